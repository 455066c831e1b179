"""Errors that stop the daemon from starting, with a message naming the config key."""


class StartupError(Exception):
    pass

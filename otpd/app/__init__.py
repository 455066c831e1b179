"""The daemon as a program: assembly, the settings root, the command line,
systemd notification, the control socket, demo mode, logging and dynamic DNS."""

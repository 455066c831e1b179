"""The wire protocol, pure: envelope and commands, response codes, signing and
the broker conventions. Shared by the daemon, `otpd broker` and the client
library; imports no I/O library and nothing from otpd above it."""

"""Who may connect: htpasswd files and the one HTTP Basic-auth parser, shared by
the REST API and `otpd broker`."""

"""Egress: the delivery channels. Each pulls jobs from the delivery engine and
hands them to a modem (sms/) or an SMTP server (email.py); none parses JSON or
touches a transport."""

"""Ingress: the REST API and the broker consumers. Each turns bytes into a command
for the service and its answer back into bytes; none touches the store or a channel."""

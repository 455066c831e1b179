"""Delivery: the durable outbox drained into channels. The engine, its pure job
queue, and the Channel contract that channels implement (they pull work)."""

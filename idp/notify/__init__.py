"""Notifications: the durable outbox and its message templates."""

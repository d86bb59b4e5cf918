"""Roles, permissions and (later) restrictions: who may do what."""

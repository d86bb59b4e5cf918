"""Importing this module registers every console area on the blueprint (one line each)."""

from admin_ui import dashboard  # noqa: F401

"""Accounts: users, roles, password hashing."""

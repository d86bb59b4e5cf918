"""Darbaza: the identity and access service of a school portal."""

__version__ = "0.1.0"

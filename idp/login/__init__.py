"""The sign-in flow."""

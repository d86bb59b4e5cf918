"""Breach reports (policy 5.2.3): contain at once, act within one working day."""

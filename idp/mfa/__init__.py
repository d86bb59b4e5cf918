"""Second factors: TOTP (replay-safe) and recovery codes."""

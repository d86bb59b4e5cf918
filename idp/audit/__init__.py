"""The append-only, hash-chained audit journal (policy 2.5, 3, 4.1)."""

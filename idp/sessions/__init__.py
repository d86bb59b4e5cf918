"""Browser sessions kept server-side in Redis."""

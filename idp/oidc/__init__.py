"""OpenID Connect provider: clients, codes, tokens, keys, endpoints."""

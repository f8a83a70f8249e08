"""Helpers for the pgguard test suite: a private PostgreSQL cluster, the gateway process,
the reference schema, a raw wire-protocol client and token crafting."""

"""The cache service: exact and semantic response cache over Redis."""

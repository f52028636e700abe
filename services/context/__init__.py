"""The context service: sessions kept in Redis and the prompts built from them."""

"""The router: the mesh's front door (auth, validation, routing, orchestration)."""

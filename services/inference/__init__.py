"""The inference service: fronts NVIDIA Triton servers over Triton's gRPC API."""

"""meshgate: an LLM gateway as a gRPC mesh (router, context, cache, inference)."""

from meshgate import tasks

# Before any service, client or test awaits anything: see keep_cancellations.
tasks.keep_cancellations()

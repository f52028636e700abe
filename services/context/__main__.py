"""``meshgate-context``: serves ContextService."""

from __future__ import annotations

import os

from services import ignore_hangup_until_serving

ignore_hangup_until_serving()

# Before numpy loads, as in services/cache/__main__.py: adaptive assembly
# multiplies a session's turn vectors (a few thousand rows) by the
# question's, and idle OpenBLAS worker threads spin on the cores the event
# loop needs (measured through gRPC on a 1,548-turn session, 2 busy cores:
# relevance scoring 7.6 ms per assembly with the default threads, 0.16 ms
# with one; AssembleContext p50 26 -> 10 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from meshgate import serving  # noqa: E402
from services.context import app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    serving.main("context", app.SERVICE_NAMES, lambda s: s.context.listen, app.setup, argv)


if __name__ == "__main__":
    main()

"""``meshgate-context``: serves ContextService."""

from __future__ import annotations

from meshgate import serving
from services.context import app


def main(argv: list[str] | None = None) -> None:
    serving.main("context", app.SERVICE_NAMES, lambda s: s.context.listen, app.setup, argv)


if __name__ == "__main__":
    main()

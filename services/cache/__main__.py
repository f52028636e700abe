import os

from services import ignore_hangup_until_serving

ignore_hangup_until_serving()

# Before numpy loads: lookups multiply at most a few thousand rows, and idle
# OpenBLAS worker threads spin on the cores the event loop needs (measured:
# 55 ms of CPU per cache miss with the default threads, 6 ms with one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from meshgate import serving  # noqa: E402
from services.cache import app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    serving.main("cache", app.SERVICE_NAMES, lambda s: s.cache.listen, app.setup, argv)


if __name__ == "__main__":
    main()

import os

# Before numpy loads: lookups multiply at most a few thousand rows, and idle
# OpenBLAS worker threads spin on the cores the event loop needs (measured:
# 55 ms of CPU per cache miss with the default threads, 6 ms with one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from meshgate import serving
from services.cache import app


def main(argv: list[str] | None = None) -> None:
    serving.main("cache", app.SERVICE_NAMES, lambda s: s.cache.listen, app.setup, argv)


if __name__ == "__main__":
    main()

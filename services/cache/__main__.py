from meshgate import serving
from services.cache import app


def main(argv: list[str] | None = None) -> None:
    serving.main("cache", app.SERVICE_NAMES, lambda s: s.cache.listen, app.setup, argv)


if __name__ == "__main__":
    main()

from meshgate import serving
from services.router import app


def main(argv: list[str] | None = None) -> None:
    serving.main("router", app.SERVICE_NAMES, lambda s: s.router.listen, app.setup, argv)


if __name__ == "__main__":
    main()

from meshgate import serving
from services.inference import app


def main(argv: list[str] | None = None) -> None:
    serving.main("inference", app.SERVICE_NAMES, lambda s: s.inference.listen, app.setup, argv)


if __name__ == "__main__":
    main()

from services import ignore_hangup_until_serving

ignore_hangup_until_serving()

from meshgate import serving  # noqa: E402
from services.inference import app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    serving.main("inference", app.SERVICE_NAMES, lambda s: s.inference.listen, app.setup, argv)


if __name__ == "__main__":
    main()

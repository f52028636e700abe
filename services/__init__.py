"""The four services, each run as ``python -m services.<name>`` or its
``meshgate-<name>`` script."""

import signal


def ignore_hangup_until_serving() -> None:
    """Called first by each service's ``__main__``, before its imports (a
    second or more): SIGHUP asks a service to reload, and its default action
    killed one started by hand (``meshgate-router``, ``python -m
    services.router``) that got it then. serving.main installs the service's
    own handler in its place; the settings are read after the imports, so
    no reload asked for is lost. (Under ``meshgate up`` the launcher ignores
    it from the exec on: meshgate/local/children.py.)"""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

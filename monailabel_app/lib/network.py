"""Where the server listens: this machine only (the loopback interface) unless ``--conf allow_remote true``.

``monailabel start_server`` listens on ``0.0.0.0`` (every interface) when ``--host`` is not given, with no
authentication. The app is built while uvicorn starts, after uvicorn has read its options and before it opens its
socket, so the app can still change the address: :func:`check_bind_address` moves MONAI Label's default to
``127.0.0.1`` and refuses to start on another address that was asked for without ``--conf allow_remote true``.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import sys
from typing import List, Optional, Sequence

logger = logging.getLogger(__name__)

#: The address the app listens on when ``--host`` is not given.
DEFAULT_HOST = "127.0.0.1"


class BindAddressError(RuntimeError):
    """The server would listen on an address other machines can reach, and that was not allowed."""


def is_loopback(host: Optional[str]) -> bool:
    """Whether ``host`` (an IP address, ``[IPv6]`` or ``localhost``) is this machine's loopback interface."""
    if not host:
        return False
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def uvicorn_configs() -> List[object]:
    """The ``uvicorn.Config`` objects of this process: the options of the server that is starting, if any."""
    try:
        from uvicorn import Config
    except ImportError:  # pragma: no cover - MONAI Label always brings uvicorn
        return []
    return [obj for obj in gc.get_objects() if isinstance(obj, Config)]


def host_given(argv: Sequence[str]) -> bool:
    """Whether the command line names the address to listen on.

    Only ``monailabel start_server`` has an address of its own (``0.0.0.0``), read with its own parser here; under
    any other command (``uvicorn monailabel.app:app ...``) the address counts as asked for.
    """
    if len(argv) < 2 or argv[1] != "start_server" or not _is_monailabel_main(argv[0]):
        return True
    try:
        from monailabel.main import Main

        parser = argparse.ArgumentParser(add_help=False)
        Main.args_start_server(Main.__new__(Main), parser)  # MONAI Label's options; Main.__init__ sets up logging
        parser.set_defaults(host=None)
        args, _ = parser.parse_known_args(list(argv[2:]))
    except (ImportError, AttributeError, SystemExit):  # another MONAI Label: count the address as asked for
        return True
    return args.host is not None


def _is_monailabel_main(program: str) -> bool:
    """Whether ``program`` (``sys.argv[0]``) is MONAI Label's command line (``python -m monailabel.main``)."""
    path = os.path.normpath(program)
    return os.path.basename(path) in ("main.py", "monailabel") and "monailabel" in path.split(os.sep)[-2:]


def _can_move(config) -> bool:
    """Whether uvicorn still opens its socket itself, after the app is built (one worker, no reloader)."""
    return getattr(config, "workers", 1) in (None, 1) and not getattr(config, "reload", False)


def refusal(host: str, port) -> str:
    """The message of a server that must not start on ``host``."""
    return (
        f"The server would listen on {host}:{port}, where other machines can reach it, and it has no "
        f"authentication. Start it with --host {DEFAULT_HOST} (this app's default), or add --conf allow_remote true "
        "to serve other machines on purpose, behind authentication (see monailabel_app/README.md, "
        "'Serving other machines')."
    )


def check_bind_address(allow_remote: bool, argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """Keep the server that is starting on the loopback interface unless ``allow_remote``.

    MONAI Label's default address (``--host`` not given) becomes :data:`DEFAULT_HOST`; an address other machines
    can reach that was asked for, or that can no longer be changed, raises :class:`BindAddressError`.

    Returns:
        The address the server will listen on, or None when no uvicorn server is starting in this process.
    """
    argv = sys.argv if argv is None else argv
    host = None
    for config in uvicorn_configs():
        if getattr(config, "uds", None) or getattr(config, "fd", None) is not None:
            continue  # a UNIX socket or an inherited one: no network address
        host = config.host
        if is_loopback(host):
            continue
        if allow_remote:
            logger.warning(f"Listening on {host}:{config.port} for other machines (--conf allow_remote true).")
            continue
        if host_given(argv) or not _can_move(config):
            logger.error(refusal(host, config.port))
            raise BindAddressError(refusal(host, config.port))
        logger.info(
            f"Listening on {DEFAULT_HOST}:{config.port}, this machine only (monailabel's default {host} is not "
            "used). To serve other machines, see monailabel_app/README.md, 'Serving other machines'."
        )
        config.host = host = DEFAULT_HOST
    return host

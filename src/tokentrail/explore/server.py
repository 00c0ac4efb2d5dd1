"""`tokentrail explore RUN_DIR`: serve the explorer on this machine (uvicorn), until Ctrl-C."""

from __future__ import annotations

import ipaddress
import socket
import webbrowser
from collections.abc import Callable
from pathlib import Path

from tokentrail.errors import TokentrailError
from tokentrail.explore.session import ExploreSession

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "is_loopback", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    """Whether `host` only ever reaches this machine (127.0.0.0/8, ::1 or a name that resolves only there)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _check_free(host: str, port: int) -> None:
    """Refuse a port something else holds with one line, before the run is read (uvicorn would exit instead)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TokentrailError(f"--host {host!r}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise TokentrailError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def serve(run_dir: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, open_browser: bool = False,
          say: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> None:
    """Open `run_dir` (refused with one line if it is not a traced run), start loading its model in the
    background and serve the page and API at http://host:port/ until interrupted."""
    import uvicorn

    from tokentrail.explore.app import create_app

    if not 0 <= port <= 65535:
        raise TokentrailError(f"--port must be 0..65535, got {port}")
    _check_free(host, port)
    session = ExploreSession(run_dir)
    if not is_loopback(host):
        warn(f"explore is bound to {host}, not only this machine: anyone who can reach it can trace prompts with "
             "your model and add them to this run")
    session.start_loading()
    config = uvicorn.Config(create_app(session), host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    say(f"exploring {session.run_dir} ({len(session.trace)} prompts) at {url}  (Ctrl-C stops)")
    if open_browser:
        webbrowser.open(url)
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn has shut down gracefully and re-raised the signal; Ctrl-C is how explore is meant to stop.
        pass
    except OSError as exc:
        raise TokentrailError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    say("explore stopped")

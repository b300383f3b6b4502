"""Running the application: settings checked, the token read, the socket bound, uvicorn started."""

from __future__ import annotations

import ctypes
import ipaddress
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ..errors import AnomapError
from .app import create_app
from .model import ServedModel

M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2
MIN_TOKEN_CHARS = 16
MAX_UPLOAD_MB = 1024
MAX_BATCH = 256
MAX_PENDING = 4096
GRACE_SECONDS = 30  # requests still running after this long at shutdown are dropped


def read_token(path: str | Path) -> str:
    """The bearer token in `path`: its content without surrounding whitespace, at least 16
    visible ASCII characters."""
    path = Path(path)
    try:
        raw = path.read_bytes()[:4096]
    except OSError as err:
        raise AnomapError(f"{path}: cannot read the token file ({err.strerror})") from None
    token = raw.decode("ascii", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise AnomapError(
            f"{path}: the token must be at least {MIN_TOKEN_CHARS} visible ASCII characters without "
            "spaces; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def exposure_warning(host: str, has_token: bool) -> str | None:
    """The warning for serving beyond this machine without a token, else None."""
    if has_token or is_loopback(host):
        return None
    return (
        f"serving on {host} without --token-file: anyone who can reach this address can use the model; "
        "add --token-file FILE or bind to 127.0.0.1"
    )


@dataclass
class Serving:
    """A bound, not yet running server (see `prepare`)."""

    server: uvicorn.Server
    sock: socket.socket
    model: ServedModel

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then finish the requests in flight and return."""
        if threading.current_thread() is not threading.main_thread():
            self.server.run(sockets=[self.sock])
            return
        # uvicorn raises the stopping signal again once it has shut down; a signal is the normal
        # way to stop this server, so it is absorbed here and the command ends normally
        previous = {sig: signal.signal(sig, _absorb) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _absorb(sig: int, frame: object) -> None:
    """A signal handler that does nothing."""


def prepare(
    model: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | Path | None = None,
    max_batch: int = 16,
    max_upload_mb: float = 20.0,
    max_pending: int | None = None,
    device: str | None = None,
    key: bytes | None = None,
) -> Serving:
    """Check the settings, load the model and bind the address (port 0: any free port).

    Raises:
        AnomapError: a setting is out of range, the token file is unusable, the model cannot be
            loaded, or the address cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise AnomapError(f"--port must be from 0 to 65535, got {port}")
    if not 1 <= max_batch <= MAX_BATCH:
        raise AnomapError(f"--max-batch must be from 1 to {MAX_BATCH}, got {max_batch}")
    max_pending = 4 * max_batch if max_pending is None else max_pending
    if not 1 <= max_pending <= MAX_PENDING:
        raise AnomapError(f"--max-pending must be from 1 to {MAX_PENDING}, got {max_pending}")
    if not 0 < max_upload_mb <= MAX_UPLOAD_MB:
        raise AnomapError(f"--max-upload-mb must be above 0 and at most {MAX_UPLOAD_MB}, got {max_upload_mb:g}")
    token = None if token_file is None else read_token(token_file)
    _limit_malloc_arenas(MALLOC_ARENAS)
    sock = _bind(host, port)
    try:
        served = ServedModel(model, device, key)
    except BaseException:
        sock.close()
        raise
    app = create_app(served, token=token, max_batch=max_batch, max_upload_mb=max_upload_mb, max_pending=max_pending)
    config = uvicorn.Config(app, timeout_graceful_shutdown=GRACE_SECONDS, server_header=False)
    return Serving(uvicorn.Server(config), sock, served)


def _limit_malloc_arenas(count: int) -> None:
    """Cap glibc's malloc arenas before the server's threads start. With one arena per thread,
    each keeps the peak of the images and batches it has held, and RSS creeps up under load
    (glass_fabric, 256 px: +42% over 500 requests; with 2 arenas +5%). A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_ARENA_MAX, count)


def _bind(host: str, port: int) -> socket.socket:
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        if sock is not None:
            sock.close()
        raise AnomapError(
            f"cannot listen on {host} port {port} ({err.strerror or err}); choose another --host or --port"
        ) from None
    return sock

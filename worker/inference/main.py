"""``lorafleet inference``: the inference server process (uvicorn), registered in the database.

The socket is bound (and listening) before the server registers its URL, so the API never finds a
URL that refuses connections; with no ``--port`` the kernel picks a free one. A heartbeat thread
reports what is loaded every few seconds (the API prefers a server already holding a request's
base model); a clean stop marks the server offline, a killed one goes offline by silence
(``STALE_LEASES`` leases, as workers do).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from importlib import metadata

from shared.config import Settings, get_settings
from shared.db import session_scope, upgrade_to_head
from shared.services import inference as registry
from shared.storage import storage_from_settings
from worker.inference.adapters import AdapterStore
from worker.inference.engine import Engine

log = logging.getLogger("lorafleet.inference")


def _version() -> str | None:
    try:
        return metadata.version("lorafleet")
    except metadata.PackageNotFoundError:
        return None


class Registration(threading.Thread):
    """Registers the server, then heartbeats until stopped; marks it offline at the end."""

    def __init__(self, server_id: str, url: str, token: str, device: str, engine: Engine) -> None:
        super().__init__(name="inference-heartbeat", daemon=True)
        self.server_id, self.url, self.token, self.device = server_id, url, token, device
        self.engine = engine
        self.period = max(0.5, min(5.0, get_settings().lease_seconds / 3))
        self._stop = threading.Event()

    def register(self) -> None:
        with session_scope() as session:
            registry.register_inference_server(
                session,
                self.server_id,
                self.url,
                socket.gethostname(),
                self.token,
                self.device,
                _version(),
            )

    def run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                names, adapters = self.engine.held()
                with session_scope() as session:
                    known = registry.heartbeat_inference_server(
                        session, self.server_id, names, adapters, self.engine.active_rows > 0
                    )
                if not known:  # the row was removed (or the database replaced): register again
                    self.register()
            except Exception:  # a database outage: keep serving, try again next period
                log.warning("inference heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self.join(timeout=10)
        try:
            with session_scope() as session:
                registry.mark_inference_server_offline(session, self.server_id)
        except Exception:
            log.warning("could not mark inference server %s offline", self.server_id)


def make_engine(settings: Settings) -> Engine:
    """An engine configured by the ``LORAFLEET_INFERENCE_*`` settings."""
    return Engine(
        memory_bytes=settings.inference_memory_bytes,
        max_batch=settings.inference_max_batch,
        batch_wait_s=settings.inference_batch_wait_ms / 1000,
        max_adapters=settings.inference_max_adapters,
        dtype=settings.inference_dtype,
    )


def bind(host: str, port: int | None) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 or None: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port or 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def advertised_url(host: str, port: int) -> str:
    """The URL other hosts reach this server at (a wildcard bind advertises the host name)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(host: str, port: int | None, advertise_url: str | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    from worker.inference.server import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head()
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    url = (advertise_url or advertised_url(host, bound)).rstrip("/")
    engine = make_engine(settings).start()
    store = AdapterStore(
        storage_from_settings(settings),
        settings.data_dir.resolve() / "inference" / "adapters",
        max_bytes=settings.inference_adapter_cache_bytes,
        in_use=engine.in_use,
    )
    token = settings.inference_api_key or secrets.token_urlsafe(32)
    app = create_app(engine, store, settings, token)
    server_id = f"inference-{os.getpid()}-{secrets.token_hex(3)}@{socket.gethostname()}"
    device = f"{engine.device.type} {str(engine.dtype).removeprefix('torch.')}"
    registration = Registration(server_id, url, token, device, engine)
    registration.register()
    registration.start()
    print(f"lorafleet inference: {url} ({device}), registered as {server_id}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        registration.stop()
        engine.stop()
        sock.close()

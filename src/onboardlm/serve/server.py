"""Run the app under uvicorn: in the foreground (``onboardlm serve``) or on a background thread.

SIGTERM (or Ctrl-C) in the foreground: ``/health`` answers 503 and new generation requests are refused
with 503 at once; uvicorn closes the listening socket and lets open requests finish for up to
``shutdown_timeout`` seconds, then cancels what is left; the engine stops and :func:`serve` returns.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from onboardlm.runtime.serving import ServingEngine


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


class _Server(uvicorn.Server):
    """uvicorn's server that first stops the engine admitting requests when told to exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: ServingEngine) -> None:
        super().__init__(config)
        self._app = app
        self._engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.draining = True
        self._engine.stop_admitting()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM start the graceful shutdown; unlike uvicorn's own, the signal is not raised
        again afterwards, so a server stopped on purpose exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _config(app: FastAPI, shutdown_timeout: float) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=max(1, round(shutdown_timeout))
    )


def serve(app: FastAPI, engine: ServingEngine, sock: socket.socket, shutdown_timeout: float = 30.0) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT; the engine runs for as long as the server does."""
    server = _Server(_config(app, shutdown_timeout), app, engine)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(timeout=0)


class BackgroundServer:
    """The app and its engine on a background thread, for tests, benchmarks and notebooks::

    with BackgroundServer(app, engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    """

    def __init__(self, app: FastAPI, engine: ServingEngine, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.engine = engine
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self._server = _Server(_config(app, 5.0), app, engine)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.engine.start()
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            self._thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.handle_exit(0, None)
        self._thread.join()
        self.engine.shutdown(timeout=0)
        self.sock.close()

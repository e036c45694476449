"""A server on a background thread of this process, for tests and benchmarks that talk to it over loopback."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from blockrag.errors import ServerStartError


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on ``host`` until the block ends (any free port if 0)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, name="blockrag-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise ServerStartError(f"the server did not start on {self.host}; see the log above.")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from pocketlm.serve import ServeConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A pocketlm server on a free 127.0.0.1 port in this process, stopped by `close`."""

    def __init__(self, cfg: ServeConfig, wait_ready: bool = True):
        self.app = create_app(cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        if wait_ready:
            self.wait_ready()

    @property
    def engine(self):
        return self.app.state.engine

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert self.engine.state != "failed", self.engine.error
            assert time.time() < deadline, "the model did not load"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve():
    """serve(**ServeConfig fields) → a RunningServer; all are stopped after the test."""
    running = []

    def start(wait_ready: bool = True, **fields):
        s = RunningServer(ServeConfig(**fields), wait_ready)
        running.append(s)
        return s
    yield start
    for s in running:
        s.close()

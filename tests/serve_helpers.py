"""A real `xiaolm serve` HTTP server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xiaolm.checkpoint import load_model
from xiaolm.config import ServeConfig

from chat_helpers import make_checkpoint

pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install 'xiaolm[serve]'")
import uvicorn  # noqa: E402

from xiaolm.serve.app import create_app  # noqa: E402


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    app: object  # the FastAPI app
    checkpoint: Path

    @property
    def server(self):
        """The xiaolm Server: engine, tokenizer, model id."""
        return self.app.state.server


@contextlib.contextmanager
def run_server(checkpoint: Path, **config) -> Iterator[Running]:
    """Serve `checkpoint` on 127.0.0.1 (a free port) until the block ends."""
    app = create_app(load_model(checkpoint, "cpu"), ServeConfig(**{"port": 0, **config}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 600  # with compile=True the decode step compiles first
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Running(f"http://127.0.0.1:{port}", app, checkpoint)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serving_checkpoint(directory: Path, tokenizer, **model_overrides) -> Path:
    """A tiny random-weight checkpoint with room for long replies."""
    return make_checkpoint(directory, tokenizer, **{"max_seq_len": 256, **model_overrides})

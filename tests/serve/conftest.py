"""A live `mplus-fast serve` on 127.0.0.1 (a free port) in a subprocess, over a tiny random
checkpoint with a trained-here tokenizer; started and stopped by the tests themselves."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from textkit import make_text_checkpoint  # noqa: E402

MODEL = "tiny-mplus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, data_dir: Path, *extra: str):
        self.ckpt, self.data_dir, self.extra = ckpt, data_dir, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 60.0) -> "Server":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "mplus_fast", "serve", str(self.ckpt), "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--model-name", MODEL, "--device", "cpu", "--threads", "1", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory) -> Path:
    return make_text_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def server(text_ckpt, tmp_path_factory):
    s = Server(text_ckpt, tmp_path_factory.mktemp("data") / "memories").start()
    yield s
    s.stop()


@pytest.fixture
def make_server(text_ckpt, tmp_path):
    started = []

    def make(*extra, data_dir=None):
        s = Server(text_ckpt, data_dir or tmp_path / "memories", *extra)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()

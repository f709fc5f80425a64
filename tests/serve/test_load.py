"""The bounded load test at CI size: concurrent clients, a fixed request count, 0 errors besides 429s."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from serve_load import run_load  # noqa: E402

from .conftest import MODEL  # noqa: E402


def test_bounded_load_has_no_errors_besides_429(make_server):
    s = make_server("--max-queue", "2").start()
    res = run_load(s.url, MODEL, clients=6, requests=30, max_tokens=8)
    assert res["errors"] == 0, res["error_samples"]
    assert res["ok"] + res["busy_429"] == 30 and res["ok"] >= 3
    assert res["latency_p50_s"] <= res["latency_p99_s"]

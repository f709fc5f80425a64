"""Soak (issue 14 item 1), CI size: bench/soak.py on all three configurations (reference, fast,
fast with the LTM bank on the host). The full run (10,000 injections each) is manual; its figures
are in bench/results/ and docs/reliability.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_ci_size(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--injections", "300", "--json", str(out),
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert r.returncode == 0 and result["failed"] == {}, json.dumps(result["failed"]) + r.stderr[-2000:]
    assert [run["config"] for run in result["runs"]] == ["reference", "fast", "fast-host"]
    for run in result["runs"]:
        assert run["injections"] == 300 and run["saves"] == 20 and run["merges"] == 75
        assert run["ltm_tokens_max"] <= run["ltm_bound"] and run["reload_continues_exactly"]
        assert run["rss_growth"] < 0.05 and run["fds_peak"] <= run["fds_after_warmup"]

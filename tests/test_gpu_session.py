"""scripts/gpu_session.sh without a GPU: its syntax, a dry run (the CPU-runnable stages for real),
and that a failing stage neither stops the later ones nor goes unreported."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def run(*args, script=SCRIPT, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True, timeout=300)


def summary(out: Path) -> dict[str, str]:
    rows = [line.split(None, 1) for line in (out / "summary.txt").read_text().splitlines()]
    return {name: rest for name, rest in rows}


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_dry_run_runs_the_cpu_stages(tmp_path):
    res = run("--dry-run", OUT=str(tmp_path), PYTHON=sys.executable)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    stages = summary(tmp_path)
    assert list(stages) == ["nvidia-smi", "versions", "build", "tests-gpu", "bench-engine", "tests-parity",
                            "bench-ops", "report"]
    assert all(stages[s].startswith("ok") for s in ("versions", "tests-gpu", "bench-engine", "report"))
    assert all(stages[s].startswith("skipped") for s in ("nvidia-smi", "build", "tests-parity", "bench-ops"))
    benches = json.loads((tmp_path / "bench-gpu.json").read_text())["benchmarks"]
    assert {b["extra_info"]["placement"] for b in benches} == {"device", "host"}
    assert "test_prefill[host]" in (tmp_path / "report.log").read_text()


def test_a_failing_stage_does_not_stop_the_next_and_fails_the_run(tmp_path):
    res = run("--dry-run", OUT=str(tmp_path), PYTHON="false")
    assert res.returncode == 1
    stages = summary(tmp_path)
    assert all(stages[s].startswith("FAILED") for s in ("versions", "tests-gpu", "bench-engine", "report"))
    assert "4 stage(s) did not pass" in res.stdout


def test_budget_spent_stages_are_reported_not_run(tmp_path):
    res = run("--dry-run", OUT=str(tmp_path), PYTHON="false", MPLUS_GPU_SESSION_BUDGET_S="0")
    assert res.returncode == 1
    assert summary(tmp_path)["bench-engine"].startswith("NOT RUN")


def test_out_defaults_to_gpu_out_in_the_repository(tmp_path):
    copy = tmp_path / "repo" / "scripts" / "gpu_session.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(SCRIPT, copy)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    res = subprocess.run(["bash", str(copy), "--dry-run"], env={**env, "PYTHON": "false"}, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert (tmp_path / "repo" / "gpu-out" / "summary.txt").is_file()


def test_unknown_argument_is_named():
    res = run("--fast")
    assert res.returncode == 2 and "--fast" in res.stderr

"""kill -9 in the middle of an injection: the restarted server has that memory as it was before
or after the injection, never corrupt. Trials: MPLUS_FAST_DURABILITY_TRIALS (CI: 4)."""
from __future__ import annotations

import os
import random
import threading
import time

import httpx

from .conftest import MODEL

TRIALS = int(os.environ.get("MPLUS_FAST_DURABILITY_TRIALS", "4"))
TEXT = "The copper key is in the old desk by the window. Call me Ishmael. " * 12
ASK = {"model": MODEL, "prompt": "Where is the copper key?", "max_tokens": 6, "temperature": 0, "memory_id": "m"}


def answer(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json=ASK, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def state(url: str) -> tuple[int, str]:
    return httpx.get(url + "/v1/memories/m").json()["injections"], answer(url)


def inject_ignoring_the_kill(url: str) -> None:
    try:
        httpx.post(url + "/v1/memories/m/inject", json={"text": TEXT}, timeout=120)
    except httpx.HTTPError:
        pass                                      # the server was killed under it


def test_kill_9_during_injection_leaves_the_memory_before_or_after(make_server, tmp_path):
    data = tmp_path / "memories"
    s = make_server(data_dir=data).start()
    httpx.post(s.url + "/v1/memories", json={"id": "m"}).raise_for_status()
    t0 = time.monotonic()
    httpx.post(s.url + "/v1/memories/m/inject", json={"text": TEXT}, timeout=120).raise_for_status()
    duration = time.monotonic() - t0
    rng = random.Random(0)
    outcomes = {"before": 0, "after": 0}
    for trial in range(TRIALS):
        before = state(s.url)
        # what "after" looks like: the same injection on a fork, completed
        httpx.post(s.url + "/v1/memories/m/fork", json={"id": "probe"}).raise_for_status()
        httpx.post(s.url + "/v1/memories/probe/inject", json={"text": TEXT}, timeout=120).raise_for_status()
        after_injections = httpx.get(s.url + "/v1/memories/probe").json()["injections"]
        after_answer = httpx.post(s.url + "/v1/completions", json={**ASK, "memory_id": "probe"}, timeout=60).json()["choices"][0]["text"]
        httpx.delete(s.url + "/v1/memories/probe").raise_for_status()
        thread = threading.Thread(target=inject_ignoring_the_kill, args=(s.url,), daemon=True)
        thread.start()
        time.sleep(rng.uniform(0.2, 1.0) * duration * 1.2)
        s.kill()                                  # SIGKILL, anywhere in the injection or its commit
        thread.join(timeout=30)
        s = make_server(data_dir=data).start()
        got = state(s.url)
        assert got in (before, (after_injections, after_answer)), (trial, before, got)
        outcomes["before" if got == before else "after"] += 1
    print(f"durability: {TRIALS} kill -9 trials, {outcomes}")
    assert not list(data.glob("*/.mplus_fast-staging-*")) and not list(data.glob("*/.mplus_fast-commit.json"))

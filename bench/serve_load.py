"""Bounded load test of `mplus-fast serve`: N concurrent clients send a fixed count of completion
requests to a live server on 127.0.0.1; reports errors (429s counted apart: the bounded queue's
expected answer), p50/p99 latency and generated tokens/s.

    python bench/serve_load.py CKPT [--clients 8] [--requests 200] [--max-tokens 16] [--max-queue 4] [--out FILE]

Starts the server itself (a free port, a temporary data dir), and stops it at the end. Without
CKPT a tiny random checkpoint with a test tokenizer is made. CI runs a small version
(tests/serve/test_load.py); figures of full runs are in bench/results/serve-load-*.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx
    prompts = ["The copper key is", "Call me Ishmael.", "Where is the lighthouse?", "Emma walked to"]

    def one(i: int):
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
        t0 = time.perf_counter()
        try:
            r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        except httpx.HTTPError as exc:
            return "error", time.perf_counter() - t0, 0, repr(exc)
        dt = time.perf_counter() - t0
        if r.status_code == 200:
            return "ok", dt, r.json()["usage"]["completion_tokens"], None
        return ("busy" if r.status_code == 429 else "error"), dt, 0, r.text[:200]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    ok = sorted(dt for kind, dt, _, _ in results if kind == "ok")
    tokens = sum(n for _, _, n, _ in results)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None  # noqa: E731
    return {"clients": clients, "requests": requests, "max_tokens": max_tokens, "ok": len(ok),
            "busy_429": sum(k == "busy" for k, *_ in results), "errors": sum(k == "error" for k, *_ in results),
            "error_samples": [m for k, _, _, m in results if k == "error"][:3],
            "latency_p50_s": pct(0.50), "latency_p99_s": pct(0.99), "latency_mean_s": statistics.fmean(ok) if ok else None,
            "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from serve.conftest import MODEL, Server
    from textkit import make_text_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.ckpt) if a.ckpt else make_text_checkpoint(Path(tmp) / "ckpt")
        server = Server(ckpt, Path(tmp) / "memories", "--max-queue", str(a.max_queue), "--threads", str(a.threads)).start()
        try:
            res = run_load(server.url, MODEL, a.clients, a.requests, a.max_tokens)
        finally:
            server.stop()
    res.update({"max_queue": a.max_queue, "checkpoint": str(a.ckpt or "tiny random M+ (tests/textkit.py)"),
                "machine": f"{platform.machine()}, {platform.python_version()}", "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()

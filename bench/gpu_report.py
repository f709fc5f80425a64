"""One line per benchmark of pytest-benchmark JSON files: median, and the targets and peaks that
bench_gpu_engine.py records. For the end of a GPU session log, where only the tail is read.

    python -m bench.gpu_report gpu-out/bench-gpu.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("achieved_tflops", "achieved_gbps", "per_token_ms_with_prefill", "decode_per_token_ms", "capture_s",
        "captures_while_timing", "peak_gpu_gb", "resident_gpu_gb",
        "build_peak_gpu_gb", "build_s")


def line(bench: dict) -> str:
    info = bench.get("extra_info", {})
    parts = [f"{bench['name']:<44}", f"median {bench['stats']['median'] * 1e3:9.3f} ms"]
    for name, t in info.get("targets", {}).items():
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        parts.append(f"{name} {value} (target ≤ {t['target']} {t['unit']}: {met})")
    parts += [f"{k} {info[k]:.3g}" for k in KEYS if isinstance(info.get(k), (int, float))]
    return "  ".join(parts)


def report(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path}: not written (its stage failed or did not run)"]
    data = json.loads(path.read_text())
    info = data.get("machine_info", {})
    head = f"{path}: {len(data.get('benchmarks', []))} benchmarks, {info.get('node', '?')}, python {info.get('python_version', '?')}"
    return [head] + [line(b) for b in data.get("benchmarks", [])]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for arg in argv:
        print("\n".join(report(Path(arg))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

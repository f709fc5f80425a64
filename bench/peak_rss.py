"""Peak resident memory of each backend, each in a fresh process (so neither sees the other's
allocations): build the model, prefill a 128-token prompt, decode 8 tokens, inject 512 tokens.

    python -m bench.peak_rss [--size mid|small]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import os, resource, json, torch
os.environ["MPLUS_FAST_BENCH_SIZE"] = {size!r}
from bench.bench_engine import config, LTM
from mplus_fast.model import MPlus
from mplus_fast.testing import random_tensors
cfg = config()
tensors = random_tensors(cfg, seed=0, ltm_size=LTM, weight_std=0.02)
after_tensors = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = MPlus(cfg, tensors, backend={backend!r}, seed=0)
del tensors
ids = torch.randint(3, cfg.vocab_size, (1, 128))
model.generate(ids, max_new_tokens=8, eos_token_id=[])
model.inject_memory(torch.randint(3, cfg.vocab_size, (1, 512)), update_memory=True)
print(json.dumps({{"backend": {backend!r}, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_random_tensors_mb": after_tensors / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="mid", choices=["mid", "small"])
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for backend in ("reference", "fast"):
        out = subprocess.run([sys.executable, "-c", CHILD.format(size=args.size, backend=backend)], cwd=root,
                             capture_output=True, text=True, check=True)
        print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()

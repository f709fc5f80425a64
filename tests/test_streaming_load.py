"""Streaming load: each checkpoint tensor is read, checked, converted and placed before the next
one is read, so loading a float32 checkpoint in bfloat16 never holds the float32 copy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mplus_fast
from mplus_fast import checkpoint
from mplus_fast.loading import Placement
from mplus_fast.safetensors_header import read_header
from mplus_fast.testing import make_random_checkpoint

# ≈ 390 MB of float32 on disk: 4 layers of d 1,024 / MLP 2,816, an 8,000-token vocabulary, an STM
# of 1,280 and an LTM of 8,000 rows per layer (the largest tensors: ltm.i, 32.8 MB each). The
# memory is about a third of the file, as at the CPU-mid geometry: a loader that copies the
# loaded memory rows into the store while still holding them (≈ 1.3-1.4 x kept) fails the bound.
GEOMETRY = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                intermediate_size=2816, vocab_size=8_000, num_tokens=64, num_blocks=30, num_ltm_blocks=10,
                selector_hidden_dim=64, update_ltm_frequency=60, initial_rf_when_moving_stm_to_ltm=10,
                lora_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "inference_mode": True,
                             "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]})

CHILD = r"""
import json, resource, sys
import torch, mplus_fast

def rss():                      # resident set size now, bytes (Linux: /proc/self/statm, in pages)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

base = rss()
model = mplus_fast.load(sys.argv[1], dtype=torch.bfloat16, tokenizer=None, backend=sys.argv[2])
after = rss()
with open("/proc/self/status") as f:  # VmHWM: this process's peak RSS (not ru_maxrss: see the test)
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024
seen, kept_tensors = set(), 0                                          # bytes of the model's own storages
def walk(obj, depth=0):
    global kept_tensors
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr()); kept_tensors += s.nbytes()
    elif isinstance(obj, (list, tuple)):
        for x in obj: walk(x, depth)
    elif isinstance(obj, dict):
        for x in obj.values(): walk(x, depth)
    elif depth < 6 and hasattr(obj, "__dict__") and not isinstance(obj, type):
        for x in vars(obj).values(): walk(x, depth + 1)
walk(model)
print(json.dumps({"base": base, "after": after, "peak": peak, "kept_tensors": kept_tensors}))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", ltm_size=8000, weight_std=0.02, **GEOMETRY)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_peak_host_memory_while_loading_is_what_the_model_keeps_plus_one_tensor(big_ckpt, backend):
    """Load the ≈ 390 MB float32 checkpoint in bfloat16 in a fresh process and compare its peak
    resident memory with what the loaded model keeps (each backend keeps other things: the fast
    one its merged weights and the memory's K/V, computed while loading).

    The measure: `base` is the child's RSS once torch and mplus_fast are imported (the import-time
    baseline, before anything is read); `kept` = RSS after the load − base (everything the model
    holds: weights, merged copies, memory, plus allocator slack); `peak` = VmHWM − base, the
    most the load ever held beyond the baseline (VmHWM, the high-water mark of the process's own
    address space; not ru_maxrss, into which Linux folds the parent's peak when the child is
    spawned by vfork + exec, as subprocess does: a test process that just wrote the checkpoint
    would inflate it). The file is read with positioned reads, never
    mapped, so its page cache does not count against the process. The bound: peak ≤ 1.10 · kept
    + one tensor (the largest float32 tensor of the file, the buffer it is read into before its
    conversion). The old loader held every float32 tensor (≈ 2 × kept) until the model was built;
    a store that copies the loaded memory rows instead of keeping them held the memory twice.
    `kept` is also checked against the bytes of the model's own tensors, so a bloated RSS after
    the load cannot make the bound easy: for that the child runs glibc's malloc with a fixed mmap
    threshold (MALLOC_MMAP_THRESHOLD_), so every freed buffer above 128 KiB goes back to the
    system at once (by default the threshold adapts upwards and freed read buffers linger in the
    heap, which inflates RSS after the load by ≈ 20 % here and would loosen the bound)."""
    largest = max(info.nbytes for info in read_header(big_ckpt / "model.safetensors").tensors.values())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(big_ckpt), backend], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    kept, peak = r["after"] - r["base"], r["peak"] - r["base"]
    mb = lambda x: f"{x / 1e6:.0f} MB"
    detail = f"{backend}: peak {mb(peak)}, kept {mb(kept)} (tensors {mb(r['kept_tensors'])}), largest tensor {mb(largest)}"
    print(detail)
    assert kept <= 1.15 * r["kept_tensors"], detail
    assert peak <= 1.10 * kept + largest, detail


def test_streamed_tensors_arrive_converted_and_in_place(tiny_ckpt):
    """Each tensor is converted as it is read: the loaded dict already holds the compute dtype for
    weights and memory rows, and the small exact tensors (ages, counters) as stored."""
    config, ref = checkpoint.load_checkpoint(tiny_ckpt)
    place = lambda c: Placement(c, torch.device("cpu"), torch.bfloat16).convert
    _, t = checkpoint.load_checkpoint(tiny_ckpt, place)
    assert set(t) == set(ref)
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["memory"].dtype == torch.bfloat16 and t["ltm.0"].dtype == torch.bfloat16
    assert t["ltm_ages.0"].dtype == ref["ltm_ages.0"].dtype == torch.float32
    assert torch.equal(t["ltm_ages.0"], ref["ltm_ages.0"])
    assert torch.equal(t["model.norm.weight"], ref["model.norm.weight"].to(torch.bfloat16))


def test_streamed_load_matches_the_model_built_from_the_same_tensors(tiny_ckpt):
    """from_pretrained (streamed, converted while reading) and MPlus(config, tensors) built from
    the float32 tensors give the same logits, bit for bit."""
    config, tensors = checkpoint.load_checkpoint(tiny_ckpt)
    a = mplus_fast.MPlus(config, tensors, dtype=torch.bfloat16, seed=0)
    b = mplus_fast.load(tiny_ckpt, dtype=torch.bfloat16, seed=0, tokenizer=None)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_file_truncated_while_reading_is_one_clear_error(tiny_ckpt, tmp_path, monkeypatch):
    """The headers are checked against the files first; a file that shrinks after that check is
    reported naming it, not read past its end."""
    import shutil
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    infos, headers = checkpoint.read_headers(out)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(checkpoint.CheckpointError, match="truncated while it was read"):
        checkpoint.read_tensors(out, infos, headers)


def test_options_are_checked_before_anything_is_read(tiny_ckpt, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a tensor was read before the options were checked")
    monkeypatch.setattr(checkpoint, "read_tensor_data", refuse)
    with pytest.raises(ValueError, match="ltm_placement"):
        mplus_fast.load(tiny_ckpt, ltm_placement="disk")
    with pytest.raises(ValueError, match="float64"):
        mplus_fast.load(tiny_ckpt, dtype=torch.float64)


def test_the_low_memory_preset_places_the_bank_on_the_host(tiny_ckpt):
    model = mplus_fast.load(tiny_ckpt, preset="low-memory", tokenizer=None)
    assert model.ltm_placement == "host" and model.dtype == torch.bfloat16
    assert mplus_fast.load(tiny_ckpt, preset="low-memory", dtype="bfloat16", tokenizer=None).dtype == torch.bfloat16


def test_a_preset_contradicted_by_an_explicit_option_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match=r"preset='low-memory' sets ltm_placement='host', but ltm_placement='device'"):
        mplus_fast.load(tiny_ckpt, preset="low-memory", ltm_placement="device")
    with pytest.raises(ValueError, match=r"preset='tiny' is not one of \['low-memory'\]"):
        mplus_fast.load(tiny_ckpt, preset="tiny")

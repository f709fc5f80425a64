"""Fuzzing with Hypothesis (issue 14 item 3): config parsing, checkpoint loading, token ids,
masks and generation arguments. Every failure must be a clear exception (ConfigError,
CheckpointError, ValueError, TypeError, FileNotFoundError) that names the field, tensor, file or
argument; never another exception, a crash or a hang (a deadline per example); never silent
acceptance (a checkpoint that loads holds exactly the tensors that were saved); and the model's
memory is unchanged after any rejected call.

Profiles: CI size by default (derandomized, a few hundred examples per target, ~1 minute);
`MPLUS_FAST_FUZZ=full` runs 10× more with random seeds. Run with `--hypothesis-show-statistics`
to see the examples tried per target (docs/reliability.md has the full run's figures).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mplus_fast  # noqa: E402
from mplus_fast import CheckpointError, ConfigError  # noqa: E402
from mplus_fast.checkpoint import INDEX, load_checkpoint  # noqa: E402
from mplus_fast.checkpoint_checks import expected_layout, together  # noqa: E402
from mplus_fast.config import MPlusConfig  # noqa: E402
from mplus_fast.hf.options import DEFAULT_MAX_NEW_TOKENS  # noqa: E402
from mplus_fast.testing import TINY_MPLUS, _config_dict, make_random_checkpoint  # noqa: E402

FULL = os.environ.get("MPLUS_FAST_FUZZ") == "full"
SCALE = 10 if FULL else 1
COMMON = dict(deadline=10_000, database=None, derandomize=not FULL, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])


def fuzz(n: int):
    return settings(max_examples=n * SCALE, **COMMON)


CLEAR = (ConfigError, CheckpointError, ValueError, TypeError, FileNotFoundError)

# ---------------------------------------------------------------------- config parsing
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, -1, 2**31, 10**6]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=8)
BASE = _config_dict({})
FIELDS = sorted(BASE) + ["num_key_value_heads", "head_dim", "rope_scaling", "tie_word_embeddings", "pad_token_id",
                         "add_encoder_retriever", "add_decoder_lora", "num_selector_layers"]
NESTED = {"lora_config": ["r", "lora_alpha", "target_modules"],
          "rope_scaling": ["type", "rope_type", "factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"]}


@st.composite
def config_edits(draw):
    """A valid tiny config with one to three fields deleted, retyped or set out of range."""
    raw = json.loads(json.dumps(BASE))
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS + [f"{k}.{s}" for k, ss in NESTED.items() for s in ss]))
        action = draw(st.sampled_from(["delete", "value", "value"]))
        parent, leaf = raw, key
        if "." in key:
            top, leaf = key.split(".")
            if not isinstance(raw.get(top), dict):
                raw[top] = {"type": "linear", "factor": 2.0} if top == "rope_scaling" else {"r": 4, "lora_alpha": 8}
            parent = raw[top]
        if action == "delete":
            parent.pop(leaf, None)
        else:
            parent[leaf] = draw(json_values)
        touched.append(key.split(".")[0])
    return raw, touched


def names_a_field(message: str, touched: list[str]) -> bool:
    known = set(FIELDS) | set(NESTED) | {"architectures", "model_type", "config.json"}
    return any(t in message for t in touched) or any(f"{k}=" in message or f"'{k}'" in message for k in known)


@fuzz(400)
@given(config_edits())
def test_fuzz_config_parsing(edit):
    raw, touched = edit
    try:
        cfg = MPlusConfig.from_dict(raw)
    except ConfigError as exc:
        assert names_a_field(str(exc), touched), f"{exc} (touched {touched})"
        event("refused: ConfigError")
        return
    event("accepted")
    # Accepted: the sizes it implies are sane and it survives a round trip.
    again = MPlusConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(cfg.to_dict(), sort_keys=True)
    assert cfg.stm_size > 0 and cfg.head_dim % 2 == 0 and cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_hidden_layers <= 1024 and cfg.vocab_size <= 2**24


# ---------------------------------------------------------------------- checkpoint loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint saved by mplus_fast (so with checksums), after some injections."""
    src = make_random_checkpoint(tmp_path_factory.mktemp("src") / "c", seed=4)
    model = mplus_fast.load(src, seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        model.inject_memory(torch.randint(3, 96, (1, 20), generator=g), update_memory=True)
    folder = model.save_pretrained(tmp_path_factory.mktemp("saved") / "c")
    _, tensors = load_checkpoint(folder)
    return folder, tensors


def fresh_copy(saved, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("case") / "c"
    shutil.copytree(saved[0], out)
    return out


def check_load(folder: Path, reference: dict[str, torch.Tensor]) -> str:
    """Load `folder`: a clear error naming a file, field or tensor, or exactly the saved tensors."""
    try:
        _, tensors = load_checkpoint(folder)
    except CLEAR as exc:
        msg = str(exc)
        assert any(s in msg for s in ("config.json", ".safetensors", INDEX, "tensor", "generation_config")), msg
        event(f"refused: {type(exc).__name__}")
        return type(exc).__name__
    assert tensors.keys() == reference.keys(), "a corrupted checkpoint loaded with other tensors"
    for k, v in reference.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), f"{k} changed but the checkpoint loaded"
    event("loaded, tensors identical to those written")
    return "identical"


@fuzz(150)
@given(data=st.data())
def test_fuzz_truncated_and_bit_flipped_files(saved, tmp_path_factory, data):
    folder = fresh_copy(saved, tmp_path_factory)
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        header_len = int.from_bytes(raw[:8], "little")
        in_header = data.draw(st.booleans(), label="in header")
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            pos = data.draw(st.integers(0, 8 + header_len - 1) if in_header else st.integers(0, len(raw) - 1), label="at")
            raw[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    f.write_bytes(bytes(raw))
    check_load(folder, saved[1])


TENSOR_EDITS = st.sampled_from(["nan", "inf", "dtype", "shape", "drop", "extra", "scalar"])


@fuzz(150)
@given(data=st.data())
def test_fuzz_tensor_edits(saved, tmp_path_factory, data):
    from safetensors.torch import load_file, save_file
    folder = fresh_copy(saved, tmp_path_factory)
    f = folder / "model.safetensors"
    t = load_file(str(f))
    name = data.draw(st.sampled_from(sorted(t)), label="tensor")
    edit = data.draw(TENSOR_EDITS, label="edit")
    x = t[name]
    if edit in ("nan", "inf"):
        assume(x.dtype.is_floating_point and x.numel() > 0)
        x = x.clone()
        x.view(-1)[data.draw(st.integers(0, x.numel() - 1))] = float(edit) * data.draw(st.sampled_from([1, -1]))
    elif edit == "dtype":
        x = x.to(data.draw(st.sampled_from([torch.int32, torch.float16, torch.uint8, torch.bool, torch.float64])))
    elif edit == "shape":
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
        x = torch.zeros(shape)
    elif edit == "drop":
        del t[name]
        x = None
    elif edit == "extra":
        name = data.draw(st.sampled_from(["model.layers.9.mlp.x", "ltm.7", "mplus_fast.new", "memory_ages.5", "bos"]))
        x = torch.zeros(3)
    else:
        x = torch.tensor(data.draw(st.integers(-5, 5)))
    if x is not None:
        t[name] = x
    save_file({k: v.contiguous() for k, v in t.items()}, str(f))   # another tool: no checksums
    outcome = check_load(folder, t)   # if it loads, it holds exactly what was written
    if edit in ("nan", "inf", "extra"):
        assert outcome != "identical", f"{edit} on {name} was accepted"
    if edit == "drop" and outcome == "identical":   # only an optional tensor may be left out
        config = MPlusConfig.from_file(folder / "config.json")
        spec = expected_layout(config, {k: tuple(v.shape) for k, v in saved[1].items()})[name]
        assert not spec.required, f"required tensor {name} dropped but the checkpoint loaded"
        assert not any(name in g for g in together(config)), f"{name} dropped without its partner"


@fuzz(100)
@given(data=st.data())
def test_fuzz_index_files(saved, tmp_path_factory, data):
    folder = fresh_copy(saved, tmp_path_factory)
    from safetensors.torch import load_file
    names = list(load_file(str(folder / "model.safetensors")))
    target = data.draw(st.one_of(st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd",
                                                  "sub/../../x.safetensors", "", ".", "model.safetensors/..",
                                                  "C:\\x.safetensors", "missing.safetensors"]), st.text(max_size=12)))
    weight_map = {n: target for n in names}
    if data.draw(st.booleans(), label="drop an entry"):
        weight_map.pop(data.draw(st.sampled_from(names)))
    body = data.draw(st.sampled_from(["map", "junk", "list"]), label="body")
    text = {"map": json.dumps({"weight_map": weight_map}), "junk": "{\"weight_map\": ", "list": "[]"}[body]
    (folder / INDEX).write_text(text)
    outcome = check_load(folder, saved[1])
    if outcome == "identical":
        assert target == "model.safetensors" and body == "map"


@fuzz(150)
@given(config_edits())
def test_fuzz_config_of_a_saved_checkpoint(saved, tmp_path_factory, edit):
    raw, _ = edit
    folder = fresh_copy(saved, tmp_path_factory)
    cfg = json.loads((folder / "config.json").read_text())
    base = _config_dict({})
    for k in set(base) | set(raw):   # apply the same edit to the saved config
        if k not in raw:
            cfg.pop(k, None)
        elif raw[k] != base.get(k):
            cfg[k] = raw[k]
    (folder / "config.json").write_text(json.dumps(cfg, allow_nan=True))
    check_load(folder, saved[1])


# ---------------------------------------------------------------------- ids, masks, generation
@pytest.fixture(scope="module", params=["reference", "fast"])
def model(request, tmp_path_factory):
    return mplus_fast.load(make_random_checkpoint(tmp_path_factory.mktemp("m") / "c", seed=2), seed=0,
                           backend=request.param)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_tensors().items() if not k.endswith("generator_state")}


def unchanged(m, before) -> bool:
    after = snapshot(m)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8]


@st.composite
def id_tensors(draw):
    kind = draw(st.sampled_from(["good", "good", "dtype", "shape", "values", "list", "meta"]))
    B, n = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    low = draw(st.sampled_from([3, 0, -3]))
    high = draw(st.sampled_from([96, 97, 200]))
    values = draw(st.lists(st.integers(low, high - 1), min_size=B * n, max_size=B * n))
    x = torch.tensor(values).view(B, n)
    if kind == "good":
        return x.clamp(3, 95).to(draw(st.sampled_from(INT_DTYPES[:2])))
    if kind == "dtype":
        return x.to(draw(st.sampled_from([torch.float32, torch.bool, torch.complex64, torch.float16])))
    if kind == "shape":
        target = draw(st.sampled_from([(1, 1, B * n), (B * n, 1, 1), (0,), (B, 0)]))
        return torch.zeros(target, dtype=torch.long) if 0 in target else x.reshape(target)
    if kind == "values":
        return x
    if kind == "list":
        return values
    return x.to("meta")


@st.composite
def masks(draw, shape):
    kind = draw(st.sampled_from(["none", "ones", "left", "random", "shape", "values"]))
    B, n = shape
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(B, n, dtype=torch.long)
    if kind == "left":
        pads = draw(st.lists(st.integers(0, n), min_size=B, max_size=B))
        return torch.tensor([[0] * p + [1] * (n - p) for p in pads])
    if kind == "random":
        return torch.tensor(draw(st.lists(st.integers(0, 1), min_size=B * n, max_size=B * n))).view(B, n)
    if kind == "shape":
        return torch.ones(B, n + draw(st.integers(1, 3)))
    return torch.tensor(draw(st.lists(st.sampled_from([0, 1, 2, -1]), min_size=B * n, max_size=B * n))).view(B, n).float()


NAMES = ("input_ids", "context_ids", "attention_mask", "update_memory", "retrieve", "max_new_tokens", "do_sample",
         "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


def run_call(m, call, *args, **kwargs):
    before = snapshot(m)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert any(n in str(exc) for n in NAMES), f"the message names no argument: {exc}"
        assert unchanged(m, before), f"a rejected call changed the memory: {exc}"
        event(f"refused: {type(exc).__name__}, memory unchanged")
        return None
    event("accepted")
    return out, before


@fuzz(200)
@given(data=st.data())
def test_fuzz_ids_and_masks(model, data):
    x = data.draw(id_tensors(), label="ids")
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) and x.dim() == 2 and x.device.type == "cpu" else (1, 5)
    mask = data.draw(masks(shape), label="mask")
    call = data.draw(st.sampled_from(["forward", "inject", "inject_update"]), label="call")
    if call == "forward":
        res = run_call(model, model, x, attention_mask=mask)
        if res:
            out, before = res
            assert out.logits.shape[:2] == shape and torch.isfinite(out.logits).all()
            assert unchanged(model, before), "a read changed the memory"
    else:
        update = call == "inject_update"
        res = run_call(model, model.inject_memory, x, update_memory=update, attention_mask=mask)
        if res and not update:
            assert unchanged(model, res[1]), "inject_memory(update_memory=False) changed the memory"


@fuzz(150)
@given(data=st.data())
def test_fuzz_generation_arguments(model, data):
    any_value = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=True), st.text(max_size=3),
                          st.lists(st.integers(-1, 100), max_size=3))
    kwargs = {}
    for name, good in (("max_new_tokens", st.integers(0, 6)), ("do_sample", st.booleans()),
                       ("temperature", st.floats(0.1, 2.0)), ("top_k", st.one_of(st.none(), st.integers(0, 50))),
                       ("top_p", st.one_of(st.none(), st.floats(0.05, 1.0))), ("eos_token_id", st.none()),
                       ("pad_token_id", st.none()), ("retrieve", st.booleans())):
        choice = data.draw(st.sampled_from(["skip", "good", "good", "any"]), label=name)
        if choice != "skip":
            kwargs[name] = data.draw(good if choice == "good" else any_value, label=f"{name} value")
    k = kwargs.setdefault("max_new_tokens", 4)
    if isinstance(k, int) and not isinstance(k, bool) and k > 6:
        kwargs["max_new_tokens"] = 6   # keep each example short
    x = torch.randint(3, 96, (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 8))))
    res = run_call(model, model.generate, x, **kwargs)
    if res:
        out, before = res
        k = kwargs["max_new_tokens"] if kwargs["max_new_tokens"] is not None else DEFAULT_MAX_NEW_TOKENS
        assert out.shape[0] == x.shape[0] and x.shape[1] <= out.shape[1] <= x.shape[1] + k
        assert int(out.min()) >= 0 and int(out.max()) < 96
        assert unchanged(model, before), "generate changed the memory"

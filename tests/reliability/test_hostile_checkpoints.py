"""Checkpoints from elsewhere cannot do harm (issue 14 items 1 and 4): index paths confined to the
folder, headers checked before anything is allocated, absurd configs refused at once, broken
files and non-finite values refused with the file, field or tensor named, nothing unpickled."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mplus_fast
from mplus_fast import CheckpointError, ConfigError, checkpoint
from mplus_fast.checkpoint import INDEX
from mplus_fast.cli import app

PACKAGE = Path(mplus_fast.__file__).parent


def edit(ckpt: Path, tensors=None, config=None) -> Path:
    """Rewrite the tiny checkpoint's tensors and/or config in place (as another tool would: no checksums)."""
    if tensors:
        t = load_file(str(ckpt / "model.safetensors"))
        tensors(t)
        save_file(t, str(ckpt / "model.safetensors"))
    if config:
        cfg = json.loads((ckpt / "config.json").read_text())
        config(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def no_tensor_is_read(monkeypatch):
    """Fail the test if any tensor's data is read (the refusal must come first)."""
    def refuse(*a, **k):
        raise AssertionError("a tensor was read before the checkpoint was refused")
    monkeypatch.setattr(checkpoint, "read_tensor_data", refuse)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    text = " ".join(lines)
    for n in needles:
        assert n in text, result.output


# ---------------------------------------------------------------------- index files
@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors",
                                   "sub/../../elsewhere.safetensors", "..\\elsewhere.safetensors", "config.json"])
def test_index_paths_are_confined_to_the_folder(tiny_ckpt, tmp_path, monkeypatch, shard):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny_ckpt / "model.safetensors", outside)   # a loadable file, outside the folder
    names = load_file(str(outside)).keys()
    (tiny_ckpt / "model.safetensors").unlink()
    (tiny_ckpt / INDEX).write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    no_tensor_is_read(monkeypatch)
    with pytest.raises(CheckpointError, match=r"inside the checkpoint folder"):
        mplus_fast.load(tiny_ckpt)


def test_a_shard_holding_a_tensor_the_index_places_elsewhere_is_refused(tiny_model, tmp_path):
    target = tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((target / INDEX).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    index["weight_map"][name] = other
    (target / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"holds tensor '{name}', which .* places in '{other}'"):
        mplus_fast.load(target)


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ("[1, 2]", "weight_map"),
                                        ('{"weight_map": {"a": 3}}', "weight_map"), ('{"weight_map": {}}', "empty")])
def test_a_broken_index_is_named(tiny_ckpt, text, match):
    (tiny_ckpt / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=match) as e:
        mplus_fast.load(tiny_ckpt)
    assert INDEX in str(e.value)


# ---------------------------------------------------------------------- headers before allocation
def test_a_header_claiming_absurd_shapes_is_refused_unallocated(tiny_ckpt, monkeypatch):
    f = tiny_ckpt / "model.safetensors"
    huge = 10**12 * 4096 * 4
    raw_safetensors(f, {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**12, 4096],
                                                      "data_offsets": [0, huge]}}, b"\0" * 64)
    no_tensor_is_read(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*describes 16,384,000,000,000,000 bytes.*holds 64"):
        mplus_fast.load(tiny_ckpt)
    assert time.perf_counter() - t0 < 2


def test_a_shape_that_does_not_match_its_bytes_is_refused(tiny_ckpt, monkeypatch):
    raw_safetensors(tiny_ckpt / "model.safetensors",
                    {"memory": {"dtype": "F32", "shape": [2, 16, 48], "data_offsets": [0, 64]}}, b"\0" * 64)
    no_tensor_is_read(monkeypatch)
    with pytest.raises(CheckpointError, match=r"tensor 'memory': shape \(2, 16, 48\) of F32 needs 6,144 bytes"):
        mplus_fast.load(tiny_ckpt)


def test_tensor_shapes_are_checked_against_the_config_before_any_is_read(tiny_ckpt, monkeypatch):
    edit(tiny_ckpt, tensors=lambda t: t.__setitem__("ltm.1", torch.zeros(7, 49)))
    no_tensor_is_read(monkeypatch)
    with pytest.raises(CheckpointError, match=r"'ltm.1' has shape \(7, 49\), expected \(7, 48\)"):
        mplus_fast.load(tiny_ckpt)


@pytest.mark.parametrize("header,match", [
    ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, "dtype 'F4' is not supported"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [1]}}, "exactly dtype, shape and data_offsets"),
    ({"__metadata__": {"k": 1}}, "__metadata__"),
])
def test_malformed_headers_are_named(tmp_path, header, match):
    from mplus_fast.safetensors_header import HeaderError, read_header
    f = raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(HeaderError, match=match) as e:
        read_header(f)
    assert str(f) in str(e.value)


def test_duplicate_names_in_a_header_are_refused(tmp_path):
    from mplus_fast.safetensors_header import HeaderError, read_header
    text = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0")
    with pytest.raises(HeaderError, match="names 'a' twice"):
        read_header(f)


# ---------------------------------------------------------------------- broken files
@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000, -1])
def test_a_truncated_file_is_one_clear_error(tiny_ckpt, keep):
    f = tiny_ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        mplus_fast.load(tiny_ckpt)
    assert "truncated" in str(e.value) or "not valid JSON" in str(e.value)
    assert_one_error_line(cli("inspect", tiny_ckpt), "model.safetensors")
    assert_one_error_line(cli("generate", tiny_ckpt, "--ids", "5,6,7"), "model.safetensors")


def test_a_flipped_header_bit_is_one_clear_error(tiny_ckpt):
    f = tiny_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    pos = data.index(b'"shape":[') + 9
    data[pos] ^= 0x01   # a digit of the first shape changes
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors|has shape"):
        mplus_fast.load(tiny_ckpt)


def test_a_flipped_data_bit_in_a_saved_checkpoint_fails_its_checksum(tiny_model, tmp_path):
    target = tiny_model.save_pretrained(tmp_path / "saved")
    f = target / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10   # inside the last tensor's bytes: the header cannot tell
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match the checksum it was saved with") as e:
        mplus_fast.load(target)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("name,value", [("model.layers.0.self_attn.o_proj.weight", float("nan")),
                                        ("memory", float("inf")), ("ltm.1", float("-inf")),
                                        ("ltm_recall_frequencies.0", float("nan")),
                                        ("lm_head.weight", float("nan"))])
def test_non_finite_weights_and_memory_are_refused_by_name(tiny_ckpt, name, value):
    def poison(t):
        t[name].view(-1)[t[name].numel() // 2] = value
    edit(tiny_ckpt, tensors=poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .*holds {value} at index"):
        mplus_fast.load(tiny_ckpt)


def test_non_finite_memory_in_bf16_is_refused(tiny_ckpt):
    def poison(t):
        t["memory"] = t["memory"].bfloat16()
        t["memory"][1, 3, 5] = float("nan")
    edit(tiny_ckpt, tensors=poison)
    with pytest.raises(CheckpointError, match=r"'memory' .*nan at index \(1, 3, 5\)"):
        mplus_fast.load(tiny_ckpt)


@pytest.mark.parametrize("name,tensor,match", [
    ("model.norm.weight", torch.ones(48, dtype=torch.int32), "dtype int32, expected a floating-point dtype"),
    ("update_step", torch.tensor(1.5), "dtype float32, expected an integer dtype"),
    ("update_step", torch.tensor(-4), "must be non-negative"),
    ("ltm_ages.0", -torch.ones(10), "negative age"),
    ("mplus_fast.stm_slots", torch.zeros(2, 16, dtype=torch.int64), "not a permutation"),
    ("mplus_fast.stm_provenance", torch.full((2, 16), 7), "injection ids in \\[7, 7\\]"),
    ("mplus_fast.generator_state", torch.zeros(12, dtype=torch.uint8), "not a state of torch's CPU generator"),
    ("initialized", torch.tensor(3), "must be 0 or 1"),
    ("mplus_fast.something_new", torch.zeros(1), "unexpected tensor 'mplus_fast.something_new'"),
])
def test_invalid_state_tensors_are_refused_by_name(tiny_ckpt, name, tensor, match):
    edit(tiny_ckpt, tensors=lambda t: t.__setitem__(name, tensor))
    with pytest.raises(CheckpointError, match=match):
        mplus_fast.load(tiny_ckpt)


# ---------------------------------------------------------------------- configs
def test_absurd_config_sizes_are_refused_at_once_with_the_field_named(tiny_ckpt, monkeypatch):
    edit(tiny_ckpt, config=lambda c: c.__setitem__("num_hidden_layers", 10**6))
    no_tensor_is_read(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config.json: num_hidden_layers=1000000 is out of range"):
        mplus_fast.load(tiny_ckpt)
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("missing", ["num_tokens", "num_blocks", "num_ltm_blocks", "architectures", "selector_hidden_dim"])
def test_a_missing_geometry_field_is_named_not_a_tensor_shape(tiny_ckpt, missing):
    edit(tiny_ckpt, config=lambda c: c.pop(missing))
    with pytest.raises(ConfigError, match=rf"required field '{missing}' is missing") as e:
        mplus_fast.load(tiny_ckpt)
    assert "shape" not in str(e.value)


def test_a_shape_error_names_the_defaulted_fields(tiny_ckpt):
    edit(tiny_ckpt, config=lambda c: c.pop("num_key_value_heads"))   # GQA tensors, MHA default
    with pytest.raises(CheckpointError, match=r"config.json does not set .*num_key_value_heads"):
        mplus_fast.load(tiny_ckpt)


@pytest.mark.parametrize("text", ["{", "[" * 100_000 + "]" * 100_000, "[]", '"MPlus"'])
def test_unparseable_configs_are_named(tiny_ckpt, text):
    (tiny_ckpt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json"):
        mplus_fast.load(tiny_ckpt)


def test_a_huge_config_file_is_not_read(tiny_ckpt):
    with open(tiny_ckpt / "config.json", "ab") as f:
        f.truncate(64 * 2**20)   # sparse: no disk used
    with pytest.raises(ConfigError, match="is not a config.json"):
        mplus_fast.load(tiny_ckpt)


@pytest.mark.parametrize("gen,match", [("{", "not valid JSON"), ('{"eos_token_id": 500}', "eos_token_id=500"),
                                       ('{"pad_token_id": "x"}', "pad_token_id"), ("[1]", "JSON object")])
def test_a_broken_generation_config_is_named(tiny_ckpt, gen, match):
    (tiny_ckpt / "generation_config.json").write_text(gen)
    with pytest.raises(ConfigError, match=match) as e:
        mplus_fast.load(tiny_ckpt)
    assert "generation_config.json" in str(e.value)


# ---------------------------------------------------------------------- no pickle
def test_no_pickle_anywhere_in_the_package():
    """Weights and memory are read only through safetensors: no module may unpickle."""
    banned = ["import pickle", "from pickle", "torch.load(", "allow_pickle=True", "weights_only=False",
              "import dill", "import joblib", "cloudpickle", "numpy.load(", "np.load("]
    offenders = [f"{p.relative_to(PACKAGE)}: {b}" for p in PACKAGE.rglob("*.py") for b in banned if b in p.read_text()]
    assert not offenders, offenders


def test_load_and_save_never_unpickle(tiny_model, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something unpickled")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    target = tiny_model.save_pretrained(tmp_path / "c")
    mplus_fast.load(target)
    assert cli("inspect", target).exit_code == 0

"""Inputs that were accepted silently and that users get wrong (issue 14): each is refused (or
warned about) with a message that names the argument and the cause, and a refused call leaves
the memory exactly as it was."""
from __future__ import annotations

import warnings

import pytest
import torch
from typer.testing import CliRunner

import mplus_fast
from mplus_fast.cli import app
from mplus_fast.inputs import IgnoredOptionWarning, ShortInjectionWarning, resolve_device, resolve_dtype

BOS = 1   # the random checkpoints' bos_token_id


def snapshot(model):
    return {k: v.clone() for k, v in model.state_tensors().items()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed after a refused call"


def ids(*tokens):
    return torch.tensor([list(tokens)])


# ---------------------------------------------------------------------- a leading BOS
BOS_CALLS = {
    "forward": lambda m, x, mask=None: m(x, attention_mask=mask),
    "generate": lambda m, x, mask=None: m.generate(x, attention_mask=mask, max_new_tokens=2),
    "inject": lambda m, x, mask=None: m.inject_memory(x, attention_mask=mask),
    "inject_update": lambda m, x, mask=None: m.inject_memory(x, update_memory=True, attention_mask=mask),
}


@pytest.mark.parametrize("call", BOS_CALLS)
def test_a_leading_tokenizer_bos_is_refused_with_the_reason(tiny_model, call):
    before = snapshot(tiny_model)
    name = "context_ids" if call.startswith("inject") else "input_ids"
    with pytest.raises(ValueError, match=rf"{name} row 0 starts with token 1, the tokenizer's BOS.*own learned BOS"):
        BOS_CALLS[call](tiny_model, ids(BOS, *range(5, 25)))
    assert_unchanged(tiny_model, before)


@pytest.mark.parametrize("call", BOS_CALLS)
def test_a_bos_after_left_padding_is_found(tiny_model, call):
    x = torch.tensor([[7] * 20 + [8], [0, BOS] + [9] * 19])
    mask = torch.tensor([[1] * 21, [0] + [1] * 20])
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="row 1 starts with token 1"):
        BOS_CALLS[call](tiny_model, x, mask)
    assert_unchanged(tiny_model, before)


def test_the_bos_id_inside_an_input_is_an_ordinary_token(tiny_model):
    tiny_model(ids(5, BOS, 6))
    tiny_model.inject_memory(ids(*range(5, 21), BOS), update_memory=True)


# ---------------------------------------------------------------------- positions
@pytest.fixture
def short_context(ckpt_factory):
    """P = 1 + R + N = 1 + 4 + 16 = 21 of 30 positions: 9 are left for a prompt."""
    return mplus_fast.load(ckpt_factory(max_position_embeddings=30), seed=0)


def test_a_prompt_past_max_position_embeddings_is_refused(short_context):
    short_context(torch.arange(5, 14)[None])            # positions 21..29
    before = snapshot(short_context)
    with pytest.raises(ValueError, match=r"input_ids: 10 tokens after the memory prefix of 21 positions reach position 30, "
                                         r"past the 30 positions.*max_position_embeddings.*at most 9 tokens fit"):
        short_context(torch.arange(5, 15)[None])
    assert_unchanged(short_context, before)


def test_generation_past_max_position_embeddings_is_refused(short_context):
    short_context.generate(torch.arange(5, 10)[None], max_new_tokens=5, eos_token_id=[])   # last fed position 29
    with pytest.raises(ValueError, match=r"and max_new_tokens=6 reach position 30"):
        short_context.generate(torch.arange(5, 10)[None], max_new_tokens=6)


def test_an_injection_past_max_position_embeddings_is_refused(short_context):
    before = snapshot(short_context)
    with pytest.raises(ValueError, match=r"context_ids: 26 tokens after the memory prefix of 5 positions"):
        short_context.inject_memory(torch.arange(5, 31)[None], update_memory=True)   # positions up to T + m = 30
    assert_unchanged(short_context, before)
    short_context.inject_memory(torch.arange(5, 30)[None], update_memory=True)


def test_padding_does_not_count_as_positions(short_context):
    x = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.arange(5, 14)[None]], 1)
    short_context(x, attention_mask=(x > 0).long())


@pytest.mark.parametrize("scaling,limit", [({"type": "linear", "factor": 2.0}, 60), ({"type": "dynamic", "factor": 2.0}, None)])
def test_scaled_rope_moves_the_limit(ckpt_factory, scaling, limit):
    m = mplus_fast.load(ckpt_factory(max_position_embeddings=30, rope_scaling=scaling))
    assert m.config.max_positions == limit
    m(torch.arange(5, 44)[None])   # 39 tokens: positions up to 59
    if limit is None:
        m(torch.arange(5, 80)[None])
    else:
        with pytest.raises(ValueError, match="past the 60 positions"):
            m(torch.arange(5, 45)[None])


def test_a_config_whose_memory_prefix_fills_every_position_is_refused(ckpt_factory):
    with pytest.raises(mplus_fast.ConfigError, match=r"max_position_embeddings=21 leaves no position for input"):
        ckpt_factory(max_position_embeddings=21)


# ---------------------------------------------------------------------- dtype, device, flags
@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16), ("torch.bfloat16", torch.bfloat16)])
def test_dtype_names_are_accepted(tiny_ckpt, name, dtype):
    assert mplus_fast.load(tiny_ckpt, dtype=name).dtype == dtype


@pytest.mark.parametrize("dtype,exc,match", [("bf16", ValueError, "'bf16' is not one of 'float32', 'bfloat16', 'float16'"),
                                             (torch.int64, ValueError, "not supported"),
                                             (torch.float64, ValueError, "float64 needs backend='reference'"),
                                             (16, TypeError, "must be a torch.dtype")])
def test_other_dtypes_are_refused_clearly(tiny_ckpt, dtype, exc, match):
    with pytest.raises(exc, match=match):
        mplus_fast.load(tiny_ckpt, dtype=dtype)


@pytest.mark.parametrize("device,match", [("gpu", "not a device name"), ("mps", "not supported"), ("cuda:x", "not a device name"),
                                          (True, "must be a string")])
def test_bad_device_names_are_refused_clearly(device, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_so(tiny_ckpt):
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available here"):
        mplus_fast.load(tiny_ckpt, device="cuda")


def test_a_cuda_index_past_the_device_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\) \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cpu:0") == torch.device("cpu")


def test_float64_runs_on_the_reference_backend(tiny_ckpt):
    assert mplus_fast.load(tiny_ckpt, dtype="float64", backend="reference").dtype == torch.float64


def test_dtype_default_follows_the_device():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda", 0)) == torch.bfloat16


@pytest.mark.parametrize("flag", ["no", 1, None, 0.0])
def test_update_memory_must_be_a_bool(tiny_model, flag):
    before = snapshot(tiny_model)
    with pytest.raises(TypeError, match=rf"update_memory={flag!r} must be True or False"):
        tiny_model.inject_memory(torch.arange(5, 25)[None], update_memory=flag)
    assert_unchanged(tiny_model, before)


# ---------------------------------------------------------------------- generation options
@pytest.mark.parametrize("opts,named", [(dict(temperature=0.7), "temperature=0.7"), (dict(top_k=5), "top_k=5"),
                                        (dict(top_p=0.9, temperature=0.5), "temperature=0.5, top_p=0.9")])
def test_sampling_options_without_do_sample_warn_and_are_ignored(tiny_model, opts, named):
    x = torch.arange(5, 12)[None]
    greedy = tiny_model.generate(x, max_new_tokens=4)
    with pytest.warns(IgnoredOptionWarning, match=rf"{named} ha(s|ve) no effect without do_sample=True"):
        out = tiny_model.generate(x, max_new_tokens=4, **opts)
    assert torch.equal(out, greedy)


def test_default_options_do_not_warn(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.generate(torch.arange(5, 12)[None], max_new_tokens=2)
        tiny_model.generate(torch.arange(5, 12)[None], max_new_tokens=2, do_sample=True, temperature=0.5, top_k=3)


@pytest.mark.parametrize("opts,exc,match", [
    (dict(do_sample="yes"), TypeError, "do_sample='yes' must be True or False"),
    (dict(temperature="hot"), TypeError, "temperature='hot' must be a number"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature=nan must be a finite number > 0"),
    (dict(do_sample=True, temperature=0), ValueError, "temperature=0"),
    (dict(top_k=True), ValueError, "top_k=True must be a non-negative integer"),
    (dict(do_sample=True, top_p=1.5), ValueError, r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_p="0.9"), TypeError, "top_p='0.9' must be a number"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens=True"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens=2.0"),
    (dict(pad_token_id=-1), ValueError, r"pad_token_id=-1 must be a token id in \[0, 96\)"),
    (dict(eos_token_id=[2, True]), ValueError, "eos_token_id=True"),
    (dict(retrieve="no"), TypeError, "retrieve='no'"),
])
def test_bad_generation_options_are_named(tiny_model, opts, exc, match):
    before = snapshot(tiny_model)
    with pytest.raises(exc, match=match):
        tiny_model.generate(torch.arange(5, 12)[None], **{"max_new_tokens": 2, **opts})
    assert_unchanged(tiny_model, before)


# ---------------------------------------------------------------------- short injections
@pytest.mark.parametrize("update", [False, True])
def test_an_injection_under_16_tokens_warns(tiny_model, update):
    with pytest.warns(ShortInjectionWarning, match=r"an injection of 9 token\(s\), under the 16 the authors ask for"):
        tiny_model.inject_memory(torch.arange(5, 14)[None], update_memory=update)


def test_an_injection_of_16_tokens_does_not_warn(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model.inject_memory(torch.arange(5, 21)[None], update_memory=True)


def test_the_warnings_point_at_the_callers_line(tiny_model):
    with pytest.warns(ShortInjectionWarning) as record:
        tiny_model.inject_memory(torch.arange(5, 9)[None])
    with pytest.warns(IgnoredOptionWarning) as record2:
        tiny_model.generate(torch.arange(5, 9)[None], max_new_tokens=1, top_p=0.5)
    assert record[0].filename == __file__ and record2[0].filename == __file__


# ---------------------------------------------------------------------- the command line
def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0], result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "inject", "bench"])
def test_cli_device_cuda_without_cuda_is_one_error_line(tiny_ckpt, tmp_path, command):
    args = {"generate": ["generate", tiny_ckpt, "--ids", "5,6"], "bench": ["bench", tiny_ckpt],
            "inject": ["inject", tiny_ckpt, "--ids", "5,6", "--out", tmp_path / "o"]}[command]
    one_error_line(cli(*args, "--device", "cuda"), "--device cuda: CUDA is not available")


@pytest.mark.parametrize("device", ["gpu", "cuda:zero", "tpu"])
def test_cli_unknown_device_is_one_error_line(tiny_ckpt, device):
    one_error_line(cli("generate", tiny_ckpt, "--ids", "5,6", "--device", device), f"--device {device}")


def test_cli_demo_device_is_checked_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLUS_FAST_CACHE", str(tmp_path / "cache"))
    one_error_line(cli("demo", "--device", "gpu"), "--device")
    assert not (tmp_path / "cache").exists()      # refused before the demo checkpoint was made


def test_cli_bad_dtype_is_one_error_line(tiny_ckpt):
    one_error_line(cli("generate", tiny_ckpt, "--ids", "5,6", "--dtype", "fp8"), "--dtype 'fp8'")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nope"}}', ""])
def test_cli_malformed_tokenizer_is_one_error_line(tiny_ckpt, tmp_path, content):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(content)
    one_error_line(cli("generate", tiny_ckpt, "--prompt", "hello", "--tokenizer", tmp_path / "tokenizer.json"),
                   "not a valid tokenizer.json", "tokenizer.json")


def test_cli_leading_bos_is_one_error_line(tiny_ckpt):
    one_error_line(cli("generate", tiny_ckpt, "--ids", "1,5,6"), "the tokenizer's BOS")


def test_cli_unused_sampling_option_is_one_warning_line(tiny_ckpt):
    r = cli("generate", tiny_ckpt, "--ids", "5,6,7", "--temperature", "0.5", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output
    warning = [l for l in r.output.splitlines() if l.startswith("warning:")]
    assert len(warning) == 1 and "temperature=0.5 has no effect without do_sample=True (CLI: --sample)" in warning[0]
    assert "Warning" not in r.output.replace("warning:", "")     # no Python warning banner with file and line

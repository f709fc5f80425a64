"""The fast backend's CUDA code path on the CPU (issue 8 item 1), through the stand-in of
cuda_standin.py: "cuda" tensors with real values, CUDA's device rules, and CUDA graphs that record
and replay. Each test runs the engine on "cuda" and compares with the same run on the CPU: load
(a checkpoint and `random_model`), injections through merges, prefill with retrieval (bank on the
device and on the host through the prefetch engine), `generate` through the captured static
decoder (captured once per shape), save. A CPU/device mix, a host sync inside the captured step
or a missing conversion fails here, before a GPU is ever lent."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from mplus_fast import decoding
from mplus_fast.config import MPlusConfig
from mplus_fast.testing import _config_dict, make_random_checkpoint, random_model

from cuda_standin import CaptureError, StandinTensor, cuda_standin, to_host

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26]]
CONTEXTS = [list(range(3 + i, 3 + i + 6 + i)) for i in range(5)]   # 5 injections: merges at 2 and 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("standin") / "ck", seed=7)


def cuda(t):
    return t.to("cuda")


def run_session(path, device, placement="device", dtype=torch.float32):
    """Load, inject 5 contexts (with merges), read 2 prompts, generate: everything back on the host."""
    model = mplus_fast.load(path, seed=0, device=device, dtype=dtype, ltm_placement=placement)
    out = {"records": []}
    for ctx in CONTEXTS:
        model.inject_memory(torch.tensor([ctx], device=device), update_memory=True)
        out["records"].append(model.last_update.merged)
    ids = torch.tensor(PROMPTS, device=device)
    res = model(ids)
    out["logits"] = to_host(res.logits).cpu()
    out["idx"] = [t.cpu() for t in to_host(list(res.ltm_indices))]
    out["gen"] = to_host(model.generate(ids, max_new_tokens=10, eos_token_id=[])).cpu()
    return model, out


def test_the_stand_in_enforces_cuda_rules():
    with cuda_standin() as sim, torch.inference_mode():
        x = torch.ones(4, 3, device="cuda")
        assert isinstance(x, StandinTensor) and x.device.type == "cuda" and x.is_cuda
        assert float((x * 2).sum()) == 24.0 and sim.syncs_outside_capture == 1
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(4, 3)                      # a CPU operand of more than 0 dims
        assert (x + torch.tensor(2.0)).device.type == "cuda"   # a CPU 0-dim scalar is allowed
        assert x[torch.tensor([0, 2])].shape == (2, 3)        # CPU indices are allowed
        assert not x.cpu().is_cuda and torch.empty(3, pin_memory=True).is_pinned()


def test_graph_capture_executes_nothing_and_replay_repeats_the_step():
    with cuda_standin() as sim, torch.inference_mode():
        state, step = torch.zeros(3, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            state.index_fill_(0, step, 5.0)
            doubled = state * 2
            step += 1
        assert to_host(state).tolist() == [0, 0, 0] and int(step) == 0   # nothing executed
        g.replay()
        g.replay()
        assert to_host(state).tolist() == [5, 5, 0] and int(step) == 2
        assert to_host(doubled).tolist() == [10, 10, 0] and sim.captures == 1 and sim.replays == 2
        for sync in (lambda: state.sum().item(), lambda: bool(state.any()), lambda: state.tolist(), lambda: state.cpu()):
            with pytest.raises(CaptureError):
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    sync()


@pytest.fixture
def eager_decoding(monkeypatch):
    """Decoding without graph capture (the engine's switch), for the reference tokens on "cuda"."""
    def run(fn):
        with monkeypatch.context() as mp:
            mp.setenv("MPLUS_FAST_CUDA_GRAPHS", "0")
            return fn()
    return run


@pytest.mark.parametrize("placement", ["device", "host"])
def test_whole_session_on_cuda_equals_cpu(ckpt, placement, eager_decoding):
    """Load, injections through merges, prefill with retrieval (the host bank through the prefetch
    engine), generate through the captured decoder: the "cuda" run retrieves the CPU run's rows
    with its logits (the GPU path's operand layouts round differently: close, not equal), and
    the captured decoder gives the tokens of eager steps on the same device."""
    _, want = run_session(ckpt, "cpu")
    with cuda_standin() as sim:
        model, got = run_session(ckpt, "cuda", placement)
        assert model.device.type == "cuda"
        assert sim.captures == 1 and sim.replays > 0 and not sim.capture_errors, sim.capture_errors
        _, eager = eager_decoding(lambda: run_session(ckpt, "cuda", placement))
        assert sim.captures == 1
    assert got["records"] == want["records"] and any(want["records"])      # merges happened
    assert all(torch.equal(a, b) for a, b in zip(got["idx"], want["idx"]))
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["gen"], eager["gen"])


def test_bf16_session_on_cuda(ckpt):
    """The CUDA default dtype: the same path in bf16 runs without a device or dtype mismatch."""
    with cuda_standin() as sim:
        _, got = run_session(ckpt, "cuda", "host", torch.bfloat16)
        assert sim.captures == 1 and not sim.capture_errors, sim.capture_errors
    assert got["gen"].shape == (2, 17) and torch.isfinite(got["logits"]).all()


def test_save_from_cuda_reloads_on_cpu(ckpt, tmp_path):
    cpu_model, _ = run_session(ckpt, "cpu")
    with cuda_standin():
        model, _ = run_session(ckpt, "cuda")
        model.save_pretrained(tmp_path / "saved")
        held_stm, held_ltm = to_host(model.state.stm), to_host(list(model.state.ltm))
    again = mplus_fast.load(tmp_path / "saved", seed=0)
    a, b = again.state, cpu_model.state
    assert torch.equal(a.stm, held_stm) and all(torch.equal(x, y) for x, y in zip(a.ltm, held_ltm))
    assert torch.equal(a.stm_ages, b.stm_ages) and [len(x) for x in a.ltm] == [len(x) for x in b.ltm]
    # the GPU path's GEMM operand layouts round differently from the CPU's: close, not equal
    torch.testing.assert_close(a.stm, b.stm, rtol=1e-3, atol=2e-4)
    ids = torch.tensor(PROMPTS)
    torch.testing.assert_close(again(ids).logits, cpu_model(ids).logits, rtol=1e-3, atol=1e-3)


def test_second_generate_of_a_shape_reuses_the_captured_step(ckpt, eager_decoding):
    """Captured once per shape (issue 8 item 5): the same shape again replays the first capture
    and gives the same tokens; another shape captures its own; all equal eager decoding."""
    calls = [(slice(None), 9), (slice(None), 9), (slice(1, None), 10), (slice(0, 5), 9), (slice(None), 9)]

    def session():
        model = mplus_fast.load(ckpt, seed=0, device="cuda")
        model.inject_memory(torch.tensor([CONTEXTS[0]], device="cuda"), update_memory=True)
        ids = torch.tensor(PROMPTS, device="cuda")
        out = []
        for cols, new in calls:
            out.append(to_host(model.generate(ids[:, cols], max_new_tokens=new, eos_token_id=[])))
            out.append(sim.captures)
        return model, out

    with cuda_standin() as sim:
        model, got = session()
        # capture, reuse, a new key (same capacity, other max_new_tokens), another shape, and the
        # first shape again: it was the least recently used of 3 with room for 2, so captured anew
        assert got[1::2] == [1, 1, 2, 3, 4]
        assert len(decoding.decoder_cache(model.backend).entries) == decoding.CACHED_DECODERS
        _, eager = eager_decoding(session)
    assert torch.equal(got[0], got[2]) and torch.equal(got[0], got[8])
    assert all(torch.equal(a, b) for a, b in zip(got[::2], eager[::2]))


def test_few_steps_left_do_not_capture(ckpt):
    with cuda_standin() as sim:
        model = mplus_fast.load(ckpt, seed=0, device="cuda")
        model.generate(torch.tensor(PROMPTS, device="cuda"), max_new_tokens=decoding.WARMUP_STEPS + 2, eos_token_id=[])
        assert sim.captures == 0


def test_a_host_sync_in_the_decode_step_is_caught(ckpt, monkeypatch):
    """A step that reads a device value on the host cannot be captured: the stand-in raises
    inside the capture (the decoder then falls back to eager steps and logs it)."""
    with cuda_standin() as sim:
        model = mplus_fast.load(ckpt, seed=0, device="cuda")
        real = model.backend.decode_forward

        def syncing(cache, tokens, pos, slot, inv_freq):
            if int(slot) < 0:            # a host read of a device tensor
                raise AssertionError
            return real(cache, tokens, pos, slot, inv_freq)

        monkeypatch.setattr(model.backend, "decode_forward", syncing)
        model.generate(torch.tensor(PROMPTS, device="cuda"), max_new_tokens=10, eos_token_id=[])
        assert sim.captures == 0 and len(sim.capture_errors) == 1
        assert isinstance(sim.capture_errors[0], CaptureError)


def test_random_model_on_cuda_with_a_host_bank():
    """The benchmark's model (bench/bench_gpu_engine.py): drawn on the device with a synthetic bank."""
    cfg = MPlusConfig.from_dict(_config_dict({}))
    with cuda_standin() as sim:
        model = random_model(cfg, device="cuda", dtype=torch.bfloat16, ltm_tokens=40, ltm_placement="host")
        ids = torch.tensor(PROMPTS, device="cuda")
        res = model.backend.read(ids, torch.ones_like(ids, dtype=torch.bool), cache_extra=10, last_only=True)
        assert res.logits.device.type == "cuda" and res.logits.dtype == torch.float32
        out = model.generate(ids, max_new_tokens=10, eos_token_id=[])
        assert sim.captures == 1 and not sim.capture_errors and out.shape == (2, 17)


def test_rope_frequencies_live_on_the_model_device(ckpt, tmp_path):
    with cuda_standin():
        model = mplus_fast.load(ckpt, seed=0, device="cuda")
        assert model.rope.inv_freq.device.type == "cuda" and model.rope.inv_freq_for(10).device.type == "cuda"
        assert model.rope.state()["inv_freq"].device.type == "cpu"      # what a checkpoint stores


def test_memory_attention_names_the_device_it_expected():
    from mplus_fast.ops.attention import memory_attention
    with cuda_standin(), torch.inference_mode():
        q, k = torch.zeros(1, 2, 3, 4, device="cuda"), torch.zeros(1, 2, 3, 4, device="cuda")
        pos, freq = torch.arange(3, device="cuda"), torch.ones(2)
        with pytest.raises(ValueError, match=r"inv_freq is on cpu but q is on cuda:0"):
            memory_attention(q, k, k, None, pos, freq, k, k, None, 0.5)


def test_low_memory_mode_keeps_the_embeddings_on_the_host(ckpt, tmp_path):
    """With the bank on the host (and an untied lm_head) the token embeddings stay on the host: a
    read copies its ids' rows over, the captured decode step gets them looked up before each
    replay. Same logits and tokens as with the table on the device; a tied table stays there."""
    with cuda_standin() as sim:
        host = mplus_fast.load(ckpt, seed=0, device="cuda", ltm_placement="host")
        dev = mplus_fast.load(ckpt, seed=0, device="cuda", ltm_placement="device")
        assert host.weights.embed.device.type == "cpu" and host.backend.host_embedding
        assert dev.weights.embed.device.type == "cuda" and not dev.backend.host_embedding
        ids = cuda(torch.tensor(PROMPTS))
        assert torch.equal(to_host(host(ids).logits), to_host(dev(ids).logits))
        captures = sim.captures
        gen = host.generate(ids, max_new_tokens=10, eos_token_id=[])
        assert sim.captures == captures + 1 and not sim.capture_errors, sim.capture_errors
        assert torch.equal(to_host(gen), to_host(dev.generate(ids, max_new_tokens=10, eos_token_id=[])))
        tied = mplus_fast.load(make_random_checkpoint(tmp_path / "tied", seed=7, tie_word_embeddings=True),
                               seed=0, device="cuda", ltm_placement="host")
        assert tied.weights.embed.device.type == "cuda" and tied.weights.lm_head is tied.weights.embed

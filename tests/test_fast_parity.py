"""The fast backend against the reference backend (issue: fast engine, "Parity").

float32: logits within 1e-4 relative, retrieved rows and greedy generations identical, memory
states equal (to float32 rounding) after 100 injections with the same seed, across merges.
Random checkpoints here use small weights (std 0.02): with the default 1/√fan_in weights the
memory write → read → write loop is chaotic and any two float32 summation orders drift apart
within ~30 injections, whichever is "right"."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mplus_fast
from conftest import rel_err

GEOMETRIES = {
    "gqa-default": dict(),
    "mha-linear": dict(num_key_value_heads=4, rope_scaling={"type": "linear", "factor": 2.0}),
    "gqa-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "small-ltm": dict(ltm_initial_size=3),
    "one-selector-layer": dict(num_selector_layers=1, num_tokens=3, num_blocks=6, num_ltm_blocks=2),
    "memoryllm": dict(architectures=["MemoryLLM"]),
}


def pair(path, **kw):
    return mplus_fast.load(path, seed=7, **kw), mplus_fast.load(path, seed=7, backend="fast", **kw)


def compare_reads(ref, fast, prompts, tol=1e-4):
    for q in prompts:
        a, b = ref(q), fast(q)
        assert rel_err(b.logits, a.logits) < tol, f"logits {rel_err(b.logits, a.logits):.2e}"
        for l, (x, y) in enumerate(zip(a.ltm_indices, b.ltm_indices)):
            assert torch.equal(x, y), f"layer {l}: {x.tolist()} vs {y.tolist()}"
            assert torch.equal(a.ltm_provenance[l], b.ltm_provenance[l])


def compare_states(ref, fast, tol=1e-4):
    sa, sb = ref.state_tensors(), fast.state_tensors()
    sb.pop("mplus_fast.stm_slots", None)  # the fast backend's physical layout: no reference counterpart
    sa.pop("mplus_fast.stm_slots", None)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if sa[k].dtype.is_floating_point and sa[k].numel():
            assert rel_err(sb[k], sa[k]) < tol, f"{k}: {rel_err(sb[k], sa[k]):.2e}"
        else:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fast_matches_reference_over_100_injections(ckpt_factory, name):
    path = ckpt_factory(seed=11, weight_std=0.02, **GEOMETRIES[name])
    ref, fast = pair(path)
    prompts = [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[40]])]
    compare_reads(ref, fast, prompts)
    g = torch.Generator().manual_seed(0)
    merges = 0
    for i in range(100):
        ids = torch.randint(3, 96, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g)
        da, db = ref.inject_memory(ids, update_memory=True), fast.inject_memory(ids, update_memory=True)
        assert torch.equal(ref.last_update.dropped, fast.last_update.dropped)
        assert ref.last_update.pruned == fast.last_update.pruned
        merges += ref.last_update.merged
        if i in (3, 50):  # mid-stream, with a non-empty pending buffer on M+
            compare_reads(ref, fast, prompts)
    assert rel_err(db, da) < 1e-4
    compare_states(ref, fast)
    sa, sb = ref.memory_stats(), fast.memory_stats()
    for key in ("ltm_tokens_per_layer", "pending_tokens", "update_step", "injections", "initialized"):
        assert sa[key] == sb[key], key
    compare_reads(ref, fast, prompts)
    if ref.config.is_mplus:
        assert merges > 10
    q = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 1, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    assert torch.equal(ref.generate(q, attention_mask=mask, max_new_tokens=8, eos_token_id=[]),
                       fast.generate(q, attention_mask=mask, max_new_tokens=8, eos_token_id=[]))


@pytest.mark.parametrize("fixture", ["upstream_tiny", "upstream_tiny_memoryllm"])
def test_fast_reproduces_fixtures(fixtures_dir, fixture):
    root = fixtures_dir / fixture
    e = load_file(str(root / "expected.safetensors"))
    model = mplus_fast.load(root / "ckpt", backend="fast")
    out = model(e["query"])
    assert rel_err(out.logits, e["logits"]) < 1e-5
    for l in range(model.config.num_hidden_layers):
        if f"ltm_indices.{l}" in e:
            assert out.ltm_indices[l][0].tolist() == e[f"ltm_indices.{l}"].tolist()
    n_new = e["generated"].shape[1] - e["query"].shape[1]
    assert model.generate(e["query"], max_new_tokens=n_new, eos_token_id=[]).tolist() == e["generated"].tolist()
    assert rel_err(model.inject_memory(e["ctx"]), e["delta_memory"]) < 1e-5
    assert rel_err(model.inject_memory(e["short_ctx"]), e["delta_memory_short"]) < 1e-5


def test_fast_bf16_error_budget(ckpt_factory):
    """bf16 by error budget (flash-attention's rule): against the float32 reference as truth, the
    fast backend's bf16 error is at most 2× the reference backend's own bf16 error."""
    path = ckpt_factory(seed=12)
    q = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    truth = mplus_fast.load(path)(q)
    ref, fast = pair(path, dtype=torch.bfloat16)
    a, b = ref(q), fast(q)
    err_ref, err_fast = rel_err(a.logits, truth.logits), rel_err(b.logits, truth.logits)
    # + 1e-3: an absolute floor of a few bf16 ulps of the logits, for when the reference's own
    # error happens to be tiny on this prompt
    assert err_fast <= 2 * err_ref + 1e-3, f"fast bf16 error {err_fast:.2e} vs reference bf16 error {err_ref:.2e}"
    assert all(torch.equal(x, y) for x, y in zip(b.ltm_indices, truth.ltm_indices))


def test_fast_save_reload_continues(ckpt_factory, tmp_path):
    path = ckpt_factory(seed=13, weight_std=0.02)
    a = mplus_fast.load(path, seed=1, backend="fast")
    b = mplus_fast.load(path, seed=1, backend="fast")
    g = torch.Generator().manual_seed(2)
    ctxs = [torch.randint(3, 96, (1, 7), generator=g) for _ in range(12)]
    for c in ctxs[:5]:
        a.inject_memory(c, update_memory=True)
        b.inject_memory(c, update_memory=True)
    b.save_pretrained(tmp_path / "mid")
    b = mplus_fast.load(tmp_path / "mid", backend="fast")
    for c in ctxs[5:]:
        a.inject_memory(c, update_memory=True)
        b.inject_memory(c, update_memory=True)
    compare_states(a, b, tol=1e-6)


def test_host_placement_matches_device(ckpt_factory):
    """The bank in host memory, fetched by the prefetch engine, gives bit-identical results, also
    after merges grow the bank (the engine follows the reallocated buffer)."""
    path = ckpt_factory(seed=14, weight_std=0.02)
    dev = mplus_fast.load(path, seed=2, backend="fast")
    host = mplus_fast.load(path, seed=2, backend="fast", ltm_placement="host")
    assert host.backend.bank[0].kv.device.type == "cpu"
    g = torch.Generator().manual_seed(3)
    q = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 1, 11, 12, 13, 14]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    for step in range(12):
        a, b = dev(q, attention_mask=mask), host(q, attention_mask=mask)
        assert torch.equal(a.logits, b.logits), step
        ctx = torch.randint(3, 96, (1, 9), generator=g)
        dev.inject_memory(ctx, update_memory=True)
        host.inject_memory(ctx, update_memory=True)
    assert torch.equal(dev.generate(q, attention_mask=mask, max_new_tokens=4), host.generate(q, attention_mask=mask, max_new_tokens=4))
    assert host.backend._prefetch is not None and dev.backend._prefetch is None  # the engine really served the reads


def test_host_placement_needs_fast_backend(ckpt_factory):
    with pytest.raises(ValueError, match="needs backend='fast'"):
        mplus_fast.load(ckpt_factory(), backend="reference", ltm_placement="host")
    with pytest.raises(ValueError, match="ltm_placement='disk'"):
        mplus_fast.load(ckpt_factory(), ltm_placement="disk")

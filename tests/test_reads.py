"""Reading edge cases of SPEC §3: an LTM smaller than R, an empty LTM, the pending buffer,
MemoryLLM's `initialized` flag, and bf16."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from conftest import rel_err
from mplus_fast.retrieval import cyclic_indices, order_by_age


def test_cyclic_indices_example():
    assert cyclic_indices(3, 7).tolist() == [2, 0, 1, 2, 0, 1, 2]
    assert cyclic_indices(4, 4).tolist() == [0, 1, 2, 3]


def test_small_ltm_is_cycled_and_ordered_by_age(ckpt_factory):
    m = mplus_fast.load(ckpt_factory(ltm_size=3))  # R = 4 > 3 rows
    out = m(torch.tensor([[5, 6, 7]]))
    for l in range(2):
        idx = out.ltm_indices[l][0]
        assert sorted(idx.tolist()) == sorted([2, 0, 1, 2])
        ages = m.state.ltm_ages[l][idx]
        assert (ages[:-1] >= ages[1:]).all()  # oldest first


def test_empty_ltm_keeps_stm_positions(ckpt_factory):
    # SPEC §3: with an empty LTM the STM keeps positions R+1..R+N (the reference loops forever).
    # Both backends place positions independently (the fast one rotates cached STM keys by slot),
    # so their agreement checks the rule; a shifted STM (positions 1..N) must give other logits.
    path = ckpt_factory(ltm_size=0)
    q = torch.tensor([[5, 6, 7]])
    ref, fast = mplus_fast.load(path, backend="reference"), mplus_fast.load(path, backend="fast")
    a, b = ref(q), fast(q)
    assert all(i.shape == (1, 0) for i in a.ltm_indices + b.ltm_indices)
    assert rel_err(b.logits, a.logits) < 1e-5
    shifted = mplus_fast.load(path, backend="reference")
    shifted.config.num_blocks -= shifted.config.num_ltm_blocks  # same N, R = 0: STM at 1..N, inputs at N+1..
    shifted.config.num_ltm_blocks = 0
    assert rel_err(shifted(q).logits, a.logits) > 1e-3
    assert fast.generate(q, max_new_tokens=2).shape == (1, 5)


def test_pending_rows_are_retrievable(ckpt_factory):
    m = mplus_fast.load(ckpt_factory(seed=2), seed=0)
    g = torch.Generator().manual_seed(0)
    m.inject_memory(torch.randint(3, 96, (1, 8), generator=g), update_memory=True)
    n_ltm = m.state.ltm[0].shape[0]
    assert m.state.pending_len() == 4
    seen_pending = False
    for trial in range(30):
        q = torch.randint(3, 96, (1, 6), generator=g)
        out = m(q)
        for l in range(2):
            idx = out.ltm_indices[l][0]
            assert idx.max() < n_ltm + m.state.pending_len()
            seen_pending |= bool((idx >= n_ltm).any())
            all_ages = torch.cat([m.state.ltm_ages[l], m.state.pend_ages[l]])
            assert (all_ages[idx][:-1] >= all_ages[idx][1:]).all()
    assert seen_pending, "no prompt ever retrieved a pending row"


def test_age_ties_keep_ascending_index():
    idx = torch.tensor([1, 4, 6, 9])
    assert order_by_age(idx, torch.tensor([3, 7, 3, 7])).tolist() == [4, 9, 1, 6]


def test_memoryllm_uninitialized_reads_as_backbone_then_fills(ckpt_factory, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    src = ckpt_factory(architectures=["MemoryLLM"])
    dst = tmp_path / "uninit"
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    t["initialized"] = torch.tensor(0, dtype=torch.uint8)
    save_file(t, str(dst / "model.safetensors"))
    m = mplus_fast.load(dst, seed=0)
    q = torch.tensor([[5, 6, 7]])
    cold = m(q).logits
    t["memory"] = torch.randn_like(t["memory"])  # the memory content must not matter while uninitialized
    save_file(t, str(dst / "model.safetensors"))
    assert torch.equal(mplus_fast.load(dst)(q).logits, cold)
    delta = m.inject_memory(torch.tensor([[9, 10, 11, 12, 13, 14]]), update_memory=True)[0]
    assert m.state.initialized
    T, N = m.config.num_tokens, m.config.stm_size
    assert torch.equal(m.state.stm[:, :T], delta) and torch.equal(m.state.stm[:, N - T:], delta)
    assert not torch.equal(m(q).logits, cold)


def test_bf16_close_to_fp32(ckpt_factory):
    path = ckpt_factory(seed=4)
    q = torch.tensor([[5, 6, 7, 8, 9]])
    f32 = mplus_fast.load(path)(q)
    b16 = mplus_fast.load(path, dtype=torch.bfloat16)(q)
    # bf16 keeps 8 mantissa bits: single logits can move by several percent through 2 layers, but
    # the logit vectors must stay aligned with float32's (cosine), and retrieval must agree.
    cos = torch.nn.functional.cosine_similarity(b16.logits.flatten(1), f32.logits.flatten(1)).item()
    assert cos > 0.995, f"bf16 vs fp32 logits cosine {cos:.5f}"
    assert rel_err(b16.logits, f32.logits) < 0.15
    assert all(torch.equal(a, b) for a, b in zip(b16.ltm_indices, f32.ltm_indices))


def test_training_age_mode_option(ckpt_factory):
    path = ckpt_factory(seed=6)
    a = mplus_fast.load(path, seed=1)
    b = mplus_fast.load(path, seed=1, age_mode="training")
    for model in (a, b):
        for _ in range(3):
            model.inject_memory(torch.tensor([[5, 6, 7, 8, 9, 10]]), update_memory=True)
    assert torch.equal(a.state.stm, b.state.stm)
    assert int(a.state.stm_ages.max()) < a.config.num_tokens
    assert int(b.state.stm_ages.max()) >= 2 * b.config.num_tokens


def test_stm_only_read_equals_the_same_memory_without_its_ltm(ckpt_factory, backend):
    """retrieve=False reads the STM at its usual positions and no LTM row: exactly the model whose
    LTM is empty (same seed: same weights and STM, the LTM is drawn last)."""
    with_ltm = mplus_fast.load(ckpt_factory(seed=5, ltm_size=10), backend=backend)
    without = mplus_fast.load(ckpt_factory(seed=5, ltm_size=0), backend=backend)
    q = torch.tensor([[5, 6, 7, 8, 9, 10]])
    full, stm_only, empty = with_ltm(q), with_ltm(q, retrieve=False), without(q)
    assert all(i.shape == (1, 0) for i in stm_only.ltm_indices)
    assert all(i.shape == (1, 4) for i in full.ltm_indices)
    assert torch.allclose(stm_only.logits, empty.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(stm_only.logits, full.logits, atol=1e-3)
    g1 = with_ltm.generate(q, max_new_tokens=6, retrieve=False)
    assert torch.equal(g1, without.generate(q, max_new_tokens=6))
    with pytest.raises(TypeError, match="retrieve"):
        with_ltm(q, retrieve="no")

"""Properties of the memory update (SPEC §5), checked on random update sequences."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from mplus_fast.config import MPlusConfig
from mplus_fast.memory import MemoryState, apply_update, merge_pending
from mplus_fast.testing import TINY_MPLUS, _config_dict, memory_state


def make_config(**over) -> MPlusConfig:
    return MPlusConfig.from_dict(_config_dict(dict(over)))


def make_state(cfg: MPlusConfig, ltm: int, seed: int) -> MemoryState:
    g = torch.Generator().manual_seed(seed)
    L, N, d, s = cfg.num_hidden_layers, cfg.stm_size, cfg.hidden_size, cfg.selector_hidden_dim
    return memory_state(torch.randn(L, N, d, generator=g), torch.zeros(L, N, dtype=torch.long),
                        [(torch.randn(ltm, d, generator=g), torch.randn(ltm, s, generator=g),
                          torch.randint(0, 50, (ltm,), generator=g), torch.zeros(ltm, dtype=torch.float64))
                         for _ in range(L)])


def fake_keys(l: int, rows: torch.Tensor) -> torch.Tensor:
    # A deterministic stand-in for key_proj(input_layernorm(rows)): layer-dependent, row-wise.
    return rows[:, :8] * (l + 1)


geometry = st.fixed_dictionaries({
    "num_tokens": st.integers(1, 5), "num_blocks": st.integers(3, 6), "num_ltm_blocks": st.just(1),
    "update_ltm_frequency": st.integers(1, 4), "initial_rf_when_moving_stm_to_ltm": st.integers(1, 4),
    "decay_frequency": st.just(1),
})


@settings(max_examples=40, deadline=None)
@given(geometry, st.integers(0, 12), st.integers(1, 25), st.integers(0, 2**31 - 1))
def test_update_invariants(over, ltm0, steps, seed):
    cfg = make_config(**over)
    T, N, R = cfg.num_tokens, cfg.stm_size, cfg.ltm_retrieved
    state = make_state(cfg, ltm0, seed)
    gen = torch.Generator().manual_seed(seed)
    merges = 0
    for step in range(steps):
        before = state.clone()
        delta = torch.randn(cfg.num_hidden_layers, T, cfg.hidden_size, generator=gen)
        rec = apply_update(state, cfg, delta, gen, fake_keys)
        assert state.stm.shape == before.stm.shape  # pool size constant
        assert torch.equal(state.stm[:, -T:], delta)  # new tokens at the end, in order
        assert state.stm_ages[:, -T:].tolist() == [list(range(T - 1, -1, -1))] * cfg.num_hidden_layers
        assert (state.stm_prov[:, -T:] == rec.injection_id).all()
        for l in range(cfg.num_hidden_layers):
            drop = rec.dropped[l]
            keep = torch.tensor(sorted(set(range(N)) - set(drop.tolist())), dtype=torch.long)
            assert torch.equal(state.stm[l, :-T], before.stm[l, keep])  # kept tokens keep their order
            if rec.merged:
                continue
            c = before.pend[l].shape[0]
            assert torch.equal(state.pend[l][c:], before.stm[l, drop])
            assert torch.equal(state.pend_keys[l][c:], fake_keys(l, before.stm[l, drop]))
            assert torch.equal(state.pend_ages[l][c:], before.stm_ages[l, drop])
            assert torch.equal(state.pend_ages[l][:c], before.pend_ages[l] + T)
            assert torch.equal(state.pend_prov[l][c:], before.stm_prov[l, drop])
            assert torch.equal(state.ltm_ages[l], before.ltm_ages[l] + T)
        if rec.merged:
            merges += 1
            assert state.update_step == 0 and state.pending_len() == 0
            for l in range(cfg.num_hidden_layers):
                # every surviving row is either an old LTM row or a just-merged pending row, with its provenance
                assert state.ltm[l].shape[0] == state.ltm_keys[l].shape[0] == state.ltm_prov[l].shape[0]
                assert state.ltm[l].shape[0] >= min(R, before.ltm[l].shape[0] + before.pend[l].shape[0] + T)
                assert (state.ltm_rf[l] > 0.01).all() or state.ltm[l].shape[0] <= R or rec.pruned[l] == 0
        else:
            assert state.update_step == before.update_step + T
    # merge cadence: one merge every update_ltm_frequency injections
    assert merges == steps // cfg.update_ltm_frequency


# The bound needs pruning to be possible: the rows of the last (initial_rf - 1) merges must
# outnumber R, i.e. update_ltm_frequency * (initial_rf - 1) > num_ltm_blocks. With initial_rf = 1
# the reference's undo rule makes the bank grow without limit (every merge is undone).
bounded_geometry = st.fixed_dictionaries({
    "num_tokens": st.integers(1, 5), "num_blocks": st.integers(3, 6), "num_ltm_blocks": st.just(1),
    "update_ltm_frequency": st.integers(2, 4), "initial_rf_when_moving_stm_to_ltm": st.integers(2, 4),
    "decay_frequency": st.just(1),
})


@settings(max_examples=20, deadline=None)
@given(bounded_geometry, st.integers(0, 2**31 - 1))
def test_ltm_bounded_after_many_injections(over, seed):
    cfg = make_config(**over)
    state = make_state(cfg, 6, seed)
    gen = torch.Generator().manual_seed(seed)
    bound = max(cfg.max_ltm_tokens, cfg.ltm_retrieved)
    for _ in range(6 * cfg.update_ltm_frequency * int(cfg.initial_rf_when_moving_stm_to_ltm) + 3):
        delta = torch.randn(cfg.num_hidden_layers, cfg.num_tokens, cfg.hidden_size, generator=gen)
        apply_update(state, cfg, delta, gen, fake_keys)
        for l in range(cfg.num_hidden_layers):
            # once the checkpoint's rows have decayed away the bank is bounded by initial_rf merges
            assert state.ltm[l].shape[0] <= max(bound, 6 + bound)
    for l in range(cfg.num_hidden_layers):
        assert state.ltm[l].shape[0] <= bound
        assert set(state.ltm_prov[l].tolist()) <= set(range(state.next_injection_id)) | {-1}


def test_pruning_rule_and_undo():
    cfg = make_config(num_tokens=2, num_blocks=4, num_ltm_blocks=1, update_ltm_frequency=1,
                      initial_rf_when_moving_stm_to_ltm=1, decay_frequency=1)
    R = cfg.ltm_retrieved  # 2
    state = make_state(cfg, 1, 0)
    # LTM of one row with rf 0 plus 2 pending rows with rf 1: after decay everything is ≤ 0.01 →
    # fewer than R+1 survivors → the decrement is undone and nothing is removed.
    for l in range(cfg.num_hidden_layers):
        state.pend[l] = torch.randn(2, cfg.hidden_size)
        state.pend_keys[l] = torch.randn(2, 8)
        state.pend_ages[l] = torch.tensor([5, 6])
        state.pend_prov[l] = torch.tensor([7, 7])
    pruned = merge_pending(state, cfg)
    assert pruned == [0, 0]
    assert state.ltm[0].shape[0] == 3
    assert state.ltm_rf[0].tolist() == [0.0, 1.0, 1.0]
    assert state.ltm_prov[0].tolist() == [-1, 7, 7]
    # Now 3 more rows at rf 1: decay leaves 3 rows at 0 → removed... survivors are the 3 new rows (rf 0)?
    for l in range(cfg.num_hidden_layers):
        state.pend[l] = torch.randn(3, cfg.hidden_size)
        state.pend_keys[l] = torch.randn(3, 8)
        state.pend_ages[l] = torch.tensor([1, 2, 3])
        state.pend_prov[l] = torch.tensor([8, 8, 8])
    merge_pending(state, cfg)
    # rf before decay: [0, 1, 1, 1, 1, 1] → after: [-1, 0, 0, 0, 0, 0] → no survivor > 0.01 → undo
    assert state.ltm[0].shape[0] == 6 and state.ltm_rf[0].tolist() == [0.0, 1, 1, 1, 1, 1]
    cfg2 = make_config(num_tokens=2, num_blocks=4, num_ltm_blocks=1, update_ltm_frequency=1,
                       initial_rf_when_moving_stm_to_ltm=3, decay_frequency=1)
    for l in range(cfg2.num_hidden_layers):
        state.pend[l] = torch.randn(3, cfg2.hidden_size)
        state.pend_keys[l] = torch.randn(3, 8)
        state.pend_ages[l] = torch.tensor([1, 2, 3])
        state.pend_prov[l] = torch.tensor([9, 9, 9])
    pruned = merge_pending(state, cfg2)
    # rf: [0,1,1,1,1,1,3,3,3] - 1 → only the three new rows (2.0) survive; 3 > R=2 → pruned 6
    assert pruned == [6, 6]
    assert state.ltm_prov[0].tolist() == [9, 9, 9] and state.ltm_rf[0].tolist() == [2.0, 2.0, 2.0]


def test_training_age_mode_differs_from_inference():
    cfg = make_config()
    T = cfg.num_tokens
    a, b = make_state(cfg, 10, 1), make_state(cfg, 10, 1)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    delta = torch.randn(cfg.num_hidden_layers, T, cfg.hidden_size)
    for _ in range(2):
        ra = apply_update(a, cfg, delta, ga, fake_keys, "inference")
        rb = apply_update(b, cfg, delta, gb, fake_keys, "training")
    assert torch.equal(ra.dropped, rb.dropped)  # same draws
    assert torch.equal(a.stm, b.stm)
    # inference: kept tokens never age; training: every STM token aged T per update before the drop
    assert a.stm_ages[:, :-T].max() <= T - 1
    assert b.stm_ages[:, :-T].min() >= T
    assert (b.pend_ages[0] > a.pend_ages[0]).all()

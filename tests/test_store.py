"""The memory store (mplus_fast/store.py): the update's landing slots, both backends' stores row
by row, host placement, and model.state as views (no second copy)."""
from __future__ import annotations

import torch

import mplus_fast
from conftest import rel_err
from mplus_fast.backends.fast import store_layout
from mplus_fast.config import MPlusConfig
from mplus_fast.memory import MemoryState
from mplus_fast.ops.insertion import drop_and_concat_reference
from mplus_fast.store import HandedOverState, MemoryStore, NoDerived, SlottedSTM, base_layout, update
from mplus_fast.testing import _config_dict, memory_state

CFG = MPlusConfig.from_dict(_config_dict(dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=4, intermediate_size=16, vocab_size=32,
                                              num_tokens=3, num_blocks=4, num_ltm_blocks=2, selector_hidden_dim=5,
                                              update_ltm_frequency=2, initial_rf_when_moving_stm_to_ltm=3)))


def small_state(cfg=CFG, ltm=4, seed=0) -> MemoryState:
    g = torch.Generator().manual_seed(seed)
    L, N, d, s = cfg.num_hidden_layers, cfg.stm_size, cfg.hidden_size, cfg.selector_hidden_dim
    return memory_state(torch.randn(L, N, d, generator=g), torch.arange(N).repeat(L, 1),
                        [(torch.randn(ltm, d, generator=g), torch.randn(ltm, s, generator=g), torch.arange(ltm),
                          torch.full((ltm,), 2.0, dtype=torch.float64)) for _ in range(L)])


def key_fn(l, rows):
    return rows[:, :CFG.selector_hidden_dim] * (l + 1)


def test_update_returns_the_slot_each_new_row_landed_in():
    store = MemoryStore.from_state(small_state(), CFG, base_layout(CFG, torch.float32, "cpu"), NoDerived(key_fn))
    g = torch.Generator().manual_seed(1)
    L, T, N = CFG.num_hidden_layers, CFG.num_tokens, CFG.stm_size
    for step in range(5):
        order_before = store.stm.order.clone()
        delta = torch.randn(L, T, CFG.hidden_size, generator=g)
        rec = update(store, delta, g, NoDerived(key_fn))
        assert rec.slots.shape == (L, T)
        assert torch.equal(rec.slots, order_before.gather(1, rec.dropped)), "new rows take the dropped rows' slots"
        assert torch.equal(store.stm.order[:, N - T:], rec.slots), "and sit at logical positions N-T..N-1"
        assert torch.equal(store.stm.at("hidden", rec.slots), delta), step
        assert torch.equal(store.stm.at("prov", rec.slots), torch.full((L, T), rec.injection_id))


def test_landing_does_not_depend_on_the_drop_order():
    """`land` takes dropped positions in any order (no sort implied): the logical STM equals the
    reference's drop-and-concatenate whatever the order of `drop` within a layer."""
    g = torch.Generator().manual_seed(2)
    L, N, T, d = 3, 11, 4, 5
    stm = torch.randn(L, N, d, generator=g)
    slotted = SlottedSTM({"hidden": stm.clone()}, torch.arange(N).repeat(L, 1))
    for _ in range(4):
        drop = torch.stack([torch.randperm(N, generator=g)[:T] for _ in range(L)])   # unsorted
        new = torch.randn(L, T, d, generator=g)
        stm = drop_and_concat_reference(stm, drop, new)       # kept rows in order, then new rows 0..T-1
        slots = slotted.land(drop)
        slotted.write(slots, {"hidden": new})
        assert torch.equal(slotted.logical("hidden"), stm)


def test_both_backends_stores_agree_row_by_row_through_merges(ckpt_factory):
    path = ckpt_factory(seed=11, weight_std=0.02)
    ref = mplus_fast.load(path, seed=7, backend="reference")
    fast = mplus_fast.load(path, seed=7, backend="fast")
    g = torch.Generator().manual_seed(0)
    merges = 0
    for _ in range(12):
        ctx = torch.randint(3, 96, (1, int(torch.randint(2, 12, (1,), generator=g))), generator=g)
        ref.inject_memory(ctx, update_memory=True)
        fast.inject_memory(ctx, update_memory=True)
        assert torch.equal(ref.last_update.slots, fast.last_update.slots)
        merges += ref.last_update.merged
    assert merges >= 2
    a, b = ref.backend.store, fast.backend.store
    assert torch.equal(a.stm.order, b.stm.order), "one update rule: the same slot layout"
    for name in ("ages", "prov"):
        assert torch.equal(a.stm.columns[name], b.stm.columns[name]), name
    assert rel_err(b.stm.columns["hidden"], a.stm.columns["hidden"]) < 1e-5
    for l in range(ref.config.num_hidden_layers):
        for bank_a, bank_b in ((a.ltm[l], b.ltm[l]), (a.pend[l], b.pend[l])):
            assert len(bank_a) == len(bank_b)
            for name in bank_a.columns:
                x, y = bank_a.live(name), bank_b.live(name).to(bank_a.live(name).device)
                if x.dtype.is_floating_point and name != "rf":
                    assert not x.numel() or rel_err(y, x) < 1e-5, (l, name)
                else:
                    assert torch.equal(x, y), (l, name)
            # the fast backend's K/V column: the K/V of the reference's hidden rows
            if len(bank_a):
                kv_of_ref_rows = fast.backend.columns(l, bank_a.live("hidden"))["kv"]
                assert rel_err(bank_b.live("kv"), kv_of_ref_rows) < 1e-5, l


def test_host_placement_keeps_no_ltm_bytes_on_the_device():
    """The fast layout with the bank on the host, the compute device stood in by "meta": the LTM
    and pending hidden states and K/V, and the STM's, are host buffers; only the STM's ages,
    provenance and slots and the bank's small per-row columns (retrieval keys, ages, recall
    frequencies, provenance) are on the device."""
    meta = torch.device("meta")
    layout = store_layout(CFG, torch.bfloat16, meta, "host")
    for specs in (layout.bank, layout.pending):
        assert specs["hidden"].device.type == "cpu" and specs["kv"].device.type == "cpu"
    assert layout.stm["hidden"].device.type == "cpu"              # read only by injections and saving
    assert layout.stm["kv"].device.type == "cpu"                  # pre-RoPE: read only to rebuild the rotated copy
    on_device = store_layout(CFG, torch.bfloat16, meta, "device").stm
    assert on_device["hidden"].device == meta and on_device["kv"].device == meta

    class HostKV:  # K/V computed on the host (a stand-in for the device projection + copy back)
        def columns(self, l, hidden):
            return {"kv": torch.zeros(hidden.shape[0], 2, CFG.num_key_value_heads, CFG.head_dim, device=hidden.device)}

        def retrieval_keys(self, l, hidden):
            raise AssertionError("not called by loading")

    store = MemoryStore.from_state(small_state(ltm=6), CFG, layout, HostKV())
    sizes = store.nbytes()
    for component in ("bank_kv", "hidden_states"):
        assert set(sizes[component]) == {"cpu"} and sizes[component]["cpu"] > 0, component
    assert set(sizes["stm"]) == {"meta", "cpu"}                  # ages, slots on the device; hidden, K/V on the host
    assert set(sizes["retrieval_keys"]) == {"meta"}


def test_model_loading_leaves_the_ltm_where_the_checkpoint_put_it(ckpt_factory):
    """`_state_from_tensors` no longer moves the LTM to the compute device (nor converts it): the
    backend's store copies each column once, to where its layout keeps it."""
    from mplus_fast.checkpoint import load_checkpoint
    model = mplus_fast.load(ckpt_factory(seed=3), backend="fast", ltm_placement="host", dtype=torch.bfloat16)
    _, tensors = load_checkpoint(model.source)
    st = model._state_from_tensors(tensors)
    assert st.ltm[0] is tensors["ltm.0"] and st.ltm_keys[0] is tensors["ltm_keys.0"]


def _storage(t):
    return t.untyped_storage().data_ptr()


def test_state_is_a_view_not_a_second_copy(ckpt_factory):
    path = ckpt_factory(seed=4)
    for backend in ("reference", "fast"):
        model = mplus_fast.load(path, seed=1, backend=backend)
        model.inject_memory(torch.arange(3, 12)[None], update_memory=True)
        store = model.backend.store
        st1, st2 = model.state, model.state
        for l in range(model.config.num_hidden_layers):
            for field, column in (("ltm", "hidden"), ("ltm_keys", "keys"), ("ltm_rf", "rf")):
                assert _storage(getattr(st1, field)[l]) == _storage(store.ltm[l].column(column).data), (backend, field)
            assert _storage(st1.pend[l]) == _storage(store.pend[l].column("hidden").data)
            assert _storage(st1.ltm[l]) == _storage(st2.ltm[l])        # nothing cached, nothing copied
        tensors = model.state_tensors()
        assert _storage(tensors["ltm.0"]) == _storage(store.ltm[0].column("hidden").data)


def test_memory_stats_gives_bytes_per_component(ckpt_factory):
    model = mplus_fast.load(ckpt_factory(seed=4), seed=1, backend="fast")
    stats = model.memory_stats()
    parts = stats["bytes"]
    assert set(parts) == set(model.MEMORY_COMPONENTS)
    assert all(set(v) == {"device", "host"} for v in parts.values())
    memory = sum(v["device"] + v["host"] for k, v in parts.items() if k not in ("weights", "pinned_staging", "decode_cache"))
    assert memory == sum(stats["memory_bytes_by_device"].values())
    assert parts["weights"]["device"] > 0 and parts["bank_kv"]["device"] > 0
    assert parts["pinned_staging"] == {"device": 0, "host": 0}


def test_a_failing_update_leaves_the_store_as_it_was():
    """Everything new is computed before anything is written: a retrieval key that fails (after
    the draws and the new rows' columns) changes no row, no slot and no counter."""
    store = MemoryStore.from_state(small_state(), CFG, base_layout(CFG, torch.float32, "cpu"), NoDerived(key_fn))
    g = torch.Generator().manual_seed(5)
    update(store, torch.randn(CFG.num_hidden_layers, CFG.num_tokens, CFG.hidden_size, generator=g), g, NoDerived(key_fn))
    before = store.view().clone()

    def broken(l, rows):
        raise RuntimeError("key projection failed")
    delta = torch.randn(CFG.num_hidden_layers, CFG.num_tokens, CFG.hidden_size, generator=g)
    try:
        update(store, delta, g, NoDerived(broken))
    except RuntimeError as exc:
        assert "key projection failed" in str(exc)
    else:
        raise AssertionError("the update should have failed")
    after = store.view()
    for name, value in before.__dict__.items():
        got = getattr(after, name)
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, got)), name
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, got), name
        else:
            assert value == got, name


# ---------------------------------------------------------------------- handed-over state, cached view
def _handed_over(st: MemoryState) -> HandedOverState:
    return HandedOverState(**st.__dict__)


def test_a_handed_over_state_becomes_the_store_without_a_copy():
    """A freshly loaded memory (HandedOverState) is kept as it is: each tensor already in its
    column's dtype and device IS the store's buffer; a plain state is copied (its owner keeps it)."""
    layout = base_layout(CFG, torch.float32, "cpu")
    st = small_state()
    copied = MemoryStore.from_state(st, CFG, layout, NoDerived(key_fn))
    st2 = small_state()
    kept = MemoryStore.from_state(_handed_over(st2), CFG, layout, NoDerived(key_fn))
    assert _storage(kept.stm.columns["hidden"]) == _storage(st2.stm)
    assert _storage(copied.stm.columns["hidden"]) != _storage(st.stm)
    for l in range(CFG.num_hidden_layers):
        for field, column in (("ltm", "hidden"), ("ltm_keys", "keys"), ("ltm_ages", "ages"), ("ltm_rf", "rf")):
            assert _storage(kept.ltm[l].column(column).data) == _storage(getattr(st2, field)[l]), field
            assert _storage(copied.ltm[l].column(column).data) != _storage(getattr(st, field)[l]), field
    for a, b in ((copied.view(), kept.view()), (small_state(), kept.view())):
        assert torch.equal(a.stm, b.stm) and all(torch.equal(x, y) for x, y in zip(a.ltm, b.ltm))


def test_a_handed_over_state_in_another_dtype_or_slot_order_is_placed_right():
    """A tensor not in its column's dtype is copied even when handed over; an STM saved with a
    slot layout (stm_slots) is put into slot order in place and reads back in logical order."""
    st = small_state()
    L, N = st.stm.shape[:2]
    g = torch.Generator().manual_seed(3)
    st.stm_slots = torch.stack([torch.randperm(N, generator=g) for _ in range(L)])
    want = st.clone()
    store = MemoryStore.from_state(_handed_over(st), CFG, base_layout(CFG, torch.float32, "cpu"), NoDerived(key_fn))
    assert _storage(store.stm.columns["hidden"]) == _storage(st.stm)      # adopted, permuted in place
    assert torch.equal(store.stm.order, want.stm_slots)
    view = store.view()
    assert torch.equal(view.stm, want.stm) and torch.equal(view.stm_ages, want.stm_ages)
    bf16 = MemoryStore.from_state(_handed_over(small_state()), CFG, base_layout(CFG, torch.bfloat16, "cpu"),
                                  NoDerived(key_fn))
    assert bf16.stm.columns["hidden"].dtype == torch.bfloat16
    assert torch.equal(bf16.view().stm, small_state().stm.to(torch.bfloat16))


def test_the_fast_stores_kv_are_the_same_from_a_handed_over_or_copied_state(ckpt_factory):
    """The fast backend's derived K/V (computed a layer at a time into their slots) do not depend
    on whether the rows were adopted: a loaded model equals one built from the same tensors."""
    from mplus_fast import checkpoint
    path = ckpt_factory(seed=6)
    loaded = mplus_fast.load(path, seed=1, backend="fast", tokenizer=None)
    config, tensors = checkpoint.load_checkpoint(path)
    built = mplus_fast.MPlus(config, tensors, seed=1, backend="fast")
    a, b = loaded.backend.store, built.backend.store
    assert torch.equal(a.stm.columns["kv"], b.stm.columns["kv"])
    assert all(torch.equal(x.live("kv"), y.live("kv")) for x, y in zip(a.ltm, b.ltm))
    assert torch.equal(a.view().stm, b.view().stm)


def test_the_logical_stm_is_gathered_once_until_the_stm_changes():
    """Reads between two updates share one logical-order copy (no gather per read); an update
    (or a detach) makes a new one, equal to a fresh gather; a column in an autograd graph is
    gathered afresh per read, so two reads never share a graph."""
    store = MemoryStore.from_state(small_state(), CFG, base_layout(CFG, torch.float32, "cpu"), NoDerived(key_fn))
    g = torch.Generator().manual_seed(2)
    first = store.view().stm
    assert store.view().stm is first and store.stm.logical("ages") is store.view().stm_ages
    delta = torch.randn(CFG.num_hidden_layers, CFG.num_tokens, CFG.hidden_size, generator=g)
    update(store, delta, g, NoDerived(key_fn))
    after = store.view().stm
    assert after is not first and torch.equal(after, store.stm.at("hidden", store.stm.order))
    assert not torch.equal(after, first)
    update(store, delta, g, NoDerived(key_fn), age_mode="training")   # ages += T in place
    assert torch.equal(store.view().stm_ages, store.stm.at("ages", store.stm.order))
    with torch.inference_mode():
        store.stm.changed()
        made_in_inference = store.view().stm
    assert not made_in_inference.is_inference()                      # usable by any later call
    grad_delta = delta.clone().requires_grad_(True)
    with torch.enable_grad():
        update(store, grad_delta, g, NoDerived(key_fn))
        assert store.view().stm is not store.view().stm and store.view().stm.requires_grad
    store.detach_()
    assert store.view().stm is store.view().stm and not store.view().stm.requires_grad

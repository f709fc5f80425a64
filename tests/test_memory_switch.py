"""Memories switched under one set of weights without recomputing the fast backend's K/V.

A snapshot of a fast-backend model carries the K/V the store keeps for every memory row
(`MemoryStore.derived_rows`); restoring it into the model that made it takes them back instead of
projecting every hidden row again. These tests check that nothing is recomputed then, that the
result is the memory as it was (bit for bit, which recomputing does not promise: a projection of
other row counts may round differently), and that any other memory is recomputed as before."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from mplus_fast.backends.fast import FastBackend
from mplus_fast.memories import read_memory, write_memory
from mplus_fast.testing import make_random_checkpoint

IDS = torch.tensor([[7, 3, 9, 12, 5, 8]])


def _inject(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model.inject_memory(torch.randint(3, model.config.vocab_size, (1, model.config.num_tokens), generator=g),
                            update_memory=True)


@pytest.fixture()
def ckpt(tmp_path):
    return make_random_checkpoint(tmp_path / "ckpt", seed=4, ltm_size=24)


def _no_projection(monkeypatch):
    calls = []
    real = FastBackend.columns
    monkeypatch.setattr(FastBackend, "columns", lambda self, l, h: calls.append(l) or real(self, l, h))
    return calls


def _store_columns(model):
    st = model.backend.store
    out = {f"stm.{k}": v.clone() for k, v in st.stm.columns.items()}
    out["order"] = st.stm.order.clone()
    for part, banks in (("ltm", st.ltm), ("pending", st.pend)):
        for l, b in enumerate(banks):
            out.update({f"{part}.{l}.{k}": b.live(k).clone() for k in b.columns})
    return out


@pytest.mark.parametrize("placement", ["device", "host"])
def test_restore_takes_the_snapshots_kv(ckpt, monkeypatch, placement):
    model = mplus_fast.load(ckpt, ltm_placement=placement)
    _inject(model, 6, seed=1)                       # past a merge: STM, pending and LTM rows all written live
    logits = model(IDS).logits
    columns = _store_columns(model)
    memory = model.snapshot()
    assert memory.derived is not None and memory.stats()["derived_bytes"] > 0
    _inject(model, 3, seed=2)
    assert not torch.equal(model(IDS).logits, logits)
    calls = _no_projection(monkeypatch)
    model.restore(memory)
    assert calls == []                                # no row projected again
    after = _store_columns(model)
    assert after.keys() == columns.keys()
    for k in columns:
        assert torch.equal(after[k], columns[k]), k
    assert torch.equal(model(IDS).logits, logits)
    # the restored memory evolves as the original did: the same injections give the same memory
    _inject(model, 3, seed=2)
    twin = mplus_fast.load(ckpt, ltm_placement=placement)
    twin.restore(memory.fork())
    _inject(twin, 3, seed=2)
    assert torch.equal(twin(IDS).logits, model(IDS).logits)


def test_kv_equal_to_recomputed(ckpt):
    """What is handed over is what the projection gives (to rounding of other row counts)."""
    model = mplus_fast.load(ckpt)
    _inject(model, 6, seed=1)
    memory = model.snapshot()
    model.restore(memory)
    kept = model(IDS).logits
    memory.derived = None                             # force the recomputation
    model.restore(memory)
    torch.testing.assert_close(model(IDS).logits, kept, rtol=1e-5, atol=1e-5)


def test_other_models_and_files_recompute(ckpt, monkeypatch, tmp_path):
    a = mplus_fast.load(ckpt)
    _inject(a, 5, seed=3)
    memory = a.snapshot()
    b = mplus_fast.load(ckpt)                         # same weights, another model instance
    calls = _no_projection(monkeypatch)
    b.restore(memory)
    assert calls                                       # its K/V are its own: recomputed
    write_memory(tmp_path / "m.safetensors", memory)
    loaded = read_memory(tmp_path / "m.safetensors")
    assert loaded.derived is None                     # K/V are never written to disk
    calls.clear()
    a.restore(loaded)
    assert calls
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


def test_restored_memory_is_independent(ckpt):
    model = mplus_fast.load(ckpt)
    _inject(model, 5, seed=3)
    memory = model.snapshot()
    frozen = {k: v.clone() for k, v in memory.derived.items()}
    model.restore(memory)
    _inject(model, 4, seed=5)                          # writes the store, not the memory object
    assert all(torch.equal(memory.derived[k], frozen[k]) for k in frozen)
    fork = memory.fork()
    fork.derived["stm.kv"].zero_()
    assert torch.equal(memory.derived["stm.kv"], frozen["stm.kv"])


def test_bad_handover_is_refused_and_changes_nothing(ckpt):
    model = mplus_fast.load(ckpt)
    _inject(model, 5, seed=3)
    memory = model.snapshot()
    _inject(model, 1, seed=9)
    before = model(IDS).logits
    memory.derived["ltm.0.kv"] = memory.derived["ltm.0.kv"][:-1]
    with pytest.raises(ValueError, match=r"derived column 'ltm.0.kv'"):
        model.restore(memory)
    del memory.derived["ltm.0.kv"]
    with pytest.raises(ValueError, match=r"missing \['ltm.0.kv'\]"):
        model.restore(memory)
    assert torch.equal(model(IDS).logits, before)


def test_reference_backend_has_nothing_to_hand_over(ckpt):
    model = mplus_fast.load(ckpt, backend="reference")
    _inject(model, 3, seed=1)
    memory = model.snapshot()
    assert memory.derived is None and memory.stats()["derived_bytes"] == 0
    logits = model(IDS).logits
    _inject(model, 2, seed=2)
    model.restore(memory)
    assert torch.equal(model(IDS).logits, logits)


# ---------------------------------------------------------------------- the server's resident memories
def test_server_switches_between_resident_memories_without_recomputing(ckpt, tmp_path, monkeypatch):
    from mplus_fast.serve.registry import MemoryRegistry
    model = mplus_fast.load(ckpt)
    reg = MemoryRegistry(model, tmp_path / "data", resident_bytes=64 << 20)
    reg.create("a"), reg.create("b")
    expected = {}
    for i, name in enumerate(["a", "b"]):
        reg.attach(name)
        _inject(model, 3 + i, seed=10 + i)
        reg.commit(name, 3 + i, (3 + i) * model.config.num_tokens)
        expected[name] = model(IDS).logits
    calls = _no_projection(monkeypatch)
    for name in ["a", "b", "a", "b"]:
        reg.attach(name)
        assert torch.equal(model(IDS).logits, expected[name]), name
    assert calls == []                                  # every switch took the resident K/V
    # a memory that was never resident (budget 0) is read from disk and recomputed, with the same result
    cold = MemoryRegistry(model, tmp_path / "data", resident_bytes=0)
    cold.attach("a")
    assert calls and cold.resident.nbytes == 0
    torch.testing.assert_close(model(IDS).logits, expected["a"], rtol=1e-5, atol=1e-5)


def test_resident_budget_drops_least_recently_used(ckpt, tmp_path):
    from mplus_fast.serve.registry import MemoryRegistry, ResidentMemories
    model = mplus_fast.load(ckpt)
    one = ResidentMemories.size(model.snapshot())
    reg = MemoryRegistry(model, tmp_path / "data", resident_bytes=int(2.5 * one))
    for name in ["a", "b", "c"]:
        reg.create(name)
    for name in ["a", "b", "c"]:
        reg.attach(name)
    assert "a" not in reg.resident and "b" in reg.resident and "c" in reg.resident
    assert reg.resident.nbytes <= reg.resident.max_bytes
    reg.attach("b")
    reg.attach("a")                                     # a comes back from disk; c is now the oldest
    assert "c" not in reg.resident and {"a", "b"} <= set(reg.resident._items)
    reg.delete("b")
    assert "b" not in reg.resident


def test_edited_memory_tensors_make_the_kv_stale(ckpt, monkeypatch):
    """A memory whose tensors were replaced or edited in place is recomputed, never read with old K/V."""
    model = mplus_fast.load(ckpt)
    _inject(model, 5, seed=3)
    memory = model.snapshot()
    calls = _no_projection(monkeypatch)
    memory.tensors["memory"].mul_(0.5)                 # in place
    model.restore(memory)
    assert calls
    ref = mplus_fast.load(ckpt, backend="reference")
    ref.restore(memory)
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    memory = model.snapshot()
    memory.tensors = {**memory.tensors, "memory": memory.tensors["memory"] * 2}   # replaced
    calls.clear()
    model.restore(memory)
    assert calls


def test_snapshot_taken_under_inference_mode_keeps_its_kv(ckpt, monkeypatch):
    """A snapshot from inside a generate's streamer (torch.inference_mode) holds ordinary tensors,
    so its K/V can still be checked and handed over; a memory of inference tensors is recomputed."""
    model = mplus_fast.load(ckpt)
    _inject(model, 4, seed=2)
    with torch.inference_mode():
        memory = model.snapshot()
    assert not any(t.is_inference() for t in memory.tensors.values())
    calls = _no_projection(monkeypatch)
    model.restore(memory)
    assert calls == []
    with torch.inference_mode():
        memory.tensors = {k: v.clone() for k, v in memory.tensors.items()}   # inference tensors: untrackable
    model.restore(memory)
    assert calls


def test_a_tensor_replaced_after_the_original_is_freed_makes_the_kv_stale(ckpt, monkeypatch):
    """Python reuses an object's id once it is freed; the hand-over holds the tensors it was made
    from, so a replacement built after the original was dropped is still seen as a change."""
    model = mplus_fast.load(ckpt)
    _inject(model, 5, seed=3)
    memory = model.snapshot()
    shape = memory.tensors["memory"].shape
    del memory.tensors["memory"]
    memory.tensors["memory"] = torch.zeros(shape)
    calls = _no_projection(monkeypatch)
    model.restore(memory)
    assert calls

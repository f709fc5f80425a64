"""`random_model`: a fast-backend model built in place with a synthetic LTM bank (benchmarks of
the released geometry without a checkpoint). Tiny geometry here; on a GPU machine also on CUDA."""
from __future__ import annotations

import pytest
import torch

from mplus_fast.backends.fast import SyntheticBankError
from mplus_fast.config import MPlusConfig
from mplus_fast.testing import RELEASED_LTM_TOKENS, RELEASED_MPLUS, TINY_MPLUS, _config_dict, random_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LTM = 37  # more than R = 4, and not a multiple of the chunk (10)


def config(**over) -> MPlusConfig:
    return MPlusConfig.from_dict(_config_dict(dict(over)))


def build(device="cpu", placement="device", ltm=LTM, dtype=torch.bfloat16, **kw):
    return random_model(config(), device=device, dtype=dtype, ltm_tokens=ltm, ltm_placement=placement,
                        chunk_rows=10, **kw)


def prompt(device, n=6):
    return torch.arange(5, 5 + n, device=device)[None]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def test_released_geometry_constants():
    c = config(**RELEASED_MPLUS)
    assert (c.stm_size, c.ltm_retrieved, c.read_prefix_len) == (10_240, 2_560, 12_801)
    assert c.max_ltm_tokens == RELEASED_LTM_TOKENS == 153_600


def test_builds_in_place_with_the_requested_bank(device):
    m = build(device)
    assert all(t.dtype == torch.bfloat16 and t.device.type == device for t in (
        m.weights.embed, m.backend.lm_head_t, m.backend.dec[0].fused.wqkv, m.backend.stm_h))
    stats = m.memory_stats()
    L = m.config.num_hidden_layers
    assert stats["ltm_tokens_per_layer"] == [LTM] * L
    assert stats["synthetic_ltm"] and stats["pending_tokens"] == 0
    for bank in m.backend.bank:
        assert bank.hidden is None                       # no hidden states were made
        assert bank.kv.data.shape[0] == LTM               # reserved once: no doubling while filling
        assert bank.keys.data.shape[0] == LTM
        assert bool((bank.prov.live == -1).all())
        ages, rf = bank.ages.live, bank.rf.live
        assert int(ages.min()) >= 0 and int(ages.max()) < m.config.max_ltm_tokens
        assert float(rf.min()) >= 0 and float(rf.max()) < m.config.initial_rf_when_moving_stm_to_ltm
    kv_bytes = L * LTM * 2 * m.config.num_key_value_heads * m.config.head_dim * 2
    assert sum(stats["memory_bytes_by_device"].values()) > kv_bytes


@pytest.mark.parametrize("placement", ["device", "host"])
def test_reads_retrieve_from_the_synthetic_bank_and_generate(device, placement):
    m = build(device, placement)
    out = m(prompt(device))
    assert out.logits.shape == (1, 6, m.config.vocab_size) and bool(out.logits.isfinite().all())
    for idx, prov in zip(out.ltm_indices, out.ltm_provenance):
        assert idx.shape == (1, m.config.ltm_retrieved)
        assert int(idx.min()) >= 0 and int(idx.max()) < LTM  # rows of the bank (the pending buffer is empty)
        assert idx.unique().numel() == idx.numel()
        assert bool((prov == -1).all())
    ids = m.generate(prompt(device), max_new_tokens=5, eos_token_id=[])
    assert ids.shape == (1, 11)


def test_host_placement_matches_device(device):
    """The same seed draws the same bank wherever its K/V rows are kept."""
    dev, host = build(device, "device", dtype=torch.float32), build(device, "host", dtype=torch.float32)
    kv = host.backend.bank[0].kv
    assert kv.device.type == "cpu" and (device == "cpu" or kv.data.is_pinned())
    assert torch.equal(dev.backend.bank[1].kv.live.cpu(), host.backend.bank[1].kv.live)
    a, b = dev(prompt(device)), host(prompt(device))
    assert all(torch.equal(x, y) for x, y in zip(a.ltm_indices, b.ltm_indices))
    assert torch.equal(a.logits, b.logits)


def test_seed_decides_the_model():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    assert torch.equal(a.backend.bank[0].keys.live, b.backend.bank[0].keys.live)
    assert torch.equal(a(prompt("cpu")).logits, b(prompt("cpu")).logits)
    assert not torch.equal(a.backend.bank[0].keys.live, c.backend.bank[0].keys.live)


def test_synthetic_bank_refuses_to_be_materialised_or_saved(tmp_path):
    m = build()
    with pytest.raises(SyntheticBankError, match="synthetic"):
        m.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SyntheticBankError, match="synthetic"):
        m.state


def test_without_ltm_tokens_the_model_saves(tmp_path):
    m = build(ltm=0, dtype=torch.float32)
    assert m.memory_stats()["ltm_tokens_per_layer"] == [0] * m.config.num_hidden_layers
    assert not m.memory_stats()["synthetic_ltm"]
    m.save_pretrained(tmp_path / "out")


def test_injections_merge_into_the_synthetic_bank():
    """Merged rows join the bank (K/V, keys, provenance) although it keeps no hidden states."""
    m = build(dtype=torch.float32)
    c = m.config
    assert c.update_ltm_frequency == 2
    ctx = torch.arange(3, 3 + 2 * c.num_tokens)[None]
    m.inject_memory(ctx, update_memory=True)
    first_drops = [p.kv.live.clone() for p in m.backend.pend]
    m.inject_memory(ctx, update_memory=True)
    rec, merged = m.last_update, 2 * c.num_tokens
    assert rec.merged and m.memory_stats()["pending_tokens"] == 0
    assert min(rec.pruned) > 0                            # compaction ran on the bank without hidden states
    for l, bank in enumerate(m.backend.bank):
        assert len(bank) == LTM + merged - rec.pruned[l]
        # merged rows (recall frequency initial_rf − decay = 1) outlive the pruning, in order, at the end
        assert torch.equal(bank.kv.live[-merged:][: c.num_tokens], first_drops[l])
        assert bool((bank.rf.live[-merged:] == 1.0).all())
    assert bool(m(prompt("cpu")).logits.isfinite().all())


def test_memoryllm_without_ltm():
    m = random_model(config(architectures=["MemoryLLM"]), device="cpu", dtype=torch.float32)
    assert m(prompt("cpu")).logits.shape[1] == 6


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ltm_tokens=-1), ValueError, "ltm_tokens=-1"),
    (dict(ltm_tokens=2.5), ValueError, "ltm_tokens=2.5"),
    (dict(ltm_tokens=True), ValueError, "ltm_tokens=True"),
    (dict(ltm_placement="gpu"), ValueError, "ltm_placement='gpu'"),
    (dict(backend="reference"), ValueError, "backend='reference'"),
    (dict(weight_std=0.0), ValueError, "weight_std"),
    (dict(chunk_rows=0), ValueError, "chunk_rows=0"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(device="cpu", dtype=torch.float32, ltm_tokens=3) | kwargs
    with pytest.raises(error, match=match):
        random_model(config(), **args)


def test_bad_config_and_architecture_are_named():
    with pytest.raises(TypeError, match="MPlusConfig"):
        random_model(dict(TINY_MPLUS), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="MemoryLLM"):
        random_model(config(architectures=["MemoryLLM"]), device="cpu", dtype=torch.float32, ltm_tokens=3)

"""The memory budget (mplus_fast.budget): the storage tally itself, then the released geometry on
data-less tensors (CI: one scenario, ≈ 10 s), its components checked against sizes worked out
independently from the geometry."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from typer.testing import CliRunner

from mplus_fast.budget import GB, ROTATED, StorageTally, released_budget, released_config
from mplus_fast.cli import app
from mplus_fast.testing import RELEASED_LTM_TOKENS


# ---------------------------------------------------------------------- the tally
def test_a_storage_is_counted_once_with_its_views_and_released_with_the_last():
    tally = StorageTally()
    with FakeTensorMode(), tally:
        a = torch.empty(1000, dtype=torch.float32, device="meta")
        view = a[10:20].view(2, 5)
        b = torch.empty(10, dtype=torch.int64)
        assert tally.now == {"device": 4000, "host": 80}
        del a
        assert tally.now["device"] == 4000          # the view keeps the storage alive
        del view
        c = torch.empty(500, dtype=torch.bfloat16, device="meta")
        assert tally.now == {"device": 1000, "host": 80}
        assert tally.peak["device"] == 4000
        del b, c
    assert tally.now == {"device": 0, "host": 0}


def test_a_value_read_back_from_a_fake_tensor_reads_as_zero_but_a_constant_keeps_its_value():
    with FakeTensorMode(), StorageTally():
        x = torch.empty(4, device="meta")
        assert int(x.max()) == 0 and not bool((x > 0).any())
        assert int(torch.tensor(7)) == 7


# ---------------------------------------------------------------------- the released geometry
@pytest.fixture(scope="module")
def host_budget():
    return released_budget(ltm_placement="host", batch=1, prompt=512, new_tokens=64, decode_steps=1)


def test_the_released_budget_counts_what_the_geometry_implies(host_budget):
    """Components of the run against sizes from the geometry (bf16: 2 bytes per value)."""
    c = released_config()
    L, d, inter, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    kv_row = 2 * c.num_key_value_heads * c.head_dim * 2                     # K and V of one token, bytes
    at = host_budget.at_decode
    merged = L * (d * (c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim)  # q|k|v
                  + c.num_attention_heads * c.head_dim * d + 3 * d * inter) * 2                    # o, gate|up, down
    lora_corrections = at[("weights: fused and merged projections, lm_head", "device")] - merged - V * d * 2
    assert 0 <= lora_corrections < 0.2 * GB                                # rank-16 encoder corrections only
    assert at[("weights: token embeddings", "host")] == V * d * 2           # untied lm_head: on the host
    assert ("weights: token embeddings", "device") not in at
    assert at[("STM hidden states", "host")] == L * c.stm_size * d * 2         # with the bank, on the host
    assert ("STM hidden states", "device") not in at
    assert at[("STM K/V", "host")] == L * c.stm_size * kv_row                # pre-RoPE, with the bank
    assert at[(ROTATED, "device")] == L * (1 + c.stm_size) * kv_row + 4 * c.head_dim // 2   # + its inv_freq
    assert at[("LTM bank K/V", "host")] == L * RELEASED_LTM_TOKENS * kv_row
    assert ("LTM bank K/V", "device") not in at                            # the host placement holds
    assert at[("LTM retrieval keys", "device")] == L * RELEASED_LTM_TOKENS * c.selector_hidden_dim * 2
    cache_rows = c.ltm_retrieved + 512 + 64                                  # [bos | STM] is attended in place
    assert at[("decode cache", "device")] == L * cache_rows * (kv_row + 1) + 8  # + validity masks, next_pos
    assert host_budget.shared_prefix_in_decode_cache == 0


def test_the_released_budget_serves_within_21_gb(host_budget):
    """The serving peak (prefill of 512 tokens + decode) with the bank on the host: what is
    resident plus the prompt's working memory, within the paper's 21 GB with no lever left."""
    b = host_budget
    resident = b.phase("load: build the model").end["device"]
    assert 18.2 * GB < resident < 18.3 * GB                                  # 18.23 GB
    assert resident < b.serving_peak() < resident + 2 * GB
    assert 20.0 * GB < b.serving_peak() <= 20.1 * GB                          # 20.07 GB
    assert b.peak("device") == b.serving_peak()          # building the model peaks lower (19.47 GB)
    assert 19.4 * GB < b.phase("load: build the model").peak["device"] < 19.5 * GB
    assert b.levers() == []
    text = b.table()
    assert "bank on the host" in text and "serving peak with every lever" in text


def test_cli_budget_on_a_checkpoint_config(tmp_path):
    from mplus_fast.testing import make_random_checkpoint
    ckpt = make_random_checkpoint(tmp_path / "tiny")
    result = CliRunner().invoke(app, ["budget", str(ckpt), "--placement", "both", "--prompt-len", "8", "--new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "bank on the host" in result.output and "bank on the device" in result.output
    bad = CliRunner().invoke(app, ["budget", "--placement", "disk"])
    assert bad.exit_code == 2 and "--placement 'disk'" in bad.output


@pytest.mark.parametrize("bad", [dict(batch=0), dict(prompt=-1), dict(decode_steps=0), dict(ltm_rows=-5), dict(batch=True)])
def test_bad_scenarios_are_refused_naming_the_argument(bad):
    from mplus_fast.budget import run_budget
    with pytest.raises(ValueError, match=next(iter(bad))):
        run_budget(released_config(), **bad)

"""Every memory token carries the id of the injection that wrote it, through STM → pending → LTM."""
from __future__ import annotations

import torch

import mplus_fast


def test_provenance_flows_to_retrieval(ckpt_factory, backend):
    model = mplus_fast.load(ckpt_factory(seed=5), seed=3, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(9):
        model.inject_memory(torch.randint(3, 96, (1, 8), generator=g), update_memory=True)
    st = model.state
    assert st.next_injection_id == 9
    assert set(st.stm_prov.flatten().tolist()) <= set(range(9)) | {-1}
    assert (st.stm_prov[:, -4:] == 8).all()
    merged = set(st.ltm_prov[0].tolist())
    assert merged - {-1}, "no injected token reached the LTM"
    out = model(torch.tensor([[4, 5, 6, 7]]))
    for l in range(model.config.num_hidden_layers):
        idx = out.ltm_indices[l][0]
        bank_prov = torch.cat([st.ltm_prov[l], st.pend_prov[l]])
        assert torch.equal(out.ltm_provenance[l][0], bank_prov[idx])
    counts = out.recalled_injections()
    assert sum(counts.values()) == model.config.ltm_retrieved * model.config.num_hidden_layers

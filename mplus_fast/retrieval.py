"""Long-term-memory retrieval, reference semantics (SPEC §3 step 1).

score_j = mean over the prompt's query vectors of sigmoid(q · key_j) (no 1/√s scale), over the LTM
keys followed by the pending buffer's keys; the top R indices, sorted ascending, then placed by
age, oldest first. Ties (equal scores at the R-th place, equal ages) are broken by ascending index:
the reference leaves them to numpy/torch sort internals, which we document and do not imitate.
"""
from __future__ import annotations

import torch


def cyclic_indices(n: int, r: int) -> torch.Tensor:
    """arange(n) repeated end to end, cut to the LAST r entries (n=3, r=7 → 2,0,1,2,0,1,2)."""
    reps = -(-r // n)
    return torch.arange(n, dtype=torch.int64).repeat(reps)[-r:]


def retrieval_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries (n, s), keys (M, s) -> (M,) mean sigmoid score, in the activation dtype like the reference."""
    return torch.sigmoid(queries @ keys.transpose(0, 1)).mean(dim=0)


def top_r_ascending(scores: torch.Tensor, r: int) -> torch.Tensor:
    """The r best indices along the last dim (ties: lower index first), in ascending index order."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :r]
    return order.sort(dim=-1).values


def order_by_age(indices: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
    """Place `indices` (ascending) oldest first (descending age); ties keep ascending index."""
    return indices[torch.sort(-ages, stable=True).indices]


def select_ltm_rows(queries: torch.Tensor | None, ltm_keys: torch.Tensor, pend_keys: torch.Tensor,
                    ltm_ages: torch.Tensor, pend_ages: torch.Tensor, r: int) -> torch.Tensor:
    """Indices (in [LTM; pending] numbering, placement order) of the rows one prompt retrieves.

    `queries` = query_proj(input_layernorm(x)) over the prompt's real tokens, (n, s).
    Returns an empty tensor when the LTM is empty (n_l = 0) or r = 0.
    """
    n_ltm = ltm_keys.shape[0]
    if r == 0 or n_ltm == 0:
        return torch.empty(0, dtype=torch.int64)
    if n_ltm < r:  # too small to score: cycle through the LTM (pending rows not retrievable)
        idx = cyclic_indices(n_ltm, r)
        return order_by_age(idx, ltm_ages.cpu()[idx])
    keys = torch.cat([ltm_keys, pend_keys.to(ltm_keys.device)]) if pend_keys.shape[0] else ltm_keys
    scores = retrieval_scores(queries, keys.to(queries.device, queries.dtype))
    idx = top_r_ascending(scores.cpu(), r)
    ages = torch.cat([ltm_ages.cpu(), pend_ages.cpu()])
    return order_by_age(idx, ages[idx])

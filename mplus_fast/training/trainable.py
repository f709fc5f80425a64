"""An `MPlus` whose weights learn: write → read with gradients through the reference backend.

The reference backend is the arithmetic of the authors' model in plain PyTorch; `MPlus` wraps it
in inference mode, so training calls it directly with autograd on:

    inject(ids, grad)   the encoder adapter writes T memory tokens per layer (with or without a graph)
    write(delta)        the SPEC §5 update (random drop from the model's generator, pending buffer,
                        merges) under autograd, so rows written with a graph keep it wherever
                        they go (STM, pending buffer, LTM)
    read(ids, ...)      the decoder adapter reads over [bos | retrieved LTM | STM | ids]

The memory persists from step to step (as the authors train, and as a user's model lives);
`detach_memory()` cuts it from the previous step's graph. Trainable weights are leaves with
`requires_grad`; in bf16/fp16 the optimizer steps float32 master copies and the model's
tensors are refreshed from them (`MasterWeights`).
"""
from __future__ import annotations

import math

import torch

from mplus_fast.config import MPlusConfig
from mplus_fast.memory import MemoryState
from mplus_fast.model import MPlus
from mplus_fast.retrieval import order_by_age
from mplus_fast.weights import SELECTORS, Weights, expected_weight_shapes

# What each trainable group holds (see `parameter_groups`).
GROUPS = ("backbone", "adapters", "retriever")
TARGETS = {"scratch": ("backbone", "adapters", "retriever"), "finetune": ("adapters", "retriever")}


def parameter_groups(weights: Weights) -> dict[str, list[torch.Tensor]]:
    """The model's tensors by group: `adapters` = both LoRA adapters (A, B), `retriever` = the
    selectors f_q (query_proj) and f_k (key_proj), `backbone` = everything else (embeddings,
    norms, base projections, o_proj, lm_head, the learned BOS and new-memory embedding).
    `encoder_query_proj` is in no group: the reference never uses it (SPEC §2)."""
    adapters, retriever, backbone = [], [], []
    seen: set[int] = set()

    def add(group, t):
        if id(t) not in seen:
            seen.add(id(t))
            group.append(t)

    for t in (weights.embed, weights.lm_head, weights.final_norm, weights.bos, weights.new_memory_pos):
        add(backbone, t)
    for layer in weights.layers:
        for t in (layer.input_norm, layer.post_norm, layer.o_proj):
            add(backbone, t)
        for lin in layer.proj.values():
            add(backbone, lin.weight)
            for a, b in lin.adapters.values():
                add(adapters, a)
                add(adapters, b)
        for name in ("query_proj", "key_proj"):
            for w in layer.selectors.get(name, []):
                add(retriever, w)
    return {"backbone": backbone, "adapters": adapters, "retriever": retriever}


class MasterWeights:
    """Float32 masters of the trainable tensors. In float32 the master IS the model tensor; in
    bf16/fp16 the optimizer updates a float32 copy and `sync()` rounds it into the model."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.model = tensors
        self.master = [t if t.dtype == torch.float32 else t.detach().float().requires_grad_(True) for t in tensors]

    def grads_to_master(self) -> None:
        for t, m in zip(self.model, self.master):
            if m is not t:
                m.grad = None if t.grad is None else t.grad.float()
                t.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        for t, m in zip(self.model, self.master):
            if m is not t:
                t.copy_(m)


class TrainableMPlus:
    """A reference-backend `MPlus` with some weight groups trainable (see module doc)."""

    def __init__(self, model: MPlus, groups: tuple[str, ...]):
        if model.backend_name != "reference":
            raise ValueError("training runs on the reference backend (load the model with backend='reference')")
        unknown = set(groups) - set(GROUPS)
        if unknown or not groups:
            raise ValueError(f"trainable groups {sorted(unknown) or list(groups)} must be a non-empty subset of {list(GROUPS)}")
        self.model = model
        self.groups = {g: ts for g, ts in parameter_groups(model.weights).items() if g in groups}
        for ts in self.groups.values():
            for t in ts:
                t.requires_grad_(True)
        self.masters = {g: MasterWeights(ts) for g, ts in self.groups.items()}

    @property
    def config(self) -> MPlusConfig:
        return self.model.config

    @property
    def backend(self):
        return self.model.backend

    @property
    def state(self) -> MemoryState:
        return self.model.backend.memory_state()

    # ------------------------------------------------------------------ write / read
    def inject(self, ids: torch.Tensor, grad: bool) -> torch.Tensor:
        """New memory (L, T, d) for one context (m,) through the encoder adapter."""
        with torch.set_grad_enabled(grad):
            return self.backend.inject(ids)

    def write(self, delta: torch.Tensor):
        """The memory update, with autograd on (rows that carry a graph keep it)."""
        with torch.enable_grad():
            record = self.backend.update(delta)
        self.model.last_update = record
        return record

    def read(self, ids: torch.Tensor, valid: torch.Tensor, *, retrieve: bool, query_mask: torch.Tensor | None = None,
             observe=None):
        with torch.enable_grad():
            return self.backend.read(ids, valid, retrieve=retrieve, query_mask=query_mask, observe=observe)

    def detach_memory(self) -> None:
        """Cut the memory from the graph of the previous step (values unchanged)."""
        self.backend.store.detach_()

    # ------------------------------------------------------------------ the retriever's view
    def bank(self, layer: int, detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows a read can retrieve at `layer`, [LTM; pending], and their provenance; with
        `detach=False` the rows written with a graph this step keep it."""
        st = self.state
        if not st.ltm:
            d = self.config.hidden_size
            return torch.empty(0, d), torch.empty(0, dtype=torch.int64)
        rows = torch.cat([st.ltm[layer], st.pend[layer].to(st.ltm[layer].dtype)])
        rows = rows.detach() if detach else rows
        return rows, torch.cat([st.ltm_prov[layer], st.pend_prov[layer]])

    def next_injection_id(self) -> int:
        return self.state.next_injection_id

    def retrieved_rows(self, ids: torch.Tensor, valid: torch.Tensor, query_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per layer, the [LTM; pending] rows (indices, distinct) that a read of these rows
        retrieves, any row of the batch: a forward pass without a graph."""
        with torch.no_grad():
            res = self.backend.read(ids, valid, retrieve=True, query_mask=query_mask)
        return [idx.reshape(-1).unique() for idx in res.ltm_indices]

    def place_rows(self, injections, slot: float, among: list[torch.Tensor] | None = None):
        """Re-age every layer's retrievable rows ([LTM; pending]) so that the rows written by
        `injections` come after a share `slot` of the reference rows in the retrieved block
        (oldest first, SPEC §4): slot 0 puts them before every reference row, slot 1 after. The
        reference rows of layer l are the other rows of `among[l]` (row indices, e.g. the rows a
        first read retrieved: `retrieved_rows`) or, with `among=None`, every other retrievable
        row. The injections' rows keep their own order and every other row keeps its order (the
        ages are rewritten with room between any two), so only the fact's place in the block
        changes (ties in age are broken as a read breaks them). Ages order the retrieved rows and
        nothing else a read does. Returns the undo."""
        want = torch.tensor(sorted(injections), dtype=torch.int64)
        saved = []
        with torch.inference_mode():         # ages carry no graph; a memory written by inject_memory holds inference tensors
            for l, (ltm, pend) in enumerate(zip(self.backend.store.ltm, self.backend.store.pend)):
                parts = [ltm.live("ages"), pend.live("ages")]
                ages = torch.cat(parts).long()
                mine = torch.isin(torch.cat([ltm.live("prov"), pend.live("prov")]), want.to(ages.device))
                ref = ~mine
                if among is not None:
                    chosen = torch.zeros_like(mine)
                    chosen[among[l].to(ages.device)] = True
                    ref &= chosen
                if not bool(mine.any()) or not bool(ref.any()):
                    continue
                new = self._ages_with_rows_placed(ages, mine, ref, slot)
                start = 0
                for a in parts:
                    saved.append((a, a.clone()))
                    a.copy_(new[start:start + a.numel()].to(a.dtype))
                    start += a.numel()

        def undo() -> None:
            with torch.inference_mode():
                for a, old in saved:
                    a.copy_(old)
        return undo

    @staticmethod
    def _ages_with_rows_placed(ages: torch.Tensor, mine: torch.Tensor, ref: torch.Tensor, slot: float) -> torch.Tensor:
        """`place_rows`' arithmetic on one layer's ages. Every row first gets a distinct age in the
        order a read places rows (oldest first, ties by ascending index: SPEC §3), spaced to leave
        room for all of mine between any two; mine then go after `slot` of the reference rows."""
        n, scale = ages.numel(), int(mine.sum()) + 1
        order = order_by_age(torch.arange(n, device=ages.device), ages)   # the read's placement order over the whole bank
        place = torch.empty_like(order)
        place[order] = torch.arange(n, device=ages.device)
        new = (n - place) * scale                                 # distinct, descending along the order
        others = new[ref].sort(descending=True).values
        before = min(int(slot * (others.numel() + 1)), others.numel())   # reference rows placed before mine
        base = 1 if before == others.numel() else int(others[before]) + 1
        rank = torch.empty_like(place[mine])
        rank[place[mine].argsort()] = torch.arange(rank.numel() - 1, -1, -1, device=ages.device)   # my oldest highest
        new[mine] = base + rank
        return new


# ---------------------------------------------------------------------- a model from scratch
def fresh_tensors(config: MPlusConfig, seed: int, init_std: float = 0.02) -> dict[str, torch.Tensor]:
    """Initial tensors of a model trained from scratch, in the upstream layout: linear weights
    N(0, init_std²) (residual outputs o_proj/down_proj scaled by 1/√(2L), as GPT-2), LoRA A
    N(0, 1/in) and B = 0 (each adapter starts as the base model), selectors N(0, 1/fan_in),
    norms 1, the learned BOS and the STM N(0, 1), the new-memory embedding 0, an empty LTM."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    residual_scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
    for name, shape in expected_weight_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name == "new_memory_positional_emb":
            t = torch.zeros(shape)
        elif name == "bos_embedding":
            t = torch.randn(shape, generator=g)
        elif ".lora_B." in name:
            t = torch.zeros(shape)
        elif ".lora_A." in name or any(f"self_attn.{sel}." in name for sel in SELECTORS):
            t = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        else:
            t = torch.randn(shape, generator=g) * init_std
            if name.endswith(("o_proj.weight", "down_proj.base_layer.weight", "down_proj.weight")):
                t *= residual_scale
        out[name] = t
    L, d = config.num_hidden_layers, config.hidden_size
    out["memory"] = torch.randn(L, config.stm_size, d, generator=g)
    if config.is_mplus:
        s = config.selector_hidden_dim
        for i in range(L):
            out[f"ltm.{i}"] = torch.zeros(0, d)
            out[f"ltm_keys.{i}"] = torch.zeros(0, s)
            out[f"ltm_ages.{i}"] = torch.zeros(0)
            out[f"ltm_recall_frequencies.{i}"] = torch.zeros(0)
    else:
        out["initialized"] = torch.tensor(1, dtype=torch.uint8)
    return out

"""What every task does with a model: build one with a fresh memory, write text into it, ask a
question in one of the three reading modes, and see which past injections each layer recalled.

The three modes compared by every task, in the same run and over the same memory:
- `mplus`: the full model: short-term memory plus the retrieved long-term rows (`retrieve=True`);
- `stm`: the same memory read without the long-term memory (`retrieve=False`): what MemoryLLM,
  the short-term-only predecessor, would see;
- `borderline`: no memory of the material: the question alone, asked on a fresh memory (the
  checkpoint's own memory, before anything of the example was injected). It measures what the
  model answers from its weights and the prompt alone, so `mplus − borderline` is what the memory
  contributed.
Reads never change the memory (nothing at inference updates it but an injection), so both memory
modes are asked at the same moment of the same stream.

A fresh memory per example (`ModelSource.fresh`): every example starts from the checkpoint's
memory with a generator seeded from (seed, example index), so an example's result does not depend
on which examples ran before it — the basis of resumable runs. The model is built once; each
example restores the memory snapshot taken at load (`mplus_fast.memories`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.chunking import chunk_ids
from mplus_fast.model import MPlus

MODES = ("mplus", "stm", "borderline")
MODE_LABELS = {"mplus": "M+", "stm": "STM only", "borderline": "borderline"}


def check_modes(modes) -> tuple[str, ...]:
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad or modes}: choose from {list(MODES)}")
    return tuple(m for m in MODES if m in modes)   # canonical order


@dataclass
class ModelSource:
    """A checkpoint loaded once; `fresh(index)` hands out its model on the checkpoint's memory."""
    path: str
    config: object
    tensors: dict
    generation_config: dict | None
    device: str = "cpu"
    dtype: torch.dtype | None = None
    backend: str = "fast"
    seed: int = 0

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=None, backend="fast", seed=0) -> "ModelSource":
        from mplus_fast.hf.hub import resolve_checkpoint
        path = resolve_checkpoint(path)          # a folder, or a hub id from the local hub cache
        config, tensors = load_checkpoint(path)
        gen = Path(path) / "generation_config.json"
        return cls(str(path), config, tensors, json.loads(gen.read_text()) if gen.is_file() else None,
                   device, dtype, backend, seed)

    def __post_init__(self):
        self._model: MPlus | None = None

    def example_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def fresh(self, index: int = 0) -> MPlus:
        """The model, its memory put back to the checkpoint's (`MPlus.restore` of a snapshot taken
        at load: the weights are not rebuilt), its generator seeded from (seed, index) and its
        RoPE cache as loaded. The same object every time: a previous example's model is reset."""
        if self._model is None:
            self._model = MPlus(self.config, self.tensors, device=self.device, dtype=self.dtype, backend=self.backend,
                                seed=self.example_seed(index), generation_config=self.generation_config)
            self._initial = (self._model.snapshot(), self._model.rope.state())
            self.tensors = {}   # the model holds what it needs; do not keep a second (float32) copy
        else:
            memory, rope = self._initial
            self._model.restore(memory)
            self._model.rope.load_state(rope)
        self._model.generator.manual_seed(self.example_seed(index))
        return self._model

    @property
    def is_mplus(self) -> bool:
        return bool(self.config.is_mplus)

    def config_hash(self) -> str:
        """sha256 of the canonical config.json: which model the numbers belong to."""
        text = json.dumps(self.config.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def available_modes(source: ModelSource, modes) -> tuple[str, ...]:
    """MemoryLLM has no long-term memory: its `stm` mode would repeat `mplus`, so it is dropped."""
    modes = check_modes(modes)
    return modes if source.is_mplus else tuple(m for m in modes if m != "stm")


# ---------------------------------------------------------------------- writing
def inject_text(model: MPlus, ids: list[int] | torch.Tensor, chunk_tokens: int | None = None) -> list[int]:
    """Inject token ids chunk by chunk (`mplus_fast.chunking`: `chunk_tokens`, default T, per
    injection, no tiny tail) with `update_memory=True`; returns the injection ids written."""
    return [inject_chunk(model, c) for c in split_ids(model, ids, chunk_tokens)]


def split_ids(model: MPlus, ids, chunk_tokens: int | None = None) -> list[torch.Tensor]:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return chunk_ids(ids, chunk_tokens or model.config.num_tokens) if ids.numel() else []


def inject_marked(model: MPlus, ids, offset: int, length: int, chunk_tokens: int | None = None) -> list[int]:
    """Inject `ids` chunk by chunk; returns the injection ids whose chunks hold any of the
    tokens [offset, offset + length) (a needle, a planted event)."""
    written = [(inject_chunk(model, c), c.numel()) for c in split_ids(model, ids, chunk_tokens)]
    return span_injections(offset, length, [n for _, n in written], written[0][0] if written else 0)


def span_injections(offset: int, length: int, sizes: list[int], first_injection: int) -> list[int]:
    """The injection ids (consecutive from `first_injection`, chunk lengths `sizes`) holding any
    token of [offset, offset + length)."""
    out, start = [], 0
    for i, size in enumerate(sizes):
        if start < offset + length and offset < start + size:
            out.append(first_injection + i)
        start += size
    return out


def inject_chunk(model: MPlus, chunk: torch.Tensor) -> int:
    """One injection with update; returns its injection id (the provenance of its memory rows)."""
    injection = model.memory_counts()["injections"]
    model.inject_memory(chunk.to(model.device), update_memory=True)
    return injection


# ---------------------------------------------------------------------- reading
@dataclass
class Answer:
    text: str                                   # decoded continuation (before post-processing)
    ids: list[int]
    recall: list[bool] | None = None            # per layer: a row of a target injection retrieved
    share: list[float] | None = None            # per layer: fraction of the retrieved rows from the targets
    recalled: dict[int, int] = field(default_factory=dict)   # injection id -> rows, all layers

    def to_json(self) -> dict:
        out = {"text": self.text}
        if self.recall is not None:
            out.update(recall=self.recall, share=[round(s, 4) for s in self.share])
        return out


def read_mode(mode: str) -> bool:
    """`retrieve=` for a mode (borderline reads like M+, on a memory that never saw the example)."""
    return mode != "stm"


def ask(model: MPlus, prompt_ids, tokenizer, *, mode: str, max_new_tokens: int,
        targets: list[int] | None = None, eos_ids: list[int] | None = None) -> Answer:
    """Greedy answer to a prompt, stopped at the model's or the tokenizer's end-of-sequence ids;
    with `targets` (injection ids holding the answer) and the long-term memory read, also which
    layers recalled them (one more forward of the prompt: `generate` does not return the
    retrieved rows)."""
    x = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.device)[None]
    retrieve = read_mode(mode)
    eos = sorted(set(_model_eos(model)) | set(eos_ids or []))
    out = model.generate(x, max_new_tokens=max_new_tokens, retrieve=retrieve, eos_token_id=eos or None)
    new = _cut_at_eos(out[0, x.shape[1]:].tolist(), eos)
    answer = Answer(tokenizer.decode(new), new)
    if targets is not None and retrieve and model.config.is_mplus:
        prov = model(x, retrieve=True).ltm_provenance
        answer.recall, answer.share, answer.recalled = recall_by_layer(prov, targets)
    return answer


def _model_eos(model: MPlus) -> list[int]:
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _cut_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def recall_by_layer(provenance, targets: list[int]) -> tuple[list[bool], list[float], dict[int, int]]:
    """Per layer: whether any retrieved row came from a target injection, and which share did."""
    want = torch.tensor(sorted(set(targets)), dtype=torch.int64)
    recall, share, counts = [], [], {}
    for prov in provenance:
        row = prov[0].cpu()
        hits = torch.isin(row, want)
        recall.append(bool(hits.any()))
        share.append(float(hits.float().mean()) if row.numel() else 0.0)
        for i in row.tolist():
            counts[i] = counts.get(i, 0) + 1
    return recall, share, counts


def locate(model: MPlus, targets: list[int]) -> list[list[int]] | None:
    """Per layer, how many memory tokens written by the target injections are now in the STM,
    the pending buffer and the LTM bank: [stm, pending, ltm]. Recall@R only means something where
    the target has rows to retrieve (pending + LTM > 0). Reads `model.state`, a snapshot of the
    memory: cheap on small models, a full copy of the memory at the released size (turn it off
    there)."""
    if not model.config.is_mplus:
        return None
    st = model.state
    want = torch.tensor(sorted(set(targets)), dtype=torch.int64)
    count = lambda t: int(torch.isin(t.cpu(), want).sum())
    return [[count(st.stm_prov[l]), count(st.pend_prov[l]), count(st.ltm_prov[l])]
            for l in range(model.config.num_hidden_layers)]


def token_logprobs(model: MPlus, context_ids, continuation_ids, *, retrieve: bool = True) -> tuple[list[float], bool, object]:
    """Log-probabilities of `continuation_ids` after `context_ids` in one read over the memory
    (the retrieval's queries are all the tokens read), whether each was the greedy choice, and
    the read's provenance. With no context the first continuation token has no prediction and
    is left out (as a rolling log-likelihood does)."""
    ctx, cont = list(context_ids), list(continuation_ids)
    if not cont:
        raise ValueError("the continuation is empty")
    ids = torch.tensor(ctx + cont, dtype=torch.long, device=model.device)[None]
    out = model(ids, retrieve=retrieve)
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)        # (n, V)
    first = max(len(ctx), 1)
    targets = ids[0, first:]
    rows = logp[first - 1: ids.shape[1] - 1]
    picked = rows.gather(1, targets[:, None])[:, 0]
    greedy = bool((rows.argmax(-1) == targets).all())
    return picked.tolist(), greedy, out.ltm_provenance


def chance_recall(location: list[list[int]], model_or_sizes, retrieved: int) -> list[float]:
    """Per layer, the recall a retriever choosing `retrieved` rows at random would have: the
    chance that R rows drawn without replacement from the M rows of the LTM and pending buffer
    include one of the k rows of the fact (1 when M <= R: every row is read). The floor that a
    trained retriever's recall@R must beat."""
    sizes = bank_sizes(model_or_sizes) if not isinstance(model_or_sizes, list) else model_or_sizes
    out = []
    for (_, pend, ltm), m in zip(location, sizes):
        k = pend + ltm
        if k == 0:
            out.append(0.0)
        elif m <= retrieved:
            out.append(1.0)
        else:   # 1 - C(m - k, R) / C(m, R), as a product to stay in floats
            miss = 1.0
            for i in range(retrieved):
                miss *= max(m - k - i, 0) / (m - i)
                if miss == 0.0:
                    break
            out.append(1.0 - miss)
    return out


def bank_sizes(model: MPlus) -> list[int]:
    """Per layer, the rows retrieval chooses from: LTM plus pending buffer (cheap: counts only)."""
    st = model.memory_counts()
    return [n + st["pending"] for n in st["ltm_sizes"]]

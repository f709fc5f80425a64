"""The training objectives: answers read over the memory, text continued from it, and the
retriever's binary cross-entropy; retriever recall@R.

Rows of one read are left-padded like any batch of prompts (`MPlus` semantics). Each row has a
prompt (the question, or the first words of a continuation) whose tokens alone choose the LTM
rows (`query_mask`), as `generate`'s prefill does, and targets on the tokens to predict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mplus_fast import layers as F_

IGNORE = -100


KINDS = ("qa", "repeat", "continuation")


@dataclass
class ReadRow:
    """One row of a read. `qa`: a question (prompt) and its answer + eos (target); `repeat`: an
    injected context given its first words, the rest to be read back from the memory (the
    authors' "repeat" task: it teaches reading from the memory); `continuation`: the text that
    follows the last injection."""
    kind: str
    prompt: list[int]           # tokens that choose the retrieved rows
    target: list[int]           # tokens predicted after the prompt
    source: int = -1            # injection id holding what the row needs (-1: none, no retriever loss)

    @property
    def predict_prompt(self) -> bool:   # texts also predict their prompt's tokens 2…k
        return self.kind != "qa"


@dataclass
class ReadBatch:
    ids: torch.Tensor           # (B, n) int64, left-padded
    valid: torch.Tensor         # (B, n) bool
    query_mask: torch.Tensor    # (B, n) bool: prompt tokens
    targets: torch.Tensor       # (B, n) int64: the token position i must predict next, or IGNORE
    sources: torch.Tensor       # (B,) int64
    kinds: list[str]

    def of(self, kind: str) -> torch.Tensor:
        """(B,) bool: the rows of one kind."""
        return torch.tensor([k == kind for k in self.kinds], dtype=torch.bool)


def make_batch(rows: list[ReadRow], pad_id: int) -> ReadBatch:
    n = max(len(r.prompt) + len(r.target) for r in rows)
    B = len(rows)
    ids = torch.full((B, n), pad_id, dtype=torch.int64)
    valid = torch.zeros(B, n, dtype=torch.bool)
    qmask = torch.zeros(B, n, dtype=torch.bool)
    targets = torch.full((B, n), IGNORE, dtype=torch.int64)
    for b, r in enumerate(rows):
        seq = r.prompt + r.target
        start = n - len(seq)
        ids[b, start:] = torch.tensor(seq)
        valid[b, start:] = True
        qmask[b, start:start + len(r.prompt)] = True
        # position i predicts token i + 1: the targets, and for continuations the prompt's own tail
        first = 1 if r.predict_prompt else len(r.prompt)
        for j in range(max(first, 1), len(seq)):
            targets[b, start + j - 1] = seq[j]
    return ReadBatch(ids, valid, qmask, targets, torch.tensor([r.source for r in rows], dtype=torch.int64),
                     [r.kind for r in rows])


def token_loss(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the predicted tokens of the chosen rows, and their count."""
    if rows is not None:
        logits, targets = logits[rows], targets[rows]
    mask = targets != IGNORE
    count = int(mask.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[mask], targets[mask], reduction="sum"), count


@torch.no_grad()
def answer_exact(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per chosen row: whether every target token is the argmax (teacher-forced exact match)."""
    pred = logits[rows].argmax(-1)
    tgt = targets[rows]
    ok = (pred == tgt) | (tgt == IGNORE)
    return ok.all(dim=1)


def bce(scores: torch.Tensor, labels: torch.Tensor, negative_weight: float) -> torch.Tensor:
    """The authors' selector loss, per row of (B, M) scores: mean −log s over the positives and
    mean −log(1 − s) over the negatives, combined as (pos + w·neg) / (1 + w), so the few
    positives weigh as much as the many negatives. Returns (B,)."""
    eps = 1e-5
    pos, neg = labels.float(), (~labels).float()
    loss_pos = (-(scores + eps).log() * pos).sum(1) / pos.sum(1).clamp_min(1)
    loss_neg = (-(1 - scores + eps).log() * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (loss_pos + negative_weight * loss_neg) / (1 + negative_weight)


def retriever_loss(tm, layer_inputs: dict[int, torch.Tensor], batch: ReadBatch, negative_weight: float = 1.0,
                   into_memory: bool = False):
    """BCE of the retrieval scores over every row a read could retrieve ([LTM; pending]) against
    provenance: positives are the rows written by the injection a row needs. Scores are computed
    as at inference (mean over the prompt's tokens of sigmoid(f_q(x)·f_k(row))). By default the
    rows, the layer inputs and the layer's norm are detached, so the loss trains f_q and f_k only;
    `into_memory` lets it reach the rows written with a graph this step and the questions' hidden
    states too (co-training: the encoder learns to write rows the retriever can find).
    Returns (mean loss over the (row, layer) pairs that have positives, their count)."""
    c = tm.config
    asking = batch.sources >= 0
    if not bool(asking.any()) or not c.is_mplus:
        return None, 0
    losses = []
    qmask = batch.query_mask[asking].float()                       # (b, n)
    for l, layer in enumerate(tm.model.weights.layers):
        rows, prov = tm.bank(l, detach=not into_memory)
        if rows.shape[0] == 0:
            continue
        labels = prov[None, :] == batch.sources[asking][:, None]   # (b, M)
        has = labels.any(1)
        if not bool(has.any()):
            continue
        norm = layer.input_norm.detach()   # the layer's norm belongs to the backbone: not trained by this loss
        keys = F_.selector(layer.selectors["key_proj"], F_.rms_norm(rows, norm, c.rms_norm_eps), c.hidden_act)
        x = layer_inputs[l] if into_memory else layer_inputs[l].detach()
        h = F_.rms_norm(x[asking], norm, c.rms_norm_eps)
        q = F_.selector(layer.selectors["query_proj"], h, c.hidden_act)          # (b, n, s)
        sig = torch.sigmoid(q @ keys.transpose(0, 1))                             # (b, n, M)
        scores = (sig * qmask[:, :, None]).sum(1) / qmask.sum(1, keepdim=True)    # (b, M)
        losses.append(bce(scores[has], labels[has], negative_weight))
    if not losses:
        return None, 0
    flat = torch.cat(losses)
    return flat.mean(), flat.numel()


@torch.no_grad()
def retrieval_recall(tm, read_result, batch: ReadBatch) -> tuple[float, int]:
    """recall@R: per (question row, layer) whose needed injection has rows in [LTM; pending], the
    share of those rows the read retrieved (distinct rows). Returns (sum of recalls, count)."""
    total, count = 0.0, 0
    if not tm.config.is_mplus:
        return 0.0, 0
    for l, idx in enumerate(read_result.ltm_indices):
        _, prov = tm.bank(l)
        for b in range(batch.ids.shape[0]):
            s = int(batch.sources[b])
            if s < 0 or batch.kinds[b] != "qa":
                continue
            positives = int((prov == s).sum())
            if positives == 0:
                continue
            chosen = idx[b].unique() if idx.numel() else idx.new_empty(0)
            hits = int((prov[chosen] == s).sum()) if chosen.numel() else 0
            total += hits / positives
            count += 1
    return total, count

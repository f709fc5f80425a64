"""Greedy retention on held-out facts, logged while training runs (the full evaluation is
`mplus-fast eval retention`): per distance D, the share of answers generated exactly, reading
the STM only and with retrieval. The training memory is restored afterwards, bit for bit, and
the model's generator too, so monitoring does not change the run."""
from __future__ import annotations

import random

import torch

from mplus_fast.inputs import short_injections_expected
from mplus_fast.training.facts import FactSource, draw_facts
from mplus_fast.training.vocab import Codec


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


class RetentionMonitor:
    def __init__(self, source: FactSource, codec: Codec, facts: int, distances: list[int], seed: int):
        rng = random.Random(seed + 7)
        self.codec = codec
        self.distances = sorted(set(distances))
        self.items = []
        for fact in draw_facts(rng, source.split, facts):
            ctx = codec.encode(source.fact_context(rng, fact))
            dis = [codec.encode(source.distractor(rng)[0]) for _ in range(max(self.distances, default=0))]
            self.items.append((ctx, dis, codec.encode(fact.question), fact.answer))

    @torch.no_grad()
    @short_injections_expected()   # its passages are cut at word ends to T tokens: short by design
    def __call__(self, model) -> dict:
        saved_state, saved_gen = model.backend.state, model.generator.get_state()
        hits = {(d, r): 0 for d in self.distances for r in (False, True)}
        try:
            for ctx, dis, q, answer in self.items:
                model.backend.state = saved_state.clone()
                model.inject_memory(torch.tensor(ctx), update_memory=True)
                done = 0
                for d in self.distances:
                    for ids in dis[done:d]:
                        model.inject_memory(torch.tensor(ids), update_memory=True)
                    done = d
                    for r in (False, True):
                        out = model.generate(torch.tensor(q)[None], max_new_tokens=8, retrieve=r)
                        text = self.codec.decode(out[0, len(q):])
                        hits[(d, r)] += normalise(text) == normalise(answer)
        finally:
            model.backend.state, _ = saved_state, model.generator.set_state(saved_gen)
        n = len(self.items)
        return {f"{'mplus' if r else 'stm'}@{d}": round(h / n, 4) for (d, r), h in hits.items()}

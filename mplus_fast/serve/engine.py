"""What the endpoints ask of the model, run on the model worker thread: generation over a chosen
memory (with per-token log-probabilities when asked), and injection into a memory.

Reads never change a memory: the generator state (part of a memory: it decides which STM tokens
the next injection drops) is put back after every generation, and a request's `seed` seeds its
sampling. An injection is all or nothing: every id is checked before the first chunk is written,
the memory is committed to disk once all chunks are in, and any failure detaches the memory so
the next request reloads it from disk as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mplus_fast.chunking import chunk_ids
from mplus_fast.serve.errors import bad_request
from mplus_fast.serve.registry import MemoryRegistry
from mplus_fast.serve.worker import Deadline
from mplus_fast.text import Completion, complete_ids


@dataclass
class GenRequest:
    memory_id: str
    ids: list[int]                  # what the model reads (no BOS)
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: list[str]
    seed: int | None
    retrieve: bool
    logprobs: int | None = None     # top-k alternatives per token (completions)
    echo_lead: int = 0              # leading BOS tokens the client sent and the model did not read


class DeadlineStreamer:
    """Wraps a streamer (or none) and stops the generation when the request's time is up."""

    def __init__(self, inner, deadline: Deadline):
        self.inner, self.deadline = inner, deadline

    def put(self, value):
        self.deadline.check()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class Engine:
    def __init__(self, model, registry: MemoryRegistry, tokenizer):
        self.model, self.registry, self.tokenizer = model, registry, tokenizer
        self.bos = model.config.bos_token_id

    # ------------------------------------------------------------------ ids
    def strip_bos(self, ids: list[int]) -> tuple[list[int], int]:
        lead = 0
        while lead < len(ids) and self.bos is not None and ids[lead] == self.bos:
            lead += 1
        return ids[lead:], lead

    def check_ids(self, ids: list[int], param: str) -> None:
        V = self.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < V), None)
        if bad is not None:
            raise bad_request(f"{param} holds token id {bad}, outside the vocabulary [0, {V})", param)

    # ------------------------------------------------------------------ generation
    def generate(self, req: GenRequest, deadline: Deadline, streamer=None) -> tuple[Completion, dict | None]:
        self.registry.attach(req.memory_id)
        model = self.model
        saved = model.generator.get_state()
        try:
            if req.seed is not None:
                model.generator.manual_seed(req.seed)
            ids = torch.tensor(req.ids, dtype=torch.long, device=model.device)
            result = complete_ids(model, ids, tokenizer=self.tokenizer, streamer=DeadlineStreamer(streamer, deadline),
                                  stop_strings=req.stop or None, max_new_tokens=req.max_new_tokens,
                                  do_sample=req.do_sample, temperature=req.temperature if req.do_sample else None,
                                  top_p=req.top_p if req.do_sample else None, top_k=req.top_k if req.do_sample else None,
                                  retrieve=req.retrieve)
            logprobs = self.logprobs(req, result) if req.logprobs is not None else None
        finally:
            model.generator.set_state(saved)
        return result, logprobs

    def logprobs(self, req: GenRequest, result: Completion) -> dict:
        """OpenAI completion logprobs over the echoed prompt (when echo) and the answer: for
        token i, log p(token i | tokens before it) from one forward over prompt + answer."""
        model, tok = self.model, self.tokenizer
        seq = req.ids + result.token_ids
        with torch.inference_mode():
            logits = model(torch.tensor(seq, device=model.device)[None], retrieve=req.retrieve).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        k = max(req.logprobs, 1)
        tokens, token_lp, top = [], [], []
        for i, t in enumerate(seq):
            tokens.append(tok.decode([t], skip_special_tokens=False))
            if i == 0:
                token_lp.append(None)
                top.append(None)
                continue
            token_lp.append(float(lp[i - 1, t]))
            vals, idx = lp[i - 1].topk(k)
            alts = {tok.decode([j], skip_special_tokens=False): float(v) for v, j in zip(vals.tolist(), idx.tolist())}
            alts.setdefault(tokens[-1], token_lp[-1])
            top.append(alts)
        lead = [tok.decode([self.bos], skip_special_tokens=False)] * req.echo_lead
        return {"tokens": lead + tokens, "token_logprobs": [None] * req.echo_lead + token_lp,
                "top_logprobs": [None] * req.echo_lead + top, "prompt_len": req.echo_lead + len(req.ids)}

    # ------------------------------------------------------------------ injection
    def inject(self, memory_id: str, ids: list[int], chunk_tokens: int | None, deadline: Deadline) -> dict:
        self.registry.get(memory_id)
        ids, _ = self.strip_bos(ids)
        if not ids:
            raise bad_request("nothing to inject: the input holds no tokens", "text")
        self.check_ids(ids, "ids")
        chunks = chunk_ids(torch.tensor(ids, dtype=torch.long), chunk_tokens or self.model.config.num_tokens)
        self.registry.attach(memory_id)
        injection_ids = []
        try:
            for chunk in chunks:
                deadline.check()
                self.model.inject_memory(chunk.to(self.model.device), update_memory=True)
                injection_ids.append(self.model.last_update.injection_id)
            meta = self.registry.commit(memory_id, len(chunks), len(ids))
        except BaseException:
            self.registry.detach()      # the memory on disk is still the one before this request
            raise
        return {"object": "memory.injection", "memory_id": memory_id, "chunks": len(chunks), "tokens": len(ids),
                "injection_ids": injection_ids, "memory": meta}

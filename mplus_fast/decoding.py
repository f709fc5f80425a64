"""Static decoding for the fast backend (issue 4 §5): the whole `generate` loop with its per-step
state in device tensors, so that on a GPU one step (forward, logits processing, sampling, EOS
bookkeeping) is a single captured CUDA graph, and on a CPU a step is one Python call.

Sampling on the device without changing the random stream (see `sampling`): each step draws
the Exp(1) noise `torch.multinomial` would draw from the model's CPU generator, and the device
does the argmax, so tokens and generator state equal the reference loop's (tests/test_decoding.py
checks both). With a GPU, the noise for step s+1
is drawn while step s runs, and undone (generator state restored) if step s finished every
sequence.

`MPLUS_FAST_CUDA_GRAPHS=0` turns graph capture off (eager static steps, same results).
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

from mplus_fast.kvcache import KVCache
from mplus_fast.sampling import exponential_noise, filter_logits

log = logging.getLogger(__name__)

WARMUP_STEPS = 2   # eager steps on the capture stream before capturing (cuBLAS/allocator set-up)
MIN_REPLAYS = 4    # capture only when at least this many steps are left to replay it
CACHED_DECODERS = int(os.environ.get("MPLUS_FAST_DECODER_CACHE", "2"))   # captured decoders kept per backend


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("MPLUS_FAST_CUDA_GRAPHS", "1") != "0"


class StaticDecoder:
    """Decodes `max_new_tokens` from a prefill's cache and last logits (see module doc)."""

    def __init__(self, backend, cache: KVCache, inv_freq: torch.Tensor, *, max_new_tokens: int, do_sample: bool,
                 temperature: float, top_k, top_p, eos: list[int], pad: int, generator: torch.Generator,
                 on_step=None):
        dev = cache.next_pos.device
        B, V = cache.next_pos.shape[0], backend.cfg.vocab_size
        self.backend, self.cache = backend, cache
        self.max_new = max_new_tokens
        self.sampling = (do_sample, temperature, top_k, top_p)
        self.has_eos = bool(eos)
        self.key = decoder_key(cache, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad)
        # Everything a step reads or writes, at fixed addresses (a captured graph replays on them).
        self.inv_freq = inv_freq.to(device=dev, dtype=torch.float32).clone()
        self.eos = torch.tensor(eos or [-1], dtype=torch.int64, device=dev)
        self.pad = torch.full((B,), pad, dtype=torch.int64, device=dev)
        self.pos = cache.next_pos[:, None].clone()                            # (B, 1)
        self.slot = torch.full((1,), cache.length[0], dtype=torch.int64, device=dev)
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)             # column of `out`
        self.tok = torch.zeros(B, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, max_new_tokens), pad, dtype=torch.int64, device=dev)
        self.noise = torch.ones(B, V, dtype=torch.float32, device=dev) if do_sample else None
        # A host-resident embedding table cannot be read inside a graph: the step's rows are then
        # looked up before it (one read-back of the chosen tokens per step) into this buffer.
        self.x = (torch.empty(B, 1, backend.cfg.hidden_size, dtype=backend.m.dtype, device=dev)
                  if getattr(backend, "host_embedding", False) else None)
        self.host_noise = None
        if do_sample and dev.type == "cuda":
            self.host_noise = torch.empty(B, V, dtype=torch.float32).pin_memory()
        self.graph = None                 # the captured step, once there is one
        self.captures = 0                 # graphs captured by this decoder (at most one)
        self._stream, self._warm, self._capture_failed = None, 0, False
        self._bind(generator, on_step)

    def _bind(self, generator: torch.Generator, on_step) -> None:
        self.generator = generator
        # A host callback after each step (streamers, stop strings): tokens (B,) → (B,) bool of
        # sequences to finish now, or None. It reads the tokens back, so it costs a sync per step.
        self.on_step = on_step
        self.can_finish = self.has_eos or on_step is not None

    def restart(self, cache: KVCache, inv_freq: torch.Tensor, generator: torch.Generator, on_step=None) -> None:
        """Decode again from a new prefill of the same shape (`decoder_key`), reusing the captured
        step: the prefill's cache and the per-step state are copied into this decoder's fixed
        buffers (one device copy of the cache instead of a new capture)."""
        key = decoder_key(cache, self.max_new, *self.sampling, *self.key[-2:])
        if key != self.key:
            raise ValueError(f"StaticDecoder.restart: the new prefill's shape {key} differs from this decoder's {self.key}")
        for static, new in ((self.cache.k, cache.k), (self.cache.v, cache.v), (self.cache.valid, cache.valid)):
            for dst, src in zip(static, new):
                dst.copy_(src)
        for (dk, dv), (sk, sv) in zip(self.cache.shared, cache.shared):   # the backend's one buffer: the same
            if dk.data_ptr() != sk.data_ptr():                               # storage unless it was reallocated
                dk.copy_(sk)
                dv.copy_(sv)
        self.cache.shared_version = cache.shared_version
        self.inv_freq.copy_(inv_freq)
        self.pos.copy_(cache.next_pos[:, None])
        self.slot.fill_(cache.length[0])
        self.step.zero_()
        self.tok.zero_()
        self.finished.zero_()
        self.out.copy_(self.pad[:, None].expand_as(self.out))
        self._bind(generator, on_step)

    # ------------------------------------------------------------------ one step, on the device
    def _choose(self, logits: torch.Tensor) -> None:
        """Pick, record and account the next token from float32 logits (B, V)."""
        do_sample, temperature, top_k, top_p = self.sampling
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            tok = (probs / self.noise).argmax(dim=-1)
        else:
            tok = logits.argmax(dim=-1)
        tok = torch.where(self.finished, self.pad, tok)
        self.out.index_copy_(1, self.step, tok[:, None])
        self.finished |= (tok[:, None] == self.eos).any(dim=-1)
        self.tok.copy_(tok)
        self.step += 1

    def _advance(self) -> None:
        """Forward the last chosen token, then choose the next: one graph-capturable step."""
        embedded = {} if self.x is None else {"x": self.x}
        logits = self.backend.decode_forward(self.cache, self.tok, self.pos, self.slot, self.inv_freq, **embedded)
        self.pos += 1
        self.slot += 1
        self._choose(logits)

    # ------------------------------------------------------------------ the loop, on the host
    def _draw_noise(self) -> None:
        if self.noise is None:
            return
        if self.host_noise is None:                      # CPU: draw straight into the step's buffer
            exponential_noise(self.noise.shape, self.generator, out=self.noise)
        else:
            exponential_noise(self.host_noise.shape, self.generator, out=self.host_noise)
            self.noise.copy_(self.host_noise)            # stream-ordered after the running step

    def _all_finished(self) -> bool:
        return self.can_finish and bool(self.finished.all())

    def _after_step(self, column: int) -> None:
        if self.on_step is not None:
            stop = self.on_step(self.out[:, column])
            if stop is not None:
                self.finished |= stop.to(self.finished.device)

    def run(self, first_logits: torch.Tensor) -> torch.Tensor:
        """Returns the new tokens (B, k), k ≤ max_new_tokens (fewer when every sequence ended).
        The generator is consumed exactly as the reference loop consumes it: one draw per chosen
        token when sampling, none after the step that finished every sequence."""
        self._draw_noise()
        self._choose(first_logits)
        self._after_step(0)
        done = 1
        if done < self.max_new and not self._all_finished():
            self._draw_noise()
            while True:
                self._step(self.max_new - done)
                self._after_step(done)
                done += 1
                if done == self.max_new:
                    break
                saved = self.generator.get_state() if self.noise is not None and self.can_finish else None
                self._draw_noise()          # for the next step, overlapping the running one on a GPU
                if self._all_finished():
                    if saved is not None:   # the reference would not have drawn it
                        self.generator.set_state(saved)
                    break
        return self.out[:, :done].clone()    # `out` is rewritten by the next call of a reused decoder

    def _step(self, remaining: int) -> None:
        """One step: the captured graph if there is one; else eager, or (on a GPU with enough
        steps left to pay for a capture) warm-up and capture."""
        if self.x is not None:
            self.x.copy_(self.backend.embed(self.tok)[:, None])
        if self.graph is not None:
            self.graph.replay()
        elif not graphs_enabled(self.tok.device) or self._capture_failed or (
                self._warm == 0 and remaining < WARMUP_STEPS + MIN_REPLAYS):   # a capture would not pay
            self._advance()
        else:
            self._advance_or_capture()

    def _advance_or_capture(self) -> None:
        """On a GPU: the first steps run eagerly on a side stream (warm-up), then the step is
        captured once and replayed from then on. A capture that fails falls back to eager steps
        (capturing executes nothing, so no state is touched)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if self._warm < WARMUP_STEPS:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self._advance()
            torch.cuda.current_stream().wait_stream(self._stream)
            self._warm += 1
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._advance()
        except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", e)
            self._capture_failed = True
            self._advance()
            return
        self.graph = graph
        self.captures += 1
        graph.replay()

    @property
    def reusable(self) -> bool:
        """Whether a later call of the same shape gains by reusing this decoder (it holds a graph)."""
        return self.graph is not None


def decoder_key(cache: KVCache, max_new_tokens: int, do_sample: bool, temperature, top_k, top_p, eos, pad) -> tuple:
    """What a captured step depends on: shapes, dtype and device of the cache, and every option
    baked into the step (the sampling values are Python constants of the graph)."""
    k0 = cache.k[0]
    shared = tuple(cache.shared[0][0].shape) if cache.shared else None
    sampling = (float(temperature), top_k, top_p) if do_sample else ()
    return (len(cache.k), tuple(k0.shape), shared, k0.dtype, str(k0.device), max_new_tokens, bool(do_sample), sampling,
            tuple(eos), int(pad))


class DecoderCache:
    """Captured decoders of one backend, by `decoder_key`, least recently used first out (each
    holds a KV cache of its shape on the device, so only `CACHED_DECODERS` are kept)."""

    def __init__(self, capacity: int = CACHED_DECODERS):
        self.capacity = capacity
        self.entries: dict[tuple, StaticDecoder] = {}

    def take(self, key: tuple) -> StaticDecoder | None:
        return self.entries.pop(key, None)

    def keep(self, decoder: StaticDecoder) -> None:
        if self.capacity <= 0 or not decoder.reusable:
            return
        self.entries[decoder.key] = decoder
        while len(self.entries) > self.capacity:
            del self.entries[next(iter(self.entries))]

    def clear(self) -> None:
        self.entries.clear()


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def decoder_cache(backend) -> DecoderCache:
    """The captured decoders of `backend` (dropped with it)."""
    cache = _CACHES.get(backend)
    if cache is None:
        cache = _CACHES[backend] = DecoderCache()
    return cache

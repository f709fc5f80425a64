"""Stop strings: a sequence ends once its generated text contains one of them.

As in Hugging Face's `StopStringCriteria`, the returned ids include the token that completed the
stop string; text answers (`MPlus.complete`, `.chat`, the server) are cut just before it, as the
OpenAI API does. The text is decoded from the generated ids after every step (the new tokens
only, never the prompt), so a stop string that spans several tokens is found.
"""
from __future__ import annotations

import torch


class StopStrings:
    def __init__(self, tokenizer, stop_strings: list[str], batch: int):
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (pass tokenizer=..., or load a checkpoint that has one)")
        self.tokenizer = tokenizer
        self.strings = list(stop_strings)
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.stopped = [False] * batch

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) just chosen → (B,) bool: the sequences that reached a stop string now."""
        hit = []
        for b, t in enumerate(tokens.tolist()):
            if not self.stopped[b]:
                self.ids[b].append(int(t))
                text = self.tokenizer.decode(self.ids[b])
                self.stopped[b] = any(s in text for s in self.strings)
            hit.append(self.stopped[b])
        return torch.tensor(hit, dtype=torch.bool)


def cut_at_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """`text` up to (not including) the first stop string, and whether one was found."""
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    if not cuts:
        return text, False
    return text[:min(cuts)], True

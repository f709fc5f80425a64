"""Streamers with the Hugging Face interface (`put(ids)`, `end()`), usable without transformers.

`generate(..., streamer=s)` calls `s.put(prompt_ids)` once, then `s.put(new_ids)` after every
step, then `s.end()`, exactly as Hugging Face `generate` does; so transformers' own
`TextStreamer` / `TextIteratorStreamer` work too (given our `TextTokenizer`, which decodes like an
HF tokenizer). These two are the same idea with no transformers import: text is printed (or
queued) in pieces that end at a space or a line break, so a word is never cut in half, and the
prompt is skipped with `skip_prompt=True`.
"""
from __future__ import annotations

import queue
import sys


class TextStreamer:
    """Writes the decoded text to `file` (stdout) as it is generated."""

    def __init__(self, tokenizer, skip_prompt: bool = False, file=None, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.file = file
        self._ids: list[int] = []
        self._printed = 0
        self._prompt_pending = True

    def put(self, value) -> None:
        ids = value.tolist() if hasattr(value, "tolist") else list(value)
        if ids and isinstance(ids[0], list):
            if len(ids) > 1:
                raise ValueError("streamers support a batch of one sequence only")
            ids = ids[0]
        if self._prompt_pending:
            self._prompt_pending = False
            if self.skip_prompt:
                return
        self._ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
        if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the next token
            return
        cut = max(text.rfind(" "), text.rfind("\n")) + 1
        if cut > self._printed:
            self.on_text(text[self._printed:cut], stream_end=False)
            self._printed = cut

    def end(self) -> None:
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs) if self._ids else ""
        self.on_text(text[self._printed:], stream_end=True)
        self._ids, self._printed, self._prompt_pending = [], 0, True

    def on_text(self, text: str, stream_end: bool = False) -> None:
        out = self.file or sys.stdout
        out.write(text + ("\n" if stream_end else ""))
        out.flush()


class TextIteratorStreamer(TextStreamer):
    """Queues the text pieces; iterate over it (in another thread than `generate`) to read them.
    `timeout` (seconds) bounds each wait for the next piece (queue.Empty after it)."""

    _END = object()

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self.queue.get(timeout=self.timeout)
        if item is self._END:
            raise StopIteration
        return item

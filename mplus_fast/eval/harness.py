"""`mplus_fast` as an lm-evaluation-harness model: any harness task runs on an M+ checkpoint.

    mplus-fast eval harness --model mplus_fast --model_args pretrained=CKPT,inject_document=true \\
        --tasks TASK [--include_path DIR] ...          # every other argument goes to lm_eval

lm-eval 0.4 finds models only in its own registry (no entry-point discovery), so the model is
registered when this module is imported: `mplus-fast eval harness` imports it and then runs
lm_eval's own command line; from Python, `import mplus_fast.eval.harness` before
`lm_eval.simple_evaluate(model="mplus_fast", ...)`. The `lm_eval.models` entry point in
pyproject.toml declares it for harness versions that discover plugins.

Model arguments (`--model_args k=v,...`): `pretrained` (checkpoint folder), `tokenizer` (default:
the folder's; or "llama3"), `device`, `dtype`, `backend`, `seed`, `retrieve` (false: STM only),
`max_gen_toks` (default 256), `max_length` (tokens per read in rolling log-likelihoods, default
2048), `threads` (torch CPU threads, 0: torch's default), and the memory option:
- `inject_document=false` (default): every request is read as one prompt over the checkpoint's
  memory;
- `inject_document=true`: a request's context is split at its LAST `document_sep` (default a
  blank line): the part before (the document) is injected into a fresh memory chunk by chunk
  (`chunk_tokens`, default T), the part after (the question) is read. Requests sharing a
  document share that memory (reads do not change it). Rolling log-likelihoods inject each
  window after scoring it, so later windows read the memory of the earlier ones.
"""
from __future__ import annotations

from mplus_fast.eval.session import ModelSource, inject_text, token_logprobs

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as exc:   # the class needs the harness; the CLI says how to get it
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: pip install 'mplus_fast[eval]'") from exc

NAME = "mplus_fast"


class MPlusLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu", dtype: str | None = None,
                 backend: str = "fast", seed: int = 0, retrieve: bool = True, inject_document: bool = False,
                 document_sep: str = "\n\n", chunk_tokens: int = 0, max_gen_toks: int = 256, max_length: int = 2048,
                 threads: int = 0, **_harness):   # batch_size, max_batch_size: one request at a time
        super().__init__()
        from mplus_fast.cliutil import parse_dtype, set_threads
        set_threads(int(threads))
        from mplus_fast.eval.tokenizer import load_tokenizer
        self.tok = load_tokenizer(tokenizer, pretrained)
        self.source = ModelSource.from_pretrained(pretrained, device=_usable(device), dtype=parse_dtype(dtype),
                                                  backend=backend, seed=int(seed))
        self.tok.check_model(self.source.config.vocab_size)
        self.retrieve, self.inject_document = bool(retrieve), bool(inject_document)
        self.document_sep = document_sep.encode().decode("unicode_escape")   # "\\n\\n" from the command line
        self.chunk_tokens, self.max_gen_toks, self.max_length = int(chunk_tokens), int(max_gen_toks), int(max_length)
        self._document, self._model = None, None

    # ------------------------------------------------------------------ memory per document
    def _split(self, context: str) -> tuple[str, str]:
        if not self.inject_document or self.document_sep not in context:
            return "", context
        doc, _, rest = context.rpartition(self.document_sep)
        return doc, self.document_sep + rest

    def _model_for(self, document: str):
        """The model whose memory holds `document` (kept while the next requests share it)."""
        if self._model is None or document != self._document:
            self._model = self.source.fresh(0)
            if document:
                inject_text(self._model, self.tok.encode(document), self.chunk_tokens)
            self._document = document
        return self._model

    # ------------------------------------------------------------------ the harness API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            doc, question = self._split(context)
            model = self._model_for(doc)
            ctx_ids, cont_ids = self._encode_pair(question, continuation)
            logprobs, greedy, _ = token_logprobs(model, ctx_ids, cont_ids, retrieve=self.retrieve)
            out.append((sum(logprobs), greedy))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness does: trailing spaces of the context move to the continuation, and the
        continuation's ids are those of (context + continuation) after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the log-probabilities of every token of the text but the first (nothing is
        before it: M+ has no BOS token id), read in windows of `max_length` tokens that overlap
        by one token; with `inject_document`, each window is injected once it is scored."""
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text)
            model = self.source.fresh(0)
            total, start = 0.0, 1
            while start < len(ids):
                end = min(start + self.max_length - 1, len(ids))
                logprobs, _, _ = token_logprobs(model, ids[start - 1:start], ids[start:end], retrieve=self.retrieve)
                total += sum(logprobs)
                if self.inject_document:
                    inject_text(model, ids[start - 1:end], self.chunk_tokens)
                start = end
            self._document, self._model = None, None
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mplus_fast.eval.session import ask
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            doc, question = self._split(context)
            model = self._model_for(doc)
            answer = ask(model, self.tok.encode(question), self.tok, mode="mplus" if self.retrieve else "stm",
                         max_new_tokens=max_new, eos_ids=self.tok.eos_ids).text
            cut = min([answer.find(u) for u in until if u and u in answer], default=len(answer))
            out.append(answer[:cut])
        return out

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name


def _usable(device: str | None) -> str:
    """lm_eval passes `--device` (default cuda:0) even on machines without a GPU: there, as its
    own Hugging Face model does, run on the CPU and say so."""
    import torch
    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        import warnings
        warnings.warn(f"mplus_fast: device {device!r} is not available, running on the CPU", stacklevel=3)
        return "cpu"
    return device


def register() -> None:
    """Put `mplus_fast` into lm_eval's model registry (idempotent). lm_eval fills its registry
    with its own models only when it finds it empty, so those are registered first."""
    import lm_eval.models  # noqa: F401
    if NAME not in model_registry:
        model_registry.register(NAME, target=MPlusLM)


register()


def main(argv: list[str]) -> None:
    """lm_eval's command line with `mplus_fast` registered."""
    import sys
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])

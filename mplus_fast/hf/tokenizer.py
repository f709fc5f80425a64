"""The tokenizer that goes with a checkpoint: text in, ids out, never the tokenizer's BOS.

M+ and MemoryLLM prepend their own learned BOS vector at every layer (SPEC §2), so the ids given
to the model must not start with the tokenizer's BOS. `TextTokenizer` is the one place where text
becomes ids for the whole package (CLI, server, training, evaluation):

- `encode(text)` never adds special tokens, and strips a leading BOS that the text itself spelled
  (a chat template that starts with `{{ bos_token }}` does);
- `decode(ids)` skips special tokens by default;
- `apply_chat_template(messages)` renders the folder's Jinja chat template (tokenizer_config.json
  `chat_template`, or `chat_template.jinja`), or a plain "role: content" layout when there is none.

Loading: `load_tokenizer(path)` takes a tokenizer.json or a folder holding one (the `tokenizers`
package, extra `mplus_fast[tokenizer]`), reading tokenizer_config.json / special_tokens_map.json
beside it for the special tokens and the template. A folder with only a slow tokenizer
(tokenizer.model) is loaded through `transformers` when installed (extra `mplus_fast[hf]`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool")

# Used when the folder has no chat template: simple, unambiguous, and easy to reproduce by hand.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


class TokenizerError(ValueError):
    """A missing, unreadable or unusable tokenizer (the message names the file)."""


def _token_text(value) -> str | None:
    """special_tokens_map / tokenizer_config store a token as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


class TextTokenizer:
    """Text ↔ ids for a checkpoint (see the module doc). `backend` is a `tokenizers.Tokenizer`
    (or, for a slow tokenizer, a transformers tokenizer)."""

    def __init__(self, backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, source: str = ""):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self._is_fast = hasattr(backend, "encode_batch")

    # ------------------------------------------------------------------ ids
    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if hasattr(self.backend, "token_to_id"):
            return self.backend.token_to_id(token)
        i = self.backend.convert_tokens_to_ids(token)
        return None if i == getattr(self.backend, "unk_token_id", object()) else i

    @property
    def vocab_size(self) -> int:
        if hasattr(self.backend, "get_vocab_size"):
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added; a leading BOS spelled by the text is removed."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._is_fast:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False)
        return self.strip_bos(ids)

    def strip_bos(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        while ids and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, **_ignored) -> str:
        """Text of `ids` (special tokens skipped by default). Extra keyword arguments of Hugging
        Face's `decode` (e.g. clean_up_tokenization_spaces) are accepted, so HF streamers work."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # Hugging Face tokenizers are callables; streamers and lm-eval call `decode` only.
    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        """Render a conversation with the chat template; `tokenize=True` returns ids (no BOS)."""
        check_messages(messages)
        text = render_template(self.chat_template or PLAIN_TEMPLATE, messages, add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.source or '?'}, vocab={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'plain'})")


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r} is not one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string (text only)")


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, **special) -> str:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("chat templates need the `jinja2` package: pip install jinja2 "
                             "(or pip install 'mplus_fast[hf]')") from None

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"chat template failed: {exc}") from None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A `TextTokenizer` from a tokenizer.json, or from a folder holding one (or a slow tokenizer)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    file = p / TOKENIZER_FILE if p.is_dir() else p
    config = _read_json(folder / CONFIG_FILE)
    special = _read_json(folder / SPECIAL_FILE)
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not template and (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    tokens = {k: _token_text(config.get(k)) or _token_text(special.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    if file.is_file():
        backend = _fast_backend(file)
    elif p.is_dir() and any((p / n).is_file() for n in ("tokenizer.model", "vocab.json")):
        backend = _slow_backend(p)
    elif not p.exists():
        raise TokenizerError(f"tokenizer not found: {p}")
    else:
        raise TokenizerError(f"no tokenizer in {p}: expected {TOKENIZER_FILE} (or a tokenizer.json path)")
    return TextTokenizer(backend, chat_template=template, source=str(p), **tokens)


def _fast_backend(file: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("the `tokenizers` package is not installed: pip install tokenizers "
                             "(or pip install 'mplus_fast[tokenizer]')") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({str(exc).splitlines()[0][:200]})") from None


def _slow_backend(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"{folder} holds a slow tokenizer (no {TOKENIZER_FILE}); loading it needs "
                             "transformers: pip install 'mplus_fast[hf]'") from None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def find_tokenizer(folder: str | Path) -> TextTokenizer | None:
    """The tokenizer saved in a checkpoint folder, or None when it has none."""
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file() or (folder / "tokenizer.model").is_file():
        return load_tokenizer(folder)
    return None

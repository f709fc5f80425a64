"""Hugging Face conventions for mplus_fast, none of which imports transformers at import time.

| module | what |
| --- | --- |
| `tokenizer` | the checkpoint's tokenizer: text ↔ ids without the tokenizer's BOS, chat templates |
| `options` | generation_config.json defaults, GenerationConfig, keyword overrides |
| `streamers` | `TextStreamer` / `TextIteratorStreamer` (the HF interface, no transformers needed) |
| `stopping` | stop strings |
| `hub` | a hub id resolved from the local hub cache (or downloaded when possible) |
| `auto` | `AutoConfig` / `AutoModelForCausalLM` registration (needs `transformers`: extra `mplus_fast[hf]`) |
"""
from mplus_fast.hf.streamers import TextIteratorStreamer, TextStreamer
from mplus_fast.hf.tokenizer import TextTokenizer, TokenizerError, load_tokenizer

__all__ = ["TextTokenizer", "TokenizerError", "load_tokenizer", "TextStreamer", "TextIteratorStreamer"]

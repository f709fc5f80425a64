"""Test helpers: a small byte-level BPE tokenizer trained here (no download), and a random
checkpoint folder that holds it, so text-in/text-out paths run end to end."""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 384
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
TEXT = ("The lighthouse keeper wrote the tide tables every morning. Emma walked to Highbury with Mr. Knightley. "
        "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse. "
        "The copper key is in the old desk by the window. What is the name of the ship? The Pequod sailed. ") * 8
# Starts with the BOS, as Llama-3's template does: the package must strip it.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_tokenizer(folder: Path, vocab_size: int = VOCAB, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|pad|>", "model_max_length": 4096}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def make_text_checkpoint(folder: Path, seed: int = 3, **config) -> Path:
    """A random tiny M+ checkpoint with the tokenizer above (BOS id 0, EOS id 1, pad 2)."""
    from mplus_fast.testing import make_random_checkpoint
    make_random_checkpoint(folder, seed=seed, **{"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1,
                                                  "pad_token_id": 2, **config})
    make_tokenizer(folder)
    return folder

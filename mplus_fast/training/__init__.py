"""Training M+ (issue 11): the dual-LoRA write → read recipe and the co-trained retriever.

    from mplus_fast.training import load_config, train
    train(load_config("mplus_fast/training/configs/tiny-mplus.toml"))

Modules: `config` (TOML stages), `trainable` (gradients through the reference backend),
`data` (episodes), `objectives` (losses, recall@R), `loop` (steps, checkpoints, resume),
`facts` (synthetic facts in the books' prose), `vocab` (the tiny model's tokenizer),
`monitor` (retention logged while training). See docs/training.md.
"""
from mplus_fast.training.config import TrainConfig, TrainConfigError, load_config, parse_config
from mplus_fast.training.loop import train

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "parse_config", "train"]

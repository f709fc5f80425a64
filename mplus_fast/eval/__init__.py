"""mplus_fast.eval: the evaluation suite (`mplus-fast eval TASK CKPT`).

Tasks (one module each): `retention` (knowledge retention vs distance, recall@R by layer),
`longbench`, `niah` (needle in a haystack, depth × length), `events` (planted-event multiple
choice), `perplexity`. Every task compares, in one run and over the same memory, M+
(`mplus`), its STM-only mode (`stm`, retrieval off) and the `borderline` (no memory of the
material). Shared pieces: `session` (fresh models, injection, asking, provenance), `metrics`
(written once), `tokenizer`, `results` (run folders, resumable), `report`, `plots`, data
(`data`, `authors`, `books`), and `harness` (the lm-evaluation-harness model `mplus_fast`).
See docs/evaluation.md.
"""

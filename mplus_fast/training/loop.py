"""The training loop: stages in order, each a run of steps over episodes (`data.py`), with
checkpoints that resume exactly.

A step: cut the memory from the last step's graph; write the episode's injections (facts with a
graph, distractors without); read every question (and a continuation) in one left-padded batch
with the decoder adapter; loss = answer cross-entropy + continuation cross-entropy + retriever
BCE; one AdamW step (the retriever with its own learning rate); warm-up then cosine decay.
An `in_context` stage writes nothing: each question is read with its fact in the prompt.

Run folder (`out`):
    config.toml               the config as given
    tokenizer.json            the tokenizer (trained here or copied)
    log.jsonl                 one line per `log_every` steps (and per monitor evaluation)
    <stage>/step-000500/      checkpoints: the model (upstream layout, memory included,
                              tokenizer.json beside it) + trainer.json and trainer.safetensors (optimizer, data RNG,
                              ledger, step); each written to a temporary folder and renamed
                              into place, so a crash leaves the previous one whole
    <stage>/final/            the stage's last checkpoint; the next stage starts from it
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mplus_fast.atomic import write_bytes_atomic
from mplus_fast.config import MPlusConfig
from mplus_fast.model import MPlus
from mplus_fast.training import objectives as obj
from mplus_fast.training.config import Stage, TrainConfig
from mplus_fast.training.data import Episode, Ledger, ask_row, text_row
from mplus_fast.training.setup import Setup, build_model, prepare
from mplus_fast.training.ship import flush_memory
from mplus_fast.training.trainable import TARGETS, TrainableMPlus

TRAINER_STATE = "trainer.json"      # step, stage, data RNG, ledger, optimizer hyper-parameters
TRAINER_TENSORS = "trainer.safetensors"   # the optimizer's moments (no pickle anywhere)


# ---------------------------------------------------------------------- checkpoints
def checkpoints(stage_dir: Path) -> list[Path]:
    """Complete step checkpoints of a stage, oldest first."""
    if not stage_dir.is_dir():
        return []
    done = [p for p in stage_dir.glob("step-*") if (p / TRAINER_STATE).is_file() and (p / "config.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(folder: Path, model: MPlus, tokenizer_file: Path, trainer: dict) -> Path:
    """Model + tokenizer + trainer state into a temporary sibling folder, renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    meta, tensors = split_trainer_state(trainer)
    save_file(tensors, str(tmp / TRAINER_TENSORS))
    write_bytes_atomic(tmp / TRAINER_STATE, json.dumps(meta).encode("utf-8"))
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def split_trainer_state(trainer: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The trainer state as JSON + tensors: the optimizer's per-tensor state goes to safetensors."""
    opt = trainer["optimizer"]
    tensors = {f"state.{i}.{k}": v.detach().contiguous() for i, st in opt["state"].items() for k, v in st.items()}
    version, internal, gauss = trainer["rng"]
    meta = {**{k: v for k, v in trainer.items() if k not in ("optimizer", "rng")},
            "rng": [version, list(internal), gauss], "param_groups": opt["param_groups"]}
    return meta, tensors


def load_trainer_state(folder: Path) -> dict:
    meta = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    state: dict[int, dict] = {}
    for name, t in load_file(str(folder / TRAINER_TENSORS)).items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = t
    version, internal, gauss = meta.pop("rng")
    return {**meta, "rng": (version, tuple(internal), gauss),
            "optimizer": {"state": state, "param_groups": meta.pop("param_groups")}}


# ---------------------------------------------------------------------- one stage
def lr_factor(step: int, stage: Stage) -> float:
    if step < stage.warmup:
        return (step + 1) / stage.warmup
    span = max(1, stage.steps - stage.warmup)
    progress = min(1.0, (step - stage.warmup) / span)
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Meter:
    """Running sums between two log lines."""
    sums: dict = field(default_factory=dict)

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        s, c = self.sums.get(name, (0.0, 0.0))
        self.sums[name] = (s + value, c + count)

    def means(self) -> dict:
        return {k: s / c for k, (s, c) in self.sums.items() if c}


class StageRun:
    def __init__(self, setup: Setup, stage: Stage, index: int, model: MPlus, trainer: dict | None):
        self.setup, self.stage, self.index = setup, stage, index
        cfg = setup.config
        groups = tuple(stage.trainable or cfg.model.trainable
                       or TARGETS["scratch" if cfg.model.init == "scratch" else "finetune"])
        self.tm = TrainableMPlus(model, groups)
        param_groups = []
        for g, masters in self.tm.masters.items():
            lr = stage.retriever_lr if g == "retriever" else stage.lr
            param_groups.append({"params": masters.master, "lr": lr, "base_lr": lr, "name": g})
        self.opt = torch.optim.AdamW(param_groups, lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay)
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.ledger = Ledger()
        self.step = 0
        self.prose_memory, self.prose_memory_step = None, -1   # fresh_memory: the memory each episode starts from
        if trainer is not None:
            self.opt.load_state_dict(trainer["optimizer"])
            self.rng.setstate(trainer["rng"])
            self.ledger = Ledger.from_json(trainer["ledger"], self.ledger.capacity)
            self.step = int(trainer["step"])

    def trainer_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "rng": self.rng.getstate(), "ledger": self.ledger.to_json(),
                "step": self.step, "stage": self.stage.name}

    # ------------------------------------------------------------------ a step
    def one_step(self, meter: Meter) -> int:
        """One optimisation step over `accumulate` episodes; returns the number of tokens processed."""
        self.opt.zero_grad(set_to_none=True)
        tokens = 0
        for _ in range(self.stage.accumulate):
            loss, n = self.episode_loss(meter)
            tokens += n
            if loss is not None and loss.requires_grad:   # (a retriever-only step whose reads had no positives: nothing to learn)
                (loss / self.stage.accumulate).backward()
                meter.add("loss", float(loss.detach()))
        self.apply_gradients()
        return tokens

    def episode_loss(self, meter: Meter) -> tuple[torch.Tensor | None, int]:
        """Write one episode and read its rows: (loss, tokens processed)."""
        st, tm, rng = self.stage, self.tm, self.rng
        tm.detach_memory()
        if st.fresh_memory:
            self.start_from_prose_memory()
        ep = self.setup.source.episode(rng, st.injections, st.facts, st.continuation_tokens if st.continuation_weight else 0,
                                       random_distractors=st.distractors == "random", random_tokens=st.random_tokens,
                                       facts_per_injection=st.facts_per_injection)
        if st.in_context:
            return self.in_context_loss(ep, meter)
        retrieve = rng.random() < st.retrieve
        K = len(ep.injections)
        reach = K if retrieve else min(K, st.stm_only_max_distance + 1)
        repeated = list(range(K - 1, K - 1 - min(st.repeats, reach), -1)) if st.repeat_weight else []
        with_graph = ep.fact_injections | set(repeated)    # contexts some row reads: written with gradient
        tokens = 0
        written = []
        for i, ids in enumerate(ep.injections):
            written.append(tm.next_injection_id())
            delta = tm.inject(torch.tensor(ids, dtype=torch.int64), grad=i in with_graph)
            tm.write(delta)
            tokens += len(ids)
        rows, distances = [], []
        for i, ask in ep.needed:
            d = len(ep.injections) - 1 - i
            if retrieve or d <= st.stm_only_max_distance:
                rows.append(ask_row(ask, written[i]))
                distances.append(d)
        next_id = tm.next_injection_id()
        hi = st.max_distance if retrieve else min(st.max_distance, st.stm_only_max_distance)
        for inj, ask in self.ledger.sample(rng, st.recall_questions, next_id, len(ep.injections), hi):
            rows.append(ask_row(ask, inj))
            distances.append(next_id - 1 - inj)
        for i, ask in ep.needed:
            self.ledger.add(written[i], ask)
        for i in repeated:
            rows.append(text_row("repeat", ep.injections[i], st.continuation_prompt, written[i]))
        if ep.continuation and st.continuation_weight:
            rows.append(text_row("continuation", ep.continuation, st.continuation_prompt))
        if not rows:
            return None, tokens
        batch = obj.make_batch(rows, self.setup.pad_id)
        inputs: dict[int, torch.Tensor] = {}
        observe = (lambda l, x: inputs.__setitem__(l, x)) if st.retriever_weight else None
        undo_ages = None
        if retrieve and st.random_fact_age and rng.random() < st.random_fact_age:
            undo_ages = self.place_facts_at_random(batch, {written[i] for i in ep.fact_injections})
        res = tm.read(batch.ids, batch.valid, retrieve=retrieve, query_mask=batch.query_mask, observe=observe)
        if undo_ages is not None:
            undo_ages()
        tokens += int(batch.valid.sum())
        loss = res.logits.sum() * 0.0
        for kind, weight in (("qa", st.qa_weight), ("repeat", st.repeat_weight), ("continuation", st.continuation_weight)):
            chosen = batch.of(kind)
            if not weight or not bool(chosen.any()):
                continue
            s, n = obj.token_loss(res.logits, batch.targets, chosen)
            loss = loss + weight * s / max(n, 1)
            meter.add(f"{kind}_loss", float(s.detach()), n)
        qa = batch.of("qa")
        if bool(qa.any()):
            exact = obj.answer_exact(res.logits, batch.targets, qa)
            for d, ok in zip(distances, exact.tolist()):
                meter.add("qa_acc", float(ok))
                meter.add(f"qa_acc_{'stm' if not retrieve else 'ret'}_{bucket(d)}", float(ok))
        if st.retriever_weight:
            bce, count = obj.retriever_loss(tm, inputs, batch, st.negative_weight, st.retriever_into_memory)
            if bce is not None:
                loss = loss + st.retriever_weight * bce
                meter.add("bce", float(bce.detach()))
        if retrieve:
            rec, count = obj.retrieval_recall(tm, res, batch)
            if count:
                meter.add("recall", rec, count)
        return loss, tokens

    def place_facts_at_random(self, batch: obj.ReadBatch, facts: set[int]):
        """`random_fact_age`: the facts' rows moved to a uniformly random place in the retrieved
        block, among the rows the questions about them retrieve (a first read without a graph
        finds those; `random_fact_age_among = "bank"`: among every retrievable row instead).
        Returns the undo."""
        among = None
        if self.stage.random_fact_age_among == "retrieved":
            asking = torch.tensor([k == "qa" and int(s) in facts for k, s in zip(batch.kinds, batch.sources)])
            if not bool(asking.any()):           # no row asks about the facts: no block to place them in
                return None
            among = self.tm.retrieved_rows(batch.ids[asking], batch.valid[asking], batch.query_mask[asking])
        return self.tm.place_rows(facts, slot=self.rng.random(), among=among)

    def start_from_prose_memory(self) -> None:
        """`fresh_memory`: make the memory one of prose only — training passages injected (no
        graph) until no older row is left, as `ship` flushes a model — refilled every
        `fresh_memory_every` steps so its rows follow the writer. The generator that draws the
        memory drops keeps running (restoring a snapshot would rewind it)."""
        model = self.tm.model
        if self.prose_memory is None or self.step - self.prose_memory_step >= self.stage.fresh_memory_every:
            flush_memory(model, lambda: self.setup.source.episode(self.rng, 1, 0, 0).injections[0])
            self.prose_memory, self.prose_memory_step = model.snapshot(), self.step
        generator = model.generator.get_state()
        model.restore(self.prose_memory)
        model.generator.set_state(generator)

    def in_context_loss(self, ep: Episode, meter: Meter) -> tuple[torch.Tensor, int]:
        """The `in_context` stage: every question read with its fact's context before it in the
        prompt, over the STM as it stands; nothing is written, so only the backbone's lookup learns
        (reading the STM later is the same attention over a prefix)."""
        whole = [t for inj in ep.injections for t in inj] if self.stage.in_context_episode else None
        rows = [obj.ReadRow("qa", (whole or ep.injections[i]) + ask.prompt, ask.answer) for i, ask in ep.needed]
        batch = obj.make_batch(rows, self.setup.pad_id)
        res = self.tm.read(batch.ids, batch.valid, retrieve=False)
        s, n = obj.token_loss(res.logits, batch.targets)
        meter.add("qa_loss", float(s.detach()), n)
        for ok in obj.answer_exact(res.logits, batch.targets, batch.of("qa")).tolist():
            meter.add("qa_acc", float(ok))
            meter.add("qa_acc_context", float(ok))
        return self.stage.qa_weight * s / max(n, 1), int(batch.valid.sum())

    def apply_gradients(self) -> None:
        masters = [m for ms in self.tm.masters.values() for m in ms.master]
        for ms in self.tm.masters.values():
            ms.grads_to_master()
        if self.stage.grad_clip:
            torch.nn.utils.clip_grad_norm_(masters, self.stage.grad_clip)
        f = lr_factor(self.step, self.stage)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.step()
        for ms in self.tm.masters.values():
            ms.sync()


def bucket(d: int) -> str:
    """Distance buckets for the log: 0, 1-3, 4-8, 9-16, 17-32, 33-64, 65+."""
    for hi, name in ((0, "0"), (3, "1-3"), (8, "4-8"), (16, "9-16"), (32, "17-32"), (64, "33-64")):
        if d <= hi:
            return name
    return "65+"


# ---------------------------------------------------------------------- the run
def stage_ends(stage: Stage, step: int, accuracy: float | None) -> str | None:
    """Why a stage ends at a log line after `step` steps (None: it goes on). `accuracy` is the
    answers' exact-match rate over the log window just ended (None: no question was scored)."""
    if step < stage.steps:
        return None
    if not stage.until_accuracy:
        return "steps"
    if accuracy is not None and accuracy >= stage.until_accuracy:
        return f"answers {accuracy:.3f} >= until_accuracy {stage.until_accuracy}"
    return "step_limit" if step >= stage.step_limit else None


def run_stage(setup: Setup, index: int, model: MPlus, trainer: dict | None, max_steps: int | None, log) -> MPlus:
    stage = setup.config.stages[index]
    run = StageRun(setup, stage, index, model, trainer)
    stage_dir = setup.out / stage.name
    cfg = setup.config
    meter, t_log, tok_log = Meter(), time.perf_counter(), 0
    longest = stage.step_limit if stage.until_accuracy else stage.steps
    end = longest if max_steps is None else min(longest, max_steps)
    ended = None
    with log.progress(stage, run.step, stage.steps) as bar:
        while run.step < end and ended is None:
            tok_log += run.one_step(meter)
            run.step += 1
            if run.step % cfg.log_every == 0 or run.step in (end, stage.steps):
                dt = time.perf_counter() - t_log
                means = meter.means()
                line = {"stage": stage.name, "step": run.step, **{k: round(v, 5) for k, v in means.items()},
                        "tokens_per_s": round(tok_log / max(dt, 1e-9), 1), "lr": run.opt.param_groups[0]["lr"]}
                log.write(line)
                bar.update(run.step, line)
                meter, t_log, tok_log = Meter(), time.perf_counter(), 0
                ended = stage_ends(stage, run.step, means.get("qa_acc"))
                if ended and stage.until_accuracy:
                    log.write({"stage": stage.name, "step": run.step, "ended": ended})
            if cfg.monitor.every and run.step % cfg.monitor.every == 0:
                log.write({"stage": stage.name, "step": run.step, "monitor": setup.monitor(model)})
            if run.step % cfg.checkpoint_every == 0 and ended is None:
                save_checkpoint(stage_dir / f"step-{run.step:06d}", model, setup.tokenizer_file, run.trainer_state())
                for old in checkpoints(stage_dir)[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
    if ended is not None:
        save_checkpoint(stage_dir / "final", model, setup.tokenizer_file, run.trainer_state())
    else:  # --max-steps stopped the stage early: a resumable checkpoint
        save_checkpoint(stage_dir / f"step-{run.step:06d}", model, setup.tokenizer_file, run.trainer_state())
    return model


def train(config: TrainConfig, out: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
          show: bool = True) -> Path:
    """Run every stage of `config`; returns the final checkpoint folder. `resume` continues from
    the newest checkpoint in the run folder (a finished stage is not run again); `max_steps`
    stops each stage after that many steps (with a resumable checkpoint)."""
    from mplus_fast.training.progress import RunLog
    setup = prepare(config, out, resume)
    log = RunLog(setup.out / "log.jsonl", show=show)
    model = None
    for index, stage in enumerate(config.stages):
        stage_dir = setup.out / stage.name
        final = stage_dir / "final"
        if resume and (final / TRAINER_STATE).is_file():
            model = None
            continue
        trainer = None
        start_from = None
        if resume and checkpoints(stage_dir):
            start_from = checkpoints(stage_dir)[-1]
            trainer = load_trainer_state(start_from)
        elif index > 0:
            start_from = setup.out / config.stages[index - 1].name / "final"
        if start_from is not None:
            model = MPlus.from_pretrained(start_from, backend="reference", dtype=setup.dtype, seed=config.seed)
        elif model is None:
            model = build_model(setup)
        log.note(f"stage {stage.name}: " + (f"from {start_from}" if start_from else "from the initial model"))
        model = run_stage(setup, index, model, trainer, max_steps, log)
        if not (final / TRAINER_STATE).is_file():
            return checkpoints(stage_dir)[-1]
    return setup.out / config.stages[-1].name / "final"

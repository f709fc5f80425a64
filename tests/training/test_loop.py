"""The training loop end to end on a micro model: the loss falls, a seed repeats bit for bit,
a resumed run equals an uninterrupted one, checkpoints load in both backends."""
from __future__ import annotations

import json
import math

import pytest
import torch

import mplus_fast
from mplus_fast.checkpoint import read_tensors
from mplus_fast.training import parse_config, train

pytest.importorskip("tokenizers")

MICRO = """
seed = {seed}
threads = 1
checkpoint_every = 10
log_every = 10

[model]
init = "scratch"
[model.config]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
max_position_embeddings = 256
num_tokens = 12
num_blocks = 3
num_ltm_blocks = 1
update_ltm_frequency = 2
initial_rf_when_moving_stm_to_ltm = 4
selector_hidden_dim = 8
num_selector_layers = 2
lora_config = {{ r = 2, lora_alpha = 4, target_modules = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"] }}

[tokenizer]
vocab_size = 300

[[stage]]
name = "one"
steps = {steps}
lr = 3e-3
warmup = 5
injections = 2
facts = 1
retrieve = 0.5
repeat_weight = 1.0
repeats = 2
accumulate = 1
retriever_weight = 0.5
recall_questions = 2
max_distance = 8
"""


def config(steps: int, seed: int = 0, stages: str = ""):
    import tomllib
    text = MICRO.format(steps=steps, seed=seed) + stages
    return parse_config(tomllib.loads(text), None, text)


def weights(folder):
    return {k: v for k, v in read_tensors(folder).items() if not k.startswith("mplus_fast.")}


def log_lines(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_hundred_steps_lower_the_loss(tmp_path):
    final = train(config(100), out=tmp_path / "run", show=False)
    lines = [l for l in log_lines(tmp_path / "run") if "loss" in l]
    first, last = lines[0], lines[-1]
    assert last["step"] == 100
    assert last["repeat_loss"] < first["repeat_loss"] - 1.0, (first, last)
    assert last["loss"] < first["loss"] - 1.0
    assert all(math.isfinite(l["loss"]) for l in lines)
    # the output is an ordinary checkpoint: both backends load it and agree
    ids = torch.tensor([[5, 40, 77, 12, 9]])
    ref = mplus_fast.load(final, backend="reference", seed=0)
    fast = mplus_fast.load(final, backend="fast", seed=0)
    for model in (ref, fast):
        model.inject_memory(torch.tensor([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]), update_memory=True)
    a, b = ref(ids), fast(ids)
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert [x.tolist() for x in a.ltm_indices] == [x.tolist() for x in b.ltm_indices]
    assert (final / "tokenizer.json").is_file() and (final / "trainer.json").is_file() and (final / "trainer.safetensors").is_file()


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    straight = train(config(20), out=tmp_path / "a", show=False)
    again = train(config(20), out=tmp_path / "b", show=False)
    wa, wb = weights(straight), weights(again)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same config + seed must give bit-identical weights"
    other = weights(train(config(20, seed=1), out=tmp_path / "c", show=False))
    assert not torch.equal(other["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    # stopped after 12 steps (a checkpoint), then resumed: the same weights as 20 steps in one go
    part = train(config(20), out=tmp_path / "d", max_steps=12, show=False)
    assert part.name == "step-000012"
    resumed = weights(train(config(20), out=tmp_path / "d", resume=True, show=False))
    assert all(torch.equal(resumed[k], wa[k]) for k in wa), "a resumed run must equal an uninterrupted one"


def test_stages_chain_and_refuse_a_used_folder(tmp_path):
    second = '\n[[stage]]\nname = "two"\nsteps = 3\naccumulate = 1\ninjections = 2\nfacts = 1\n'
    final = train(config(3, stages=second), out=tmp_path / "run", show=False)
    assert final == tmp_path / "run" / "two" / "final"
    assert (tmp_path / "run" / "one" / "final" / "config.json").is_file()
    notes = [l["stage"] for l in log_lines(tmp_path / "run") if "loss" in l]
    assert notes == ["one", "two"]
    with pytest.raises(FileExistsError, match="not empty: pass --resume"):
        train(config(3, stages=second), out=tmp_path / "run", show=False)
    # resuming a finished run runs nothing and returns its final checkpoint
    assert train(config(3, stages=second), out=tmp_path / "run", resume=True, show=False) == final


LOOKUP_FIRST = """
[[stage]]
name = "lookup"
steps = 4
lr = 3e-3
warmup = 1
injections = 1
facts = 1
in_context = true
accumulate = 2
"""


@pytest.mark.parametrize("whole_episode", [False, True])
def test_an_in_context_stage_scores_answers_and_writes_nothing(tmp_path, whole_episode, monkeypatch):
    """The `in_context` stage reads each question with its fact in the prompt (or, with
    `in_context_episode`, after all the episode's contexts): answers are scored, nothing reaches
    the memory, and the next stage starts from its weights."""
    import tomllib

    from mplus_fast.training import loop
    text = MICRO.format(steps=2, seed=0)
    head, stage_one = text.split("[[stage]]", 1)
    lookup = LOOKUP_FIRST
    if whole_episode:
        lookup = lookup.replace("injections = 1\nfacts = 1\n", "injections = 3\nfacts = 2\n") + "in_context_episode = true\n"
    text = head + lookup + "[[stage]]" + stage_one
    seen = []                        # (episode, the prompts of its rows)
    real_loss, real_batch = loop.StageRun.in_context_loss, loop.obj.make_batch

    def spy(self, ep, meter):
        seen.append((ep, []))
        monkeypatch.setattr(loop.obj, "make_batch", lambda rows, pad: seen[-1][1].extend(r.prompt for r in rows) or real_batch(rows, pad))
        try:
            return real_loss(self, ep, meter)
        finally:
            monkeypatch.setattr(loop.obj, "make_batch", real_batch)
    monkeypatch.setattr(loop.StageRun, "in_context_loss", spy)
    cfg = parse_config(tomllib.loads(text), None, text)
    train(cfg, out=tmp_path / "run", show=False)
    lines = [l for l in log_lines(tmp_path / "run") if "loss" in l]
    lookup = [l for l in lines if l["stage"] == "lookup"]
    assert lookup and all("qa_acc_context" in l and "repeat_loss" not in l for l in lookup), lookup
    assert [l["stage"] for l in lines][-1] == "one"
    after_lookup = read_tensors(tmp_path / "run" / "lookup" / "final")
    after_one = read_tensors(tmp_path / "run" / "one" / "final")
    # no injection was written in the lookup stage; the memory stage after it writes its own
    assert int(after_lookup["mplus_fast.next_injection_id"]) == 0, "an in_context stage must not write the memory"
    assert int(after_one["mplus_fast.next_injection_id"]) > 0
    assert len(seen) == 4 * 2        # 4 steps of 2 episodes
    for ep, prompts in seen:         # each question after its own context, or after all of them
        whole = [t for inj in ep.injections for t in inj]
        assert prompts == [(whole if whole_episode else ep.injections[i]) + ask.prompt for i, ask in ep.needed]


def test_a_retriever_only_stage_changes_the_selectors_and_nothing_else(tmp_path):
    """`trainable = ["retriever"]` on a stage: f_q/f_k learn from the BCE, every other weight
    (backbone, adapters) leaves the stage bit for bit as it came in."""
    import tomllib
    second = ('\n[[stage]]\nname = "ret"\nsteps = 4\naccumulate = 2\ninjections = 3\nfacts = 2\nretrieve = 1.0\n'
              'recall_questions = 2\nmax_distance = 8\nretriever_weight = 1.0\nretriever_lr = 1e-2\n'
              'trainable = ["retriever"]\n')
    text = MICRO.format(steps=6, seed=0) + second
    train(parse_config(tomllib.loads(text), None, text), out=tmp_path / "run", show=False)
    before, after = weights(tmp_path / "run" / "one" / "final"), weights(tmp_path / "run" / "ret" / "final")
    selectors = [k for k in before if "query_proj" in k or "key_proj" in k]
    assert selectors
    changed = [k for k in selectors if not torch.equal(before[k], after[k])]
    assert changed, "the retriever did not train"
    frozen = [k for k in before if k not in selectors and not k.startswith(("memory", "ltm"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), \
        [k for k in frozen if not torch.equal(before[k], after[k])]
    bce = [l["bce"] for l in log_lines(tmp_path / "run") if l.get("stage") == "ret" and "bce" in l]
    assert bce and all(math.isfinite(b) for b in bce)


@pytest.mark.slow
def test_a_finished_run_ships_with_its_retention_table(tmp_path):
    """`training.ship`: the run's last checkpoint with its memory flushed of training rows (every
    row of the shipped memory comes from the flush), its files, and a retention table measured
    on held-out facts that the demo and the tests read."""
    from mplus_fast.checkpoint import load_checkpoint
    from mplus_fast.training.ship import injections_kept, ship
    run = tmp_path / "run"
    train(config(2), out=run, show=False)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((run / "config.toml").read_text())
    with pytest.raises(FileNotFoundError, match="no final checkpoint"):
        ship(unfinished, tmp_path / "x")
    table = ship(run, tmp_path / "models" / "tiny", facts=3, distances=(0, 1))
    dest = tmp_path / "models" / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train-config.toml", "train-log.jsonl",
                 "retention.json", "retention.md"):
        assert (dest / name).is_file(), name
    assert json.loads((dest / "retention.json").read_text())["mplus"] == table["mplus"] and set(table["mplus"]) == {"0", "1"}
    assert "| M+ |" in (dest / "retention.md").read_text()
    config_, tensors = load_checkpoint(dest)
    trained = int(read_tensors(run / "one" / "final")["mplus_fast.next_injection_id"])
    assert int(tensors["mplus_fast.next_injection_id"]) == trained + injections_kept(config_) + 1
    provenance = [k for k in tensors if k.startswith("mplus_fast.") and "provenance" in k]
    assert "mplus_fast.stm_provenance" in provenance
    for key in provenance:        # the flush's ids start at `trained`: no row written in training is left
        p = tensors[key]          # (-1: a row of the initial memory, never written)
        assert not bool(((p >= 0) & (p < trained)).any()), (key, p)


def test_a_fresh_memory_stage_starts_every_episode_from_prose_only(tmp_path, monkeypatch):
    """`fresh_memory`: every episode starts from one prose-only memory (refilled every
    `fresh_memory_every` steps), so the episode's fact is the only fact in the memory, as in
    the retention evaluation; the memory drops still follow a running generator."""
    import tomllib

    from mplus_fast.training import loop
    second = ('\n[[stage]]\nname = "fresh"\nsteps = 3\naccumulate = 2\ninjections = 3\nfacts = 1\nretrieve = 1.0\n'
              'retriever_weight = 1.0\nfresh_memory = true\nfresh_memory_every = 2\n')
    text = MICRO.format(steps=2, seed=0) + second
    starts, generators = [], []           # per episode: (the stage step, the memory it started from)
    real = loop.StageRun.start_from_prose_memory

    def spy(self):
        real(self)
        if self.stage.name == "fresh":
            state = self.tm.state
            starts.append((self.step, self.prose_memory_step, state.next_injection_id,
                           torch.cat([state.ltm[0], state.pend[0]]).clone()))
            generators.append(self.tm.model.generator.get_state())
    monkeypatch.setattr(loop.StageRun, "start_from_prose_memory", spy)
    train(parse_config(tomllib.loads(text), None, text), out=tmp_path / "run", show=False)
    assert [(s, filled) for s, filled, *_ in starts] == [(0, 0), (0, 0), (1, 0), (1, 0), (2, 2), (2, 2)]
    for (_, filled_a, next_a, bank_a), (_, filled_b, next_b, bank_b) in zip(starts, starts[1:]):
        if filled_a == filled_b:          # the same prose memory, not the previous episode's
            assert next_a == next_b and torch.equal(bank_a, bank_b)
    assert not torch.equal(starts[0][3], starts[-1][3]), "the prose memory was never refilled"
    assert all(not torch.equal(a, b) for a, b in zip(generators, generators[1:])), "the drop generator was rewound"
    lines = [l for l in log_lines(tmp_path / "run") if l.get("stage") == "fresh" and "loss" in l]
    assert lines and all(math.isfinite(l["loss"]) for l in lines)


@pytest.mark.parametrize("field,value", [("recall_questions", 2), ("in_context", True)])
def test_fresh_memory_refuses_what_a_fresh_memory_cannot_hold(field, value):
    import tomllib

    from mplus_fast.training.config import TrainConfigError
    extra = f"fresh_memory = true\n{field} = {str(value).lower()}\n" + ("max_distance = 8\n" if field == "recall_questions" else "")
    text = MICRO.format(steps=2, seed=0).replace("recall_questions = 2\nmax_distance = 8\n", "") + extra
    with pytest.raises(TrainConfigError, match=field):
        parse_config(tomllib.loads(text), None, text)


def _model_with_an_old_fact(tmp_path, num_ltm_blocks, injections):
    from mplus_fast.testing import make_random_checkpoint
    from mplus_fast.training.trainable import TrainableMPlus
    ckpt = make_random_checkpoint(tmp_path / "m", hidden_size=32, num_hidden_layers=2, num_tokens=4, num_blocks=6,
                                  num_ltm_blocks=num_ltm_blocks, ltm_initial_size=0, update_ltm_frequency=1, vocab_size=64)
    model = mplus_fast.load(ckpt, backend="reference", seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(injections):
        model.inject_memory(torch.randint(3, 64, (1, 4), generator=g), update_memory=True)
    return model, TrainableMPlus(model, ("adapters",)), torch.randint(3, 64, (1, 5), generator=g)


def _ages(model):
    return [(b.live("ages").clone(), p.live("ages").clone()) for b, p in zip(model.backend.store.ltm, model.backend.store.pend)]


def _placed_read(model, undo, query):
    out = model(query, retrieve=True)
    undo()
    return [p[0].tolist() for p in out.ltm_provenance]


def test_place_rows_among_the_bank_moves_a_fact_to_either_end_of_the_block_and_undoes(tmp_path):
    """`random_fact_age_among = "bank"`: slot 0 puts the fact's rows before every other
    retrievable row (first in the retrieved block, oldest first: SPEC §4), slot 1 after every
    one (last); the undo puts every age back. R covers every retrievable row, so each layer's
    read holds the fact and its place is checked."""
    model, tm, query = _model_with_an_old_fact(tmp_path, num_ltm_blocks=4, injections=6)
    fact, before = 2, _ages(model)                   # an old injection: its rows are in [LTM; pending]
    for slot in (0.0, 1.0):
        provs = _placed_read(model, tm.place_rows({fact}, slot), query)
        for prov in provs:
            assert fact in prov, "a layer's read lacks the fact: nothing checks its place"
            at = [i for i, p in enumerate(prov) if p == fact]
            assert at == (list(range(len(at))) if slot == 0.0 else list(range(len(prov) - len(at), len(prov)))), (slot, prov)
    after = _ages(model)
    assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(before, after))


@pytest.mark.parametrize("slot", [0.0, 0.3, 0.7, 1.0])
def test_place_rows_among_the_retrieved_rows_puts_the_fact_at_its_slot_of_the_block(tmp_path, slot):
    """`random_fact_age_among = "retrieved"`: a first read finds the rows the question retrieves;
    the fact's rows then come after a share `slot` of the other rows of that block. At layer 0
    the read's queries are the embeddings, so the second read retrieves the same rows and the
    place is exact; the fact's rows stay together, the other rows keep their order."""
    model, tm, query = _model_with_an_old_fact(tmp_path, num_ltm_blocks=2, injections=8)
    natural = model(query, retrieve=True).ltm_provenance[0][0].tolist()
    fact = max(set(natural), key=natural.count)      # the injection layer 0 retrieves most rows of
    among = tm.retrieved_rows(query, torch.ones_like(query, dtype=torch.bool))
    provs = _placed_read(model, tm.place_rows({fact}, slot, among=among), query)
    layer0 = provs[0]
    assert sorted(layer0) == sorted(natural), "the placement changed which rows layer 0 retrieves"
    at = [i for i, p in enumerate(layer0) if p == fact]
    assert at, "layer 0 retrieves no row of the fact: nothing checks its place"
    others = len(layer0) - len(at)
    assert others >= 2 and len(tm.bank(0)[1]) > len(layer0), "the block must hold other rows, the bank more than the block"
    want = min(int(slot * (others + 1)), others)
    assert at == list(range(want, want + len(at))), (slot, layer0)
    assert [p for p in layer0 if p != fact] == [p for p in natural if p != fact]


@pytest.mark.parametrize("among", ["retrieved", "bank"])
def test_a_random_fact_age_stage_trains_and_is_refused_where_nothing_is_retrieved(tmp_path, among):
    import tomllib

    from mplus_fast.training.config import TrainConfigError
    stage = ('\n[[stage]]\nname = "aged"\nsteps = 2\naccumulate = 2\ninjections = 3\nfacts = 1\nretrieve = 1.0\n'
             f'retriever_weight = 1.0\nfresh_memory = true\nrandom_fact_age = 1.0\nrandom_fact_age_among = "{among}"\n')
    text = MICRO.format(steps=1, seed=0) + stage
    train(parse_config(tomllib.loads(text), None, text), out=tmp_path / "run", show=False)
    lines = [l for l in log_lines(tmp_path / "run") if l.get("stage") == "aged" and "loss" in l]
    assert lines and all(math.isfinite(l["loss"]) for l in lines)
    for bad, field in (("retrieve = 0.0\nrandom_fact_age = 1.0\n", "retrieve"),
                       ("random_fact_age = 1.0\nin_context = true\n", "in_context"),
                       ('random_fact_age = 1.0\nrandom_fact_age_among = "all"\n', "random_fact_age_among")):
        text = MICRO.format(steps=2, seed=0).replace("retrieve = 0.5\n", "") + bad
        with pytest.raises(TrainConfigError, match=field):
            parse_config(tomllib.loads(text), None, text)


UNTIL = {"steps": 10, "until_accuracy": 0.9, "step_limit": 30}


@pytest.mark.parametrize("step, accuracy, fields, why", [
    (9, 1.0, UNTIL, None),                       # never before `steps`, however good the answers
    (10, 0.95, UNTIL, "answers 0.950 >= until_accuracy 0.9"),
    (10, 0.5, UNTIL, None),                      # below the target: the stage goes on
    (20, None, UNTIL, None),                     # a window without questions decides nothing
    (30, 0.5, UNTIL, "step_limit"),
    (10, 0.0, {"steps": 10}, "steps"),           # a plain stage ends at `steps`
])
def test_stage_ends_at_steps_then_at_the_target_accuracy_or_the_limit(step, accuracy, fields, why):
    from mplus_fast.training.config import Stage
    from mplus_fast.training.loop import stage_ends
    assert stage_ends(Stage(name="s", **fields), step, accuracy) == why


def _until(steps: int, until: float, limit: int):
    import tomllib
    text = MICRO.format(steps=steps, seed=0).replace("accumulate = 1\n", f"accumulate = 1\nuntil_accuracy = {until}\nstep_limit = {limit}\n")
    return parse_config(tomllib.loads(text), None, text)


def test_an_until_accuracy_stage_runs_past_steps_to_its_limit_and_resumes_there(tmp_path):
    # a micro model never answers every question: the stage runs one log window at a time to its limit
    straight = train(_until(10, 1.0, 30), out=tmp_path / "a", show=False)
    assert straight.name == "final"
    lines = log_lines(tmp_path / "a")
    assert [l["step"] for l in lines if "loss" in l] == [10, 20, 30]
    assert lines[-1] == {"stage": "one", "step": 30, "ended": "step_limit"}
    assert all(l["qa_acc"] < 1.0 for l in lines if "qa_acc" in l)
    # stopped inside the extension, then resumed: the same weights as in one go
    part = train(_until(10, 1.0, 30), out=tmp_path / "b", max_steps=20, show=False)
    assert part.name == "step-000020"
    resumed = weights(train(_until(10, 1.0, 30), out=tmp_path / "b", resume=True, show=False))
    wa = weights(straight)
    assert all(torch.equal(resumed[k], wa[k]) for k in wa), "a resumed extension must equal an uninterrupted one"


def test_an_until_accuracy_stage_stops_at_the_first_window_that_reaches_its_target(tmp_path, monkeypatch):
    from mplus_fast.training import loop
    real, reads = loop.obj.answer_exact, []

    def right_from_the_16th_read(logits, targets, rows):   # accumulate = 1: one scored read per step
        reads.append(1)
        got = real(logits, targets, rows)
        return torch.full_like(got, len(reads) > 15)
    monkeypatch.setattr(loop.obj, "answer_exact", right_from_the_16th_read)
    final = train(_until(10, 0.9, 60), out=tmp_path / "run", show=False)
    lines = log_lines(tmp_path / "run")
    windows = [l["qa_acc"] for l in lines if "qa_acc" in l]
    assert len(windows) == 3 and windows[0] == 0.0 and 0.0 < windows[1] < 0.9 and windows[2] == 1.0, windows
    assert lines[-1] == {"stage": "one", "step": 30, "ended": "answers 1.000 >= until_accuracy 0.9"}
    assert final.name == "final" and len(reads) == 30


def test_the_monitor_logs_retention_quietly_and_leaves_the_run_unchanged(tmp_path):
    import tomllib
    import warnings

    from mplus_fast.inputs import ShortInjectionWarning
    text = MICRO.format(steps=10, seed=0).replace("[[stage]]", "[monitor]\nevery = 5\nfacts = 2\ndistances = [0, 3]\n\n[[stage]]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = train(parse_config(tomllib.loads(text), None, text), out=tmp_path / "watched", show=False)
    # the monitor's passages are cut to T = 12 tokens, under the 16 the warning asks for: expected, not shown
    assert not [w for w in caught if issubclass(w.category, ShortInjectionWarning)]
    monitored = [l for l in log_lines(tmp_path / "watched") if "monitor" in l]
    assert [l["step"] for l in monitored] == [5, 10]
    assert set(monitored[0]["monitor"]) == {"stm@0", "mplus@0", "stm@3", "mplus@3"}
    assert all(0.0 <= v <= 1.0 for l in monitored for v in l["monitor"].values())
    # monitoring restores the memory and the generator: the same weights as a run without it
    plain = weights(train(config(10), out=tmp_path / "plain", show=False))
    wm = weights(watched)
    assert all(torch.equal(wm[k], plain[k]) for k in plain), "the monitor must not change the run"

"""A model used from several threads (issue 14 item 5; mplus_fast.concurrency): calls on one
model are serialised and each sees a whole memory; different models run in parallel; a call
from inside another call on the same thread may only look, anything else raises
NestedCallError; saves and loads of one folder from several threads see whole checkpoints."""
from __future__ import annotations

import threading

import pytest
import torch

import mplus_fast
from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.concurrency import NestedCallError

PROMPT = torch.arange(5, 15)[None]


def chunks(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (1, 16), generator=g) for _ in range(n)]


def run_threads(*targets, timeout=120):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        return run
    threads = [threading.Thread(target=guard(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_reads_during_injections_always_see_a_whole_memory(tiny_ckpt, backend):
    """Readers racing a writer get exactly the logits of the memory after k injections, some k."""
    seq = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    expected = [seq(PROMPT).logits]
    for c in chunks():
        seq.inject_memory(c, update_memory=True)
        expected.append(seq(PROMPT).logits)
    model = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    done = threading.Event()
    seen: list[int] = []

    def writer():
        for c in chunks():
            model.inject_memory(c, update_memory=True)
        done.set()

    def reader():
        while not done.is_set():
            logits = model(PROMPT).logits
            match = [k for k, e in enumerate(expected) if torch.equal(logits, e)]
            assert match, "a read saw a memory that no sequence of whole injections produces"
            seen.append(match[0])

    run_threads(writer, reader, reader, reader)
    assert seen, "the readers never ran"
    final = model.state_tensors()
    for k, v in seq.state_tensors().items():
        assert torch.equal(final[k], v), f"{k}: the threaded run ended elsewhere than the sequential one"


def test_a_call_from_another_thread_waits_for_the_running_one(tiny_model):
    inside, release = threading.Event(), threading.Event()
    order = []

    class Holding:   # a streamer that keeps generate running until told to finish
        def put(self, ids):
            if not inside.is_set():
                inside.set()
                assert release.wait(30)
        def end(self):
            order.append("generate done")

    def generating():
        tiny_model.generate(PROMPT, max_new_tokens=3, streamer=Holding())

    def injecting():
        assert inside.wait(30)
        tiny_model.inject_memory(torch.arange(5, 25)[None], update_memory=True)
        order.append("inject done")

    t_gen = threading.Thread(target=generating)
    t_inj = threading.Thread(target=injecting)
    t_gen.start()
    t_inj.start()
    assert inside.wait(30)
    t_inj.join(0.5)
    assert t_inj.is_alive() and not order, "the injection ran while generate was in progress"
    release.set()
    t_gen.join(30)
    t_inj.join(30)
    assert order == ["generate done", "inject done"]


def test_two_models_run_at_the_same_time(tiny_ckpt):
    """No lock is shared between models: each one's read waits inside for the other's."""
    a, b = mplus_fast.load(tiny_ckpt, seed=0), mplus_fast.load(tiny_ckpt, seed=0)
    entered = {"a": threading.Event(), "b": threading.Event()}

    def meet(model, me, other):
        real = model.backend.read

        def read(*args, **kwargs):
            entered[me].set()
            assert entered[other].wait(10), f"model {other} never ran while model {me} was inside a call"
            return real(*args, **kwargs)
        model.backend.read = read

    meet(a, "a", "b")
    meet(b, "b", "a")
    out = {}
    run_threads(lambda: out.__setitem__("a", a(PROMPT).logits), lambda: out.__setitem__("b", b(PROMPT).logits))
    assert torch.equal(out["a"], out["b"])


def test_two_models_in_parallel_match_a_sequential_run(tiny_ckpt, backend):
    def work(model):
        for c in chunks(6, seed=1):
            model.inject_memory(c, update_memory=True)
        return model.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=0.8)
    solo = work(mplus_fast.load(tiny_ckpt, seed=3, backend=backend))
    models = [mplus_fast.load(tiny_ckpt, seed=3, backend=backend) for _ in range(3)]
    outs = [None] * 3
    run_threads(*[lambda i=i: outs.__setitem__(i, work(models[i])) for i in range(3)])
    assert all(torch.equal(o, solo) for o in outs)


@pytest.mark.parametrize("call", ["inject", "forward", "generate", "restore", "reset"])
def test_a_nested_call_that_reads_or_writes_raises_and_changes_nothing(tiny_model, call):
    snap = tiny_model.snapshot()
    before = {k: v.clone() for k, v in tiny_model.state_tensors().items()}
    nested = {"inject": lambda: tiny_model.inject_memory(torch.arange(5, 25)[None], update_memory=True),
              "forward": lambda: tiny_model(PROMPT),
              "generate": lambda: tiny_model.generate(PROMPT, max_new_tokens=1),
              "restore": lambda: tiny_model.restore(snap),
              "reset": lambda: tiny_model.reset()}[call]

    class CallsBack:
        def put(self, ids):
            nested()
        def end(self):
            pass

    name = {"inject": "inject_memory"}.get(call, call)
    with pytest.raises(NestedCallError, match=rf"MPlus.{name} was called from inside MPlus.generate on the same thread"):
        tiny_model.generate(PROMPT, max_new_tokens=2, streamer=CallsBack())
    after = tiny_model.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tiny_model.inject_memory(torch.arange(5, 25)[None], update_memory=True)   # the model still works


def test_a_nested_call_that_only_looks_is_allowed(tiny_model, tmp_path):
    seen = {}

    class Looks:
        def put(self, ids):
            if not seen:
                seen["stats"] = tiny_model.memory_stats()
                seen["tensors"] = len(tiny_model.state_tensors())
                seen["snapshot"] = tiny_model.snapshot().stats()
                tiny_model.save_pretrained(tmp_path / "during")
                tiny_model.save_memory(tmp_path / "memory.safetensors")
        def end(self):
            pass

    tiny_model.generate(PROMPT, max_new_tokens=2, streamer=Looks())
    assert seen["stats"]["injections"] == 0 and seen["tensors"] > 0
    mplus_fast.load(tmp_path / "during")


def test_saves_and_loads_of_one_folder_from_threads_see_whole_checkpoints(tiny_ckpt, tmp_path):
    a = mplus_fast.load(tiny_ckpt, seed=0)
    b = mplus_fast.load(tiny_ckpt, seed=0)
    for c in chunks(3):
        b.inject_memory(c, update_memory=True)
    refs = [a.state_tensors(), b.state_tensors()]
    target = a.save_pretrained(tmp_path / "shared")
    stop = threading.Event()
    loads = []

    def saver(model):
        for i in range(6):
            model.save_pretrained(target, **({"max_shard_size": 60_000} if i % 2 else {}))

    def loader():
        while not stop.is_set():
            _, t = load_checkpoint(target)
            assert any(t.keys() == r.keys() and all(torch.equal(t[k], r[k]) for k in r) for r in refs), \
                "a load saw a mix of two saves"
            loads.append(1)

    def savers():
        run_threads(lambda: saver(a), lambda: saver(b))
        stop.set()

    run_threads(savers, loader)
    assert loads

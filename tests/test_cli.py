"""The `mplus-fast` command line, run in-process with typer's CliRunner.

Each test checks what the command claims: exit code, the facts it prints, and files it writes
(against the public API where a number can be checked)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mplus_fast
from mplus_fast.cli import app
from mplus_fast.testing import make_random_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture()
def run(tmp_path, monkeypatch):
    """Invoke the CLI with the demo cache in tmp_path and a wide terminal (no line wrapping)."""
    monkeypatch.setenv("MPLUS_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    threads = torch.get_num_threads()  # tiny models run fastest on 1 thread; restore for the rest of the suite
    torch.set_num_threads(1)

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])
    yield invoke
    torch.set_num_threads(threads)


@pytest.fixture()
def ckpt(tmp_path):
    return make_random_checkpoint(tmp_path / "ckpt", seed=1)


def test_demo_small_runs_and_reports(run, tmp_path):
    r = run("demo", "--random", "--chunks", 9, "--new-tokens", 4, "--table-every", 3)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "RANDOM" in out  # the random-weights panel is shown
    assert "9/9" in out  # progress bar completed
    assert re.search(r"inject total \(9 chunks × 16 tokens\)", out)
    assert "span of chunk 0 (first chunk)" in out and "span of chunk 8 (last chunk)" in out
    assert "recalled" in out and "generated" in out
    assert re.search(r"demo finished in \d+\.\d s", out)
    # merge every 4 injections → 2 merges after 9 chunks; the growth table's last row says so
    assert re.search(r"│\s+8 │\s+160 │\s+16 │\s+\d+ │\s+2 │", out), out
    cached = list((tmp_path / "cache").glob("demo-*"))
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    r2 = run("demo", "--random", "--chunks", 2, "--new-tokens", 2)  # second run re-uses the cache
    assert r2.exit_code == 0 and "(cached)" in r2.output


def test_demo_refuses_tokenizer_without_ckpt(run):
    r = run("demo", "--tokenizer", "tok.json")
    assert r.exit_code == 2 and "need --ckpt" in r.output


def test_demo_real_text_mode(run, ckpt, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = "the lighthouse was built by margaret holt in 1874 who built it ?".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("the lighthouse was built by margaret holt in 1874 " * 3)
    r = run("demo", "--ckpt", ckpt, "--tokenizer", tmp_path, "--doc", tmp_path / "doc.txt",
            "--question", "who built it ?", "--new-tokens", 3)
    assert r.exit_code == 0, r.output
    assert "who built it ?" in r.output and "RANDOM" not in r.output
    assert "inject total (7 chunks × 4 tokens)" in r.output  # 27 tokens in chunks of T=4


def _table(output: str) -> dict[str, str]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_inspect_random(run, ckpt):
    r = run("inspect", ckpt)
    assert r.exit_code == 0, r.output
    rows = _table(r.output)
    assert rows["architecture"] == "MPlus"
    assert rows["layers / hidden / intermediate"] == "2 / 48 / 96"
    assert rows["STM size N per layer"] == "16" and rows["R (LTM retrieved per layer)"] == "4"
    assert rows["LoRA r / alpha"] == "4 / 8"
    assert rows["LTM tokens per layer"] == "10" and rows["pending (not yet merged)"] == "0"
    n = len(mplus_fast.checkpoint.read_tensors(ckpt))
    assert rows["tensors"].startswith(f"{n}, ")


@pytest.mark.parametrize("name,arch", [("upstream_tiny", "MPlus"), ("upstream_tiny_memoryllm", "MemoryLLM")])
def test_inspect_fixtures(run, name, arch):
    path = FIXTURES / name / "ckpt"
    if not path.is_dir():
        pytest.skip(f"fixture {path} absent")
    r = run("inspect", path)
    assert r.exit_code == 0, r.output
    assert _table(r.output)["architecture"] == arch
    cfg = json.loads((path / "config.json").read_text())
    assert _table(r.output)["vocab"] == str(cfg["vocab_size"])


def test_generate_ids_matches_api(run, ckpt):
    r = run("generate", ckpt, "--ids", "5,6,7,8", "--max-new-tokens", 6, "--seed", 0)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.split("ids:")[1].strip())
    model = mplus_fast.load(ckpt, seed=0)
    want = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6)[0, 4:].tolist()
    assert got == want


def test_generate_sample_is_seeded(run, ckpt):
    args = ("generate", ckpt, "--ids", "5,6,7", "--sample", "--top-k", 10, "--temperature", 0.8, "--seed", 4)
    a, b = run(*args), run(*args)
    assert a.exit_code == 0 and a.output == b.output


def test_inject_out_then_reload(run, ckpt, tmp_path):
    ids = ",".join(str(i % 90 + 3) for i in range(40))  # 10 chunks of T=4 → 5 merges (every 2)
    out = tmp_path / "after"
    r = run("inject", ckpt, "--ids", ids, "--out", out)
    assert r.exit_code == 0, r.output
    assert "10 chunk(s); merges: 5" in r.output
    ref = mplus_fast.load(ckpt, seed=0)
    for chunk in torch.tensor([int(i) for i in ids.split(",")]).split(4):
        ref.inject_memory(chunk, update_memory=True)
    saved = mplus_fast.load(out)
    assert saved.memory_stats()["injections"] == 10
    torch.testing.assert_close(saved.state.stm, ref.state.stm)
    assert saved.state.ltm_sizes() == ref.state.ltm_sizes()


def test_inject_in_place(run, ckpt):
    before = mplus_fast.load(ckpt).memory_stats()["injections"]
    r = run("inject", ckpt, "--ids", "3,4,5,6,7,8,9,10", "--in-place")
    assert r.exit_code == 0, r.output
    assert mplus_fast.load(ckpt).memory_stats()["injections"] == before + 2


@pytest.mark.parametrize("args,message", [
    (("inspect", "/definitely/not/here"), "not found"),
    (("demo", "--chunks", "0"), "--chunks 0 must be at least 1"),
    (("generate", "{ckpt}", "--ids", "1,x,3"), "'x' is not an integer"),
    (("generate", "{ckpt}", "--ids", "1,99999"), "outside the vocabulary"),
    (("generate", "{ckpt}", "--prompt", "hello"), "needs --tokenizer"),
    (("generate", "{ckpt}"), "exactly one of --prompt"),
    (("generate", "/definitely/not/here", "--ids", "1,2"), "not found"),
    (("inject", "{ckpt}", "--ids", "1,2"), "exactly one of --out DIR, --in-place or --memory FILE"),
    (("generate", "{ckpt}", "--ids", "1,2", "--dtype", "int8"), "--dtype"),
    (("generate", "{ckpt}", "--ids", "1,2", "--sample", "--temperature", "0"), "temperature"),
])
def test_user_errors_exit_2_without_traceback(run, ckpt, args, message):
    r = run(*[str(a).replace("{ckpt}", str(ckpt)) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_bench_and_profile(run, ckpt, tmp_path, backend):
    trace = tmp_path / "trace.json"
    r = run("bench", ckpt, "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1, "--profile", trace, "--backend", backend)
    assert r.exit_code == 0, r.output
    assert "inject + update" in r.output and "decode (per token" in r.output and f"backend={backend}" in r.output
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"bench.inject", "bench.prefill", "bench.decode", f"{backend}.read.layer0", f"{backend}.inject.layer1"} <= names


@pytest.mark.parametrize("cmd", ["demo", "inspect", "generate", "inject", "bench"])
def test_help(run, cmd):
    r = run(cmd, "--help")
    assert r.exit_code == 0 and "Usage" in r.output


def test_missing_tokenizers_package_says_how_to_install(run, ckpt, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    r = run("generate", ckpt, "--prompt", "hi", "--tokenizer", "tok.json")
    assert r.exit_code == 2
    assert "pip install tokenizers" in r.output and "mplus_fast[tokenizer]" in r.output  # brackets not eaten as markup

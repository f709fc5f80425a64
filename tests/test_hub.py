"""Hugging Face hub ids as checkpoint paths (`mplus_fast.hf.hub`), resolved from a local hub cache.

Each test builds a hub cache in tmp_path laid out as `huggingface_hub` lays it out
(`models--ORG--NAME/{blobs,refs,snapshots}`, snapshot files as symbolic links to blobs) and sets
HF_HUB_OFFLINE=1, so nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mplus_fast
from mplus_fast.cli import app
from mplus_fast.hf.hub import cached_snapshot, resolve_checkpoint
from mplus_fast.testing import make_random_checkpoint

REPO_ID = "acme/tiny-mplus"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_snapshot(cache: Path, src: Path, repo_id: str, commit: str, refs=("main",)) -> Path:
    """Copy the checkpoint folder `src` into `cache` as the hub does: blobs named by content, the
    snapshot's files symbolic links to them, refs/<branch> holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    src = make_random_checkpoint(tmp_path / "src", seed=5)
    snap = _cache_snapshot(cache, src, REPO_ID, COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)               # relative paths in the tests resolve under tmp_path
    return cache, src, snap


def test_hub_id_loads_the_cached_snapshot(hub):
    _, src, snap = hub
    assert resolve_checkpoint(REPO_ID) == snap
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    a = mplus_fast.load(REPO_ID, backend="reference")(ids).logits
    b = mplus_fast.load(src, backend="reference")(ids).logits
    assert torch.equal(a, b)


def test_revision_by_branch_tag_or_commit(hub):
    cache, src, _ = hub
    other = "fedcba9876543210fedcba9876543210fedcba98"
    snap2 = _cache_snapshot(cache / "x", src, REPO_ID, other, refs=())
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.move(str(snap2), str(repo / "snapshots" / other))
    (repo / "refs" / "v1.0").write_text(other)
    assert resolve_checkpoint(REPO_ID, revision="v1.0") == repo / "snapshots" / other
    assert resolve_checkpoint(REPO_ID, revision=COMMIT) == repo / "snapshots" / COMMIT
    assert cached_snapshot(REPO_ID, "no-such-branch") is None


def test_huggingface_hub_agrees_on_the_layout(hub):
    """Our reading of the cache layout is huggingface_hub's own (when that package is installed)."""
    hf = pytest.importorskip("huggingface_hub")
    cache, _, snap = hub
    found = hf.try_to_load_from_cache(REPO_ID, "config.json", cache_dir=str(cache))
    assert isinstance(found, str) and Path(found).parent == snap


def test_partial_snapshot_is_not_a_checkpoint(hub):
    """A snapshot without config.json (an interrupted download) is not taken for a checkpoint."""
    _, _, snap = hub
    (snap / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_checkpoint(REPO_ID)


def test_unknown_hub_id_offline_says_why(hub):
    with pytest.raises(FileNotFoundError, match=r"'acme/other'.*hub cache.*HF_HUB_OFFLINE is set"):
        mplus_fast.load("acme/other")


def test_local_folder_wins_over_a_hub_id(hub, tmp_path):
    """A relative folder that exists is a folder, even when its path reads like a hub id."""
    local = make_random_checkpoint(tmp_path / "acme" / "tiny-mplus", seed=6)
    assert resolve_checkpoint(REPO_ID) == Path(REPO_ID)
    ids = torch.tensor([[3, 4, 5]])
    a = mplus_fast.load(REPO_ID, backend="reference")(ids).logits
    b = mplus_fast.load(local, backend="reference")(ids).logits
    assert torch.equal(a, b)


def test_paths_that_are_not_hub_ids_are_left_to_the_loader(hub):
    for p in ["a/b/c", "./acme/x", "/abs/path", "-x/y"]:
        assert resolve_checkpoint(p) == Path(p)


def test_cli_reads_hub_ids_and_never_writes_the_cache(hub, tmp_path):
    cache, _, snap = hub
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", REPO_ID])
    assert r.exit_code == 0, r.output
    assert "layers" in r.output
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    r = runner.invoke(app, ["inject", REPO_ID, "--ids", ",".join(str(i) for i in range(3, 40)), "--in-place"])
    assert r.exit_code == 2 and "--in-place needs CKPT to be a local checkpoint folder" in r.output
    r = runner.invoke(app, ["inject", REPO_ID, "--ids", ",".join(str(i) for i in range(3, 40)), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    after = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "acme").exists()
    assert mplus_fast.load(tmp_path / "out").memory_stats()["injections"] >= 1

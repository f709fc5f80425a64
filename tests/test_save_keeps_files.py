"""Saving never deletes the user's files (issue 14 item 0): `save_pretrained`, `mplus-fast inject
--out` and `--in-place` replace only the checkpoint's own files, as one crash-safe commit."""
from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import mplus_fast
from mplus_fast import atomic
from mplus_fast.checkpoint import INDEX, NotACheckpointError
from mplus_fast.cli import app

USER_FILES = {"tokenizer.json": '{"model": {}}', "README.md": "# my model\n", "projA/results.csv": "a,b\n1,2\n",
              ".hidden": "keep me"}


def plant(folder, files=USER_FILES):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def assert_planted(folder, files=USER_FILES):
    for name, text in files.items():
        assert (folder / name).is_file(), f"{name} was deleted"
        assert (folder / name).read_text() == text, f"{name} was changed"


def inject(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model.inject_memory(torch.randint(3, model.config.vocab_size, (1, 9), generator=g), update_memory=True)


def test_save_into_a_downloaded_checkpoint_keeps_its_other_files(tiny_ckpt, backend):
    plant(tiny_ckpt)
    model = mplus_fast.load(tiny_ckpt, seed=1, backend=backend)
    inject(model)
    model.save_pretrained(tiny_ckpt)
    assert_planted(tiny_ckpt)
    again = mplus_fast.load(tiny_ckpt, backend=backend)
    assert again.memory_stats()["injections"] == 2


def test_save_into_a_folder_with_user_subfolders_keeps_them(tiny_model, tmp_path):
    target = tmp_path / "work"
    plant(target)
    tiny_model.save_pretrained(target)
    assert_planted(target)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def test_resharding_removes_only_stale_shards(tiny_model, tmp_path):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(target, max_shard_size=40_000)
    shards = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    plant(target)
    tiny_model.save_pretrained(target)  # one file now: the index and every shard must go
    assert not (target / INDEX).exists()
    assert not list(target.glob("model-*-of-*.safetensors"))
    assert_planted(target)
    mplus_fast.load(target)
    tiny_model.save_pretrained(target, max_shard_size=40_000)  # and back: the single file goes
    assert not (target / "model.safetensors").exists()
    assert_planted(target)
    mplus_fast.load(target)


def test_a_folder_of_something_else_is_refused_unless_overwrite(tiny_model, tmp_path):
    target = tmp_path / "webapp"
    plant(target, {"config.json": '{"port": 8080}', "index.html": "<html/>"})
    with pytest.raises(NotACheckpointError, match=r"config.json.*overwrite=True"):
        tiny_model.save_pretrained(target)
    assert_planted(target, {"config.json": '{"port": 8080}', "index.html": "<html/>"})
    assert not (target / "model.safetensors").exists()
    tiny_model.save_pretrained(target, overwrite=True)
    assert (target / "index.html").read_text() == "<html/>"
    mplus_fast.load(target)


def test_weights_without_a_config_are_refused(tiny_model, tmp_path):
    target = tmp_path / "other"
    plant(target, {"model.safetensors": "not ours"})
    with pytest.raises(NotACheckpointError, match="model.safetensors"):
        tiny_model.save_pretrained(target)
    assert (target / "model.safetensors").read_text() == "not ours"


@pytest.mark.parametrize("mode", ["out", "in_place"])
def test_cli_inject_keeps_other_files(tiny_ckpt, tmp_path, mode):
    plant(tiny_ckpt)
    target = tiny_ckpt
    args = ["inject", str(tiny_ckpt), "--ids", ",".join(str(i) for i in range(3, 20))]
    if mode == "out":
        target = tmp_path / "out"
        plant(target)
        args += ["--out", str(target)]
    else:
        args += ["--in-place"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_planted(target)
    assert_planted(tiny_ckpt)
    assert mplus_fast.load(target).memory_stats()["injections"] > 0


def test_cli_inject_out_refuses_a_foreign_folder(tiny_ckpt, tmp_path):
    target = tmp_path / "proj"
    plant(target, {"config.json": "{}"})
    args = ["inject", str(tiny_ckpt), "--ids", "3,4,5,6,7", "--out", str(target)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (target / "config.json").read_text() == "{}"
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0


# ---------------------------------------------------------------------- the commit protocol
def test_crash_before_the_commit_point_keeps_the_old_checkpoint(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save_pretrained(tmp_path / "ckpt")
    plant(target)
    old = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    inject(tiny_model)
    real = atomic.write_bytes_atomic

    def crash(path, data):  # dies while writing the journal: nothing was committed
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "write_bytes_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(target)
    monkeypatch.setattr(atomic, "write_bytes_atomic", real)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == old
    assert mplus_fast.load(target).memory_stats()["injections"] == 0


def test_crash_after_the_commit_point_is_completed_by_the_next_load(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save_pretrained(tmp_path / "ckpt")
    plant(target)
    inject(tiny_model)
    replaced = []
    real_replace = os.replace

    def crash_after_one(src, dst):  # the first staged file lands, then the process dies
        if str(src).find(atomic.STAGING_PREFIX) >= 0 and replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(target)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (target / atomic.JOURNAL).is_file(), "the crash should have happened past the commit point"
    loaded = mplus_fast.load(target)          # completes the commit first
    assert loaded.memory_stats()["injections"] == 2
    assert not (target / atomic.JOURNAL).exists()
    assert not [p for p in target.iterdir() if p.name.startswith(atomic.STAGING_PREFIX)]
    assert_planted(target)


def test_a_tampered_journal_is_reported(tiny_model, tmp_path):
    target = tiny_model.save_pretrained(tmp_path / "ckpt")
    (target / atomic.JOURNAL).write_text(json.dumps({"staging": "../../etc", "files": [], "remove": []}))
    with pytest.raises(atomic.CommitError, match="journal"):
        mplus_fast.load(target)


def test_commit_files_rejects_paths(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        atomic.commit_files(tmp_path, {"../x": lambda p: p.write_text("x")})

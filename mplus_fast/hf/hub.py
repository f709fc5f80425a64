"""A Hugging Face hub id ("YuWangX/mplus-8b") as a checkpoint path.

`resolve_checkpoint(path)`: an existing folder is returned as it is. Otherwise a hub id is looked
up in the local hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
~/.cache/huggingface/hub; the layout `models--ORG--NAME/snapshots/<commit>/` with
`refs/<revision>` naming the commit), and, when it is not there, downloaded with
`huggingface_hub.snapshot_download` if that package is installed and the machine is online.
Nothing else is ever fetched, and nothing at all when `HF_HUB_OFFLINE=1`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# The files a checkpoint needs (weights, configs, tokenizer); never the authors' Python files.
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ["HF_HOME"]) if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit), or None."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if (snap / "config.json").is_file() else None


def resolve_checkpoint(path, revision: str = "main") -> Path:
    p = Path(path)
    if p.exists() or not HUB_ID.match(str(path)):
        return p                        # a local path (missing ones are reported by the loader)
    snap = cached_snapshot(str(path), revision)
    if snap is not None:
        return snap
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        snapshot_download = None
    if snapshot_download is None or offline:
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface_hub is not installed (pip install 'mplus_fast[hf]')"
        raise FileNotFoundError(f"{path!r} is neither a local folder nor in the hub cache {hub_cache()}, and it cannot be "
                                f"downloaded here: {why}. Download it elsewhere with `hf download {path}` and copy the "
                                "cache, or give the checkpoint folder's path")
    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=PATTERNS))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(f"{path!r}: not a local folder, not in the hub cache {hub_cache()}, and the download "
                                f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None

"""What the manual runners (soak.py, crash_trials.py) share: a scratch folder that is always
removed, and the result printed as JSON and optionally written to a file. Imported by those
scripts as `script_io` (they run as `python bench/NAME.py`, with bench/ on the path)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def in_scratch(prefix: str, parent: Path | None, fn: Callable[[Path], dict]) -> dict:
    """fn(a fresh temporary folder under `parent`), the folder removed afterwards whatever happens."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return fn(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def emit(result: dict, path: Path | None) -> None:
    """Print `result` as JSON, and write it to `path` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

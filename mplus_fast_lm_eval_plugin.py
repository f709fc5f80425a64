"""Makes `lm_eval --model mplus_fast` work in an environment where mplus_fast is installed.

lm-eval (0.4.x) finds models only in its own table (`lm_eval.models.MODEL_MAPPING`) and discovers
no plugins, so an outside package's model is known only to a process that imported it. The
package installs `mplus_fast_lm_eval_plugin.pth` beside itself; Python runs its one line at start-up,
which calls `install()` here. That costs one tiny module (standard library only: no torch, no
lm_eval) and a finder on `sys.meta_path` that waits for `lm_eval.models`: the moment lm-eval
imports its model table, `mplus_fast` is added to the registry as a lazy entry
("mplus_fast.eval.harness:MPlusLM"), so torch and the adapter are imported only when a run asks
for the model. A process that never imports lm_eval is not touched. A failure of the plugin's own
work is swallowed: it must never break an interpreter's start or lm-eval itself.
"""
from __future__ import annotations

import sys

WATCHED = "lm_eval.models"
NAME = "mplus_fast"
TARGET = "mplus_fast.eval.harness:MPlusLM"


def register(registry) -> None:
    """Add the lazy `mplus_fast` entry unless the name is taken (by the adapter itself, imported
    first, or by a model of the same name that lm-eval ships one day: its own wins)."""
    if NAME not in registry:
        registry.register(NAME, target=TARGET)


class _RegisterAfterLoad:
    """Wraps lm_eval.models' own loader: runs the module, then registers `mplus_fast`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):                   # is_package, get_code, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            from lm_eval.api.registry import model_registry
            register(model_registry)
        except Exception:  # noqa: BLE001 - an lm-eval without this registry: nothing to do
            pass


class _Finder:                                    # a meta path finder (importlib.abc not imported: start-up cost)
    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        sys.meta_path.remove(self)                 # once, and never in the way of the real lookup
        import importlib.util
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Called by the .pth line at start-up (idempotent)."""
    try:
        if WATCHED in sys.modules:                  # lm_eval already imported (not at start-up)
            from lm_eval.api.registry import model_registry
            register(model_registry)
        elif not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001
        pass

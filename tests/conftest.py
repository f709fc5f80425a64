from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mplus_fast
from mplus_fast.testing import make_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"   # made by the authors' code, see its README


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number per comparison, printed by failing asserts."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def pytest_report_header(config):
    from mplus_fast.ops import build_info

    info = build_info()
    return (f"mplus_fast._C: built={info['ext_built']} (cuda={info['cuda_built']}), loaded={info['ext_loaded']}"
            " (op tests of native kernels skip when not loaded; `make test` requires it when built)")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return make_random_checkpoint(tmp_path / "tiny", seed=3)


@pytest.fixture(params=["reference", "fast"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_ckpt, backend):
    return mplus_fast.load(tiny_ckpt, seed=0, backend=backend)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Session-cached random checkpoints keyed by their config overrides."""
    cache: dict[str, Path] = {}

    def make(seed: int = 0, ltm_size: int | None = None, weight_std: float | None = None, **config) -> Path:
        key = repr((seed, ltm_size, weight_std, sorted(config.items())))
        if key not in cache:
            cache[key] = make_random_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=seed, ltm_size=ltm_size,
                                                weight_std=weight_std, **config)
        return cache[key]

    return make

"""Shared test setup: 8 simulated CPU devices, strict numerics, paths to ../shared.

Run the quick tier with `pytest -m "not slow"`; CI runs everything (`pytest`).
Golden tests read nanochat's own outputs from ../shared/fixtures (never edited).
"""
import os
from pathlib import Path

# Must happen before anything imports jax: simulate 8 devices so shard_map paths run on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXRL_SHARED", REPO.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures" / "nanochat"
ARITH = SHARED / "fixtures" / "nanochat-sft-arith"
GENERATIONS = ("gen-2025-10", "gen-2026-01", "gen-2026-07")


def pytest_configure(config):
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}; set JAXRL_SHARED to the shared folder")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return FIXTURES

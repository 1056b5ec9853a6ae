"""Test-wide settings: eight simulated CPU devices (for sharding tests) before jax loads."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("METATTT_NO_PROGRESS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Float64 for the duration of one test (finite-difference checks)."""
    with jax.enable_x64(True):
        yield

"""Test-wide settings, set before jax loads: eight simulated CPU devices (for sharding tests)
and a persistent compilation cache.

The cache (``.pytest_cache/jax-compilation-cache``, ignored by git) lets a program compiled
once be loaded by every later process that builds it again: the other test worker, and the
subprocesses that the resume, kill and command-line tests start on the same tiny configs
(environment variables reach them). It changes no result: an entry is the executable XLA built
for the same program, keyed by its HLO, options, devices and JAX version. Delete the folder
to start cold; ``JAX_COMPILATION_CACHE_DIR=`` (empty) turns it off.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("METATTT_NO_PROGRESS", "1")
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Float64 for the duration of one test (finite-difference checks)."""
    with jax.enable_x64(True):
        yield

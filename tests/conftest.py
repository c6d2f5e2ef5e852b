"""Test set-up: 8 simulated CPU devices and a private TMPDIR, both before jax or tfds is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tfds leaves temporary folders behind; keep them out of the system /tmp.
_TMP = tempfile.mkdtemp(prefix="lecture3-tests-")
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP
# One persistent XLA cache for the whole run (xdist workers and the CLI / notebook subprocesses inherit
# these variables from the first process): the suite compiles the same small programs many times over
# (the same init for every arm of a claim, the same train step in several test files).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_TMP, "xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def little_xla_optimisation():
    """Ask XLA for little optimisation work while a module runs: tiny models compile far more than they
    compute, so this halves the CPU time of the sweep and property tests; their results do not depend on it."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)

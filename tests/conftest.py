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

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

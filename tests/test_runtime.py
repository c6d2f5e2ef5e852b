"""lecture3.runtime: the CPU settings made before jax's backend starts, and that they do what they say.

The measure is the kernel's count of minor page faults (getrusage), not time: without kept host memory
every train step maps its temporaries afresh and faults on every page of them; with it, the pages stay.
"""

import json
import os
import platform
import statistics
import subprocess
import sys

import jax.numpy as jnp
import pytest

from lecture3 import runtime

FAULTS_PER_STEP = r"""
import json, resource, sys
import lecture3
lecture3.runtime.cpu_defaults()  # the documented opt-in (LECTURE3_XLA_DEFAULTS=0 makes it a no-op)
cfg = lecture3.Config().replace(**{"train.steps": 32, "train.log_every": 4, "train.eval_every": 1000,
                                   "train.progress": False})
faults = []
run = lecture3.train(cfg, callbacks=[lambda rec: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)],
                     echo=lambda *a, **k: None)
per_step = [(b - a) / cfg.train.log_every for a, b in zip(faults[1:], faults[2:])]  # after the compiled warm-up
print(json.dumps({"per_step": per_step, "loss": run.history.to_list()[-1]["loss"]}))
"""


def _faults(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LECTURE3_XLA_DEFAULTS"}
    env.update(env_extra, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: the whole batch's temporaries
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_host_memory is glibc's mallopt; elsewhere it changes nothing by design")
def test_train_keeps_host_memory_so_a_step_does_not_fault_its_temporaries_in_again():
    kept = _faults({})
    fresh = _faults({"LECTURE3_XLA_DEFAULTS": "0"})
    # the default step's temporaries are ~156 MB: ~38,000 pages of 4 KiB faulted in anew each step when
    # glibc maps and unmaps them; kept, a step faults (almost) nothing. Medians over the logging intervals:
    # the heap still grows now and then for other things (the data pipeline's buffers)
    assert statistics.median(fresh["per_step"]) > 10_000, fresh
    assert statistics.median(kept["per_step"]) < 500, kept
    assert kept["loss"] == pytest.approx(fresh["loss"], abs=1e-5)  # memory policy, not maths


def test_nothing_is_applied_once_the_backend_has_started(monkeypatch):
    jnp.ones(2).block_until_ready()  # this process's backend is up
    monkeypatch.delenv("LECTURE3_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS")
    assert runtime.backend_started()
    assert runtime.cpu_defaults() == {"xla_flags": False, "keep_host_memory": False}
    assert os.environ.get("XLA_FLAGS") == flags


@pytest.mark.parametrize("keep", [True, False])
def test_keep_memory_false_applies_the_flag_alone(keep, monkeypatch):
    calls = []
    monkeypatch.delenv("LECTURE3_XLA_DEFAULTS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    monkeypatch.setattr(runtime, "keep_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(runtime, "_applied", {"xla_flags": False, "keep_host_memory": False})
    assert runtime.cpu_defaults(keep_memory=keep) == {"xla_flags": True, "keep_host_memory": keep}
    assert calls == ([1] if keep else [])
    assert os.environ["XLA_FLAGS"] == f"--{runtime.YNN_FLAG}=dot"


LEAVES_THE_PROCESS = r"""
import json, os
from lecture3 import runtime
calls = []
runtime.keep_host_memory = lambda: calls.append("mallopt") or True
before = dict(os.environ)
import lecture3
cfg = lecture3.Config().replace(**{"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
                                   "data.seq_len": 32, "train.steps": 2, "train.batch_size": 2,
                                   "train.warmup_steps": 1, "train.eval_every": 2, "train.eval_batches": 1,
                                   "train.sample_tokens": 0, "train.progress": False})
lecture3.train(cfg, echo=lambda *a, **k: None)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "calls": calls, "applied": runtime.applied()}))
"""


def test_lecture3_train_leaves_the_process_as_it_found_it():
    """Library code sets no XLA flag and no allocator setting: a notebook's kernel after `lecture3.train`
    is the kernel it was (the CLI and the experiment workers opt in with runtime.cpu_defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LECTURE3_XLA_DEFAULTS", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", LEAVES_THE_PROCESS], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"changed": [], "calls": [], "applied": {"xla_flags": False, "keep_host_memory": False}}

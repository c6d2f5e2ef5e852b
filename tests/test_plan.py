"""`lecture3 plan`: the sharded train step compiled for a real TPU slice on this CPU (libtpu's compile-only
devices). The compiling tests need libtpu (`pip install 'lecture3[tpu]'`) and are skipped where it is not
installed, with that reason in pytest's summary (`-ra`); the paths that need no libtpu always run."""

import os

import jax
import pytest

from lecture3 import accounting, cli, plan, presets
from lecture3.cli_plan import COMPILE_ONLY_ENV
from lecture3.config import Config, DataConfig, MeshConfig, TrainConfig

NO_LIBTPU = "libtpu is not installed: `pip install 'lecture3[tpu]'` compiles for TPU topologies on this CPU"
needs_libtpu = pytest.mark.skipif(not plan.libtpu_available(), reason=NO_LIBTPU)

# llama3:tiny with every mesh axis above 1, on an 8-chip v5e slice
TINY = ["--preset", "llama3:tiny", "--topology", "v5e:2x4", "--mesh.data", "2", "--mesh.fsdp", "2",
        "--mesh.tensor", "2", "--train.batch-size", "8", "--data.seq-len", "64"]
OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (19.58G) "
       "exceeds available HBM (15.75G).")


@pytest.fixture(autouse=True)
def compile_only_env(monkeypatch):
    """What `lecture3 plan` sets (quiet libtpu, no metadata server), set here so that it is undone after."""
    for key, value in COMPILE_ONLY_ENV.items():
        if key not in os.environ:
            monkeypatch.setenv(key, value)


def test_without_libtpu_plan_says_which_extra_to_install(monkeypatch, capsys):
    monkeypatch.setattr(plan, "libtpu_available", lambda: False)
    assert cli.main(["plan", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs libtpu" in err and "pip install 'lecture3[tpu]'" in err


def test_xlas_out_of_memory_figures_are_read():
    assert plan.oom_figures(f"XlaRuntimeError: {OOM}\nmore") == pytest.approx((19.58 * 2 ** 30, 15.75 * 2 ** 30))
    assert plan.oom_figures("RESOURCE_EXHAUSTED: something else") is None


def test_a_step_that_does_not_compile_for_lack_of_hbm_is_does_not_fit_with_the_numbers(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED is the plan's answer, not a traceback (here on the simulated CPU devices, with
    the compile failing as it does for llama3:8b at batch 32 x 4096 on v5e:4x4)."""
    monkeypatch.setattr(plan, "topology_devices", lambda name: jax.devices()[:8])

    def compile_fails(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_fails)
    assert cli.main(["plan", *TINY]) == 1
    out = capsys.readouterr().out
    assert "temporaries    19.58 GiB  (XLA's out-of-memory error: the step did not compile)" in out
    assert "of 15.75 GiB HBM" in out and "\ndoes not fit (RESOURCE_EXHAUSTED: Ran out of memory" in out


@pytest.mark.slow
@needs_libtpu
def test_the_tiny_step_compiles_sharded_over_data_fsdp_and_tensor_for_a_tpu_slice():
    def cfg(loss_chunk=None):
        return Config(model=presets.get("llama3", size="tiny"), data=DataConfig(seq_len=64),
                      train=TrainConfig(batch_size=8, loss_chunk=loss_chunk), mesh=MeshConfig(2, 2, 2))

    devices = plan.topology_devices("v5e:2x4")
    p = plan.plan(cfg(), "v5e:2x4", devices)
    assert (p.devices, p.device_kind, p.per) == (8, "TPU v5 lite", "chip")
    assert p.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert p.fits and p.oom is None and 0 < p.temporaries < p.hbm == plan.HBM_GIB["TPU v5 lite"] * 2 ** 30
    full = accounting.param_counts(cfg().model)["total"] * 4  # float32
    assert full / 4 <= p.params < full / 2  # a quarter per chip (fsdp x tensor), the norms replicated
    assert p.optimizer == pytest.approx(2 * p.params, rel=0.01)  # Adam's two moments
    assert p.step_flops == accounting.flops_per_token(cfg().model, 64)["training"] * 8 * 64
    # the chunked loss compiles sharded too (at this size its loop costs more than the 32 KiB of logits it saves;
    # tests/test_chunked_loss.py checks that no [B, T, V] array is left, the README the savings at full size)
    chunked = plan.plan(cfg(loss_chunk=16), "v5e:2x4", devices)
    assert chunked.fits and chunked.oom is None and chunked.params == p.params and chunked.temporaries > 0


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("flags, message", [
    (["--topology", "v5e:3x3"], "TPU topology 'v5e:3x3' cannot be resolved"),
    (["--topology", "v9z:2x2"], "TPU topology 'v9z:2x2' cannot be resolved"),
    (["--mesh.tensor", "3"], "does not match the 8 devices"),
])
def test_a_topology_or_mesh_that_cannot_be_is_one_line(capsys, flags, message):
    assert cli.main(["plan", *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err

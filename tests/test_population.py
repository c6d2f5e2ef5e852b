"""The population engine: member i of one vmapped program is the same config trained alone."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import make_corpus

import lecture3
from lecture3 import population, presets
from lecture3.config import Config, ConfigError, MeshConfig, TrainConfig
from lecture3.data import DataConfig
from lecture3.optim import schedule

# each member changes seed, data order, peak LR, warmup, weight decay or z-loss against the base
MEMBERS = [
    {"train.seed": 1},
    {"train.seed": 2, "train.lr": 2e-3, "train.warmup_steps": 0, "train.z_loss": 1e-3, "data.seed": 7},
    {"train.seed": 3, "train.lr": 1e-3, "train.warmup_steps": 8, "train.weight_decay": None},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("population")
    corpus = make_corpus(root)
    # modern:tiny shrunk, with dropout on, so that the dropout keys are exercised too
    model = presets.get("modern", "tiny").replace(d_model=32, max_seq_len=64, resid_dropout=0.1)
    return Config(
        model=model,
        data=DataConfig(source=f"files:{corpus}/*.py", data_dir=str(root / "cache"), seq_len=32,
                        val_fraction=0.25, val_sequences=8),
        train=TrainConfig(steps=20, batch_size=8, lr=3e-3, final_lr=3e-4, warmup_steps=5, weight_decay=0.1,
                          log_every=1, eval_every=10, eval_batches=1, progress=False, sample_tokens=0),
        mesh=MeshConfig(data=-1),
    )


@pytest.fixture(scope="module")
def solo(base):
    """Each member's config trained alone through lecture3.train, once per module."""
    cache = {}

    def get(overrides: dict):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            cache[key] = lecture3.train(base.replace(**overrides), echo=lambda *a: None)
        return cache[key]

    return get


def _assert_same_run(member, alone, atol=1e-5):
    assert [r["step"] for r in member.history] == [r["step"] for r in alone.history] == list(range(1, 21))
    for mine, theirs in zip(member.history, alone.history, strict=True):
        assert set(mine) == set(theirs), set(mine) ^ set(theirs)
        for key in ("loss", "cross_entropy", "grad_norm", "lr", "val_loss"):
            if key in theirs:
                np.testing.assert_allclose(mine[key], theirs[key], atol=atol, rtol=1e-6,
                                           err_msg=f"{key} at step {mine['step']}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(member.params), jax.tree.leaves(alone.params),
                            strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def full_xla_optimisation():
    """XLA's usual optimisation (it folds `x / n` into `x * (1/n)`), whichever fixture ran before."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant", "inverse_sqrt"])
def test_traced_schedule_is_bit_identical_to_the_solo_schedule(kind, full_xla_optimisation):
    steps = jnp.arange(40)
    for lr, final, warm in itertools.product([3e-3, 7e-4], [3e-4, 0.0], [0, 7]):
        train = TrainConfig(steps=37, lr=lr, final_lr=final, warmup_steps=warm, schedule=kind)
        alone = jax.jit(lambda s, t=train: jax.lax.map(schedule(t), s))(steps)  # a scalar step, as the step has it
        h = {k: jnp.asarray([v], jnp.float32) for k, v in population.optimizer_hparams(train).items()}
        traced = jax.jit(jax.vmap(lambda h: jax.lax.map(population.schedule(kind, h), steps)))(h)[0]
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(alone), err_msg=f"{train}")


# the two end-to-end tests compile five tiny programs; little XLA optimisation halves that time (both sides
# of each comparison are compiled alike)
@pytest.mark.slow
@pytest.mark.usefixtures("little_xla_optimisation")
def test_each_member_equals_its_config_trained_alone(base, solo, monkeypatch):
    from lecture3 import meter

    monkeypatch.setattr(meter, "peak_flops_per_device", lambda *a, **k: None)  # a device of unknown peak
    said = []
    runs = population.train(base, MEMBERS, echo=said.append)
    notes = [line for line in said if line.startswith("note: no MFU")]  # said once, as lecture3.train does
    assert len(notes) == 1 and "--train.peak-tflops" in notes[0], said
    assert all(r["mfu"] is None for run in runs for r in run.history if "mfu" in r)
    assert [r.overrides for r in runs] == MEMBERS and all(r.diverged_at is None for r in runs)
    for run, overrides in zip(runs, MEMBERS, strict=True):
        assert run.config == base.replace(**overrides)
        _assert_same_run(run, solo(overrides))
    assert "z_loss" in runs[1].history[-1] and "z_loss" not in runs[0].history[-1]
    # the optimizer numbers live in the state, one per member
    lrs = [float(r.state.opt_state.hyperparams["lr"]) for r in runs]
    np.testing.assert_allclose(lrs, [3e-3, 2e-3, 1e-3], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("little_xla_optimisation")
def test_a_diverging_member_is_frozen_and_the_others_go_on(base, solo):
    runs = population.train(base, [MEMBERS[0], {"train.seed": 5, "train.lr": 1e30, "train.final_lr": 1.0}])
    good, bad = runs
    _assert_same_run(good, solo(MEMBERS[0]))
    assert good.diverged_at is None and good.stopped is None
    assert bad.diverged_at is not None and 1 <= bad.diverged_at < 20
    assert "non-finite loss at step" in bad.stopped
    before = [r for r in bad.history if r["step"] < bad.diverged_at]
    after = [r for r in bad.history if r["step"] > bad.diverged_at]
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in before)
    assert after and all(np.isnan(r["loss"]) and r["finite"] == 0.0 for r in after)
    assert np.isnan(bad.val_loss) and np.isfinite(good.val_loss)
    # frozen: its params are those of the last finite step, finite, and its step count stopped there
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(bad.params))
    assert int(bad.state.step) == bad.diverged_at - 1


@pytest.mark.slow
@pytest.mark.usefixtures("little_xla_optimisation")
def test_a_member_that_skips_a_non_finite_step_goes_on_as_its_solo_run(base):
    """With on_nonfinite="skip" a solo run skips the bad step and goes on (no divergence, no stop): so does
    the member, which is not counted as diverged (the experiment harness would drop its params)."""
    skip = base.replace(**{"train.on_nonfinite": "skip"})
    bad = {"train.seed": 5, "train.lr": 1e30, "train.final_lr": 1.0}
    alone = lecture3.train(skip.replace(**bad), echo=lambda *a: None)
    (member,) = population.train(skip, [bad])
    assert alone.stopped is None and member.stopped is None
    assert member.diverged_at is None
    assert any(r["finite"] == 0.0 for r in alone.history)  # it did skip
    for key in ("step", "finite", "lr"):
        assert [r[key] for r in member.history] == pytest.approx([r[key] for r in alone.history], rel=1e-6), key
    assert int(member.state.step) == int(alone.state.step) == 20


def test_members_may_not_change_the_program(base):
    with pytest.raises(population.PopulationError, match=r"'model.d_model', an architecture field"):
        population.member_configs(base, [{"train.seed": 0}, {"model.d_model": 64}])
    with pytest.raises(population.PopulationError, match=r"'train.batch_size'"):
        population.member_configs(base, [{"train.batch_size": 16}])
    with pytest.raises(ConfigError, match=r"member 0: .*'train.lrr'.*did you mean 'train.lr'"):
        population.member_configs(base, [{"train.lrr": 1e-3}])
    with pytest.raises(population.PopulationError, match="at least one member"):
        population.train(base, [])
    with pytest.raises(ValueError, match=r"TrainConfig.final_lr"):  # each member is a validated config
        population.member_configs(base, [{"train.lr": 1e-4}])


def test_one_data_stream_cannot_serve_two_data_seeds(base):
    batch = {"inputs": np.zeros((8, 32), np.int32), "targets": np.zeros((8, 32), np.int32)}
    with pytest.raises(population.PopulationError, match="data.seed"):
        population.train(base, [{"data.seed": 0}, {"data.seed": 1}], data=[batch])


def test_member_axis_is_split_over_devices():
    n = len(jax.devices())  # 8 simulated CPU devices (conftest)
    assert population.make_mesh(4).devices.size == min(4, n)
    assert population.make_mesh(3).devices.size == np.gcd(3, n)

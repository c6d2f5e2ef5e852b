"""The loss and stability terms: each one's gradient is what its formula says; specs by name; aux terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lecture3 import losses


def _batch(seed, b=2, t=5, v=7):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32).at[0, 0].set(1.0)
    return logits, {"targets": targets, "loss_mask": mask}


@pytest.mark.slow
def test_label_smoothing_gradient_is_the_smoothed_target_formula():
    logits, batch = _batch(0)
    e, v = 0.1, logits.shape[-1]
    term = losses.cross_entropy(label_smoothing=e)
    grad = jax.grad(lambda x: term(x, batch)[0])(logits)
    p = np.asarray(jax.nn.softmax(logits))
    onehot = np.eye(v)[np.asarray(batch["targets"])]
    m = np.asarray(batch["loss_mask"])[..., None]
    expected = ((1 - e) * (p - onehot) + e * (p - 1.0 / v)) * m / m.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    value, metrics = term(logits, batch)
    plain, _ = losses.cross_entropy()(logits, batch)
    assert metrics["cross_entropy"] == plain and metrics["cross_entropy_smoothed"] == value and value != plain


def test_logit_l2_gradient_is_2w_logits_over_v_per_token():
    logits, batch = _batch(1)
    w, v = 1e-2, logits.shape[-1]
    grad = jax.grad(lambda x: losses.logit_l2(w)(x, batch)[0])(logits)
    m = np.asarray(batch["loss_mask"])[..., None]
    np.testing.assert_allclose(grad, 2 * w * np.asarray(logits) / v * m / m.sum(), rtol=1e-5, atol=1e-9)


def test_z_loss_gradient_is_2w_logz_softmax():
    logits, batch = _batch(2)
    w = 1e-2
    grad = jax.grad(lambda x: losses.z_loss(w)(x, batch)[0])(logits)
    lz = np.asarray(jax.nn.logsumexp(logits, -1))[..., None]
    m = np.asarray(batch["loss_mask"])[..., None]
    np.testing.assert_allclose(grad, 2 * w * lz * np.asarray(jax.nn.softmax(logits)) * m / m.sum(), rtol=1e-5,
                               atol=1e-9)


def test_max_attn_logit_penalty_gradient_and_threshold():
    logits, batch = _batch(3)
    m = jnp.asarray([[10.0, 35.0, 50.0], [29.0, 31.0, 0.0]])  # [L, N]
    w, thr = 1e-2, 30.0
    term = losses.max_attn_logit(w, thr)
    assert losses.required(term) == ("attn_logit_max",)
    value, _ = term(logits, batch, {"attn_logit_max": m})
    excess = np.maximum(np.asarray(m) - thr, 0)
    np.testing.assert_allclose(value, w * np.mean(excess**2), rtol=1e-6)
    grad = jax.grad(lambda a: term(logits, batch, {"attn_logit_max": a})[0])(m)
    np.testing.assert_allclose(grad, 2 * w * excess / m.size, rtol=1e-6)
    assert float(term(logits, batch, {"attn_logit_max": m - 100})[0]) == 0.0  # below the threshold: free


def test_attn_entropy_floor_gradient_pushes_low_entropy_heads_up():
    logits, batch = _batch(4)
    rng = np.random.default_rng(4)
    ent = jnp.asarray(rng.uniform(0, 1.2, size=(2, 2, 3, 5)), jnp.float32)  # [L, B, N, T]
    w, floor = 0.5, 0.6
    term = losses.attn_entropy_floor(w, floor)
    grad = jax.grad(lambda a: term(logits, batch, {"attn_entropy": a})[0])(ent)
    per_head = np.asarray(ent).mean(axis=(1, 3))  # [L, N]
    deficit = np.maximum(floor - per_head, 0)
    expected = -2 * w * deficit / per_head.size / (ent.shape[1] * ent.shape[3])
    np.testing.assert_allclose(grad, np.broadcast_to(expected[:, None, :, None], ent.shape), rtol=1e-5)
    # rtol 1e-5, as for the gradient: floor - per_head cancels, so float32 sums in another order differ by ~1e-5
    np.testing.assert_allclose(term(logits, batch, {"attn_entropy": ent})[0], w * np.mean(deficit**2), rtol=1e-5)


def test_finite_differences_agree_for_every_logit_term():
    logits, batch = _batch(5)
    direction = jnp.asarray(np.random.default_rng(5).normal(size=logits.shape), jnp.float32)
    for term in (losses.cross_entropy(0.2), losses.z_loss(1e-2), losses.logit_l2(1e-2)):
        f = lambda x, term=term: term(x, batch)[0]
        analytic = float(jnp.vdot(jax.grad(f)(logits), direction))
        h = 1e-3
        numeric = float((f(logits + h * direction) - f(logits - h * direction)) / (2 * h))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-6)


def test_spec_builds_the_same_loss_as_composing_by_hand():
    logits, batch = _batch(6)
    aux = {"attn_logit_max": jnp.full((2, 3), 40.0)}
    fn = losses.parse("cross_entropy+z_loss:1e-4+logit_l2:1e-5+max_attn_logit:1e-3,30")
    hand = losses.compose(losses.cross_entropy(), losses.z_loss(1e-4), losses.logit_l2(1e-5),
                          losses.max_attn_logit(1e-3, 30.0))
    assert losses.required(fn) == ("attn_logit_max",)
    a, b = fn(logits, batch, aux), hand(logits, batch, aux)
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    np.testing.assert_allclose(a[1]["max_attn_logit_penalty"], 1e-3 * 100.0, rtol=1e-6)


def test_two_argument_user_terms_still_compose_with_aux_terms():
    logits, batch = _batch(7)

    def bonus(logits, batch):
        return 0.5 * jnp.ones(()), {"bonus": 0.5 * jnp.ones(())}

    @losses.needs("attn_entropy")
    def mine(logits, batch, aux):
        return aux["attn_entropy"].mean(), {"mine": aux["attn_entropy"].mean()}

    fn = losses.compose(losses.cross_entropy(), bonus, mine)
    assert losses.required(fn) == ("attn_entropy",)
    total, metrics = fn(logits, batch, {"attn_entropy": jnp.full((1, 2, 1, 5), 2.0)})
    np.testing.assert_allclose(total, metrics["cross_entropy"] + 0.5 + 2.0, rtol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("cross_entropy+zloss:1e-4", "unknown loss term 'zloss' in 'cross_entropy+zloss:1e-4': did you mean 'z_loss'?"),
    ("cross_entropy+z_loss:abc", "arguments must be numbers"),
    ("cross_entropy+z_loss:-1", "z_loss weight=-1.0 is invalid: expected a positive number"),
    ("cross_entropy+z_loss:1e-4,2", "takes at most 1 argument"),
    ("z_loss:1e-4", "has no cross_entropy term"),
    ("cross_entropy+z_loss+z_loss", "appears twice"),
    ("", "is empty"),
    ("cross_entropy:1.5", "label_smoothing=1.5 is invalid"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(losses.LossSpecError) as e:
        losses.parse(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def _train_params(spec, steps=3, **train):
    import flax.linen as nn

    from lecture3 import steps as step_lib
    from lecture3.config import ModelConfig, TrainConfig
    from lecture3.model import Transformer

    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=61, max_seq_len=16)
    tc = TrainConfig(steps=steps, batch_size=2, warmup_steps=0, lr=1e-2, final_lr=1e-2, loss=spec, **train)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    opt = step_lib.make_optimizer(tc)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                                rng=jax.random.PRNGKey(1))
    step = jax.jit(step_lib.make_train_step(cfg, tc, optimizer=opt))
    for _ in range(steps):
        state, metrics = step(state, batch)
    return state.params, metrics


@pytest.mark.slow
@pytest.mark.parametrize("spec, metric", [
    ("cross_entropy:0.1", "cross_entropy_smoothed"),
    ("cross_entropy+z_loss:1e-1", "z_loss"),
    ("cross_entropy+logit_l2:1e-1", "logit_l2"),
    ("cross_entropy+max_attn_logit:10,1e-3", "max_attn_logit_penalty"),
    ("cross_entropy+attn_entropy_floor:10,5", "attn_entropy_penalty"),
])
def test_a_run_with_each_term_differs_from_one_without_it(spec, metric):
    plain, _ = _train_params("cross_entropy")
    with_term, metrics = _train_params(spec)
    assert metric in metrics and float(metrics[metric]) != 0.0
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_term),
                                                              strict=True))
    assert diff > 1e-6, spec


def test_independent_weight_decay_does_not_scale_with_the_peak_lr():
    from lecture3.config import TrainConfig
    from lecture3.optim import make_optimizer

    params = {"layer_0": {"attn": {"q": jnp.ones((4, 4))}}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    moved = {}
    for mode in ("decoupled", "independent"):
        for lr in (1e-3, 1e-2):
            tc = TrainConfig(lr=lr, final_lr=lr, warmup_steps=0, weight_decay=0.1, grad_clip=None,
                             weight_decay_mode=mode)
            tx = make_optimizer(tc)
            updates, _ = tx.update(zeros, tx.init(params), params, step=jnp.asarray(5))
            moved[mode, lr] = float(-updates["layer_0"]["attn"]["q"][0, 0])
    np.testing.assert_allclose([moved["decoupled", 1e-3], moved["decoupled", 1e-2]], [1e-4, 1e-3], rtol=1e-5)
    np.testing.assert_allclose([moved["independent", 1e-3], moved["independent", 1e-2]], [0.1, 0.1], rtol=1e-5)

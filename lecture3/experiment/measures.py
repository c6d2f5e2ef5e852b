"""Measurements without a training run: per-layer gradient norms at init, step time A/B in one process.

(The other shared measures: the comparison rule, best LR, divergence and LR sensitivity are in
`stats`; the largest attention logit and |log Z| of a trained model are `runs.probe`.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

from lecture3.config import Config


def _setup(cfg: Config):
    from lecture3 import sharding, steps

    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.axis_rules(cfg.model, mesh, cfg.train.batch_size)
    return mesh, rules, steps


def _batches(cfg: Config, n: int) -> list[dict]:
    from lecture3 import data as dataio

    it = dataio.make_train_iterator(cfg.data, cfg.train.batch_size)
    return [next(it) for _ in range(n)]


def init_grad_norms(cfg: Config, n_batches: int = 4, leaf: str = "up") -> dict:
    """L2 norm of the cross-entropy gradient of each layer's MLP `leaf` matrix (the input matrix W1:
    `up`; a gated MLP also has `gate`) at the training init of `cfg` (its seed), mean over `n_batches`
    batches of its data order. Returns {"per_layer": [L floats], "per_batch": [[L floats] x n]}."""
    import jax
    import jax.numpy as jnp

    from lecture3 import losses
    from lecture3.model import Transformer, unstack_layers

    mesh, rules, steps = _setup(cfg)
    state = steps.init_state(cfg.model, cfg.train, mesh, rules)
    params = jax.device_get(state.params)
    model, ce = Transformer(cfg.model), losses.cross_entropy()

    @jax.jit
    def grads(params, batch):
        def loss(p):
            return ce(model.apply({"params": p}, batch["inputs"]).logits, batch)[0]

        layers = unstack_layers(cfg.model, jax.grad(loss)(params))  # layer order, scanned or not
        return jnp.stack([jnp.linalg.norm(layer["mlp"][leaf]) for layer in layers])

    per_batch = [[float(x) for x in grads(params, {k: jnp.asarray(v) for k, v in b.items()})]
                 for b in _batches(cfg, n_batches)]
    per_layer = [statistics.fmean(col) for col in zip(*per_batch, strict=True)]
    return {"per_layer": per_layer, "per_batch": per_batch, "leaf": leaf,
            "last_over_first": per_layer[-1] / per_layer[0]}


def step_times(configs: Mapping[str, Config], rounds: int = 7, steps_per_round: int = 10) -> dict:
    """Seconds per train step of each config, measured in ONE process with the rounds interleaved (the
    order alternates every round), so machine noise hits every arm alike; median over rounds. Each arm
    runs the step `lecture3 train` runs here (its batch parts: `steps.batch_splits`).
    Returns {"median_s": {name: s}, "rounds_s": {name: [s per round]}, "batch_splits": {name: n}}."""
    import jax
    import jax.numpy as jnp

    arms, splits = {}, {}
    for name, cfg in configs.items():
        mesh, rules, steps = _setup(cfg)
        opt = steps.make_optimizer(cfg.train)
        _, shardings = steps.state_shardings(cfg.model, cfg.train, mesh, rules, opt)
        splits[name] = steps.batch_splits(cfg.model, cfg.train, mesh)
        fn = steps.jit_train_step(steps.make_train_step(cfg.model, cfg.train, None, opt, splits[name]), mesh, rules,
                                  shardings)
        state = steps.init_state(cfg.model, cfg.train, mesh, rules, opt, shardings)
        batch = {k: jnp.asarray(v) for k, v in _batches(cfg, 1)[0].items()}
        for _ in range(2):  # compile and warm up
            state, metrics = fn(state, batch)
        jax.block_until_ready(metrics)
        arms[name] = [fn, state, batch]
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, state, batch = arms[name]
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                state, metrics = fn(state, batch)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - t0) / steps_per_round)
            arms[name][1] = state
    return {"median_s": {n: statistics.median(t) for n, t in times.items()}, "rounds_s": times,
            "rounds": rounds, "steps_per_round": steps_per_round, "batch_splits": splits}

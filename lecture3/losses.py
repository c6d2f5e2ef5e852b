"""Loss and stability terms as pure functions, and their composition.

A term is `(logits, batch, aux) -> (scalar, metrics)`:
    logits  float[B, T, V], the model's output;
    batch   at least `targets` int[B, T] and optionally `loss_mask` float[B, T] (0 where the target is padding);
    aux     a mapping with `params` and the captured intermediates the term asked for (names and shapes:
            `lecture3.capture.CAPTURES`), each stacked over layers: e.g. `aux["attn_logit_max"]` float[L, N].
A term asks for intermediates by carrying a `needs` tuple (`@losses.needs("attn_probs")`); the train step
captures only what its terms need. A two-argument term `(logits, batch)` still works. Everything is float32,
whatever the model's compute dtype.

    loss_fn = losses.compose(losses.cross_entropy(), losses.z_loss(1e-4))
    loss_fn = losses.parse("cross_entropy+z_loss:1e-4+max_attn_logit:1e-3,30")   # the same terms by name
    loss, metrics = loss_fn(logits, batch, aux)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from lecture3.loss_spec import TERM_ARGS, LossSpecError, parse_terms, spec_help  # noqa: F401 - re-exported

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def loss_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """float32[B, T]: the batch's `loss_mask`, or ones when it has none."""
    targets = batch["targets"]
    mask = batch.get("loss_mask")
    return jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def log_z(logits: jax.Array) -> jax.Array:
    """log of the softmax normaliser, float32[B, T]."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def needs(*names: str) -> Callable[[LossFn], LossFn]:
    """Decorator: the term reads these captured intermediates from `aux` (see `lecture3.capture`)."""

    def mark(fn: LossFn) -> LossFn:
        fn.needs = tuple(dict.fromkeys((*getattr(fn, "needs", ()), *names)))
        return fn

    return mark


def required(loss_fn: LossFn) -> tuple[str, ...]:
    """The intermediates a (composed) term asks for."""
    return tuple(getattr(loss_fn, "needs", ()))


def _takes_aux(fn: LossFn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def call(term: LossFn, logits, batch, aux=None):
    """Call a term with `aux` if it takes one (a two-argument `(logits, batch)` term does not)."""
    return term(logits, batch, {} if aux is None else aux) if _takes_aux(term) else term(logits, batch)


# ----- the terms ----------------------------------------------------------------------------------------


def cross_entropy(label_smoothing: float | None = None, name: str = "cross_entropy") -> LossFn:
    """Masked token-level cross-entropy in nats. With `label_smoothing` e the term is (1 - e) * NLL + e * the
    mean NLL over the whole vocabulary (Szegedy 2016); the metric `cross_entropy` stays the plain NLL, and the
    smoothed value is logged as `cross_entropy_smoothed`."""
    if label_smoothing is not None and not 0.0 < label_smoothing < 1.0:
        raise LossSpecError(f"cross_entropy label_smoothing={label_smoothing!r} is invalid: expected a rate in "
                            "(0, 1), or None (off)")

    def fn(logits, batch, aux=None):
        logits = logits.astype(jnp.float32)
        lz, mask = log_z(logits), loss_mask(batch)
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        nll = masked_mean(lz - target_logit, mask)
        if label_smoothing is None:
            return nll, {name: nll}
        uniform = masked_mean(lz - logits.mean(-1), mask)
        value = (1.0 - label_smoothing) * nll + label_smoothing * uniform
        return value, {name: nll, f"{name}_smoothed": value}

    return fn


def _check_weight(term: str, weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise LossSpecError(f"{term} weight={weight!r} is invalid: expected a positive number")
    return float(weight)


def z_loss(weight: float = 1e-4, name: str = "z_loss") -> LossFn:
    """weight * mean(log^2 Z): keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022: 1e-4)."""
    weight = _check_weight("z_loss", weight)

    def fn(logits, batch, aux=None):
        loss = weight * masked_mean(jnp.square(log_z(logits)), loss_mask(batch))
        return loss, {name: loss}

    return fn


def logit_l2(weight: float = 1e-5, name: str = "logit_l2") -> LossFn:
    """weight * mean over tokens and vocabulary of logit^2: an L2 penalty on the output logits, which, like
    z-loss, stops them drifting (Wortsman et al. 2023 contrast it with z-loss)."""
    weight = _check_weight("logit_l2", weight)

    def fn(logits, batch, aux=None):
        sq = jnp.square(logits.astype(jnp.float32)).mean(-1)  # [B, T]
        loss = weight * masked_mean(sq, loss_mask(batch))
        return loss, {name: loss}

    return fn


def max_attn_logit(weight: float = 1e-3, threshold: float = 30.0, name: str = "max_attn_logit_penalty") -> LossFn:
    """weight * mean over layers and heads of relu(m - threshold)^2, where m is each head's largest attention
    logit before any soft-cap (after the query scale): a soft, QK-clip style limit on logit growth (Dehghani
    2023 saw it diverge; Kimi K2's QK-clip rescales W_q, W_k past a threshold instead)."""
    weight = _check_weight("max_attn_logit", weight)
    if not threshold > 0:
        raise LossSpecError(f"max_attn_logit threshold={threshold!r} is invalid: expected a positive number")

    @needs("attn_logit_max")
    def fn(logits, batch, aux):
        excess = jax.nn.relu(aux["attn_logit_max"].astype(jnp.float32) - threshold)  # [L, N]
        loss = weight * jnp.mean(jnp.square(excess))
        return loss, {name: loss}

    return fn


def attn_entropy_floor(weight: float = 1e-2, floor: float = 0.5, name: str = "attn_entropy_penalty") -> LossFn:
    """weight * mean over layers and heads of relu(floor - H)^2, H being the head's attention entropy (nats)
    averaged over batch and queries: a penalty against the attention-entropy collapse that Zhai et al. 2023
    tie to training instability."""
    weight = _check_weight("attn_entropy_floor", weight)
    if not floor > 0:
        raise LossSpecError(f"attn_entropy_floor floor={floor!r} is invalid: expected a positive number (nats)")

    @needs("attn_entropy")
    def fn(logits, batch, aux):
        entropy = aux["attn_entropy"].astype(jnp.float32)  # [L, B, N, T]
        per_head = entropy.mean(axis=(1, 3))  # [L, N]
        loss = weight * jnp.mean(jnp.square(jax.nn.relu(floor - per_head)))
        return loss, {name: loss}

    return fn


def compose(*terms: LossFn) -> LossFn:
    """The sum of the terms; the metrics of all of them, plus `loss` (the total). It needs what they need."""
    if not terms:
        raise LossSpecError("losses.compose needs at least one term, e.g. losses.cross_entropy()")

    def fn(logits, batch, aux=None):
        total, metrics = jnp.zeros((), jnp.float32), {}
        for term in terms:
            value, m = call(term, logits, batch, aux)
            total = total + value
            metrics.update(m)
        metrics["loss"] = total
        return total, metrics

    fn.needs = tuple(dict.fromkeys(n for t in terms for n in required(t)))
    return fn


# name -> (factory, the names of its numeric arguments, in the order a spec gives them: `loss_spec.TERM_ARGS`)
TERMS: dict[str, tuple[Callable[..., LossFn], tuple[str, ...]]] = {
    name: (factory, TERM_ARGS[name]) for name, factory in {
        "cross_entropy": cross_entropy,
        "z_loss": z_loss,
        "logit_l2": logit_l2,
        "max_attn_logit": max_attn_logit,
        "attn_entropy_floor": attn_entropy_floor,
    }.items()}


def parse(spec: str) -> LossFn:
    """`"cross_entropy+z_loss:1e-4+max_attn_logit:1e-3,30"` -> the composed loss. Each `+`-separated term is
    `name` or `name:a,b` with the term's numeric arguments in the order of `TERMS` (cross_entropy's one
    argument is its label smoothing; every other term's first is its weight)."""
    return from_config(parse_terms(spec))


def from_config(terms: Mapping[str, float | tuple | None]) -> LossFn:
    """The composed loss from `{name: args}` (a number, a tuple of numbers, or None for the defaults)."""
    fns = []
    for name, args in terms.items():
        if name not in TERMS:
            raise LossSpecError(f"unknown loss term {name!r}: expected one of {sorted(TERMS)}")
        args = () if args is None else (args,) if isinstance(args, int | float) else tuple(args)
        fns.append(TERMS[name][0](*args))
    return compose(*fns)

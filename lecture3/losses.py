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


def logits_free(fn: LossFn) -> LossFn:
    """Decorator: the term reads only `aux`, never the logits, so `chunked` can call it without them."""
    fn.reads_logits = False
    return fn


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


def token_term(per_token: Callable, finish: Callable) -> LossFn:
    """A term that is a function of masked means over the tokens: `per_token(logits, targets, lz)` maps float32
    logits [B, T, V], their int targets [B, T] and log Z [B, T] to {stat: float32[B, T]}, and `finish` maps
    {stat: masked mean} to (value, metrics). Written so, a term can also be computed a few positions at a
    time, without the full logits (`chunked`)."""

    def fn(logits, batch, aux=None):
        logits = logits.astype(jnp.float32)
        stats = per_token(logits, batch["targets"], log_z(logits))
        mask = loss_mask(batch)
        return finish({k: masked_mean(v, mask) for k, v in stats.items()})

    fn.per_token, fn.finish = per_token, finish
    return fn


def cross_entropy(label_smoothing: float | None = None, name: str = "cross_entropy") -> LossFn:
    """Masked token-level cross-entropy in nats. With `label_smoothing` e the term is (1 - e) * NLL + e * the
    mean NLL over the whole vocabulary (Szegedy 2016); the metric `cross_entropy` stays the plain NLL, and the
    smoothed value is logged as `cross_entropy_smoothed`."""
    if label_smoothing is not None and not 0.0 < label_smoothing < 1.0:
        raise LossSpecError(f"cross_entropy label_smoothing={label_smoothing!r} is invalid: expected a rate in "
                            "(0, 1), or None (off)")

    def per_token(logits, targets, lz):
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        stats = {"nll": lz - target_logit}
        if label_smoothing is not None:
            stats["uniform"] = lz - logits.mean(-1)
        return stats

    def finish(means):
        nll = means["nll"]
        if label_smoothing is None:
            return nll, {name: nll}
        value = (1.0 - label_smoothing) * nll + label_smoothing * means["uniform"]
        return value, {name: nll, f"{name}_smoothed": value}

    return token_term(per_token, finish)


def _check_weight(term: str, weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise LossSpecError(f"{term} weight={weight!r} is invalid: expected a positive number")
    return float(weight)


def _weighted(weight: float, stat: str, name: str) -> Callable:
    """`finish` of a token term that is `weight` times one mean."""

    def finish(means):
        loss = weight * means[stat]
        return loss, {name: loss}

    return finish


def z_loss(weight: float = 1e-4, name: str = "z_loss") -> LossFn:
    """weight * mean(log^2 Z): keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022: 1e-4)."""
    weight = _check_weight("z_loss", weight)
    return token_term(lambda logits, targets, lz: {"log_z_sq": jnp.square(lz)}, _weighted(weight, "log_z_sq", name))


def logit_l2(weight: float = 1e-5, name: str = "logit_l2") -> LossFn:
    """weight * mean over tokens and vocabulary of logit^2: an L2 penalty on the output logits, which, like
    z-loss, stops them drifting (Wortsman et al. 2023 contrast it with z-loss)."""
    weight = _check_weight("logit_l2", weight)
    return token_term(lambda logits, targets, lz: {"sq": jnp.square(logits).mean(-1)}, _weighted(weight, "sq", name))


def max_attn_logit(weight: float = 1e-3, threshold: float = 30.0, name: str = "max_attn_logit_penalty") -> LossFn:
    """weight * mean over layers and heads of relu(m - threshold)^2, where m is each head's largest attention
    logit before any soft-cap (after the query scale): a soft, QK-clip style limit on logit growth (Dehghani
    2023 saw it diverge; Kimi K2's QK-clip rescales W_q, W_k past a threshold instead)."""
    weight = _check_weight("max_attn_logit", weight)
    if not threshold > 0:
        raise LossSpecError(f"max_attn_logit threshold={threshold!r} is invalid: expected a positive number")

    @logits_free
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

    @logits_free
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
        return _total(call(term, logits, batch, aux) for term in terms)

    fn.needs = tuple(dict.fromkeys(n for t in terms for n in required(t)))
    fn.terms = terms
    return fn


def _total(results) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum of the terms' (value, metrics), and all their metrics plus `loss`, the total."""
    total, metrics = jnp.zeros((), jnp.float32), {}
    for value, m in results:
        total = total + value
        metrics.update(m)
    metrics["loss"] = total
    return total, metrics


# ----- the same terms without the full logits ------------------------------------------------------------


def chunked(loss_fn: LossFn, hidden: jax.Array, head: Callable, batch, aux=None, chunk: int = 512,
            metrics: Callable | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`call(loss_fn, head(hidden), batch, aux)` without ever holding the whole float32 logits [B, T, V] or
    their gradient: the head and every term that reads the logits run over `chunk` positions at a time
    (a `lax.scan` over the chunks), and each chunk's logits are recomputed in the backward pass
    (`jax.checkpoint`), so one chunk's [B, chunk, V] is live at once. The same loss, gradients and metrics
    up to float rounding: each mean is summed chunk by chunk before it is divided.

    hidden  float[B, T, D]: what the head reads (`Transformer(..., head=False)`'s `Output.hidden`);
    head    float[B, t, D] -> float32[B, t, V]: the output head with its weights (`model.head_logits`);
            called inside the loop, so a cast of its weights there accumulates their gradient in float32;
    metrics optional `per_token(logits, targets, lz) -> {name: float32[B, T]}` logged as masked means beside
            the terms' (the step's `log_z_abs`).
    Every term of `loss_fn` (one, or those of `compose`) must be a `token_term` (cross_entropy, z_loss,
    logit_l2) or `logits_free` (max_attn_logit, attn_entropy_floor): any other term reads the full logits."""
    terms = check_chunkable(loss_fn)
    stat_fns = [t.per_token for t in terms if hasattr(t, "per_token")] + ([metrics] if metrics else [])
    means = iter(_chunked_means(stat_fns, hidden, head, batch["targets"], loss_mask(batch), chunk))
    results = [t.finish(next(means)) if hasattr(t, "per_token") else call(t, None, batch, aux) for t in terms]
    loss, out = _total(results) if hasattr(loss_fn, "terms") else results[0]
    if metrics:
        out = {**out, **next(means)}
    return loss, out


def check_chunkable(loss_fn: LossFn) -> tuple[LossFn, ...]:
    """The terms of `loss_fn`, once each is known to work without the full logits (see `chunked`)."""
    terms = getattr(loss_fn, "terms", (loss_fn,))
    for term in terms:
        if not hasattr(term, "per_token") and getattr(term, "reads_logits", True):
            name = getattr(term, "__name__", repr(term))
            raise LossSpecError(f"loss term {name} reads the full logits, which the chunked loss never holds: "
                                "write it with losses.token_term (or mark it losses.logits_free), or set "
                                "train.loss_chunk=None")
    return terms


def _chunked_means(stat_fns, hidden, head, targets, mask, chunk: int) -> list[dict[str, jax.Array]]:
    """For each of `stat_fns`, {stat: masked mean over the tokens} of `fn(head(hidden), targets, lz)`, the
    logits made and reduced `chunk` positions at a time. Positions past T (T not a multiple of `chunk`) are
    padded with mask 0."""
    b, t = targets.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, mask))
    split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # [n, B, chunk, ...]

    @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping all of them
    def sums(x, y, m):
        logits = head(x).astype(jnp.float32)  # [B, chunk, V]
        lz = log_z(logits)
        return [{k: (v * m).sum() for k, v in fn(logits, y, lz).items()} for fn in stat_fns]

    xs = (split(hidden), split(targets), split(mask))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums, *(a[0] for a in xs)))
    totals, _ = jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, sums(*x)), None), zeros, xs)
    count = jnp.maximum(mask.sum(), 1.0)
    return [{k: v / count for k, v in d.items()} for d in totals]


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

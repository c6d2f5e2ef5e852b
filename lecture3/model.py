"""The Transformer: embed -> (+ absolute positions) -> layers -> final norm -> head -> soft-cap.

`Transformer(cfg).apply({"params": p}, tokens)` maps int32[B, T] to float32[B, T, V] logits.
With `scan_layers`, one period of `layer_pattern` (e.g. Gemma 2's local+global pair) is the scanned unit,
so compile time does not grow with depth; parameters then carry a leading layer axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lecture3 import capture as capture_names
from lecture3.config import ModelConfig
from lecture3.errors import Lecture3Error
from lecture3.layers import positions as pos
from lecture3.layers.block import Block
from lecture3.layers.common import DTYPES, constrain, dense, dropout, normal, param, softcap
from lecture3.layers.norms import Norm

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def block_class(cfg: ModelConfig, scanned: bool):
    if cfg.remat is None:
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scanned)


class LayerGroup(nn.Module):
    """One period of `layer_pattern`: the unit that nn.scan repeats n_layers / len(pattern) times."""

    cfg: ModelConfig
    deterministic: bool = True
    capture: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, caches, q_idx, positions, segment_ids, rel_table):
        cfg, new, captured = self.cfg, [], []
        block = block_class(cfg, scanned=True)
        for i, kind in enumerate(cfg.layer_pattern):
            window = cfg.sliding_window if kind == "local" else None
            x, c, cap = block(cfg, window, self.deterministic, self.capture, name=f"layer_{i}")(
                x, q_idx, positions, segment_ids, rel_table, None if caches is None else caches[i])
            new.append(c)
            captured.append(cap)
        return x, (None if caches is None else tuple(new), tuple(captured))


@flax.struct.dataclass
class Output:
    """What `Transformer(cfg).apply(..., capture=names)` returns: the logits, the new cache (None without
    one) and the captured intermediates by name, per layer stacked on a leading layer axis (names and
    shapes: `lecture3.capture.CAPTURES`)."""

    logits: jax.Array  # float32[B, T, V]
    cache: tuple | None = None
    captured: dict = flax.struct.field(default_factory=dict)
    hidden: jax.Array | None = None  # float[B, T, D]: what the head reads, with `head=False` only (logits None)


def head_logits(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """The output head: x float[..., D] times w [D, V] in the compute dtype -> float32 logits, soft-capped.
    `w` is `head_matrix(cfg, params)` (or already cast); the model's own head is this function."""
    logits = dense(x, w.astype(DTYPES[cfg.dtype]), preferred_element_type=jnp.float32)
    logits = softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)
    return constrain(logits, ("batch", "length", "vocab"))


def head_matrix(cfg: ModelConfig, params: dict) -> jax.Array:
    """The head's weights [D, V] in `params` (boxed by `init` or not): the embedding's transpose when tied."""
    return nn.unbox(params["embed"]).T if cfg.tie_embeddings else nn.unbox(params["head"])


def _stack_captured(per_layer: list[dict]) -> dict:
    return {name: jnp.stack([layer[name] for layer in per_layer]) for name in (per_layer[0] if per_layer else {})}


def _interleave_scanned(per_slot: tuple[dict, ...]) -> dict:
    """Scanned captures [groups, ...] per pattern slot -> [L, ...] in layer order (layer = group * p + slot)."""
    out = {}
    for name in per_slot[0]:
        stacked = jnp.stack([slot[name] for slot in per_slot], axis=1)  # [groups, p, ...]
        out[name] = stacked.reshape(-1, *stacked.shape[2:])
    return out


def check_positions(positions: jax.Array, size: int) -> None:
    """Raise when concrete positions fall outside a table of `size` rows; traced ones cannot be read."""
    if isinstance(positions, jax.core.Tracer):
        return
    lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
    if lo < 0 or hi >= size:
        raise Lecture3Error(f"positions span [{lo}, {hi}] but the learned position table has max_seq_len={size} "
                            f"rows (0..{size - 1}); keep positions below max_seq_len or raise it")


def check_splits(cfg: ModelConfig, splits: int, batch: int, cache, deterministic: bool) -> None:
    """`splits` parts of the batch through the layers: a whole number that divides the batch, in a forward
    without a cache, where no dropout mask is drawn (the parts would draw theirs apart)."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1 or batch % splits:
        raise Lecture3Error(f"splits={splits!r} must be a positive whole number that divides the batch of {batch} "
                            "rows; use 1 for one pass")
    if splits > 1 and cache is not None:
        raise Lecture3Error(f"splits={splits} is for training and scoring; decoding with a cache takes splits=1")
    if splits > 1 and cfg.has_dropout and not deterministic:
        raise Lecture3Error(f"splits={splits} with dropout would draw each part's masks apart; use splits=1")


def _layers_in_parts(stack, splits: int, x, q_idx, positions, segment_ids):
    """The layer stack on `splits` equal parts of the batch, independently (no row ever sees another), joined
    again: the same hidden states, and the captures of every part (per-head maxima over all of them)."""
    size = x.shape[0] // splits
    outs = []
    for i in range(splits):
        part = lambda a: None if a is None else a[i * size:(i + 1) * size]  # noqa: E731, B023 - used at once
        outs.append(stack(part(x), part(q_idx), part(positions), part(segment_ids), None))
    x = jnp.concatenate([o[0] for o in outs])
    captured = {}
    for name in outs[0][2]:  # [L, B, ...] per part, but attn_logit_max [L, N]: a max over the whole batch
        arrays = [o[2][name] for o in outs]
        captured[name] = (functools.reduce(jnp.maximum, arrays) if name == "attn_logit_max"
                          else jnp.concatenate(arrays, axis=1))
    return x, captured


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: tuple | None = None,
                 q_idx: jax.Array | None = None, deterministic: bool = True,
                 capture: Sequence[str] | None = None, splits: int = 1, head: bool = True):
        """tokens int32[B, T] -> logits float32[B, T, V] (and the new cache when `cache` is given).

        capture: None (the default: nothing extra is computed) or names of `lecture3.capture.CAPTURES`;
        then the result is an `Output(logits, cache, captured)` whatever else is given (`capture=()` asks
        for the struct alone).

        positions: position of each token for the encodings (default 0..T-1; restarts per document
        when packing). segment_ids: document ids, used when `cfg.document_mask`. q_idx: place of each
        token in the stream, for the causal and window masks (default 0..T-1; the cache offset when
        decoding).

        splits: the layers run on that many equal parts of the batch, independently, which XLA:CPU runs side by
        side (`lecture3.steps.batch_splits`); the embedding, final norm and head see the whole batch. The same
        logits and captures up to float rounding. Not with a cache, nor with dropout drawing masks.

        head: False stops after the final norm and returns an `Output` whose `hidden` is the stream the
        head would read, float[B, T, D], and whose `logits` is None: for a loss that applies the head
        itself a few positions at a time (`head_logits`, `losses.chunked`). Not with the `log_z` capture.

        With `position="learned"`, a position outside [0, max_seq_len) raises `Lecture3Error` when the
        positions are concrete (eager `apply`); under `jit` their values are unknown, so they are clipped
        into the table (the last row serves every position past it).
        """
        cfg = self.cfg
        names = () if capture is None else capture_names.check(capture)
        layer_names = tuple(n for n in names if n in capture_names.PER_LAYER)
        b, t = tokens.shape
        if not head and "log_z" in names:
            raise Lecture3Error("capture 'log_z' reads the logits, which head=False does not compute; "
                                "leave it out or use head=True")
        check_splits(cfg, splits, b, cache, deterministic)
        if cfg.position == "learned" and t > cfg.max_seq_len:
            raise Lecture3Error(f"sequence length {t} is longer than max_seq_len={cfg.max_seq_len}, the learned "
                                "position table; shorten the sequences or raise max_seq_len")
        dt = DTYPES[cfg.dtype]
        if q_idx is None:
            q_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = q_idx

        embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                      normal(cfg.init_std), cfg.param_dtype)
        x = jnp.take(embed, tokens, axis=0).astype(dt)  # [B, T, D]
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model ** 0.5, dt)
        if cfg.position == "learned":
            table = param(self, "pos_embed", (cfg.max_seq_len, cfg.d_model), ("length", "embed"),
                          normal(cfg.init_std), cfg.param_dtype)
            check_positions(positions, cfg.max_seq_len)
            x = x + jnp.take(table, positions, axis=0, mode="clip").astype(dt)
        elif cfg.position == "sinusoidal":
            x = x + pos.sinusoidal(positions, cfg.d_model).astype(dt)
        x = dropout(self, x, cfg.embed_dropout, deterministic)
        x = constrain(x, ("batch", "length", "embed"))

        rel_table = None
        if cfg.position == "relative":  # T5: one bucket table shared by all layers
            rel_table = param(self, "rel_bias", (cfg.relative_buckets, cfg.n_heads), ("relpos", "heads"),
                              normal(cfg.init_std), cfg.param_dtype)

        if cfg.scan_layers:
            groups = cfg.n_layers // len(cfg.layer_pattern)
            scanned = nn.scan(
                LayerGroup,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=groups,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, layer_names, name="layers")

            def stack(x, q_idx, positions, segment_ids, cache):
                x, (cache, per_slot) = scanned(x, cache, q_idx, positions, segment_ids, rel_table)
                return x, cache, _interleave_scanned(per_slot)
        else:
            blocks = [block_class(cfg, scanned=False)(cfg, cfg.window(layer), deterministic, layer_names,
                                                      name=f"layer_{layer}") for layer in range(cfg.n_layers)]

            def stack(x, q_idx, positions, segment_ids, cache):
                new, per_layer = [], []
                for layer, block in enumerate(blocks):
                    c = None if cache is None else cache[layer]
                    x, c, cap = block(x, q_idx, positions, segment_ids, rel_table, c)
                    new.append(c)
                    per_layer.append(cap)
                return x, None if cache is None else tuple(new), _stack_captured(per_layer)

        if splits == 1:
            x, cache, captured = stack(x, q_idx, positions, segment_ids, cache)
        else:
            x, captured = _layers_in_parts(stack, splits, x, q_idx, positions, segment_ids)

        if cfg.has_final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if not head:
            return Output(None, cache, {n: captured[n] for n in names}, hidden=x)
        if cfg.tie_embeddings:
            logits = head_logits(cfg, x, embed.astype(dt).T)  # [B, T, V]
        else:
            logits = head_logits(cfg, x, param(self, "head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                               normal(cfg.init_std), cfg.param_dtype))
        if capture is None:
            return logits if cache is None else (logits, cache)
        if "log_z" in names:
            captured["log_z"] = jax.nn.logsumexp(logits, axis=-1)
        return Output(logits, cache, {n: captured[n] for n in names})


def unstack_layers(cfg: ModelConfig, params: dict) -> list[dict]:
    """The per-layer parameter dicts, in layer order, whether or not the stack is scanned."""
    if not cfg.scan_layers:
        return [params[f"layer_{i}"] for i in range(cfg.n_layers)]
    p = len(cfg.layer_pattern)
    return [jax.tree.map(lambda a, g=i // p: a[g], params["layers"][f"layer_{i % p}"])
            for i in range(cfg.n_layers)]


def stack_layers(cfg: ModelConfig, layers: list[dict]) -> dict:
    """Inverse of `unstack_layers`: the layers entries of a params tree for this config."""
    if not cfg.scan_layers:
        return {f"layer_{i}": layer for i, layer in enumerate(layers)}
    p = len(cfg.layer_pattern)
    return {"layers": {f"layer_{s}": jax.tree.map(lambda *a: jnp.stack(a), *layers[s::p]) for s in range(p)}}

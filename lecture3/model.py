"""The Transformer: embed -> (+ absolute positions) -> layers -> final norm -> head -> soft-cap.

`Transformer(cfg).apply({"params": p}, tokens)` maps int32[B, T] to an `Output` whose `logits` are float32[B, T, V].
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
from lecture3.layers.common import DTYPES, Inputs, constrain, dense, dropout, normal, param, softcap
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
    def __call__(self, x, caches, inputs: Inputs):
        cfg, new, captured = self.cfg, [], []
        block = block_class(cfg, scanned=True)
        for i, kind in enumerate(cfg.layer_pattern):
            window = cfg.sliding_window if kind == "local" else None
            x, c, cap = block(cfg, window, self.deterministic, self.capture, name=f"layer_{i}")(
                x, inputs, None if caches is None else caches[i])
            new.append(c)
            captured.append(cap)
        return x, (None if caches is None else tuple(new), tuple(captured))


@flax.struct.dataclass
class Output:
    """What `Transformer(cfg).apply(...)` returns: the logits, the new cache (None without one) and the
    intermediates asked for with `capture=names`, per layer stacked on a leading layer axis (names and
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


def _layers_in_parts(stack, splits: int, x, inputs: Inputs):
    """The layer stack on `splits` equal parts of the batch, independently (no row ever sees another), joined
    again: the same hidden states, and the captures of every part (per-head maxima over all of them)."""
    size = x.shape[0] // splits
    outs = [stack(x[i * size:(i + 1) * size], inputs.rows(i * size, (i + 1) * size), None) for i in range(splits)]
    x = jnp.concatenate([o[0] for o in outs])
    captured = {}
    for name in outs[0][2]:  # [L, B, ...] per part, but attn_logit_max [L, N]: a max over the whole batch
        arrays = [o[2][name] for o in outs]
        captured[name] = (functools.reduce(jnp.maximum, arrays) if name == "attn_logit_max"
                          else jnp.concatenate(arrays, axis=1))
    return x, captured


def check_call(cfg: ModelConfig, tokens: jax.Array, cache, capture, splits: int, head: bool,
               deterministic: bool) -> tuple[str, ...]:
    """The forward's arguments checked before anything is computed; returns the capture names."""
    names = () if capture is None else capture_names.check(capture)
    if not head and "log_z" in names:
        raise Lecture3Error("capture 'log_z' reads the logits, which head=False does not compute; "
                            "leave it out or use head=True")
    check_splits(cfg, splits, tokens.shape[0], cache, deterministic)
    if cfg.position == "learned" and tokens.shape[1] > cfg.max_seq_len:
        raise Lecture3Error(f"sequence length {tokens.shape[1]} is longer than max_seq_len={cfg.max_seq_len}, the "
                            "learned position table; shorten the sequences or raise max_seq_len")
    return names


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: tuple | None = None,
                 q_idx: jax.Array | None = None, deterministic: bool = True,
                 capture: Sequence[str] | None = None, splits: int = 1, head: bool = True) -> Output:
        """tokens int32[B, T] -> `Output`: logits float32[B, T, V], the new cache (None without `cache`) and
        the captured intermediates.

        capture: names of `lecture3.capture.CAPTURES` to return in `Output.captured` (None or (): nothing extra
        is computed).

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
        names = check_call(cfg, tokens, cache, capture, splits, head, deterministic)
        b, t = tokens.shape
        q_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_idx is None else q_idx
        positions = q_idx if positions is None else positions
        embed = param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                      normal(cfg.init_std), cfg.param_dtype)
        x = self.embed_tokens(embed, tokens, positions, deterministic)
        inputs = Inputs(q_idx, positions, segment_ids, self.relative_table())
        stack = self.layer_stack(deterministic, tuple(n for n in names if n in capture_names.PER_LAYER))
        if splits == 1:
            x, cache, captured = stack(x, inputs, cache)
        else:
            x, captured = _layers_in_parts(stack, splits, x, inputs)
        if cfg.has_final_norm:
            x = Norm(cfg, name="final_norm")(x)
        if not head:
            return Output(None, cache, {n: captured[n] for n in names}, hidden=x)
        w = embed.astype(DTYPES[cfg.dtype]).T if cfg.tie_embeddings else param(
            self, "head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), normal(cfg.init_std), cfg.param_dtype)
        logits = head_logits(cfg, x, w)  # [B, T, V]
        if "log_z" in names:
            captured["log_z"] = jax.nn.logsumexp(logits, axis=-1)
        return Output(logits, cache, {n: captured[n] for n in names})

    def embed_tokens(self, embed: jax.Array, tokens: jax.Array, positions: jax.Array, deterministic: bool):
        """The token embeddings [B, T, D] in the compute dtype, scaled, plus absolute positions, dropped out."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
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
        return constrain(x, ("batch", "length", "embed"))

    def relative_table(self) -> jax.Array | None:
        """T5's relative-position bias table, one shared by all layers (position="relative" only)."""
        cfg = self.cfg
        if cfg.position != "relative":
            return None
        return param(self, "rel_bias", (cfg.relative_buckets, cfg.n_heads), ("relpos", "heads"),
                     normal(cfg.init_std), cfg.param_dtype)

    def layer_stack(self, deterministic: bool, layer_names: tuple[str, ...]):
        """`(x, inputs, cache) -> (x, new cache, captured [L, ...])` over all layers: one scanned period of
        `layer_pattern` repeated (`scan_layers`), or each layer its own module."""
        cfg = self.cfg
        if cfg.scan_layers:
            scanned = nn.scan(
                LayerGroup, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast), length=cfg.n_layers // len(cfg.layer_pattern),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, layer_names, name="layers")

            def stack(x, inputs, cache):
                x, (cache, per_slot) = scanned(x, cache, inputs)
                return x, cache, _interleave_scanned(per_slot)

            return stack
        blocks = [block_class(cfg, scanned=False)(cfg, cfg.window(layer), deterministic, layer_names,
                                                  name=f"layer_{layer}") for layer in range(cfg.n_layers)]

        def stack(x, inputs, cache):
            new, per_layer = [], []
            for layer, block in enumerate(blocks):
                x, c, cap = block(x, inputs, None if cache is None else cache[layer])
                new.append(c)
                per_layer.append(cap)
            return x, None if cache is None else tuple(new), _stack_captured(per_layer)

        return stack


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

"""Generation with a KV cache: prefill the prompts in one pass, then one compiled step per token.

    out = generate(cfg, params, [[5, 7, 2], [9]], max_new_tokens=16)   # greedy
    out = generate(cfg, params, prompts, 16, rng=jax.random.key(0), temperature=0.8, top_p=0.95)

Layout of the result, int32[B, T + max_new_tokens] with T the longest prompt: row b holds its own prompt
(length L_b), then its max_new_tokens generated tokens at columns L_b .. L_b + max_new_tokens - 1, then
`pad_id` up to the end. Prompts of different lengths share one batch: each row has its own stream
indices (q_idx) and positions, so a short prompt's generation starts right after it.

The cache (lecture3.layers.kv_cache) holds n_kv_heads heads per layer, so MQA and GQA store
n_heads / n_kv_heads times less than MHA; a local (sliding-window) layer keeps only its window.

A prompt plus its new tokens must fit in `max_seq_len`, checked before anything is computed. A model
without a position table (rope, alibi, relative, none) may go past it with allow_past_max_seq_len=True:
an extrapolation the model was not trained for, asked for on purpose. Learned and sinusoidal tables
never. With progress=True, more than PROGRESS_CHUNK new tokens run in chunks under a tqdm bar (stderr).
"""

from __future__ import annotations

import collections
import math
import sys
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lecture3.config import ModelConfig
from lecture3.errors import Lecture3Error
from lecture3.layers.kv_cache import init_cache
from lecture3.model import Transformer

TRACES: collections.Counter = collections.Counter()  # times each jitted function was traced (= compiled)
PROGRESS_CHUNK = 256  # new tokens per compiled call when generate shows progress
TABLE_POSITIONS = ("learned", "sinusoidal")  # a table of max_seq_len rows: nothing past it


class GenerationError(Lecture3Error):
    """A generate request that cannot be served as asked: malformed prompts, sampling settings, length."""


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature=0.0, top_k=None,
                  top_p=None) -> jax.Array:
    """Next tokens int32[B] from logits float32[B, V]: greedy at temperature 0, else sampled.

    Sampling divides by the temperature, keeps the top_k largest logits (Fan et al. 2018), then the
    smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019). temperature
    0 must be a Python number; otherwise the three may be traced scalars (one compile for all values).
    """
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    logits = logits.astype(jnp.float32) / temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], largest first
    if top_k is not None:
        kth = jnp.take(ranked, jnp.clip(top_k, 1, v) - 1, axis=-1)[:, None]  # [B, 1]
        ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p  # the mass before a token is short of top_p
        lowest = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < lowest, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill(cfg: ModelConfig, params, tokens: jax.Array, lengths: jax.Array, length: int):
    """Run the padded prompts [B, T] through the model once; return (cache, last logits [B, V])."""
    TRACES["prefill"] += 1
    b, t = tokens.shape
    stream = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_idx = jnp.where(stream < lengths[:, None], stream, -1)  # padding: -1, never attended nor stored
    cache = init_cache(cfg, b, length)
    logits, cache = Transformer(cfg).apply({"params": params}, tokens, positions=stream, cache=cache,
                                           q_idx=q_idx)
    return cache, logits[jnp.arange(b), lengths - 1]


def _decode_loop(cfg: ModelConfig, params, cache, logits, lengths, rng, temperature, top_k, top_p, start,
                 *, steps: int, greedy: bool, keep_logits: bool, feed_last: bool):
    """Choose `steps` tokens (the `start`-th new token first), feeding each back through the cache, the
    last one only with `feed_last`: one fori_loop over one step body. -> (cache, logits, out, seen)."""
    b, v = logits.shape
    model = Transformer(cfg)

    def choose(i, logits, out, seen):
        token = (jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else
                 sample_logits(logits, jax.random.fold_in(rng, start + i), temperature, top_k, top_p))
        out = out.at[:, i].set(token)
        if keep_logits:
            seen = seen.at[:, i].set(logits)
        return token, out, seen

    def step(i, state):
        TRACES["decode_step"] += 1
        cache, logits, out, seen = state
        token, out, seen = choose(i, logits, out, seen)
        q_idx = (lengths + start + i)[:, None]  # [B, 1]: each row continues its own prompt
        logits, cache = model.apply({"params": params}, token[:, None], positions=q_idx, cache=cache,
                                    q_idx=q_idx)
        return cache, logits[:, 0], out, seen

    out = jnp.zeros((b, steps), jnp.int32)
    seen = jnp.zeros((b, steps, v), jnp.float32) if keep_logits else None
    state = (cache, logits, out, seen)
    state = jax.lax.fori_loop(0, steps if feed_last else steps - 1, step, state)
    if not feed_last:
        cache, logits, out, seen = state
        _, out, seen = choose(steps - 1, logits, out, seen)  # the last token is never fed back
        state = cache, logits, out, seen
    return state


def _decode(cfg: ModelConfig, params, cache, logits: jax.Array, lengths: jax.Array, rng: jax.Array,
            temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, start: jax.Array | int = 0, *,
            steps: int, greedy: bool, keep_logits: bool):
    """Choose `steps` tokens, feeding each but the last back through the cache.

    temperature, top_k, top_p: scalars (traced: changing them does not recompile), unused when greedy.
    start: how many new tokens came before (a chunk of a longer generation; traced).
    Returns (cache, tokens int32[B, steps], logits float32[B, steps, V] of each choice, or None).
    """
    cache, _, out, seen = _decode_loop(cfg, params, cache, logits, lengths, rng, temperature, top_k, top_p,
                                       start, steps=steps, greedy=greedy, keep_logits=keep_logits,
                                       feed_last=False)
    return cache, out, seen


def _decode_chunk(cfg: ModelConfig, params, cache, logits, lengths, rng, temperature, top_k, top_p, start, *,
                  steps: int, greedy: bool, keep_logits: bool):
    """`_decode` that also feeds its last token back: (cache, next logits [B, V], tokens, logits or None)."""
    return _decode_loop(cfg, params, cache, logits, lengths, rng, temperature, top_k, top_p, start,
                        steps=steps, greedy=greedy, keep_logits=keep_logits, feed_last=True)


prefill = jax.jit(_prefill, static_argnames=("cfg", "length"))
decode = jax.jit(_decode, static_argnames=("cfg", "steps", "greedy", "keep_logits"),
                 donate_argnames=("cache",))
decode_chunk = jax.jit(_decode_chunk, static_argnames=("cfg", "steps", "greedy", "keep_logits"),
                       donate_argnames=("cache",))


def generate(cfg: ModelConfig, params, prompts, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             lengths: Sequence[int] | None = None, pad_id: int = 0, return_logits: bool = False,
             allow_past_max_seq_len: bool = False, progress: bool = False):
    """Continue each prompt by `max_new_tokens` tokens -> int32[B, T + max_new_tokens] (module docstring).

    prompts: a list of token-id lists (any lengths >= 1), or an int array [B, T] with optional `lengths`
    (right padding past each length is ignored). temperature 0 is greedy (top_k / top_p then unused);
    otherwise `rng` is required. With return_logits, also returns float32[B, max_new_tokens, V]: the
    logits each generated token was chosen from. The longest prompt plus max_new_tokens must fit in
    cfg.max_seq_len unless allow_past_max_seq_len (not for learned / sinusoidal positions). progress:
    a tqdm bar on stderr when more than PROGRESS_CHUNK tokens are asked for (same tokens either way).
    A bad request is a GenerationError (a ValueError), raised before anything is computed.
    """
    tokens, lens = _prepare_prompts(cfg, prompts, lengths)
    _check_request(cfg, tokens.shape[1], max_new_tokens, rng, temperature, top_k, top_p, allow_past_max_seq_len)
    b, t = tokens.shape
    out = np.full((b, t + max_new_tokens), pad_id, np.int32)
    for row, n in enumerate(lens):
        out[row, :n] = tokens[row, :n]
    new = np.zeros((b, 0), np.int32)
    seen = np.zeros((b, 0, cfg.vocab_size), np.float32)
    if max_new_tokens > 0:
        params = _model_params(params)
        cache, last = prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(lens), t + max_new_tokens)
        rng = jax.random.key(0) if rng is None else rng  # unused when greedy
        sampling = (jnp.float32(max(temperature, 1e-6)),  # traced: new values do not recompile
                    jnp.int32(cfg.vocab_size if top_k is None else top_k),
                    jnp.float32(1.0 if top_p is None else top_p))
        new, seen = _decode_all(cfg, params, cache, last, jnp.asarray(lens), rng, sampling, max_new_tokens,
                                greedy=temperature == 0, keep_logits=return_logits, progress=progress)
        chex.assert_shape(new, (b, max_new_tokens))
        chex.assert_type(new, np.int32)
    for row, n in enumerate(lens):
        out[row, n : n + max_new_tokens] = new[row]
    out = jnp.asarray(out)
    return (out, jnp.asarray(seen)) if return_logits else out


def _decode_all(cfg: ModelConfig, params, cache, last, lens, rng, sampling, n: int, *, greedy: bool,
                keep_logits: bool, progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """All n new tokens [B, n] (and their logits): one compiled call, or PROGRESS_CHUNK-token chunks under
    a progress bar (the same tokens: each step's rng is folded from its index in the whole generation)."""
    flags = dict(greedy=greedy, keep_logits=keep_logits)
    if not progress or n <= PROGRESS_CHUNK:
        _, new, seen = decode(cfg, params, cache, last, lens, rng, *sampling, steps=n, **flags)
        return np.asarray(new), None if seen is None else np.asarray(seen)
    from tqdm import tqdm

    news, seens, done = [], [], 0
    with tqdm(total=n, desc="generate", unit="tok", file=sys.stderr, dynamic_ncols=True) as bar:
        while n - done > PROGRESS_CHUNK:
            cache, last, new, seen = decode_chunk(cfg, params, cache, last, lens, rng, *sampling,
                                                  jnp.int32(done), steps=PROGRESS_CHUNK, **flags)
            news.append(np.asarray(new))
            seens.append(seen)
            done += PROGRESS_CHUNK
            bar.update(PROGRESS_CHUNK)
        _, new, seen = decode(cfg, params, cache, last, lens, rng, *sampling, jnp.int32(done), steps=n - done,
                              **flags)
        news.append(np.asarray(new))
        seens.append(seen)
        bar.update(n - done)
    return np.concatenate(news, axis=1), (np.concatenate(seens, axis=1) if keep_logits else None)


def _model_params(params):
    """Accept params or {"params": params}, boxed (nn.Partitioned) or not."""
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    return params


def _prepare_prompts(cfg: ModelConfig, prompts, lengths) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32[B, T] (T = longest prompt) and the lengths int32[B]; GenerationError if malformed."""
    if isinstance(prompts, (list, tuple)) and lengths is None:
        if len(prompts) == 0:
            raise GenerationError("prompts is empty: give at least one prompt of at least one token")
        rows = []
        for i, p in enumerate(prompts):
            row = np.asarray(p)
            if row.ndim != 1:
                raise GenerationError(f"prompt {i} has shape {row.shape}: prompts must be a list of token-id "
                                 "lists (wrap a single prompt in a list: [[1, 2, 3]])")
            rows.append(row)
        lens = np.asarray([len(r) for r in rows], np.int32)
        tokens = np.zeros((len(rows), max(1, lens.max())), np.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = np.asarray(prompts)
        if tokens.ndim != 2:
            raise GenerationError(f"prompts has shape {tokens.shape}: expected an int array [B, T] or a list of "
                             "token-id lists")
        if tokens.size == 0:
            raise GenerationError("prompts is empty: give at least one prompt of at least one token")
        lens = np.full(tokens.shape[0], tokens.shape[1], np.int32) if lengths is None else (
            np.asarray(lengths, np.int32).reshape(-1))
        if lens.shape != (tokens.shape[0],):
            raise GenerationError(f"lengths has {lens.size} entries for {tokens.shape[0]} prompts")
        if (lens > tokens.shape[1]).any():
            raise GenerationError(f"lengths {lens.tolist()} exceed the prompt array's width {tokens.shape[1]}")
    if (lens < 1).any():
        raise GenerationError(f"prompt {int(np.argmax(lens < 1))} is empty: every prompt needs at least one token")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise GenerationError(f"prompts must be integer token ids, got dtype {tokens.dtype}")
    tokens = tokens[:, : lens.max()]
    valid = np.arange(tokens.shape[1])[None, :] < lens[:, None]
    bad = valid & ((tokens < 0) | (tokens >= cfg.vocab_size))
    if bad.any():
        raise GenerationError(f"token id {int(tokens[bad][0])} is outside the vocabulary [0, {cfg.vocab_size})")
    return np.where(valid, tokens, 0).astype(np.int32), lens


def _check_request(cfg: ModelConfig, prompt_len: int, max_new_tokens: int, rng, temperature: float,
                   top_k: int | None, top_p: float | None, allow_past_max_seq_len: bool = False) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
    total, room = prompt_len + max_new_tokens, max(cfg.max_seq_len - prompt_len, 0)
    if total > cfg.max_seq_len and (cfg.position in TABLE_POSITIONS or not allow_past_max_seq_len):
        what = (f"the {cfg.position}-position table of this model has {cfg.max_seq_len} rows"
                if cfg.position in TABLE_POSITIONS else
                f"the context this {cfg.position}-position model was built for; to extrapolate on purpose, "
                "pass allow_past_max_seq_len=True (lecture3 generate --allow-long)")
        raise GenerationError(
            f"max_new_tokens={max_new_tokens} takes a {prompt_len}-token prompt to {total} tokens, past "
            f"max_seq_len={cfg.max_seq_len}: ask for at most {room} new tokens ({what})")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature={temperature!r} is invalid: expected a finite number >= 0 "
                         "(0 = greedy)")
    if temperature > 0 and rng is None:
        raise GenerationError(f"temperature={temperature} samples and needs rng=jax.random.key(seed); "
                         "use temperature=0 for greedy decoding")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                              or top_k < 1):
        raise GenerationError(f"top_k={top_k!r} is invalid: expected a positive integer or None (off)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise GenerationError(f"top_p={top_p!r} is invalid: expected a number in (0, 1] or None (off)")

"""Generation with a KV cache: prefill the prompts in one pass, then one compiled loop over a cached step.

    out = generate(cfg, params, [[5, 7, 2], [9]], max_new_tokens=16)   # greedy
    out = generate(cfg, params, prompts, 16, rng=jax.random.key(0), temperature=0.8, top_p=0.95)
    res = generate(cfg, params, prompts, 64, stop_tokens=(eos_id,), return_logprobs=True)  # a Generation

Layout of the result, int32[B, T + max_new_tokens] with T the longest prompt: row b holds its own prompt
(length L_b), then its max_new_tokens generated tokens at columns L_b .. L_b + max_new_tokens - 1, then
`pad_id` up to the end. Prompts of different lengths share one batch: each row has its own stream
indices (q_idx) and positions, so a short prompt's generation starts right after it. A row that emits
one of `stop_tokens` keeps it and is `pad_id` after it; when every row has stopped the loop ends.

Prefill computes logits for the last prompt token of each row only ([B, V], never [B, T, V]); the new
tokens are chosen inside one compiled `lax.while_loop` (no host round trip per token) whose cache
buffers are donated, so a step updates them in place.

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
import flax
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
    """Run the padded prompts [B, T] into a fresh cache; return (cache, logits [B, V] of each last token).

    Only the last real token of each row needs logits, so the prompts go in as two calls of the model:
    every token but each row's last (their logits are never used, so XLA drops the [B, T, V] head
    product), then that last token alone, as a decode step: the head runs on [B, 1] rows only.
    """
    TRACES["prefill"] += 1
    b, t = tokens.shape
    model = Transformer(cfg)
    cache = init_cache(cfg, b, length)
    last = (lengths - 1)[:, None]  # [B, 1]
    if t > 1:
        stream = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        q_idx = jnp.where(stream < last, stream, -1)  # the last token and padding: -1, never attended nor stored
        cache = model.apply({"params": params}, tokens, positions=stream, cache=cache, q_idx=q_idx).cache
    token = jnp.take_along_axis(tokens, last, axis=1)  # [B, 1]
    out = model.apply({"params": params}, token, positions=last, cache=cache, q_idx=last)
    return out.cache, out.logits[:, 0]


@flax.struct.dataclass
class Decoded:
    """What `decode_steps` returns: the cache and next logits to go on from, and the chosen tokens."""

    cache: tuple
    logits: jax.Array  # float32[B, V]: the logits after the last token fed back (feed_last), else the last used
    tokens: jax.Array  # int32[B, steps]: pad_id once a row has stopped
    done: jax.Array  # bool[B]: the row emitted a stop token
    generated: jax.Array  # int32[B]: tokens chosen before the row stopped, its stop token included
    logprobs: jax.Array | None  # float32[B, steps]: log_softmax(logits)[token] (0 after a stop), keep_logprobs
    seen: jax.Array | None  # float32[B, steps, V]: the logits of each choice (0 after a stop), keep_logits


def _decode_steps(cfg: ModelConfig, params, cache, logits: jax.Array, lengths: jax.Array, rng: jax.Array,
                  temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, start: jax.Array | int = 0,
                  done: jax.Array | None = None, stop: jax.Array | None = None, pad_id: jax.Array | int = 0, *,
                  steps: int, greedy: bool, keep_logits: bool = False, keep_logprobs: bool = False,
                  feed_last: bool = False) -> Decoded:
    """Choose up to `steps` tokens (the `start`-th new token first), feeding each back through the cache,
    the last one only with `feed_last`: one while_loop over one step body, which ends early once every
    row has emitted one of `stop` (int32[S]; None or empty: never).

    logits float32[B, V]: those of each row's last token (prefill's). temperature, top_k, top_p: scalars
    (traced: changing them does not recompile), unused when greedy. start: new tokens that came before (a
    chunk of a longer generation; traced). done bool[B]: rows that stopped in an earlier chunk.
    A stopped row still runs through the model (the batch steps together) fed its last chosen token, so
    pad_id need not be a token of the vocabulary; its later columns are pad_id.
    """
    b, v = logits.shape
    model = Transformer(cfg)
    stop = jnp.zeros((0,), jnp.int32) if stop is None else stop
    state = dict(
        i=jnp.int32(0), cache=cache, logits=logits,
        done=jnp.zeros((b,), bool) if done is None else done,
        generated=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, steps), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, steps), jnp.float32) if keep_logprobs else None,
        seen=jnp.zeros((b, steps, v), jnp.float32) if keep_logits else None)

    def choose(s):
        i, logits = s["i"], s["logits"]
        token = (jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else
                 sample_logits(logits, jax.random.fold_in(rng, start + i), temperature, top_k, top_p))
        live = ~s["done"]
        s = {**s, "tokens": s["tokens"].at[:, i].set(jnp.where(live, token, pad_id)),
             "generated": s["generated"] + live, "done": s["done"] | jnp.any(token[:, None] == stop, axis=-1)}
        if keep_logprobs:
            chosen = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
            s["logprobs"] = s["logprobs"].at[:, i].set(jnp.where(live, chosen, 0.0))
        if keep_logits:
            s["seen"] = s["seen"].at[:, i].set(jnp.where(live[:, None], logits, 0.0))
        return token, s

    def step(s):
        TRACES["decode_step"] += 1
        token, s = choose(s)
        q_idx = (lengths + start + s["i"])[:, None]  # [B, 1]: each row continues its own prompt
        out = model.apply({"params": params}, token[:, None], positions=q_idx, cache=s["cache"], q_idx=q_idx)
        return {**s, "i": s["i"] + 1, "cache": out.cache, "logits": out.logits[:, 0]}

    fed = steps if feed_last else steps - 1
    state = jax.lax.while_loop(lambda s: (s["i"] < fed) & ~jnp.all(s["done"]), step, state)
    if not feed_last:  # the last token is never fed back; after an early end every row is done: pad
        _, state = choose({**state, "i": jnp.int32(steps - 1)})
    del state["i"]
    return Decoded(**state)


decode_steps = jax.jit(_decode_steps, static_argnames=("cfg", "steps", "greedy", "keep_logits", "keep_logprobs",
                                                       "feed_last"), donate_argnames=("cache",))
prefill = jax.jit(_prefill, static_argnames=("cfg", "length"))


def decode(cfg: ModelConfig, params, cache, logits: jax.Array, lengths: jax.Array, rng: jax.Array,
           temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, start: jax.Array | int = 0, *,
           steps: int, greedy: bool, keep_logits: bool):
    """Choose `steps` tokens, feeding each but the last back through the (donated) cache, no stop tokens.

    The arguments are `decode_steps`'s. Returns (cache, tokens int32[B, steps], logits float32[B, steps, V]
    of each choice, or None).
    """
    out = decode_steps(cfg, params, cache, logits, lengths, rng, temperature, top_k, top_p, start, steps=steps,
                       greedy=greedy, keep_logits=keep_logits)
    return out.cache, out.tokens, out.seen


@flax.struct.dataclass
class Generation:
    """What `generate` returns when asked for logits or log-probabilities (else the tokens alone)."""

    tokens: jax.Array  # int32[B, T + max_new_tokens], laid out as the module docstring says
    generated: jax.Array  # int32[B]: new tokens of each row, its stop token included (pad_id after them)
    logprobs: jax.Array | None = None  # float32[B, max_new_tokens], with return_logprobs (generate's docstring)
    logits: jax.Array | None = None  # float32[B, max_new_tokens, V], with return_logits


def generate(cfg: ModelConfig, params, prompts, max_new_tokens: int, *, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             lengths: Sequence[int] | None = None, pad_id: int = 0, stop_tokens: int | Sequence[int] = (),
             return_logits: bool = False, return_logprobs: bool = False, allow_past_max_seq_len: bool = False,
             progress: bool = False):
    """Continue each prompt by up to `max_new_tokens` tokens -> int32[B, T + max_new_tokens] (module docstring).

    prompts: a list of token-id lists (any lengths >= 1), or an int array [B, T] with optional `lengths`
    (right padding past each length is ignored). temperature 0 is greedy (top_k / top_p then unused);
    otherwise `rng` is required.
    stop_tokens: token ids (e.g. the EOS id) that end a row: the row keeps the stop token it emitted and is
    pad_id after it; once every row has stopped, decoding ends (no further model steps).
    return_logprobs: the log-probability float32[B, max_new_tokens] of each chosen token under the model's
    own distribution, log_softmax of the logits (after any final soft-cap), *before* temperature, top_k and
    top_p: the same number whatever the sampling settings (greedy included), the one that scores a text.
    0 after a row's stop. return_logits: the full logits float32[B, max_new_tokens, V] each token was
    chosen from (0 after a stop). With either, the result is a `Generation` (tokens, generated, logprobs,
    logits), as `Transformer` returns an `Output` once asked for more than logits.
    The longest prompt plus max_new_tokens must fit in cfg.max_seq_len unless allow_past_max_seq_len (not
    for learned / sinusoidal positions). progress: a tqdm bar on stderr when more than PROGRESS_CHUNK tokens
    are asked for (same tokens either way). A bad request is a GenerationError (a ValueError), raised
    before anything is computed.
    """
    tokens, lens = _prepare_prompts(cfg, prompts, lengths)
    _check_request(cfg, tokens.shape[1], max_new_tokens, rng, temperature, top_k, top_p, allow_past_max_seq_len)
    stop = _check_stop_tokens(cfg, stop_tokens, pad_id)
    b, t = tokens.shape
    out = np.full((b, t + max_new_tokens), pad_id, np.int32)
    for row, n in enumerate(lens):
        out[row, :n] = tokens[row, :n]
    new = dict(tokens=np.zeros((b, 0), np.int32), generated=np.zeros((b,), np.int32),
               logprobs=np.zeros((b, 0), np.float32), seen=np.zeros((b, 0, cfg.vocab_size), np.float32))
    if max_new_tokens > 0:
        params = _model_params(params)
        cache, last = prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(lens), t + max_new_tokens)
        rng = jax.random.key(0) if rng is None else rng  # unused when greedy
        sampling = (jnp.float32(max(temperature, 1e-6)),  # traced: new values do not recompile
                    jnp.int32(cfg.vocab_size if top_k is None else top_k),
                    jnp.float32(1.0 if top_p is None else top_p))
        new = _decode_all(cfg, params, cache, last, jnp.asarray(lens), rng, sampling, jnp.asarray(stop),
                          jnp.int32(pad_id), max_new_tokens, greedy=temperature == 0, keep_logits=return_logits,
                          keep_logprobs=return_logprobs, progress=progress)
        chex.assert_shape(new["tokens"], (b, max_new_tokens))
        chex.assert_type(new["tokens"], np.int32)
    for row, n in enumerate(lens):
        out[row, n : n + max_new_tokens] = new["tokens"][row]
    out = jnp.asarray(out)
    if not (return_logits or return_logprobs):
        return out
    return Generation(out, jnp.asarray(new["generated"]),
                      jnp.asarray(new["logprobs"]) if return_logprobs else None,
                      jnp.asarray(new["seen"]) if return_logits else None)


def _decode_all(cfg: ModelConfig, params, cache, last, lens, rng, sampling, stop, pad_id, n: int, *,
                greedy: bool, keep_logits: bool, keep_logprobs: bool, progress: bool) -> dict[str, np.ndarray]:
    """All n new tokens [B, n] (their logprobs, logits, counts): one compiled call, or PROGRESS_CHUNK-token
    chunks under a progress bar (the same tokens: each step's rng is folded from its index in the whole
    generation), which stop being launched once every row has stopped."""
    flags = dict(greedy=greedy, keep_logits=keep_logits, keep_logprobs=keep_logprobs)
    b, names = last.shape[0], ("tokens", "logprobs", "seen")
    if not progress or n <= PROGRESS_CHUNK:
        out = decode_steps(cfg, params, cache, last, lens, rng, *sampling, 0, None, stop, pad_id, steps=n, **flags)
        return {name: None if getattr(out, name) is None else np.asarray(getattr(out, name))
                for name in (*names, "generated")}
    from tqdm import tqdm

    parts, generated, offset = {name: [] for name in names}, np.zeros((b,), np.int32), 0
    done = jnp.zeros((b,), bool)  # an array from the first chunk on: every chunk shares one compile
    with tqdm(total=n, desc="generate", unit="tok", file=sys.stderr, dynamic_ncols=True) as bar:
        while offset < n:
            steps = min(PROGRESS_CHUNK, n - offset)
            out = decode_steps(cfg, params, cache, last, lens, rng, *sampling, jnp.int32(offset), done, stop, pad_id,
                               steps=steps, feed_last=offset + steps < n, **flags)
            cache, last, done = out.cache, out.logits, out.done
            for name in names:
                parts[name].append(None if getattr(out, name) is None else np.asarray(getattr(out, name)))
            generated += np.asarray(out.generated)
            offset += steps
            bar.update(steps)
            if offset < n and bool(np.all(done)):  # every row stopped: the rest is padding
                rest = n - offset
                parts["tokens"].append(np.full((b, rest), int(pad_id), np.int32))
                parts["logprobs"].append(np.zeros((b, rest), np.float32) if keep_logprobs else None)
                parts["seen"].append(np.zeros((b, rest, cfg.vocab_size), np.float32) if keep_logits else None)
                bar.update(rest)
                break
    return {**{name: None if parts[name][0] is None else np.concatenate(parts[name], axis=1) for name in names},
            "generated": generated}


def _check_stop_tokens(cfg: ModelConfig, stop_tokens, pad_id) -> np.ndarray:
    """The stop ids as int32[S] (S = 0: none); GenerationError if one is not a token id or pad_id not an int."""
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not -2**31 <= pad_id < 2**31:
        raise GenerationError(f"pad_id={pad_id!r} is invalid: expected an int32 integer")
    ids = [stop_tokens] if isinstance(stop_tokens, (int, np.integer)) else stop_tokens
    if stop_tokens is None or not isinstance(ids, (list, tuple, np.ndarray)):
        raise GenerationError(f"stop_tokens={stop_tokens!r} is invalid: expected a token id or a sequence of "
                              "them, e.g. (eos_id,); () for none")
    for tok in ids:
        if isinstance(tok, (bool, np.bool_)) or not isinstance(tok, (int, np.integer)):
            raise GenerationError(f"stop_tokens={stop_tokens!r} holds {tok!r}: expected integer token ids")
        if not 0 <= tok < cfg.vocab_size:
            raise GenerationError(f"stop token {int(tok)} is outside the vocabulary [0, {cfg.vocab_size})")
    return np.unique(np.asarray(ids, np.int64)).astype(np.int32)


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

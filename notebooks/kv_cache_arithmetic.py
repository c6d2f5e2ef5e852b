# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # KV cache arithmetic: MHA vs GQA vs MQA, and the sliding-window ring buffer
#
# **What the lecture says.** At inference every new token attends to the keys and values of all the tokens
# before it, so they are kept in a KV cache, and each decode step *reads the whole cache* for very little
# arithmetic: decoding is bound by memory traffic, not FLOPs. MHA keeps one K and one V head per query
# head: the most expressive and the largest cache. MQA shares a single K/V head among all query heads: the
# smallest cache and the fastest decoding, at some cost in quality. GQA (Llama 2 / 3) shares one K/V head
# per group of query heads: near-MQA speed at near-MHA quality. A sliding window (Mistral, Gemma 2's local
# layers) bounds what a layer keeps to its last W tokens, however long the context.
#
# Here: the cache bytes from `lecture3.accounting` (arithmetic over the config), the same bytes measured on
# a real cache (`lecture3.layers.kv_cache`), the decode speed measured across context lengths, and the
# ring buffer of a local layer drawn step by step from a real model's cache.

# %%
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import lecture3
from lecture3 import Transformer, accounting, decoding, presets
from lecture3.layers.kv_cache import cache_bytes, init_cache

QUICK = os.environ.get("LECTURE3_NOTEBOOK_QUICK", "") not in ("", "0")  # the tests run every notebook quick
# full settings save the figure to a scratch folder; LECTURE3_UPDATE_FIGURES=1 rewrites the committed one
UPDATE = os.environ.get("LECTURE3_UPDATE_FIGURES") == "1"
FIGURES = Path("figures") if UPDATE else Path(tempfile.gettempdir()) / "lecture3-figures"
FIGURE = None if QUICK else FIGURES / "kv_cache_arithmetic.png"  # quick mode writes nothing
T0 = time.perf_counter()
print("quick mode" if QUICK else "full settings", "| jax", jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. The arithmetic, at the published size
#
# Per token and layer the cache holds `2 * n_kv_heads * head_dim` values (K and V). Llama 3 8B has 32 query
# heads; MHA would keep 32 KV heads, its GQA keeps 8, MQA 1. In bfloat16:

# %%
llama = presets.get("llama3", "8b")
LAYOUTS_8B = {
    "MHA (32 kv heads)": llama.replace(n_kv_heads=32),
    "GQA (8, Llama 3)": llama,
    "MQA (1)": llama.replace(n_kv_heads=1),
    "GQA 8 + window 4096 on half the layers": llama.replace(sliding_window=4096, layer_pattern=("local", "global")),
}
CONTEXTS_8B = [1024, 4096, 8192, 32768, 131072]
GiB = 2 ** 30
print(f"{'':<40}{'per token':>11}" + "".join(f"{c:>10}" for c in CONTEXTS_8B))
for name, c in LAYOUTS_8B.items():
    per_token = accounting.kv_cache_bytes_per_token(c, dtype_bytes=2)
    print(f"{name:<40}{per_token / 2**10:>7.0f} KiB" + "".join(
        f"{accounting.kv_cache_bytes(c, 1, n, dtype_bytes=2) / GiB:>9.2f}G" for n in CONTEXTS_8B))
weights = accounting.param_counts(llama)["total"] * 2 / GiB
print(f"(the bf16 weights themselves: {weights:.1f} GiB; one 128k-token MHA sequence would hold "
      f"{accounting.kv_cache_bytes(LAYOUTS_8B['MHA (32 kv heads)'], 1, 131072, 2) / GiB:.0f} GiB of cache)")

# %% [markdown]
# ## 2. Measured on a real cache, and decode speed across context lengths
#
# A small model in each layout. `init_cache` builds the cache `lecture3.generate` uses (per layer
# [B, S, K, H] keys and values; a local layer keeps S = its window), and `cache_bytes` measures its arrays.
# For speed, the cache is filled up to the context (random keys and values: the cost of a step depends on
# how many keys it reads, not on their values) and `steps` tokens are decoded by the same compiled loop as
# `generate` (`decoding.decode`), timed after a first call that compiles.

# %%
if QUICK:
    small = lecture3.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=1024)
    CONTEXTS, BATCH, STEPS, REPEATS, WINDOW = [64, 256], 2, 4, 1, 32
else:
    small = lecture3.ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, max_seq_len=8192)
    CONTEXTS, BATCH, STEPS, REPEATS, WINDOW = [256, 1024, 2048, 4096, 8192], 4, 32, 3, 512
LAYOUTS = {
    f"MHA ({small.n_heads} kv heads)": small,
    "GQA (2)": small.replace(n_kv_heads=2),
    "MQA (1)": small.replace(n_kv_heads=1),
    f"GQA (2) + window {WINDOW}, local/global": small.replace(n_kv_heads=2, sliding_window=WINDOW,
                                                              layer_pattern=("local", "global")),
}


def filled_cache(cfg, batch, context, filled, rng):
    """The cache of `context` tokens holding the first `filled`: random K/V, each token in slot i % S."""
    def fill(layer):
        s = layer["idx"].shape[-1]
        idx = np.arange(max(0, filled - s), filled)
        k = np.zeros(layer["k"].shape, np.float32)
        k[:, idx % s] = rng.standard_normal(k[:, idx % s].shape)
        slots = np.full(layer["idx"].shape, -1, np.int32)
        slots[:, idx % s] = idx
        return {"k": jnp.asarray(k), "v": jnp.asarray(k[::-1].copy()), "idx": jnp.asarray(slots),
                "pos": jnp.asarray(np.maximum(slots, 0))}

    return tuple(fill(layer) for layer in init_cache(cfg, batch, context))


def decode_speed(cfg, params, context):
    """(decode tokens / s, measured cache bytes) for STEPS tokens ending at `context`."""
    rng, filled = np.random.default_rng(0), context - STEPS
    lengths = jnp.full((BATCH,), filled, jnp.int32)
    logits = jnp.zeros((BATCH, cfg.vocab_size), jnp.float32)
    sampling = (jnp.float32(1), jnp.int32(cfg.vocab_size), jnp.float32(1))  # unused: greedy

    def once():
        cache = filled_cache(cfg, BATCH, context, filled, rng)
        nbytes = cache_bytes(cache)
        start = time.perf_counter()
        _, tokens, _ = decoding.decode(cfg, params, cache, logits, lengths, jax.random.key(0), *sampling,
                                       steps=STEPS, greedy=True, keep_logits=False)
        tokens.block_until_ready()
        return time.perf_counter() - start, nbytes

    once()  # compiles
    timings = [once() for _ in range(REPEATS)]
    return BATCH * STEPS / min(t for t, _ in timings), timings[0][1]


speed, measured, formula = {}, {}, {}
for name, cfg in LAYOUTS.items():
    params = lecture3.init_params(cfg, 0)
    for context in CONTEXTS:
        tok_s, nbytes = decode_speed(cfg, params, context)
        speed[name, context], measured[name, context] = tok_s, nbytes
        formula[name, context] = accounting.kv_cache_bytes(cfg, BATCH, context)
        assert nbytes == formula[name, context], (name, context, nbytes, formula[name, context])
    print(f"{name:<36}" + "  ".join(f"{c}: {speed[name, c]:7.0f} tok/s {measured[name, c] / 2**20:7.2f} MiB"
                                    for c in CONTEXTS))
print("measured cache bytes == accounting.kv_cache_bytes for every layout and context")

# %%
mha = next(iter(LAYOUTS))
longest = CONTEXTS[-1]
print(f"at {longest} tokens (batch {BATCH}, {STEPS} steps), relative to MHA:")
for name in LAYOUTS:
    print(f"  {name:<36} cache x{measured[name, longest] / measured[mha, longest]:.3f}   "
          f"decode speed x{speed[name, longest] / speed[mha, longest]:.2f}")

# %% [markdown]
# ## 3. The sliding-window ring buffer, step by step
#
# A local layer's cache has S = W slots, and the token of stream index i goes to slot `i % W`: when the
# ring is full, the new token overwrites the one W places back, which has just left the window. Here a real
# Gemma-2-style model (a local and a global layer) with a window of 4 takes a 3-token prompt in one prefill, then
# decodes one token at a time; after each call we read `cache[layer]["idx"]` (the stream index held in each
# slot, -1 = empty) of its local layer 0 and its global layer 1.

# %%
W, PROMPT_LEN, TOTAL = 4, 3, 11
ring_cfg = presets.get("gemma2", "tiny").replace(sliding_window=W, n_layers=2)  # one local, one global
ring_params = lecture3.init_params(ring_cfg, 0)
tokens = jnp.asarray(np.random.default_rng(1).integers(0, ring_cfg.vocab_size, (1, TOTAL)), jnp.int32)


@jax.jit
def feed(cache, chunk, q):  # the tokens `chunk` [1, T] at stream indices q [1, T] -> (logits, new cache)
    out = Transformer(ring_cfg).apply({"params": ring_params}, chunk, positions=q, cache=cache, q_idx=q)
    return out.logits, out.cache


_, cache = feed(init_cache(ring_cfg, 1, TOTAL), tokens[:, :PROMPT_LEN], jnp.arange(PROMPT_LEN)[None])
snapshots = [(f"prefill 0..{PROMPT_LEN - 1}", np.asarray(cache[0]["idx"][0]), np.asarray(cache[1]["idx"][0]))]
for i in range(PROMPT_LEN, TOTAL):
    _, cache = feed(cache, tokens[:, i:i + 1], jnp.asarray([[i]]))
    snapshots.append((f"token {i}", np.asarray(cache[0]["idx"][0]), np.asarray(cache[1]["idx"][0])))
for label, local, global_ in snapshots:
    print(f"{label:<14} local slots {local}   global slots {global_}")


def ring_plot(ax, which, title):
    grid = np.stack([s[which] for s in snapshots])  # [steps, S]
    steps, slots = grid.shape
    newest = grid.max(axis=1, keepdims=True)
    colour = np.where(grid < 0, 0.0, np.where(grid == newest, 1.0, 0.45))
    ax.imshow(colour, cmap="Blues", vmin=0, vmax=1.2, aspect="auto")
    for r in range(steps):
        for c in range(slots):
            if grid[r, c] >= 0:
                ax.text(c, r, str(grid[r, c]), ha="center", va="center", fontsize=8,
                        color="white" if grid[r, c] == newest[r, 0] else "black")
    ax.set_xticks(range(slots), [str(s) for s in range(slots)], fontsize=7)
    ax.set_yticks(range(steps), [s[0] for s in snapshots], fontsize=7)
    ax.set_xlabel("cache slot", fontsize=8)
    ax.set_title(title, fontsize=9)


fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [W, TOTAL]})
ring_plot(a, 1, f"local layer: ring of {W} slots")
ring_plot(b, 2, f"global layer: {TOTAL} slots")
plt.show()

# %% [markdown]
# ## The figure

# %%
fig = plt.figure(figsize=(16, 8))
grid = fig.add_gridspec(2, 3, width_ratios=[1.2, 1.2, 1])
ax = fig.add_subplot(grid[0, 0])
x = np.asarray(CONTEXTS_8B)
for name, c in LAYOUTS_8B.items():
    ax.plot(x, [accounting.kv_cache_bytes(c, 1, n, 2) / GiB for n in x], marker="o", label=name)
ax.axhline(weights, color="gray", ls=":", label="the bf16 weights")
ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="GiB, one sequence, bf16",
       title="Llama 3 8B: KV cache from accounting")
ax.legend(fontsize=7)
speed_ax, bytes_ax = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
for name in LAYOUTS:
    speed_ax.plot(CONTEXTS, [speed[name, c] for c in CONTEXTS], marker="o", label=name)
    line, = bytes_ax.plot(CONTEXTS, [measured[name, c] / 2**20 for c in CONTEXTS], marker="o", label=name)
    bytes_ax.plot(CONTEXTS, [formula[name, c] / 2**20 for c in CONTEXTS], ls="none", marker="x", ms=9,
                  color=line.get_color())
speed_ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens / s",
             title=f"measured decode speed (d_model {small.d_model}, {small.n_layers} layers, batch {BATCH})")
bytes_ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB",
             title="measured cache bytes (o) = accounting (x)")
speed_ax.legend(fontsize=7)
for a_ in (ax, speed_ax, bytes_ax):
    a_.grid(alpha=0.3)
for a_ in (speed_ax, bytes_ax):
    a_.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
    a_.minorticks_off()
ring_plot(fig.add_subplot(grid[0, 1]), 1, f"sliding window {W}: the local layer's ring buffer")
ring_plot(fig.add_subplot(grid[:, 2]), 2, f"the global layer: {TOTAL} slots")
fig.suptitle("KV cache: MHA vs GQA vs MQA, and where each token lands in a sliding-window ring", fontsize=11)
fig.tight_layout()
if FIGURE is not None:
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=80)
    print("figure saved to", FIGURE.resolve())
plt.show()

# %% [markdown]
# ## What was measured
#
# (Full settings: a 4-layer d_model-256 model with 8 query heads, batch 4, 32 decoded tokens per
# measurement, contexts 256 to 8192. The byte counts are arithmetic, the same on every rerun; the speeds
# are measured, and printed below.)
#
# - Llama 3 8B in bf16: MHA would hold 512 KiB per token, its GQA-8 128 KiB, MQA 16 KiB; at 128k tokens
#   that is 64 / 16 / 2 GiB for one sequence, next to 15 GiB of weights. A 4096 window on half the layers
#   stops those layers growing: 8.25 GiB instead of 16 at 128k.
# - On a real cache the measured bytes equal `accounting.kv_cache_bytes` exactly, for every layout and
#   context; GQA with 2 KV heads holds 1/4 of MHA's bytes, MQA 1/8.
# - Decode is memory-bound: MHA's speed falls as the context grows, since every step reads the whole
#   cache, and at the longest context GQA-2, MQA and GQA-2 with a window on half the layers (its cache is
#   nearly MQA's) decode faster than MHA, roughly in the order of their cache bytes. The speeds and ratios
#   of this run are printed below (timings: a rerun on another machine, or a busy one, gives others). On a
#   CPU the ratios are noisier than on an accelerator, and at short contexts fixed per-step costs hide part
#   of the gain.
# - The ring buffer: token i lands in slot i % 4; from the fifth token on, each step overwrites the token
#   that has just left the window, so the local layer's memory stays at 4 slots while the global layer's
#   grows with every token.

# %%
shortest = CONTEXTS[0]
print(f"{mha}: {speed[mha, shortest]:.0f} tokens/s at {shortest} tokens of context, {speed[mha, longest]:.0f} at "
      f"{longest} ({speed[mha, shortest] / speed[mha, longest]:.1f}x slower)")
print(f"at {longest} tokens, decode speed relative to MHA: " + ", ".join(
    f"{name} {speed[name, longest] / speed[mha, longest]:.1f}x" for name in LAYOUTS if name != mha))
print(f"wall time: {time.perf_counter() - T0:.1f} s ({'quick' if QUICK else 'full'})")

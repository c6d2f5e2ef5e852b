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
# # Architecture explorer: flip one field, see what it costs and what it looks like
#
# **What the lecture says.** Almost every modern LLM is the same block with a few choices flipped: where
# the norms sit (pre-norm is what nearly everyone uses; post-norm, the original transformer's, was less
# stable and needed long warmup; Gemma 2 and Grok put a norm both before and after each sublayer; keep
# norms *off* the residual stream), RMSNorm instead of LayerNorm (fewer parameters, less memory traffic,
# the same loss), no biases, a gated MLP (SwiGLU with d_ff ~ 8/3 d_model instead of 4 d_model, so the
# parameter count stays the same), serial or parallel attention + MLP (parallel trains ~15% faster), and
# MHA / GQA / MQA (fewer KV heads: a smaller KV cache at inference).
#
# Here every one of those choices is one field of `lecture3.ModelConfig`. This notebook builds a preset,
# flips one field, and shows what moved: parameters, training FLOPs per token and KV-cache bytes (all from
# `lecture3.accounting`, plain arithmetic over the config), and a block diagram drawn *from the config
# itself*, so the picture changes when the field does.

# %%
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyBboxPatch

import lecture3
from lecture3 import Transformer, accounting, presets

QUICK = os.environ.get("LECTURE3_NOTEBOOK_QUICK", "") not in ("", "0")  # the tests run every notebook quick
# full settings save the figure to a scratch folder; LECTURE3_UPDATE_FIGURES=1 rewrites the committed one
UPDATE = os.environ.get("LECTURE3_UPDATE_FIGURES") == "1"
FIGURES = Path("figures") if UPDATE else Path(tempfile.gettempdir()) / "lecture3-figures"
FIGURE = None if QUICK else FIGURES / "architecture_explorer.png"  # quick mode writes nothing
T0 = time.perf_counter()
print("quick mode" if QUICK else "full settings", "| presets:", ", ".join(presets.names()))

# %% [markdown]
# ## 1. Build a preset
#
# A preset is a plain `ModelConfig` (`presets.get(family, size)`); the published sizes carry the published
# hyperparameters. `accounting.summary` needs no arrays at all; `jax.eval_shape` traces the real model's
# `init` without allocating a byte, so we can check the arithmetic against the actual parameter tree of an
# 8B model on a laptop.

# %%
FAMILY, SIZE = "llama3", "8b"  # try ("gemma2", "9b"), ("gpt2", "124m"), ("olmo2", "7b"), ("palm", "8b"), ...
SEQ_LEN = 8192  # the context the FLOPs and the KV cache are counted at

base = presets.get(FAMILY, SIZE)
print(accounting.summary(base, SEQ_LEN))

# %%
check = presets.get(FAMILY, "tiny") if QUICK else base  # quick mode traces the tiny size only
shapes = jax.eval_shape(lambda: Transformer(check).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
traced = accounting.count_params(shapes["params"])
print(f"{FAMILY}/{'tiny' if QUICK else SIZE}: accounting says {accounting.param_counts(check)['total']:,} "
      f"parameters, the traced init has {traced:,}")
assert traced == accounting.param_counts(check)["total"]

# %% [markdown]
# ## 2. Flip one field
#
# `dataclasses.replace` (or `cfg.replace`) gives a new validated config. Edit `FLIP` and rerun from here.

# %%
FLIP = {"block": "parallel"}  # try {"n_kv_heads": 1}, {"norm_position": "sandwich"}, {"activation": "gelu"}
flipped = dataclasses.replace(base, **FLIP)


def numbers(cfg, seq_len=SEQ_LEN) -> dict[str, float]:
    """What the accounting says about one config: parameters, FLOPs per token, KV-cache bytes."""
    p, f = accounting.param_counts(cfg), accounting.flops_per_token(cfg, seq_len)
    return {"params": p["total"], "  attention": p["attention"], "  mlp": p["mlp"], "  norms": p["norms"],
            "  embedding + head": p["embedding"] + p["head"] + p["position"],
            "training FLOPs / token": f["training"], "  of which attention": f["training_attention"],
            f"KV cache, 1 sequence of {seq_len}": accounting.kv_cache_bytes(cfg, 1, seq_len)}


def human(x: float, is_bytes: bool = False) -> str:
    step, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if is_bytes else (1000, ("", "k", "M", "G", "T"))
    for unit in units:
        if abs(x) < step or unit == units[-1]:
            return f"{x:,.2f} {unit}".rstrip() if unit not in ("", "B") else f"{x:,.0f} {unit}".rstrip()
        x /= step


def compare(a, b) -> None:
    na, nb = numbers(a), numbers(b)
    print(f"{'':<30}{'base':>14}{'flipped':>14}{'change':>10}")
    for key in na:
        kb = key.startswith("KV")
        change = (nb[key] - na[key]) / na[key] * 100 if na[key] else float("nan")
        print(f"{key:<30}{human(na[key], kb):>14}{human(nb[key], kb):>14}{change:>+9.1f}%")


print(f"{FAMILY}/{SIZE}, flip {FLIP}:", lecture3.config_diff(lecture3.Config(model=base),
                                                          lecture3.Config(model=flipped)))
compare(base, flipped)

# %% [markdown]
# A flip the model cannot express is an error naming the field before anything runs, e.g. a parallel block
# with post-norm (GPT-J, GPT-NeoX and PaLM's parallel blocks are all pre-norm):

# %%
try:
    dataclasses.replace(flipped, norm_position="post")
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 3. The block, drawn from the config
#
# `block_layout` reads `norm_position`, `block`, `parallel_norm` (and the attention / MLP fields for the
# labels) and returns the block as a list of steps; `draw_block` draws them. The thick line is the residual
# stream; a norm drawn *on* it (red) is post-norm's, the one the lecture says to keep off the stream.

# %%
NORM_NAMES = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm", "none": None}
COLORS = {"norm": "#f6d55c", "stream": "#ef6f6c", "attn": "#8ecae6", "mlp": "#95d5b2"}


def attention_label(cfg) -> str:
    n, k = cfg.n_heads, cfg.resolved_n_kv_heads
    kind = "MHA" if k == n else "MQA" if k == 1 else f"GQA {n}q/{k}kv"
    extras = [cfg.position if cfg.position != "rope" else "RoPE"]
    if cfg.qk_norm:
        extras.append("QK-norm")
    if cfg.attn_logit_softcap:
        extras.append(f"cap {cfg.attn_logit_softcap:g}")
    if "local" in cfg.layer_pattern:
        extras.append(f"window {cfg.sliding_window}")
    return f"{kind}\nattention\n" + ", ".join(extras)


def block_layout(cfg) -> list[tuple]:
    """The block as steps: ("branch", [(kind, label), ...]) leaves the stream and adds back to it;
    ("stream", (kind, label)) sits on the stream; ("parallel", shared_norm, left, right) is two branches
    added together (a shared input norm or one per branch)."""
    norm = NORM_NAMES[cfg.norm]
    n = [("norm", norm)] if norm else []
    attn = ("attn", attention_label(cfg))
    mlp = ("mlp", f"{cfg.activation}\nMLP\nd_ff {cfg.resolved_d_ff}")
    if cfg.block == "parallel":
        if cfg.parallel_norm == "shared":
            return [("parallel", n[0] if n else None, [attn], [mlp])]
        return [("parallel", None, [*n, attn], [*n, mlp])]
    steps = []
    for f in (attn, mlp):
        if cfg.norm_position == "pre":
            steps.append(("branch", [*n, f]))
        elif cfg.norm_position == "post":
            steps += [("branch", [f]), ("stream", ("stream", norm))]
        elif cfg.norm_position == "sandwich":
            steps.append(("branch", [*n, f, *n]))
        else:  # post_branch
            steps.append(("branch", [f, *n]))
    return steps


BOX_H, GAP, BOX_W = 1.1, 0.3, 2.5


def _box(ax, x, y, kind, label, width=BOX_W):
    ax.add_patch(FancyBboxPatch((x - width / 2, y - BOX_H / 2), width, BOX_H, boxstyle="round,pad=0.05",
                                fc=COLORS[kind], ec="black", lw=1, zorder=3))
    ax.text(x, y, label, ha="center", va="center", fontsize=6.5, zorder=4, linespacing=1.1)


def _column(ax, x, y, boxes):
    """Boxes stacked upward from y along a branch at x; returns the y where the branch ends."""
    for kind, label in boxes:
        y += GAP + BOX_H / 2
        ax.plot([x, x], [y - BOX_H / 2 - GAP, y - BOX_H / 2], color="gray", zorder=1)
        _box(ax, x, y, kind, label)
        y += BOX_H / 2
    return y


def _add(ax, y):
    ax.add_patch(Circle((0, y), 0.22, fc="white", ec="black", zorder=5))
    ax.text(0, y, "+", ha="center", va="center", fontsize=10, zorder=6)


def draw_block(ax, cfg, title=""):
    y, left, right = 0.0, 2.0, 5.0
    for step in block_layout(cfg):
        if step[0] == "stream":
            y += GAP + BOX_H / 2
            _box(ax, 0, y, *step[1], width=2.0)
            y += BOX_H / 2
            continue
        fork = y + 0.3
        if step[0] == "branch":
            top = _column(ax, left, fork, step[1]) + 0.3
            ax.plot([0, left, left], [fork, fork, fork + GAP], color="gray", zorder=1)
            ax.plot([left, left, 0], [top - 0.3, top, top], color="gray", zorder=1)
        else:
            _, shared, a, m = step
            start = fork
            if shared is not None:  # one norm feeds both branches
                start = fork + GAP + BOX_H
                _box(ax, (left + right) / 2, start - BOX_H / 2, *shared, width=right - left + BOX_W)
                ax.plot([0, left, left], [fork, fork, start - BOX_H], color="gray", zorder=1)
            else:
                ax.plot([0, right], [fork, fork], color="gray", zorder=1)
            top = max(_column(ax, left, start, a), _column(ax, right, start, m)) + 0.3
            for x in (left, right):
                ax.plot([x, x], [start, top], color="gray", zorder=1)
            ax.plot([right, 0], [top, top], color="gray", zorder=1)
        _add(ax, top)
        y = top
    ax.annotate("", xy=(0, y + 0.7), xytext=(0, -0.5), zorder=0,
                arrowprops=dict(arrowstyle="-|>", lw=3, color="black"))
    ax.text(-0.25, -0.5, "$x_l$", ha="right", va="bottom", fontsize=9)
    ax.text(-0.25, y + 0.7, "$x_{l+1}$", ha="right", va="top", fontsize=9)
    ax.set_xlim(-1.4, 6.5)
    ax.set_ylim(-0.8, 11.5)
    ax.axis("off")
    final = "final norm" if cfg.has_final_norm else "no final norm"
    ax.set_title(title or f"{cfg.norm_position} / {cfg.block}", fontsize=9)
    ax.text(3.0, -0.6, f"x {cfg.n_layers} layers, then {final}", ha="center", fontsize=7, color="dimgray")


fig, axes = plt.subplots(1, 2, figsize=(9, 5.5))
draw_block(axes[0], base, f"{FAMILY}/{SIZE}")
draw_block(axes[1], flipped, f"flipped: {FLIP}")
plt.show()

# %% [markdown]
# ## 4. Every norm position x serial / parallel, and what common flips cost
#
# The gallery is `draw_block` over `replace`d copies of the base; the bars are `numbers` over a list of
# flips, relative to the base. Note that the lecture's "GLUs at matched parameters" needs `d_ff` to move
# with the activation: flipping `activation` alone at a fixed `d_ff` removes a third of the MLP.

# %%
GALLERY = {
    "pre / serial": dict(norm_position="pre"),
    "post / serial": dict(norm_position="post"),
    "sandwich / serial": dict(norm_position="sandwich"),
    "post_branch / serial": dict(norm_position="post_branch"),
    "parallel, shared norm": dict(norm_position="pre", block="parallel"),
    "parallel, separate norms": dict(norm_position="pre", block="parallel", parallel_norm="separate"),
}
FLIPS = {
    "MHA (n_kv_heads=n_heads)": dict(n_kv_heads=base.n_heads),
    "MQA (n_kv_heads=1)": dict(n_kv_heads=1),
    "sliding window 4096, local/global": dict(sliding_window=4096, layer_pattern=("local", "global")),
    "parallel block": dict(block="parallel"),
    "sandwich norm": dict(norm_position="sandwich"),
    "LayerNorm with bias": dict(norm="layernorm", norm_bias=True),
    "biases on q/k/v, o and MLP": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "GELU, same d_ff": dict(activation="gelu"),
    "GELU, d_ff x 3/2 (matched)": dict(activation="gelu", d_ff=base.resolved_d_ff * 3 // 2),
    "tied embeddings": dict(tie_embeddings=not base.tie_embeddings),
}
base_numbers = numbers(base)
table = {}
for name, change in FLIPS.items():
    nb = numbers(dataclasses.replace(base, **change))
    table[name] = [100 * (nb[k] - base_numbers[k]) / base_numbers[k]
                   for k in ("params", "training FLOPs / token", f"KV cache, 1 sequence of {SEQ_LEN}")]
    print(f"{name:<36}" + "".join(f"{v:>+9.1f}%" for v in table[name]))

# %%
fig = plt.figure(figsize=(15, 8.2))
grid = fig.add_gridspec(2, len(GALLERY), height_ratios=[1.25, 1])
for i, (title, change) in enumerate(GALLERY.items()):
    draw_block(fig.add_subplot(grid[0, i]), dataclasses.replace(base, **change), title)
bars = fig.add_subplot(grid[1, :])
names, width, clip = list(table), 0.27, 100.0
for j, (what, color) in enumerate(zip(("parameters", "training FLOPs / token", f"KV bytes at {SEQ_LEN}"),
                                      ("#457b9d", "#e9c46a", "#e76f51"), strict=True)):
    ys, values = [i + (j - 1) * width for i in range(len(names))], [table[n][j] for n in names]
    bars.barh(ys, [max(-clip, min(clip, v)) for v in values], width, label=what, color=color)
    for y, v in zip(ys, values, strict=True):
        if abs(v) >= 0.05:  # label every visible change; the axis is clipped at +-100%
            x = max(-clip, min(clip, v))
            bars.text(x + (1.5 if v > 0 else -1.5), y, f"{v:+.1f}%", va="center", fontsize=6.5,
                      ha="left" if v > 0 else "right")
bars.set_xlim(-clip - 15, clip + 15)
bars.set_yticks(range(len(names)), names, fontsize=8)
bars.invert_yaxis()
bars.axvline(0, color="black", lw=0.8)
bars.set_xlabel(f"change vs {FAMILY}/{SIZE} (%)")
bars.legend(fontsize=8, loc="lower right")
bars.grid(axis="x", alpha=0.3)
fig.suptitle(f"{FAMILY}/{SIZE}: the block at every norm position (drawn from the config), and what one flip costs",
             fontsize=11)
fig.tight_layout()
if FIGURE is not None:
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=80)
    print("figure saved to", FIGURE.resolve())
plt.show()

# %% [markdown]
# ## What was measured
#
# (Full settings, `llama3/8b` at a context of 8192; every number is `lecture3.accounting` arithmetic, the
# parameter count checked against the traced `init` of the real 8.03B-parameter model.)
#
# - The norm position and serial vs parallel change the *picture* (and, by the lecture, the stability of
#   training) but barely the cost: a sandwich norm adds 2 x 32 x 4096 gains (+0.003% of the parameters); a
#   parallel block with a shared norm halves the norm parameters (-49%, 131k of 8.03B) and leaves the FLOPs
#   unchanged. The lecture's ~15% speed-up of parallel blocks comes from fusing the two input matmuls, which
#   a FLOP count does not see.
# - The KV cache is where the head layout matters: MHA holds 4x the bytes of Llama 3's GQA with 8 KV heads
#   (+300%; +10.0% parameters, +8.3% training FLOPs), MQA 1/8 of them (-87.5%; -2.9% parameters). Local
#   layers with a 4096 window on half the stack cut the cache at 8192 tokens by 25% and the training FLOPs
#   by 5.6% (their attention by a quarter).
# - LayerNorm with bias, and all of GPT-2's biases together, are below 0.02% of the parameters: the lecture
#   drops them for memory traffic and stability, not for size.
# - GELU at Llama's d_ff loses a third of every MLP (-23.4% of the parameters, -19.5% of the FLOPs); at
#   d_ff x 3/2 the counts are back to the SwiGLU model's (+0.0%): the "8/3 d_model" rule is this matching.
#   Tying the embeddings (Llama 3 8B unties them) saves 6.5% of the parameters and no FLOPs.
#
# Every number above is arithmetic on the configs, the same on every rerun. This run's wall time:

# %%
print(f"wall time: {time.perf_counter() - T0:.1f} s ({'quick' if QUICK else 'full'})")

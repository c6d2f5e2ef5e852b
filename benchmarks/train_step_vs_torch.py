"""Train-step speed of the default config: lecture3's JAX step against the same model in eager PyTorch.

Prints step time, tokens/s and MFU for `Config()` (d_model 128, 4 layers, 4 heads, SwiGLU, RoPE, tied
embeddings, batch 16 x 128 tokens, AdamW + global-norm clipping) and, in the same run, the same model
written in eager PyTorch (float32, CPU, torch.set_num_threads = the cores JAX uses), plus JAX variants
(XLA flags, bfloat16, scan, remat, a lean step, 2-D matmuls with a custom-VJP dense, the batch split
over a data mesh of one XLA:CPU host device per core). Every variant runs
in its own worker process (XLA flags must be set before the backend starts); the workers compile once and
then take turns, round after round, so each round times all variants back to back and the ratios are
medians of per-round ratios. Timings on a shared machine swing: read the ratios, not the milliseconds.

First it proves the PyTorch model is the same model: the lecture3 init params are copied into it and the
two losses are printed at init and after a few identical AdamW steps.

`--model llama` runs the same comparison on a small Llama (d 256, 4 layers, GQA 8:2, SwiGLU d_ff 768, RoPE,
untied head, vocab 8192, batch 8 x 256) against transformers' own `LlamaForCausalLM`, loaded from the
lecture3 init params written by `lecture3.hf.save_pretrained` and trained with `torch.optim.AdamW` and
clipping (`torch`: eager attention, `torch_sdpa`: attn_implementation="sdpa"). The JAX variants that only
change flags or the step's options apply to it; the hand-written forwards (`jax_flat*`) do not.

    python benchmarks/train_step_vs_torch.py            # default: ~3-5 minutes on 2 cores
    python benchmarks/train_step_vs_torch.py --quick    # a smoke run: 2 rounds of 2 steps
    python benchmarks/train_step_vs_torch.py --variants jax,torch,jax_lean --hlo
    python benchmarks/train_step_vs_torch.py --model llama --variants jax,torch,torch_sdpa,jax_xla_defaults
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

SEED = 0


@dataclass(frozen=True)
class Variant:
    doc: str
    kind: str = "jax"  # "jax" or "torch"
    xla_flags: str = ""  # appended to XLA_FLAGS of the worker (before the backend starts)
    model: dict = field(default_factory=dict)  # ModelConfig.replace(**model)
    step: str = "lecture3"  # jax: lecture3 (the real step), lean, flat, flat_vjp; torch: math, sdpa
    precision: str | None = None  # jax_default_matmul_precision
    threads: int | None = None  # torch threads; None = the cores JAX uses
    devices: int = 1  # jax: XLA:CPU host devices, the batch split over them (a data-parallel mesh)
    plain: tuple[str, ...] = ()  # jax: custom derivatives replaced by autodiff of the same forward
    # jax: which of lecture3.runtime's CPU settings the worker applies before its backend starts, as the
    # lecture3 CLI and lecture3.train do: the XLA flag and keeping host memory ("lecture3"), the flag only
    # ("flags"), or neither ("none": XLA's default flags and glibc's default malloc)
    runtime: str = "lecture3"
    splits: int | None = None  # jax: the forward's batch parts; None = what lecture3 picks (steps.batch_splits)


VARIANTS: dict[str, Variant] = {
    "jax": Variant("lecture3 make_train_step, Config() defaults, as lecture3 runs it on a CPU (lecture3.runtime: "
                   "YNNPACK dot fusions, host memory kept; the reference)"),
    "jax_xla_defaults": Variant("the step without lecture3's CPU choices: one pass, XLA's default flags, glibc's "
                                "default malloc (a fresh mmap of the step's temporaries every step); the reference "
                                "before 2026-12-05", runtime="none", splits=1),
    "jax_one_pass": Variant("the batch in one pass through the model (steps.make_train_step(splits=1)); lecture3 "
                            "runs the halves side by side on a one-device CPU mesh", splits=1),
    "jax_glibc_malloc": Variant("lecture3's XLA flag, glibc's default malloc (what keeping host memory buys)",
                                runtime="flags"),
    "torch": Variant("same model, eager PyTorch, explicit masked softmax attention", kind="torch",
                     step="math"),
    "torch_1t": Variant("eager PyTorch, torch.set_num_threads(1)", kind="torch", step="math",
                        threads=1),
    "torch_sdpa": Variant("eager PyTorch with F.scaled_dot_product_attention(is_causal=True)", kind="torch",
                          step="sdpa"),
    "jax_ynn_dot": Variant("XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot",
                           xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot"),
    "jax_ynn_eltwise": Variant("XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
                               xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"),
    "jax_ynn_reduce": Variant("XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
                              xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"),
    "jax_no_ynn": Variant("XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (no YNNPACK fusions: Eigen dots)",
                          xla_flags="--xla_cpu_experimental_ynn_fusion_type="),
    "jax_xnn_greedy": Variant("XLA_FLAGS=--xla_cpu_use_xnnpack=true "
                              "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
                              xla_flags="--xla_cpu_use_xnnpack=true "
                              "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "jax_bf16": Variant('cfg.dtype="bfloat16" (params float32)', model={"dtype": "bfloat16"}),
    "jax_scan": Variant("scan_layers=True", model={"scan_layers": True}),
    "jax_remat_full": Variant('remat="full"', model={"remat": "full"}),
    "jax_onednn": Variant("XLA_FLAGS=--xla_cpu_use_onednn=true", xla_flags="--xla_cpu_use_onednn=true"),
    "jax_vec512": Variant("XLA_FLAGS=--xla_cpu_prefer_vector_width=512",
                          xla_flags="--xla_cpu_prefer_vector_width=512"),
    "jax_eigen_1t": Variant("XLA_FLAGS=--xla_cpu_multi_thread_eigen=false",
                            xla_flags="--xla_cpu_multi_thread_eigen=false"),
    "jax_prec_highest": Variant('jax_default_matmul_precision="highest"', precision="highest"),
    "jax_dp2": Variant("2 XLA:CPU host devices, the batch split over a data mesh of 2 (one per core)",
                       devices=2),
    "jax_dp2_ynn": Variant("jax_dp2 + XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
                           devices=2, xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"),
    "jax_dp2_eigen_1t": Variant("jax_dp2 + XLA_FLAGS=--xla_cpu_multi_thread_eigen=false", devices=2,
                                xla_flags="--xla_cpu_multi_thread_eigen=false"),
    "jax_plain_softmax": Variant("attention softmax differentiated by autodiff (its custom_jvp off: "
                                 "what the softmax's own derivative buys)", plain=("softmax",)),
    "jax_plain_rope": Variant("RoPE differentiated by autodiff (its custom_vjp off: what the rotation's own "
                              "VJP buys)", plain=("rope",)),
    "jax_lean": Variant("same model + AdamW, no diagnostics (max logit, |log Z|, update ratio, finite guard)",
                        step="lean"),
    "jax_flat": Variant("lean, hand-written forward on [B*T, D] 2-D matmuls (lecture3 params)", step="flat"),
    "jax_flat_vjp": Variant("jax_flat + dense with a custom VJP: dW = dot_general(x, g) contracting B*T",
                            step="flat_vjp"),
}
DEFAULT_VARIANTS = ("jax", "torch", "torch_1t", "torch_sdpa", "jax_xla_defaults", "jax_glibc_malloc", "jax_one_pass",
                    "jax_bf16", "jax_scan", "jax_remat_full", "jax_onednn", "jax_vec512", "jax_eigen_1t", "jax_lean",
                    "jax_flat", "jax_flat_vjp")


MODELS = ("default", "lecture3 Config()"), ("llama", "a small Llama vs transformers' LlamaForCausalLM")
FLAT_STEPS = ("flat", "flat_vjp")  # hand-written forwards of the default model only


def bench_config(model: str):
    """The Config of the comparison: `Config()` or the small Llama (llama3's choices at the issue's size)."""
    import dataclasses

    from lecture3 import presets
    from lecture3.config import Config

    cfg = Config()
    if model == "default":
        return cfg
    m = presets.get("llama3").replace(vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                                      d_ff=768, max_seq_len=256, rope_theta=10000.0, rope_scaling=None)
    return Config(model=m, data=dataclasses.replace(cfg.data, seq_len=256),
                  train=dataclasses.replace(cfg.train, batch_size=8), mesh=cfg.mesh, dist=cfg.dist)


def n_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_batch(vocab: int, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(SEED).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------


def jax_setup(v: Variant, model: str = "default"):
    """(step, state, batch) for variant v: the lecture3 state and a jitted, donating step."""
    import jax
    import jax.numpy as jnp

    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig

    if v.precision is not None:
        jax.config.update("jax_default_matmul_precision", v.precision)
    use_plain_derivatives(v.plain)
    cfg = bench_config(model)
    m, tc = cfg.model.replace(**v.model), cfg.train
    mesh = sharding.make_mesh(MeshConfig(v.devices, 1, 1), jax.devices()[:v.devices])
    rules = sharding.axis_rules(m, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(m, tc, mesh, rules)
    state = steps.init_state(m, tc, mesh, rules)
    step_fn = {"lecture3": functools.partial(steps.make_train_step, splits=batch_splits(v, m, tc, mesh)),
               "lean": lean_train_step,
               "flat": lambda m, tc: flat_train_step(m, tc, custom_vjp=False),
               "flat_vjp": lambda m, tc: flat_train_step(m, tc, custom_vjp=True)}[v.step](m, tc)
    step = steps.jit_train_step(step_fn, mesh, rules, shardings)
    batch = {k: jnp.asarray(a) for k, a in make_batch(m.vocab_size, tc.batch_size, cfg.data.seq_len).items()}
    return step, state, batch, (m, tc, cfg.data.seq_len, mesh, rules)


def batch_splits(v: Variant, m, tc, mesh) -> int:
    """The forward's batch parts of variant v's step: lecture3's choice or the variant's (1 for the hand-written
    steps, which take the batch in one pass)."""
    from lecture3 import steps

    if v.step != "lecture3":
        return 1
    return steps.batch_splits(m, tc, mesh) if v.splits is None else v.splits


def use_plain_derivatives(names: tuple[str, ...]) -> None:
    """In this worker only: the functions with their own derivative replaced by their plain forward (the
    same maths), so autodiff differentiates it as it would without the custom rule."""
    from lecture3.layers import attention_ops, positions

    if "softmax" in names:
        attention_ops.softmax_given_max = attention_ops.softmax_given_max.fun
    if "rope" in names:
        positions._rotate = positions._rotation


def lean_train_step(m, tc):
    """The same update as lecture3's step (loss, grads, clip + AdamW) without its diagnostic metrics."""
    import optax

    from lecture3 import losses
    from lecture3.model import Transformer
    from lecture3.optim import make_optimizer

    model, ce, opt = Transformer(m), losses.cross_entropy(), make_optimizer(tc)

    def step(state, batch):
        def loss_fn(p):
            return ce(model.apply({"params": p}, batch["inputs"]), batch)[0]

        loss, grads = __import__("jax").value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    return step


def flat_train_step(m, tc, custom_vjp: bool):
    """lean, but the forward is written on [B*T, D] 2-D matmuls (as PyTorch's nn.Linear sees them).

    Same params tree, same pure functions (rms_norm, apply_rope, dot_product_attention) and optimizer;
    with `custom_vjp`, every dense layer's weight gradient is one dot_general contracting the B*T rows
    of x and g directly (no transposed copy asked for), and its input gradient g @ W^T likewise.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from lecture3 import losses
    from lecture3.layers import positions as pos
    from lecture3.layers.attention import attention_mask, dot_product_attention
    from lecture3.layers.norms import rms_norm
    from lecture3.optim import make_optimizer

    opt, ce = make_optimizer(tc), losses.cross_entropy()
    n, h, d, eps = m.n_heads, m.resolved_head_dim, m.d_model, m.norm_eps
    inv_freq = pos.rope_frequencies(h, m.rope_theta)

    @jax.custom_vjp
    def dense_vjp(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, g):
        x, w = res
        dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))  # [M, N] x [K, N] -> [M, K]
        dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))  # [M, K] x [M, N] -> [K, N]
        return dx, dw

    dense_vjp.defvjp(fwd, bwd)
    dense = dense_vjp if custom_vjp else (lambda x, w: x @ w)

    def forward(p, tokens):
        b, t = tokens.shape
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attention_mask(idx, idx)
        x = jnp.take(p["embed"], tokens, axis=0).reshape(b * t, d)  # [B*T, D]
        for i in range(m.n_layers):
            lp = p[f"layer_{i}"]
            a = lp["attn"]
            hin = rms_norm(x, lp["attn_norm"]["scale"], eps)
            q, k, v = (dense(hin, a[w].reshape(d, n * h)).reshape(b, t, n, h) for w in ("q", "k", "v"))
            q, k = pos.apply_rope(q, idx, inv_freq), pos.apply_rope(k, idx, inv_freq)
            o, _ = dot_product_attention(q, k, v, mask, scale=h ** -0.5)
            x = x + dense(o.reshape(b * t, n * h), a["o"].reshape(n * h, d))
            mp = lp["mlp"]
            hin = rms_norm(x, lp["mlp_norm"]["scale"], eps)
            x = x + dense(jax.nn.silu(dense(hin, mp["gate"])) * dense(hin, mp["up"]), mp["down"])
        x = rms_norm(x, p["final_norm"]["scale"], eps)
        return dense(x, p["embed"].T).reshape(b, t, -1)

    def step(state, batch):
        def loss_fn(p):
            return ce(forward(p, batch["inputs"]), batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    return step


def jax_matmul_peak(seconds: float = 0.25, n: int = 1024) -> float:
    """FLOP/s of a jitted float32 n x n matmul (the best of short bursts)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def hlo_counts(step, state, batch, mesh, rules) -> dict:
    """Ops of the compiled step's entry computation: dots, transposing copies feeding them, fusions."""
    import re

    import flax.linen as nn
    import jax

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        text = step.jitted.lower(state, batch).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    bodies = {mt.group(1): mt.group(2) for mt in
              re.finditer(r"^%?(\S+) \(.*?\{\n(.*?)\n\}", text, re.S | re.M)}
    lines = [ln for ln in entry.splitlines() if " = " in ln]
    # short keys: they are the columns of the table. A scanned stack's layers sit in a while body,
    # which is not the entry computation: its counts are not comparable to the unrolled ones.
    out = {"entry ops": len(lines), "fusions": 0, "dots": text.count(" dot("), "unfused dots": 0,
           "ynn fusions": 0, "transposes": 0, "->dot": 0}
    producers = {}
    for ln in lines:
        name = ln.split(" = ")[0].strip().lstrip("%")
        called = re.search(r"calls=%?([\w.\-]+)", ln)
        body = bodies.get(called.group(1), "") if called else ""
        transposing = (" transpose(" in body or " copy(" in body) and " dot(" not in body
        producers[name] = transposing
        out["fusions"] += " fusion(" in ln
        out["ynn fusions"] += "__ynn_fusion" in ln
        out["unfused dots"] += " dot(" in ln
        out["transposes"] += " fusion(" in ln and transposing
    for ln in lines:
        if " dot(" in ln or ("__ynn_fusion" in ln and " dot(" in bodies.get(
                (re.search(r"calls=%?([\w.\-]+)", ln) or [None, ""])[1], "")):
            args = re.findall(r"%([\w.\-]+)", ln.split("(", 1)[1].split(")", 1)[0])
            out["->dot"] += sum(producers.get(a, False) for a in args)
    return out


def apply_runtime(v: Variant) -> dict[str, bool]:
    """lecture3.runtime's CPU settings as variant v asks (before the worker's backend starts): what was applied."""
    from lecture3 import runtime

    return runtime.cpu_defaults(keep_memory=v.runtime == "lecture3") if v.runtime != "none" else {}


def jax_worker(name: str, steps: int, hlo: bool, model: str) -> None:
    v = VARIANTS[name]
    applied = apply_runtime(v)
    import jax

    step, state, batch, (m, tc, seq_len, mesh, rules) = jax_setup(v, model)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(state)
    info = {"compile_s": time.perf_counter() - t0, "tokens": tc.batch_size * seq_len,
            "devices": len(jax.devices()), "cores": n_cores(), "runtime": sorted(k for k, on in applied.items() if on),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "splits": batch_splits(v, m, tc, mesh)}
    if hlo:
        info["hlo"] = hlo_counts(step, state, batch, mesh, rules)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    held = [state]  # the step donates its state: always feed it the one it returned

    def one_step():
        held[0], _ = step(held[0], batch)
        return held[0]

    serve(info, lambda: time_steps(one_step, steps, jax.block_until_ready),
          jax_matmul_peak if name == "jax" else None)


# ----------------------------------------------------------------------------------------------
# PyTorch side: the same model, eager, float32
# ----------------------------------------------------------------------------------------------


def torch_model(params: dict[str, np.ndarray], m, sdpa: bool):
    """The lecture3 default Transformer in eager PyTorch, holding a copy of the given lecture3 params."""
    import torch
    import torch.nn.functional as F

    n, h, d, eps = m.n_heads, m.resolved_head_dim, m.d_model, m.norm_eps
    inv_freq = torch.tensor(1.0 / m.rope_theta ** (np.arange(0, h, 2) / h), dtype=torch.float32)

    def linear(w_in_out: np.ndarray) -> torch.nn.Linear:  # lecture3 stores [in, out]; nn.Linear [out, in]
        lin = torch.nn.Linear(*w_in_out.shape, bias=False)
        lin.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w_in_out.T)))
        return lin

    def gain(w: np.ndarray) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.from_numpy(w.copy()))

    def rms(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    def rope(x, cos, sin):  # x [B, N, T, H], rotate-half layout
        x1, x2 = x[..., : h // 2], x[..., h // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Layer(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            a = p["attn"]
            self.attn_norm, self.mlp_norm = gain(p["attn_norm"]["scale"]), gain(p["mlp_norm"]["scale"])
            self.q, self.k, self.v = (linear(a[w].reshape(d, n * h)) for w in ("q", "k", "v"))
            self.o = linear(a["o"].reshape(n * h, d))
            self.up, self.gate, self.down = (linear(p["mlp"][w]) for w in ("up", "gate", "down"))

        def forward(self, x, cos, sin, mask):
            b, t, _ = x.shape
            y = rms(x, self.attn_norm)
            q, k, v = (proj(y).view(b, t, n, h).transpose(1, 2) for proj in (self.q, self.k, self.v))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                logits = (q @ k.transpose(-1, -2)) * h ** -0.5  # [B, N, T, S]
                o = torch.softmax(logits.masked_fill(~mask, -1e30), dim=-1) @ v
            x = x + self.o(o.transpose(1, 2).reshape(b, t, n * h))
            y = rms(x, self.mlp_norm)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = gain(params["embed"])
            self.layers = torch.nn.ModuleList(Layer(params[f"layer_{i}"]) for i in range(m.n_layers))
            self.final_norm = gain(params["final_norm"]["scale"])

        def forward(self, tokens):
            t = tokens.shape[1]
            angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq  # [T, H/2]
            cos, sin = angles.cos(), angles.sin()
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            x = self.embed[tokens]
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
            return rms(x, self.final_norm) @ self.embed.T  # tied head

    return Model()


def hf_llama(hf_dir: str, sdpa: bool):
    """(module, forward(tokens) -> logits): transformers' LlamaForCausalLM on the weights lecture3 wrote."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, attn_implementation="sdpa" if sdpa else "eager", dtype=torch.float32)
    model.train()  # dropout is 0 in the config: train mode changes nothing but is what training uses
    return model, lambda tokens: model(input_ids=tokens, use_cache=False).logits


def torch_trainer(params_file: str, sdpa: bool = False, model_name: str = "default"):
    """(forward(tokens) -> logits, step(tokens, targets) -> loss): AdamW + clipping, lecture3's
    hyperparameters and decay mask. `params_file`: what `save_params` wrote for `model_name`."""
    import torch

    from lecture3.optim import schedule

    cfg = bench_config(model_name)
    m, tc = cfg.model, cfg.train
    if model_name == "llama":
        model, forward = hf_llama(params_file, sdpa)
        # lecture3's mask: matrices decay; norm gains, the embedding and the untied head only with
        # decay_embeddings
        embedding = lambda name: "embed_tokens" in name or "lm_head" in name  # noqa: E731
        decays = lambda name, p: p.ndim >= 2 and (tc.decay_embeddings or not embedding(name))  # noqa: E731
    else:
        model = forward = torch_model(load_params(params_file), m, sdpa)
        decays = lambda name, p: name.endswith(".weight")  # noqa: E731  the matrices; not gains, embed
    named = list(model.named_parameters())
    decay = [p for name, p in named if decays(name, p)]
    no_decay = [p for name, p in named if not decays(name, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    lr_at = schedule(tc)
    lrs = [float(lr_at(s)) for s in range(64)]
    count = [0]

    def step(tokens, targets):
        for g in opt.param_groups:
            g["lr"] = lrs[min(count[0], len(lrs) - 1)]
        logits = forward(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        count[0] += 1
        return loss

    return forward, step


def torch_matmul_peak(seconds: float = 0.25, n: int = 1024) -> float:
    import torch

    a = torch.randn(n, n)
    a @ a
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def torch_worker(name: str, steps: int, params_file: str, threads: int, model: str) -> None:
    import torch

    torch.set_num_threads(VARIANTS[name].threads or threads)
    cfg = bench_config(model)
    _, step = torch_trainer(params_file, sdpa=VARIANTS[name].step == "sdpa", model_name=model)
    b = make_batch(cfg.model.vocab_size, cfg.train.batch_size, cfg.data.seq_len)
    tokens, targets = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
    for _ in range(3):
        step(tokens, targets)
    info = {"tokens": int(tokens.numel()), "threads": torch.get_num_threads()}
    serve(info, lambda: time_steps(lambda: step(tokens, targets), steps, lambda x: x),
          torch_matmul_peak if name == "torch" else None)


# ----------------------------------------------------------------------------------------------
# Workers, rounds and the table
# ----------------------------------------------------------------------------------------------


def time_steps(run, steps: int, sync) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run())
        out.append(time.perf_counter() - t0)
    return out


def serve(info: dict, run_round, peak) -> None:
    """The worker loop: announce readiness, then time one round per `run` line until `quit`."""
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        reply = {"times": run_round()}
        if peak is not None:
            reply["peak"] = peak()
        print(json.dumps(reply), flush=True)


def save_params(path: str, model: str = "default") -> tuple[float, list[float]]:
    """Init the lecture3 state of the comparison, save its params (an .npz; for llama, the folder that
    lecture3.hf.save_pretrained writes); return its loss at init and over 3 steps."""
    import jax

    from lecture3 import losses
    from lecture3.model import Transformer

    step, state, batch, (m, *_rest) = jax_setup(VARIANTS["jax"], model)
    params = jax.tree.map(np.asarray, state.params)
    if model == "llama":
        from lecture3.hf import save_pretrained

        save_pretrained(m, params, path, family="llama")
    else:
        flat = {"/".join(getattr(k, "key", str(k)) for k in path_): leaf
                for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(path, **flat)
    logits = jax.jit(Transformer(m).apply)({"params": state.params}, batch["inputs"])
    init_loss = float(losses.cross_entropy()(logits, batch)[0])
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return init_loss, losses


def load_params(path: str) -> dict:
    tree: dict = {}
    with np.load(path) as z:
        for key in z.files:
            node = tree
            *parents, last = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = z[key]
    return tree


def check_same_model(params_file: str, jax_init: float, jax_losses: list[float], threads: int,
                     model_name: str = "default") -> None:
    import torch

    torch.set_num_threads(threads)
    cfg = bench_config(model_name)
    forward, step = torch_trainer(params_file, model_name=model_name)
    b = make_batch(cfg.model.vocab_size, cfg.train.batch_size, cfg.data.seq_len)
    tokens, targets = torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()
    with torch.no_grad():
        logits = forward(tokens)
        init = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    losses = [step(tokens, targets).item() for _ in range(3)]
    print("same model check (identical weights, same batch): loss")
    print(f"  at init         jax {jax_init:.6f}   torch {init:.6f}   |diff| {abs(jax_init - init):.2e}")
    for i, (a, t) in enumerate(zip(jax_losses, losses, strict=True)):
        print(f"  train step {i + 1}    jax {a:.6f}   torch {t:.6f}   |diff| {abs(a - t):.2e}")
    worst = max(abs(jax_init - init), *(abs(a - t) for a, t in zip(jax_losses, losses, strict=True)))
    print(f"  {'OK' if worst < 1e-3 else 'MISMATCH'}: largest |diff| {worst:.2e} (tolerance 1e-3)\n")


def start_worker(name: str, args, params_file: str, threads: int) -> subprocess.Popen:
    v = VARIANTS[name]
    env = dict(os.environ)
    flags = v.xla_flags + (f" --xla_force_host_platform_device_count={v.devices}" if v.devices > 1 else "")
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
           "--params", params_file, "--threads", str(threads), "--model", args.model] + (["--hlo"] if args.hlo else [])
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_reply(proc: subprocess.Popen, name: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"worker {name} died (exit {proc.wait()}); run it alone: "
                         f"python {sys.argv[0]} --variants jax,{name}")
    return json.loads(line)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="rounds of interleaved timing (default 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 3)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)}; "
                        f"with --model llama, those without jax_flat*)")
    p.add_argument("--hlo", action="store_true", help="count dots and transposing copies in each step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores JAX uses)")
    p.add_argument("--model", choices=[name for name, _ in MODELS], default="default",
                   help="; ".join(f"{name}: {doc}" for name, doc in MODELS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.steps = args.steps or (2 if args.quick else 3)
    threads = args.threads or n_cores()

    if args.worker:
        if VARIANTS[args.worker].kind == "torch":
            torch_worker(args.worker, args.steps, args.params, args.threads, args.model)
        else:
            jax_worker(args.worker, args.steps, args.hlo, args.model)
        return

    if args.variants is None:
        args.variants = ",".join(n for n in DEFAULT_VARIANTS
                                 if args.model == "default" or VARIANTS[n].step not in FLAT_STEPS)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    flat = [n for n in names if VARIANTS[n].step in FLAT_STEPS]
    if args.model != "default" and flat:
        raise SystemExit(f"variant(s) {flat} are hand-written forwards of the default model; "
                         f"drop them with --model {args.model}")
    names = ["jax", "torch"] + [n for n in names if n not in ("jax", "torch")]

    from lecture3.accounting import flops_per_token

    cfg = bench_config(args.model)
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)["training"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params_file = os.path.join(tmp, "hf" if args.model == "llama" else "params.npz")
        jax_init, jax_losses = save_params(params_file, args.model)
        check_same_model(params_file, jax_init, jax_losses, threads, args.model)
        m = cfg.model
        print(f"model {args.model}: d_model {m.d_model}, {m.n_layers} layers, heads {m.n_heads}:"
              f"{m.resolved_n_kv_heads}, d_ff {m.resolved_d_ff}, vocab {m.vocab_size}, "
              f"{'tied' if m.tie_embeddings else 'untied'} head; batch {cfg.train.batch_size} x "
              f"{cfg.data.seq_len}" + ("; torch = transformers LlamaForCausalLM" if args.model == "llama" else ""))
        print(f"cores: {n_cores()} (XLA:CPU uses them all); torch.set_num_threads({threads}); "
              f"{args.rounds} rounds x {args.steps} steps per variant; training FLOPs/token "
              f"{flops_tok / 1e6:.2f} M (lecture3.accounting, seq_len {cfg.data.seq_len})")
        # all workers start (import, init, compile) at once: their compile times overlap and are not
        # comparable, but startup stays short; then only one of them runs at any time
        workers = {name: start_worker(name, args, params_file, threads) for name in names}
        infos = {}
        for name in names:
            infos[name] = read_reply(workers[name], name)["ready"]
        print(f"  {len(names)} workers ready after {time.perf_counter() - t_start:.0f} s", flush=True)
        times = {n: [] for n in names}
        peaks = {"jax": [], "torch": []}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for name in order:
                workers[name].stdin.write("run\n")
                workers[name].stdin.flush()
                reply = read_reply(workers[name], name)
                times[name].append(reply["times"])
                if "peak" in reply:
                    peaks[name].append(reply["peak"])
            print(f"  round {r + 1}/{args.rounds}: jax {1e3 * np.median(times['jax'][-1]):.0f} ms, "
                  f"torch {1e3 * np.median(times['torch'][-1]):.0f} ms", flush=True)
        for w in workers.values():
            w.stdin.write("quit\n")
            w.stdin.flush()
            w.wait()
    report(names, times, peaks, infos, flops_tok, args.hlo, args.model)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


def describe(name: str, model: str) -> str:
    """The table's `what` column: on the llama comparison the torch rows are transformers' model."""
    v = VARIANTS[name]
    if model == "llama" and name == "jax":
        return "lecture3 make_train_step, as lecture3 runs it on a CPU (lecture3.runtime)"
    if model != "llama" or v.kind != "torch":
        return v.doc
    threads = f", torch.set_num_threads({v.threads})" if v.threads else ""
    return f"transformers LlamaForCausalLM, attn_implementation={'sdpa' if v.step == 'sdpa' else 'eager'}{threads}"


def report(names, times, peaks, infos, flops_tok: float, hlo: bool, model: str = "default") -> None:
    peak_jax, peak_torch = np.median(peaks["jax"]), np.median(peaks["torch"])
    peak = max(peak_jax, peak_torch)
    print(f"\nmatmul peak (1024x1024 f32, best of bursts, median over rounds): "
          f"jax {peak_jax / 1e9:.1f} GFLOP/s, "
          f"torch {peak_torch / 1e9:.1f} GFLOP/s -> MFU uses {peak / 1e9:.1f} GFLOP/s")
    per_round = {n: np.array([np.median(t) for t in times[n]]) for n in names}
    tokens = infos["jax"]["tokens"]
    header = (f"{'variant':<17}{'ms/step':>9}{'tokens/s':>10}{'MFU':>7}{'speed vs jax':>14}"
              f"{'speed vs torch':>16}   what")
    print("\n" + header + "\n" + "-" * len(header))
    for n in names:
        ms = 1e3 * np.median(np.concatenate(times[n]))
        tps = tokens / (ms / 1e3)
        vs_jax = np.median(per_round["jax"] / per_round[n])  # > 1: faster than the JAX default
        vs_torch = np.median(per_round["torch"] / per_round[n])
        print(f"{n:<17}{ms:>9.1f}{tps:>10.0f}{100 * tps * flops_tok / peak:>6.1f}%{vs_jax:>13.2f}x"
              f"{vs_torch:>15.2f}x   {describe(n, model)}")
    print("speed vs X = median over rounds of (X's round median / variant's round median); > 1 is faster.")
    print("\nas each JAX worker ran: the forward's batch parts; lecture3.runtime settings applied before its backend "
          "started; XLA_FLAGS")
    for n in names:
        if "runtime" in infos[n]:
            print(f"  {n:<17}{infos[n]['splits']:<3}{', '.join(infos[n]['runtime']) or 'none':<30}"
                  f"{infos[n]['xla_flags'] or '-'}")
    if hlo:
        print("\ncompiled step, entry computation: transposes = fusions that transpose/copy without a dot; "
              "->dot = those feeding a dot (scan: the layers are in a while body, not counted)")
        keys = list(next(i["hlo"] for i in infos.values() if "hlo" in i))
        print(f"{'variant':<17}" + "".join(f"{k:>13.13}" for k in keys))
        for n in names:
            if "hlo" in infos[n]:
                print(f"{n:<17}" + "".join(f"{infos[n]['hlo'][k]:>13}" for k in keys))


if __name__ == "__main__":
    main()

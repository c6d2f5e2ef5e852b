"""The variants of benchmarks/train_step_vs_torch.py: what each one changes, and the JAX step it sets up.

Variants only use public switches: config fields, make_train_step's options, XLA flags and runtime settings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

SEED = 0


@dataclass(frozen=True)
class Variant:
    doc: str
    kind: str = "jax"  # "jax" or "torch"
    xla_flags: str = ""  # appended to XLA_FLAGS of the worker (before the backend starts)
    model: dict = field(default_factory=dict)  # ModelConfig.replace(**model)
    step: str = "lecture3"  # jax: lecture3 (make_train_step) or lean; torch: math or sdpa
    precision: str | None = None  # jax_default_matmul_precision
    threads: int | None = None  # torch threads; None = the cores JAX uses
    devices: int = 1  # jax: XLA:CPU host devices, the batch split over them (a data-parallel mesh)
    # jax: which of lecture3.runtime's CPU settings the worker applies before its backend starts, as the
    # lecture3 CLI and lecture3.train do: the XLA flag and keeping host memory ("lecture3"), the flag only
    # ("flags"), or neither ("none": XLA's default flags and glibc's default malloc)
    runtime: str = "lecture3"
    splits: int | None = None  # jax: the forward's batch parts; None = what lecture3 picks (steps.batch_splits)


YNN = "--xla_cpu_experimental_ynn_fusion_type="
XNN_GREEDY = "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"


def flag_variant(flags: str, doc: str = "", **kw) -> Variant:
    """A JAX variant that adds XLA flags; its doc is `doc` followed by the flags."""
    return Variant(f"{doc}XLA_FLAGS={flags}", xla_flags=flags, **kw)


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
    "torch": Variant("same model, eager PyTorch, explicit masked softmax attention", kind="torch", step="math"),
    "torch_1t": Variant("eager PyTorch, torch.set_num_threads(1)", kind="torch", step="math", threads=1),
    "torch_sdpa": Variant("eager PyTorch with F.scaled_dot_product_attention(is_causal=True)", kind="torch",
                          step="sdpa"),
    "jax_ynn_dot": flag_variant(f"{YNN}dot"),
    "jax_ynn_eltwise": flag_variant(f"{YNN}dot,eltwise"),
    "jax_ynn_reduce": flag_variant(f"{YNN}dot,eltwise,reduce"),
    "jax_no_ynn": flag_variant(YNN, "no YNNPACK fusions (Eigen dots): "),
    "jax_xnn_greedy": flag_variant(XNN_GREEDY),
    "jax_bf16": Variant('cfg.dtype="bfloat16" (params float32)', model={"dtype": "bfloat16"}),
    "jax_scan": Variant("scan_layers=True", model={"scan_layers": True}),
    "jax_remat_full": Variant('remat="full"', model={"remat": "full"}),
    "jax_onednn": flag_variant("--xla_cpu_use_onednn=true"),
    "jax_vec512": flag_variant("--xla_cpu_prefer_vector_width=512"),
    "jax_eigen_1t": flag_variant("--xla_cpu_multi_thread_eigen=false"),
    "jax_prec_highest": Variant('jax_default_matmul_precision="highest"', precision="highest"),
    "jax_dp2": Variant("2 XLA:CPU host devices, the batch split over a data mesh of 2 (one per core)", devices=2),
    "jax_dp2_ynn": flag_variant(f"{YNN}dot,eltwise,reduce", "jax_dp2 + ", devices=2),
    "jax_dp2_eigen_1t": flag_variant("--xla_cpu_multi_thread_eigen=false", "jax_dp2 + ", devices=2),
    "jax_lean": Variant("same model + AdamW, no diagnostics (max logit, |log Z|, update ratio, finite guard)",
                        step="lean"),
}
DEFAULT_VARIANTS = ("jax", "torch", "torch_1t", "torch_sdpa", "jax_xla_defaults", "jax_glibc_malloc", "jax_one_pass",
                    "jax_bf16", "jax_scan", "jax_remat_full", "jax_onednn", "jax_vec512", "jax_eigen_1t", "jax_lean")
MODELS = ("default", "lecture3 Config()"), ("llama", "a small Llama vs transformers' LlamaForCausalLM")


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


def make_batch(vocab: int, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(SEED).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def apply_settings(v: Variant) -> dict[str, bool]:
    """What variant v sets in its worker's process before jax's backend starts: lecture3.runtime's CPU settings
    as it asks, and its matmul precision. Returns the runtime settings applied, by name."""
    from lecture3 import runtime

    applied = runtime.cpu_defaults(keep_memory=v.runtime == "lecture3") if v.runtime != "none" else {}
    if v.precision is not None:
        import jax

        jax.config.update("jax_default_matmul_precision", v.precision)
    return applied


def jax_setup(v: Variant, model: str = "default"):
    """(step, state, batch, (m, tc, seq_len, mesh, rules)) for variant v: the lecture3 state and a jitted,
    donating step."""
    import jax
    import jax.numpy as jnp

    from lecture3 import sharding, steps
    from lecture3.config import MeshConfig

    cfg = bench_config(model)
    m, tc = cfg.model.replace(**v.model), cfg.train
    mesh = sharding.make_mesh(MeshConfig(v.devices, 1, 1), jax.devices()[:v.devices])
    rules = sharding.axis_rules(m, mesh, tc.batch_size)
    _, shardings = steps.state_shardings(m, tc, mesh, rules)
    state = steps.init_state(m, tc, mesh, rules)
    step_fn = {"lecture3": functools.partial(steps.make_train_step, splits=batch_splits(v, m, tc, mesh)),
               "lean": lean_train_step}[v.step](m, tc)
    step = steps.jit_train_step(step_fn, mesh, rules, shardings)
    batch = {k: jnp.asarray(a) for k, a in make_batch(m.vocab_size, tc.batch_size, cfg.data.seq_len).items()}
    return step, state, batch, (m, tc, cfg.data.seq_len, mesh, rules)


def batch_splits(v: Variant, m, tc, mesh) -> int:
    """The forward's batch parts of variant v's step: lecture3's choice or the variant's (1 for the lean step,
    which takes the batch in one pass)."""
    from lecture3 import steps

    if v.step != "lecture3":
        return 1
    return steps.batch_splits(m, tc, mesh) if v.splits is None else v.splits


def lean_train_step(m, tc):
    """The same update as lecture3's step (loss, grads, clip + AdamW) without its diagnostic metrics."""
    import jax
    import optax

    from lecture3 import losses
    from lecture3.model import Transformer
    from lecture3.optim import make_optimizer

    model, ce, opt = Transformer(m), losses.cross_entropy(), make_optimizer(tc)

    def step(state, batch):
        def loss_fn(p):
            return ce(model.apply({"params": p}, batch["inputs"], capture=()).logits, batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}

    return step

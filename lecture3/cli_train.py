"""`lecture3 train`: `--preset FAMILY:SIZE --workdir DIR` plus a dotted flag for every config field."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from lecture3.config import Config, DistConfig, MeshConfig, ModelConfig, TrainConfig
from lecture3.data import DataConfig

SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("mesh", MeshConfig),
            ("dist", DistConfig))
DEFAULT_WORKDIR = "runs/default"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from lecture3 import presets
    from lecture3.flags import add_dataclass_flags

    choices = ", ".join(f"{f}:{{{','.join(presets.sizes(f))}}}" for f in presets.names())
    parser.add_argument("--preset", default=None, metavar="FAMILY:SIZE",
                        help=f"start from a named model config, then apply --model.* flags. One of: {choices}")
    run = Config()  # --help shows the values a run without the flag uses (config_from_args' base)
    for prefix, cls in SECTIONS:
        add_dataclass_flags(parser, prefix, cls, defaults=getattr(run, prefix))


def config_from_args(args: argparse.Namespace) -> Config:
    from lecture3.flags import UsageError, dataclass_from_args

    base = Config()
    model = base.model if args.preset is None else preset_model(args.preset)
    sections = {"model": model, "data": base.data, "train": base.train, "mesh": base.mesh, "dist": base.dist}
    built = {p: dataclass_from_args(args, p, cls, sections[p]) for p, cls in SECTIONS}
    try:
        return Config(**built)
    except ValueError as e:
        raise UsageError(str(e)) from None


def preset_model(text: str) -> ModelConfig:
    """The model of `--preset FAMILY:SIZE`; a family without its size is an error listing the sizes."""
    from lecture3 import presets
    from lecture3.flags import UsageError

    family, _, size = text.partition(":")
    try:
        if not size:
            raise ValueError("name a size: one of " + ", ".join(f"{family}:{s}" for s in presets.sizes(family)))
        return presets.get(family, size=size)
    except ValueError as e:
        raise UsageError(f"--preset {text!r}: {e}") from None


def header(cfg: Config, preset: str | None) -> str:
    """One line on what is about to train: the model (preset or custom, and the fields changed from it),
    the data and tokenizer, and the tokens per step and in all."""
    base = Config().model if preset is None else preset_model(preset)
    changed = [f"{f.name}={getattr(cfg.model, f.name)}" for f in dataclasses.fields(ModelConfig)
               if f.init and getattr(cfg.model, f.name) != getattr(base, f.name)]
    shown = ", ".join(changed[:4]) + (f", +{len(changed) - 4} more" if len(changed) > 4 else "")
    if preset is None:
        model = "custom" + (f" ({shown})" if changed else " (the default model, no --preset)")
    else:
        model = preset + (f" with {shown}" if changed else "")
    tc, per_step = cfg.train, cfg.train.batch_size * cfg.data.seq_len
    return (f"training: model {model}; data {cfg.data.source}, tokenizer {cfg.data.tokenizer}; "
            f"{tc.batch_size} rows x {cfg.data.seq_len} = {per_step:,} tokens per step x {tc.steps:,} steps "
            f"= {per_step * tc.steps:,} tokens")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"checkpoints, metrics.jsonl and TensorBoard events; the same command again "
                             f"resumes (default: {DEFAULT_WORKDIR})")
    add_config_flags(parser)


def _sample(cfg: Config, state, tokenizer, n: int) -> str | None:
    """`n` tokens sampled from the trained params, on process 0 (None elsewhere). Every process takes
    part in gathering the params, which another host may hold shards of."""
    import jax
    from jax.experimental import multihost_utils

    from lecture3.decoding import generate

    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() != 0:
        return None
    prompt = tokenizer.encode("def ")
    out = generate(cfg.model, params, [prompt], n, rng=jax.random.PRNGKey(0), temperature=0.8, top_k=40)
    return tokenizer.decode([int(t) for t in out[0]])


def _run_train(args: argparse.Namespace) -> int:
    from lecture3 import accounting, loop

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = config_from_args(args)
    loop.check_inputs(cfg, args.workdir)  # a bad path, glob or mesh is the first and only thing printed
    print(header(cfg, args.preset))
    print(accounting.summary(cfg.model, cfg.data.seq_len))
    out = loop.train(cfg, workdir=args.workdir)
    m = out.metrics
    if "val_loss" in m:
        print(f"step {m['step']}: validation loss {m['val_loss']:.4f} nats/token (perplexity "
              f"{m['val_ppl']:.2f}); unigram entropy of the validation tokens {out.unigram_entropy:.4f}")
    if cfg.train.sample_tokens > 0:
        text = _sample(cfg, out.state, out.tokenizer, cfg.train.sample_tokens)
        if text is not None:
            print("sample:\n" + text)
    return 0


def command():
    return ("train a model (the same command again resumes from the latest checkpoint)",
            _add_train_args, _run_train)


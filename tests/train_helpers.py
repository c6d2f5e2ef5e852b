"""Shared pieces of the training tests: a small real corpus and tiny configs."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from lecture3.config import Config, MeshConfig, ModelConfig, TrainConfig
from lecture3.data import DataConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_corpus(root: Path) -> Path:
    """~40 real Python files copied from the standard library: a small, offline, real corpus."""
    out = root / "corpus"
    if not out.exists():
        out.mkdir(parents=True)
        for pkg in ("json", "email", "logging", "http"):
            for f in sorted((STDLIB / pkg).glob("*.py"))[:10]:
                shutil.copy(f, out / f"{pkg}_{f.name}")
    return out


def tiny_config(root: Path, **train) -> Config:
    corpus = make_corpus(root)
    return Config(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
        data=DataConfig(source=f"files:{corpus}/*.py", data_dir=str(root / "cache"), seq_len=32,
                        val_fraction=0.25, val_sequences=8),
        train=TrainConfig(**{"steps": 6, "batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_every": 3,
                             "checkpoint_every": 3, "eval_batches": 1, "progress": False, "sample_tokens": 8,
                             **train}),
        mesh=MeshConfig(data=-1),
    )


def cli_flags(cfg: Config) -> list[str]:
    """The command-line flags that reproduce a tiny_config."""
    m, d, t = cfg.model, cfg.data, cfg.train
    return [
        "--model.d-model", str(m.d_model), "--model.n-layers", str(m.n_layers), "--model.n-heads",
        str(m.n_heads), "--model.n-kv-heads", str(m.n_kv_heads), "--model.max-seq-len", str(m.max_seq_len),
        "--data.source", d.source, "--data.data-dir", d.data_dir, "--data.seq-len", str(d.seq_len),
        "--data.val-fraction", str(d.val_fraction), "--data.val-sequences", str(d.val_sequences),
        "--train.steps", str(t.steps), "--train.batch-size", str(t.batch_size), "--train.warmup-steps",
        str(t.warmup_steps), "--train.log-every", str(t.log_every), "--train.eval-every", str(t.eval_every),
        "--train.checkpoint-every", str(t.checkpoint_every), "--train.eval-batches", str(t.eval_batches),
        "--train.progress", "false", "--train.sample-tokens", str(t.sample_tokens),
    ]

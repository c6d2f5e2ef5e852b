"""A catalogue of runs: every run record under a folder as one pandas row, to query across claims.

    from lecture3.experiment import runs_frame
    runs = runs_frame("experiments/results")                  # any folder: its records, recursively
    runs[runs["model.qk_norm"].notna()].groupby("train.lr")["final_val_loss"].mean()

A row holds the record's key, claim, measure, quick, scale; its tags (arm, lr, seed, ...) as columns of
their own; the config fields that differ from protocol v2's baseline (model S at the first LR and seed)
in any record of the frame, flattened as `model.qk_norm`, `train.lr`, `data.seq_len` (a field a record
lacks is None); the scalar results (`final_val_loss`, `final_loss`, `diverged`, `train_loss_tail`,
`probe.max_attn_logit`, ...; a result named like a tag or a record field is `result.NAME`); the curves
`loss_curve` and `val_curve` ({step: loss}); the machine (`machine.cpu`, ...) and numerical environment
(`environment.jax`, ...); and what produced it: `commit`, `lecture3.version`, `claim_file.sha256`,
`claim_file.git.commit`, `uncommitted`, `command`, `wall_s`, `finished`, and the record's `path`.
Records of any version read alike (protocol v1's in results-v1/<claim>/runs/ included).
"""

from __future__ import annotations

import json
from pathlib import Path

from lecture3.experiment import protocol, records

IDENTITY = ("key", "claim", "measure", "quick", "scale")
PROVENANCE = ("commit", "uncommitted", "allow_dirty", "command", "wall_s", "finished")
FLATTENED = ("machine", "environment", "lecture3", "claim_file")


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise records.RecordError("runs_frame needs pandas: pip install 'lecture3[pandas]'") from None
    return pd


def read_records(folder) -> list[tuple[Path, dict]]:
    """(path, record) of every run record under `folder`, recursively, in path order; other JSON files are
    skipped, a file that is not JSON is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise records.RecordError(f"{folder} is not a folder: pass the folder that holds the run records "
                                  "(e.g. experiments/results)")
    out = []
    for path in sorted(folder.rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise records.RecordError(f"{path} is not a valid run record ({e}); delete it and rerun the claim "
                                      "to redo that run") from None
        if isinstance(rec, dict) and {"key", "config", "result"} <= rec.keys():
            out.append((path, rec))
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted names; lists become tuples (hashable: a groupby key)."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def baseline_config() -> dict:
    """Protocol v2's baseline run as a record holds its config, flattened: what the config columns differ from."""
    cfg = protocol.config(protocol.model_s(), lr=protocol.LRS[0], seed=protocol.SEEDS[0])
    return flatten(json.loads(json.dumps(cfg.to_dict(), default=str)))


def _scalars(result: dict) -> dict:
    """The scalar results, nested dicts flattened (`probe.max_attn_logit`); lists (the history) left out."""
    flat = flatten({k: v for k, v in result.items() if k != "history"})
    return {k: v for k, v in flat.items() if v is None or isinstance(v, bool | int | float | str)}


def _curve(history: list, key: str) -> dict:
    return {r["step"]: r[key] for r in history if r.get(key) is not None and "step" in r}


def row(path: Path, rec: dict, config_fields: list[str]) -> dict:
    """One record as a row (see the module docstring)."""
    out = {k: rec.get(k) for k in IDENTITY}
    for k, v in (rec.get("tags") or {}).items():
        out[k if k not in out else f"tag.{k}"] = v
    config = flatten(rec.get("config") or {})
    out.update({f: config.get(f) for f in config_fields})
    result = rec.get("result") or {}
    for k, v in _scalars(result).items():
        out[k if k not in out else f"result.{k}"] = v
    history = result.get("history") or []
    out["loss_curve"], out["val_curve"] = _curve(history, "loss"), _curve(history, "val_loss")
    for section in FLATTENED:
        if isinstance(rec.get(section), dict):
            out.update(flatten(rec[section], f"{section}."))
    for k in PROVENANCE:
        out[k] = ", ".join(rec[k]) if k == "uncommitted" and isinstance(rec.get(k), list) else rec.get(k)
    out["path"] = str(path)
    return out


def changed_fields(configs: list[dict], baseline: dict) -> list[str]:
    """The flattened config fields whose value differs from `baseline` in at least one config (a field a
    config lacks is not a difference: fields added later have their old behaviour as default)."""
    seen: dict[str, None] = {}
    for cfg in configs:
        for k, v in cfg.items():
            if k not in baseline or v != baseline[k]:
                seen.setdefault(k)
    return list(seen)


def frame(items: list[tuple[Path, dict]]):
    """The rows of (path, record) pairs as a DataFrame (see the module docstring)."""
    pd = _pandas()
    configs = [flatten(rec.get("config") or {}) for _, rec in items]
    fields = changed_fields(configs, baseline_config())
    return pd.DataFrame([row(path, rec, fields) for path, rec in items])


def runs_frame(folder):
    """Every run record under `folder` (recursively) as one pandas row each: tags, the config fields that
    differ from protocol v2's baseline, final and per-step losses, machine, environment, commit."""
    return frame(read_records(folder))


def claim_frame(claim, scale: str = "cpu", quick: bool = False, root=None):
    """The records of a claim's grid (from the pool it shares with other claims), tagged as this claim tags
    them (a shared record holds the tags of the claim that ran it first)."""
    from lecture3.experiment import runner

    specs = runner.grid(claim, scale, quick, root)
    pool = runner.claim_pool(claim, quick, root)
    recs = runner.pooled(pool, specs)
    return frame([(pool / f"{s.key}.json", {**recs[s.key], "tags": s.tags}) for s in specs if s.key in recs])


def to_csv(df, out) -> None:
    """The frame as CSV; the curves ({step: loss}) as JSON objects."""
    df = df.copy()
    for col in ("loss_curve", "val_curve"):
        if col in df:
            df[col] = df[col].map(lambda c: json.dumps(c, sort_keys=True))
    df.to_csv(out, index=False)

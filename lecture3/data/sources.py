"""Text sources, chosen by `DataConfig.source`, all read as random-access tfds data sources.

- `stdlib`: the `.py` files of the standard library of the running interpreter (tens of MB).
- `files:GLOB`: the user's own text files.
- `tfds:NAME[:SPLIT]`: a dataset of the TensorFlow Datasets catalog prepared in array_record format.

The two local sources are built by `Lecture3Text` into `<cache>/datasets/<kind>-<fingerprint>/`. The
fingerprint hashes the files' relative paths, sizes and mtimes, the held-out fraction and the
builder version, so a built dataset is reused until one of its inputs changes. Building happens in a
hidden temporary folder that is renamed into place only when complete, so an error or an interrupt
never leaves a half-built dataset behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lecture3.data.config import DataConfig, DataError, build_atomically
from lecture3.data.text_builder import Lecture3Text

# Bump when the built dataset's layout or the split rule changes: it invalidates every cache entry.
BUILD_VERSION = 1
_BUILDER_SUBDIR = os.path.join(Lecture3Text.name, str(Lecture3Text.VERSION))
# A tfds name may carry a version (`c4/en:3.0.1`); the split follows after one more colon.
_TFDS_SOURCE = re.compile(r"(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?")
_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__"}

Files = list[tuple[str, str]]  # (relative posix path, absolute path), sorted by relative path


def parse_source(source: str) -> tuple[str, str | None, str | None]:
    """Splits `source` into (kind, argument, split): ("stdlib", None, None), ("files", GLOB, None), ...."""
    if source == "stdlib":
        return "stdlib", None, None
    kind, _, rest = source.partition(":")
    if kind == "files":
        return "files", rest, None
    match = _TFDS_SOURCE.fullmatch(rest)
    if kind != "tfds" or match is None:
        raise DataError(f"unknown data source {source!r}; use stdlib, files:GLOB or tfds:NAME[:SPLIT]")
    return "tfds", match["name"], match["split"] or "train"


def stdlib_files() -> tuple[str, Files]:
    """The standard library's `.py` files (without site-packages) and the folder they are relative to."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        files += [(os.path.join(folder, n)) for n in names if n.endswith(".py")]
    return root, sorted((os.path.relpath(p, root).replace(os.sep, "/"), p) for p in files)


def glob_files(pattern: str) -> tuple[str, Files]:
    """The files matching `pattern` (`**` recurses) and the common folder they are relative to."""
    expanded = os.path.expanduser(pattern)
    if not glob.has_magic(expanded) and not os.path.exists(expanded):
        raise DataError(f"data source path {pattern!r} does not exist; fix the path in --data.source")
    paths = [os.path.abspath(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"glob {pattern!r} matches no files; check the pattern in --data.source files:GLOB")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return root, sorted((os.path.relpath(p, root).replace(os.sep, "/"), p) for p in paths)


def split_fraction(rel: str) -> float:
    """A stable number in [0, 1) from a relative path: the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big") / 2.0**64


def split_files(files: Files, val_fraction: float) -> dict[str, Files]:
    """Assigns each file to train or validation by the hash of its relative path.

    With two documents or more, each split gets at least one (the lowest hash goes to validation),
    so that small corpora still have a held-out set; the choice still depends only on the paths.
    """
    ranked = sorted(files, key=lambda f: split_fraction(f[0]))
    n_val = sum(split_fraction(rel) < val_fraction for rel, _ in files)
    if len(files) >= 2:
        n_val = min(max(n_val, 1), len(files) - 1)
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return {"train": train, "validation": val} if val else {"train": train}


def _fingerprint(kind: str, root: str, files: Files, val_fraction: float) -> str:
    stats = [(rel, st.st_size, st.st_mtime_ns) for rel, p in files for st in [os.stat(p)]]
    payload = json.dumps([BUILD_VERSION, kind, root, sys.version, val_fraction, stats])
    return hashlib.sha256(payload.encode()).hexdigest()


def build_local(cfg: DataConfig, kind: str, root: str, files: Files, *, progress: bool = False) -> str:
    """Builds (or reuses) the `lecture3_text` dataset of `files`; returns its tfds builder folder."""
    files = [(rel, p) for rel, p in files if os.path.getsize(p) > 0]
    if not files:
        raise DataError(f"the corpus of data source {cfg.source!r} is empty: every file it matched is empty; "
                        "point --data.source at files with text")
    fingerprint = _fingerprint(kind, root, files, cfg.val_fraction)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-" if kind == "stdlib" else ""
    datasets = os.path.join(cfg.cache_dir, "datasets")
    final = os.path.join(datasets, f"{kind}-{tag}{fingerprint[:16]}")
    if not os.path.isdir(final):
        with build_atomically(final, prefix=f".tmp-{kind}-") as tmp:
            tfds.display_progress_bar(False)  # its bars name the temporary folder's shards
            builder = Lecture3Text(documents=split_files(files, cfg.val_fraction), data_dir=tmp,
                                   file_format="array_record")
            # tfds prints "Downloading and preparing dataset ..." to stdout: nothing is downloaded here (and
            # stdout is the caller's), so its notes are dropped and one line says what happens.
            if progress:
                print(f"building the corpus of {cfg.source} from {len(files):,} local files (nothing is "
                      f"downloaded) into {final}", file=sys.stderr)
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(file_format="array_record")
            shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
    return os.path.join(final, _BUILDER_SUBDIR)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared text dataset: its train and validation splits, read as random-access sources."""

    description: str  # the source as the user named it
    fingerprint: str  # changes whenever the documents may have changed; keys the BPE cache
    builder: Any  # the tfds builder that reads it
    splits: dict[str, str | None]  # "train" / "validation" -> tfds split name (None: no such split)
    text_feature: str  # the string feature that holds each document's text
    local: bool  # built by lecture3 from local files
    num_bytes: int  # stored size of its splits, to decide whether tokenizing it once is affordable

    def require(self, role: str) -> None:
        """Raises `DataError` if the corpus has no `role` ("train" or "validation") split."""
        if self.splits[role] is None:
            fix = ("add documents (two files at least) or raise --data.val-fraction" if self.local
                   else "name a held-out split with --data.tfds-val-split")
            raise DataError(f"data source {self.description!r} has no {role} documents; {fix}")

    def source(self, role: str) -> Sequence[dict]:
        """The random-access tfds data source of `role`."""
        self.require(role)
        return self.builder.as_data_source(split=self.splits[role])

    def records(self, role: str, limit: int | None = None, chunk: int = 256) -> Iterator[dict]:
        """The records of `role` in their stored order, the first `limit` of them if given."""
        src = self.source(role)
        n = len(src) if limit is None else min(limit, len(src))
        for start in range(0, n, chunk):
            yield from src.__getitems__(list(range(start, min(start + chunk, n))))

    def texts(self, role: str, limit: int | None = None) -> Iterator[str]:
        """The documents of `role` as text, in their stored order."""
        for record in self.records(role, limit):
            yield text_of(record[self.text_feature])


def text_of(value: bytes | str) -> str:
    """A tfds text value as `str` (tfds returns bytes); invalid UTF-8 becomes U+FFFD."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _text_feature(name: str, features) -> str:
    texts = [k for k, f in features.items() if getattr(f, "shape", None) == () and f.np_dtype == np.object_]
    if not texts:
        raise DataError(f"tfds dataset {name!r} has no text feature (it has {sorted(features)}); "
                        "use a text dataset such as lm1b, c4 or tiny_shakespeare")
    return "text" if "text" in texts else texts[0]


def _open_tfds(cfg: DataConfig, name: str, split: str) -> Corpus:
    data_dir = os.path.expanduser(
        cfg.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    if not os.path.isdir(data_dir):
        raise DataError(f"tfds data dir {data_dir!r} does not exist; pass --data.tfds-data-dir DIR, the "
                        "folder where the dataset was prepared")
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown tfds dataset {name!r}: it is neither in the tfds catalog nor in "
                        f"{data_dir!r}; check the name (tfds:NAME[:SPLIT])") from None
    if not builder.is_prepared():
        raise DataError(f"tfds dataset {name!r} is not prepared in {data_dir!r}; prepare it there with "
                        f"`tfds build {name} --data_dir {data_dir} --file_format array_record`")
    if str(builder.info.file_format).rsplit(".", 1)[-1].lower() not in ("array_record", "parquet"):
        raise DataError(f"tfds dataset {name!r} in {data_dir!r} is stored as {builder.info.file_format}, "
                        "which has no random access; rebuild it with --file_format array_record")
    available = set(builder.info.splits)
    base = split.split("[")[0].split("+")[0]
    if base not in available:
        raise DataError(f"tfds dataset {name!r} has no split {split!r}; it has {sorted(available)}")
    held_out = [s for s in ("validation", "test") if s in available and s != base]
    val = cfg.tfds_val_split or (held_out[0] if held_out else None)
    if val is not None and val.split("[")[0] not in available:
        raise DataError(f"tfds dataset {name!r} has no split {val!r} for --data.tfds-val-split; "
                        f"it has {sorted(available)}")
    info = builder.info
    fingerprint = hashlib.sha256(json.dumps(
        [name, split, val, str(info.version), os.path.abspath(data_dir),
         {s: info.splits[s].num_examples for s in sorted(available)}]).encode()).hexdigest()
    num_bytes = sum(info.splits[s.split("[")[0]].num_bytes for s in (split, val) if s is not None)
    return Corpus(f"tfds:{name}:{split}", fingerprint[:32], builder, {"train": split, "validation": val},
                  _text_feature(name, info.features), local=False, num_bytes=num_bytes)


def open_corpus(cfg: DataConfig, *, progress: bool = False) -> Corpus:
    """Opens `cfg.source`, building a local source first if its inputs changed since the last build."""
    kind, arg, split = parse_source(cfg.source)
    if kind == "tfds":
        return _open_tfds(cfg, arg, split)
    root, files = stdlib_files() if kind == "stdlib" else glob_files(arg)
    path = build_local(cfg, kind, root, files, progress=progress)
    builder = tfds.builder_from_directory(path)
    splits = {role: role if role in builder.info.splits else None for role in ("train", "validation")}
    fingerprint = os.path.basename(os.path.dirname(os.path.dirname(path)))
    num_bytes = sum(s.num_bytes for s in builder.info.splits.values())
    return Corpus(cfg.source, fingerprint, builder, splits, "text", local=True, num_bytes=num_bytes)

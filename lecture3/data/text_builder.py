"""The tfds builder that turns local text files into a `lecture3_text` dataset of array_record files.

The local sources (`stdlib`, `files:GLOB`) go through it so that they are read exactly like a
prepared tfds catalog dataset: `tfds.builder_from_directory(...).as_data_source(split)`, no TensorFlow.
It lives in a package module because tfds derives the dataset's metadata from the builder's file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

# U+FFFD as UTF-8: present in the raw bytes it is real text, not a replacement we made.
_REPLACEMENT_BYTES = "\ufffd".encode()


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decodes UTF-8, replacing invalid sequences with U+FFFD; returns the text and how many it replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)


class Lecture3Text(tfds.core.GeneratorBasedBuilder):
    """Text documents, one per file, with their relative path and the count of invalid UTF-8 replaced."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text files as documents: text, path, replaced."}

    def __init__(self, *, documents: Mapping[str, Sequence[tuple[str, str]]] | None = None, **kwargs):
        """`documents` maps a split to its (relative path, absolute path) pairs; None only to read."""
        self._documents = documents
        super().__init__(**kwargs)

    # tfds finds the builder's file through `importlib_resources`, which is not installed; this is
    # the same answer without it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Local text files, one document each, built by lecture3.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text(), "replaced": np.int32}
            ),
        )

    def _split_generators(self, dl_manager):
        if self._documents is None:
            raise RuntimeError("Lecture3Text was built without `documents`")
        return {split: self._generate_examples(files) for split, files in self._documents.items()}

    def _generate_examples(self, files: Sequence[tuple[str, str]]):
        for rel, path in files:
            with open(path, "rb") as f:
                text, replaced = decode_utf8(f.read())
            yield rel, {"text": text, "path": rel, "replaced": replaced}

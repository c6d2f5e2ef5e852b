"""lecture3.hf's errors, and its optional dependencies (transformers, safetensors: the `hf` extra)."""

from __future__ import annotations

import importlib
import types

from lecture3.errors import Lecture3Error

EXTRA = "pip install 'lecture3[hf]'"


class HFError(Lecture3Error):
    """A checkpoint or config that lecture3.hf cannot read or write, with the field and the reason."""


class MissingFileError(HFError, FileNotFoundError):
    """A checkpoint directory without the file it needs (a FileNotFoundError too)."""


class MissingExtraError(HFError, ModuleNotFoundError):
    """transformers or safetensors is not installed (a ModuleNotFoundError too, for `except ImportError`)."""


def require(module: str) -> types.ModuleType:
    """`import module` for lecture3.hf, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but something it imports is broken: keep that traceback
        raise MissingExtraError(f"lecture3.hf needs transformers and safetensors ({e.name} is not installed): "
                                f"{EXTRA}") from None

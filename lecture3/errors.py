"""The project's own error type: bad input or a run that cannot go on, reported as one line by the CLI.

Every error that lecture3 raises on purpose derives from `Lecture3Error` (a `ValueError`, so callers
that catch `ValueError` keep working). The CLI prints these as `error: ...` and exits 2 (or 1 for a
failed run); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class Lecture3Error(ValueError):
    """Base class of lecture3's own errors: the message says what is wrong and how to fix it."""

"""The kit's refusals: a state the user can fix, reported by the command line as one line, no traceback.

Every error that names a file, a product or a parameter the user can act on derives from `CdkitError`
(alone, or beside the built-in class that callers already catch, e.g. `class StoreError(CdkitError,
ValueError)`). The command line turns each into `ERROR: <message>` and exit status 1; anything else is
a bug and keeps its traceback. A message never prints an unbounded value: `shorten` cuts it."""
from __future__ import annotations


class CdkitError(Exception):
    "A refusal the user can act on: its message names the file, product or parameter"


def shorten(value, limit: int = 80) -> str:
    "repr(value), cut to `limit` characters (a message never prints an unbounded value)"
    try:
        text = repr(value)
    except Exception:  # a value whose repr itself fails or recurses
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"

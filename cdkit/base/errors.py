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


class FileFormatError(CdkitError, ValueError):
    "A file the kit reads back that does not parse (truncated, overwritten, not the kit's): names the file"


def read_json(path):
    """The JSON value in the file `path` (results.json, model.json, split.json, fusion.json, manifests).

    A file that is truncated, not UTF-8 or not JSON raises FileFormatError naming it; a missing file
    raises FileNotFoundError as `open` does (callers decide whether absence is an error)."""
    import json
    from pathlib import Path
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a UTF-8 JSON file; it was damaged or overwritten: restore it or "
                              "rerun the step that writes it") from None
    except (json.JSONDecodeError, RecursionError) as e:
        what = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise FileFormatError(f"{path}: not valid JSON ({what}); it was truncated or damaged: restore it or rerun "
                              "the step that writes it") from None


def read_parquet(path, **kw):
    """pandas.read_parquet of the file `path` (indices, splits, product predictions, picture tables).

    A file that is truncated or not Parquet raises FileFormatError naming it; a missing or unreadable
    file raises the OSError that names it."""
    import pandas as pd
    try:
        return pd.read_parquet(path, **kw)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its ArrowIOError an OSError
        raise FileFormatError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]}); it was "
                              "truncated or damaged: rerun the step that writes it") from None

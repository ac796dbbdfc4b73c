"""Kaggle submission files: build in sample_submission order, validate, write atomically, submit.

The competition expects ``_id,category_id`` with one row per test product; we require the exact
order of sample_submission.csv, and one canonical text form (ASCII, ``\n`` line ends, plain decimal
integers), so that a file that validates here is the file Kaggle scores.
"""
from __future__ import annotations

import base64
import codecs
import contextlib
import gzip
import io
import json
import logging
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from cdkit.base.errors import CdkitError


COMPETITION = "cdiscount-image-classification-challenge"
COLUMNS = ["_id", "category_id"]


class SubmissionError(CdkitError):
    "A submission that Kaggle would reject or score wrongly; the message names the problem"


MAX_DIGITS = 18  # every value of a canonical file fits int64 (the competition's ids have 8 digits, categories 10)
_CANONICAL = re.compile(rf"0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}}")
HEADER = ",".join(COLUMNS)


def _examples(values, n=5): return ", ".join(str(v) for v in list(values)[:n])


def _as_int64(values, name, where=""):
    """int64 array of `values` (ints, integral floats, canonical decimal strings); SubmissionError
    naming the first rows and values otherwise (NaN, inf, fractions, '+1', '01', too many digits)"""
    a = values.to_numpy() if isinstance(values, (pd.Series, pd.Index)) else np.asarray(values)
    a = a.reshape(-1)
    if a.dtype.kind == "i":
        return a.astype(np.int64)
    if a.dtype.kind == "u":
        ok = a <= np.iinfo(np.int64).max
    elif a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(a) & (np.abs(a) < 2.0 ** 53)
            ok[ok] = a[ok] == np.floor(a[ok])
    elif a.dtype.kind == "b":
        ok = np.zeros(len(a), bool)
    else:
        text = _ascii(a)
        if text is not None:  # all strings: checked and parsed vectorized
            ok = _canonical(text)
            if ok.all(): return text.astype(np.int64)
        else:
            ok = np.fromiter((_is_int_like(v) for v in a), bool, len(a))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise SubmissionError(f"{len(bad)} non-integer {name} values{where} (expected decimal integers of 1 to "
                              f"{MAX_DIGITS} digits, no sign, point, leading zero or spaces), e.g. "
                              + ", ".join(f"row {r}: {_shown(a[r])}" for r in bad[:5]))
    if a.dtype.kind in "uf":
        return a.astype(np.int64)
    return np.array([int(v) for v in a], np.int64)


def _shown(v):
    "A value as it would read in a file: numpy scalars as plain Python values, strings quoted"
    v = v.item() if isinstance(v, np.generic) else v
    return repr(v.decode(errors="replace") if isinstance(v, bytes) else v)


def _ascii(a):
    "`a` as a bytes array when every element is an ASCII str (or bytes) without NUL, else None"
    if not all(isinstance(v, (str, bytes)) for v in a): return None
    try:
        items = [v.encode("ascii") if isinstance(v, str) else v for v in a]
    except UnicodeEncodeError:
        return None
    if any(b"\x00" in v for v in items): return None  # a bytes array would drop a trailing NUL
    return np.array(items, dtype=bytes) if items else np.zeros(0, "S1")


_STRINGS = getattr(np, "strings", np.char)  # numpy >= 2: the vectorized string functions; np.char before


def _canonical(text):
    "Which elements of a bytes array are decimal integers of 1 to MAX_DIGITS digits without sign or leading zero"
    n = _STRINGS.str_len(text)
    return (_STRINGS.isdigit(text) & (n >= 1) & (n <= MAX_DIGITS)
            & ~((n > 1) & _STRINGS.startswith(text, b"0")))


def _split_pair(lines):
    "Text before and after the first comma of each element of a bytes array"
    if hasattr(np, "strings"):
        first, _, second = np.strings.partition(lines, b",")
        return first, second
    parts = np.char.partition(lines, b",").reshape(len(lines), 3)
    return parts[:, 0], parts[:, 2]


def _is_int_like(v):
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return -2**63 <= int(v) < 2**63
    if isinstance(v, (float, np.floating)):
        return math.isfinite(v) and v == math.floor(v) and abs(v) < 2.0 ** 53
    return isinstance(v, str) and _CANONICAL.fullmatch(v) is not None


def _ids(sample_submission):
    if isinstance(sample_submission, pd.DataFrame): return _as_int64(sample_submission["_id"], "_id", " of the sample submission")
    try:
        ids = pd.read_csv(sample_submission, usecols=["_id"])["_id"]
    except (OSError, ValueError) as e:
        raise SubmissionError(f"cannot read {sample_submission}: {e}") from None
    return _as_int64(ids, "_id", f" in {sample_submission}")


def make_submission(product_ids, category_ids, sample_submission_path):
    "DataFrame _id,category_id in sample_submission order; error naming products without a prediction"
    pred = pd.Series(_as_int64(category_ids, "category_id"), index=pd.Index(_as_int64(product_ids, "_id")))
    if pred.index.has_duplicates:
        raise SubmissionError(f"product ids predicted twice: {_examples(pred.index[pred.index.duplicated()].unique())}")
    ids = _ids(sample_submission_path)
    missing = ~np.isin(ids, pred.index.to_numpy())
    if missing.any():
        raise SubmissionError(f"{missing.sum()} products of the sample submission have no prediction, "
                              f"e.g. {_examples(ids[missing])} (use fill_missing)")
    return pd.DataFrame({"_id": ids, "category_id": pred.loc[ids].to_numpy()})


def fill_missing(pred, sample_ids, fallback_category):
    """Add a `fallback_category` prediction (e.g. the most frequent train category) for every id of
    `sample_ids` missing from `pred` (a Series category_id indexed by product id, or a DataFrame
    _id,category_id). Returns (filled Series, number filled)."""
    if isinstance(pred, pd.DataFrame): pred = pred.set_index("_id")["category_id"]
    pred = pd.Series(_as_int64(pred, "category_id"), index=pd.Index(_as_int64(pred.index, "_id")))
    sample_ids = _as_int64(sample_ids, "_id", " of the sample")
    fallback = _as_int64([fallback_category], "fallback category")[0]
    missing = sample_ids[~np.isin(sample_ids, pred.index.to_numpy())]
    if not len(missing): return pred, 0
    extra = pd.Series(np.full(len(missing), fallback, np.int64), index=pd.Index(missing))
    return pd.concat([pred, extra]), len(missing)


MAX_MISSING = 0.001  # share of the test products a submission may fill without a prediction (0.1 %)


class CoverageError(CdkitError, ValueError):
    "Product predictions that do not cover the test set they are submitted for"


def check_coverage(product_ids, expected_ids, source, max_missing=MAX_MISSING, expected_from="the sample submission"):
    """Refuse predictions (`product_ids`, read from `source`) that leave more than `max_missing` of
    `expected_ids` without a prediction: products of another test set (the same catalog, other ids)
    would otherwise all be filled with one category. Returns the number of expected ids not covered."""
    pred = np.unique(_as_int64(product_ids, "_id", f" in {source}"))
    expected = np.unique(_as_int64(expected_ids, "_id", f" of {expected_from}"))
    missing = np.setdiff1d(expected, pred, assume_unique=True)
    share = len(missing) / max(len(expected), 1)
    if share > max_missing:
        extra = np.setdiff1d(pred, expected, assume_unique=True)
        raise CoverageError(
            f"{source} has no prediction for {len(missing):,} of the {len(expected):,} products of {expected_from} "
            f"({share:.2%}, more than max_missing={max_missing:g}), e.g. ids {_examples(missing)}"
            + (f"; it predicts {len(extra):,} ids that {expected_from} does not hold, e.g. {_examples(extra)}"
               if len(extra) else "")
            + ": were these products made for another test set? Run steps 02-08 on this data")
    return len(missing)


def read_canonical(path):
    """The DataFrame (int64 columns) of a submission file (.csv or .csv.gz) written in the one form this
    kit writes and Kaggle reads unambiguously: ASCII, header `_id,category_id`, `\\n` line ends (no
    BOM, no CR), each row two decimal integers without sign, point, quotes, spaces or leading zeros.
    SubmissionError naming the line and its text otherwise."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise SubmissionError(f"cannot read {path}: {e}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raise SubmissionError(f"{path} starts with a byte order mark (BOM); write it with write_submission")
    first = raw.split(b"\n", 1)[0]
    if first.rstrip(b"\r") != HEADER.encode():
        raise SubmissionError(f"header must be {HEADER}, got {first.decode(errors='replace')[:80]!r}")
    cr = raw.find(b"\r")
    if cr >= 0:
        line = raw.count(b"\n", 0, cr) + 1
        raise SubmissionError(f"{path}: line {line} ends with a carriage return (CRLF line ends); "
                              "write it with write_submission")
    body = raw[len(HEADER) + 1:]
    if raw != HEADER.encode() and not raw.endswith(b"\n"):
        raise SubmissionError(f"{path}: the last line has no line end")
    lines = np.array(body.split(b"\n")[:-1], dtype=bytes) if body else np.zeros(0, "S1")
    first, second = _split_pair(lines)
    ok = (_STRINGS.count(lines, b",") == 1) & _canonical(first) & _canonical(second)
    if b"\x00" in body or not ok.all():  # NUL: a bytes array would drop it at a line's end
        row = int(np.flatnonzero(~ok)[0]) if not ok.all() else body[:body.index(b"\x00")].count(b"\n")
        line = body.split(b"\n")[row].decode(errors="replace")
        raise SubmissionError(f"{path}: row {row} (line {row + 2}: {line[:80]!r}) is not two decimal integers of 1 to "
                              f"{MAX_DIGITS} digits without sign, point, quotes, spaces or leading zeros")
    return pd.DataFrame({"_id": first.astype(np.int64), "category_id": second.astype(np.int64)})


def validate_submission(df_or_path, sample_submission_path, known_category_ids):
    """Raise SubmissionError naming the first problem found; returns the submission as a DataFrame with
    int64 columns. A file must be canonical (see `read_canonical`); a DataFrame may hold ints,
    integral floats or canonical decimal strings."""
    if isinstance(df_or_path, pd.DataFrame):
        df = df_or_path
        if list(df.columns) != COLUMNS: raise SubmissionError(f"header must be {HEADER}, got {','.join(map(str, df.columns))}")
        df = pd.DataFrame({col: _as_int64(df[col], col) for col in COLUMNS})
    else:
        df = read_canonical(df_or_path)
    got, cat = df["_id"].to_numpy(), df["category_id"].to_numpy()
    want = _ids(sample_submission_path)
    u, c = np.unique(got, return_counts=True)
    if (c > 1).any(): raise SubmissionError(f"{(c > 1).sum()} duplicate _id values, e.g. {_examples(u[c > 1])}")
    if not np.array_equal(got, want):  # the set differences only say what is wrong
        missing = np.setdiff1d(want, got, assume_unique=True)
        if len(missing): raise SubmissionError(f"{len(missing)} _id values of the sample submission are missing, e.g. {_examples(missing)}")
        extra = np.setdiff1d(got, want, assume_unique=True)
        if len(extra): raise SubmissionError(f"{len(extra)} _id values are not in the sample submission, e.g. {_examples(extra)}")
        first = int(np.flatnonzero(got != want)[0])
        raise SubmissionError(f"rows are not in sample submission order (first difference at row {first}: "
                              f"_id {got[first]} instead of {want[first]}); build it with make_submission")
    unknown = np.setdiff1d(np.unique(cat), _as_int64(known_category_ids, "known category_id"))
    if len(unknown): raise SubmissionError(f"{len(unknown)} unknown category_id values, e.g. {_examples(unknown)}")
    return df


def write_submission(df, path, sample_submission_path, known_category_ids):
    """Validate, then write `path` (.csv.gz) atomically in the canonical form (see `read_canonical`)
    of the validated values; nothing is written when validation fails"""
    from cdkit.base.io import atomic_write
    canonical = validate_submission(df, sample_submission_path, known_category_ids)
    gz = "gzip" if str(path).endswith(".gz") else None
    # the compression is named, not inferred: the temporary file's name does not end in .gz
    return atomic_write(path, lambda tmp: canonical.to_csv(tmp, index=False, compression=gz, lineterminator="\n"))


CREDENTIAL_SOURCES = "KAGGLE_USERNAME/KAGGLE_KEY, KAGGLE_API_TOKEN, ~/.kaggle/kaggle.json, ~/.kaggle/access_token"
_VERBOSE_VARS = ("VERBOSE", "VERBOSE_OUTPUT")  # make the kaggle library log every request with its headers
_LOGGERS = ("", "kaggle", "kagglesdk", "urllib3", "requests", "http.client")
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization)(['\"]?\s*[:=]\s*['\"]?)(?:(?:basic|bearer|token)\s+)?[^\s'\",}]+")


def _kaggle_dir():
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _has_credentials():
    d = _kaggle_dir()
    return bool((os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")) or os.environ.get("KAGGLE_API_TOKEN")
                or any((p / name).is_file() for p in {d, Path.home() / ".kaggle"}
                       for name in ("kaggle.json", "access_token", "access_token.txt", "credentials.json")))


def _secrets():
    "Every credential value the kaggle library may put in a message, and the base64 forms of user:key"
    d = _kaggle_dir()
    conf = _read_json(d / "kaggle.json")
    keys = [os.environ.get("KAGGLE_KEY"), conf.get("key")]
    token = os.environ.get("KAGGLE_API_TOKEN")
    if token and Path(token).is_file():
        token = Path(token).read_text().strip()
    keys += [token] + [(p / name).read_text().strip() for p in {d, Path.home() / ".kaggle"}
                       for name in ("access_token", "access_token.txt") if (p / name).is_file()]
    for f in (d / "credentials.json", Path.home() / ".kaggle" / "credentials.json"):
        keys += [v for v in _read_json(f).values() if isinstance(v, str)]
    keys = [k for k in keys if isinstance(k, str) and len(k) >= 6]
    users = {u for u in (os.environ.get("KAGGLE_USERNAME"), conf.get("username")) if u}
    encoded = [base64.b64encode(f"{u}:{k}".encode()).decode() for u in users for k in keys]
    return sorted(set(keys + encoded), key=len, reverse=True)


def scrub(text, secrets=None):
    "`text` with credential values and Authorization headers replaced by ***"
    text = str(text)
    for s in _secrets() if secrets is None else secrets:
        text = text.replace(s, "***")
    return _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


@contextlib.contextmanager
def _quiet_kaggle():
    "No request logging from the kaggle library (VERBOSE, debug loggers, http.client); its prints captured"
    import http.client
    env = {k: os.environ.pop(k) for k in _VERBOSE_VARS if k in os.environ}
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    debuglevel = http.client.HTTPConnection.debuglevel
    for lg in loggers: lg.setLevel(max(lg.level, logging.WARNING))
    http.client.HTTPConnection.debuglevel = 0
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        os.environ.update(env)
        for lg, level in zip(loggers, levels): lg.setLevel(level)
        http.client.HTTPConnection.debuglevel = debuglevel


def _short_reason(e):
    "The most telling short line of an exception chain (an OS error's text when there is one)"
    texts, cur = [], e
    while cur is not None and len(texts) < 10:
        texts.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    for t in texts:
        m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", t)
        if m: return m.group(0).strip()
    return (texts[0].strip().splitlines() or [type(e).__name__])[0][:200]


def _is_network_error(e):
    names = {c.__name__ for c in type(e).__mro__}
    if "HTTPError" in names and getattr(getattr(e, "response", None), "status_code", None) is not None:
        return False  # Kaggle answered
    return bool(names & {"ConnectionError", "Timeout", "ProxyError", "MaxRetryError", "NewConnectionError",
                         "gaierror", "TimeoutError", "SSLError"}) or isinstance(e, OSError)


def kaggle_submit(path, message, api=None, dry_run=False, competition=COMPETITION, *, sample_submission_path,
                  known_category_ids):
    """Validate the file at `path` (it must be canonical, byte for byte), then submit it with the
    Kaggle API (unless dry_run).

    `api` defaults to `kaggle.api`, imported here only: importing kaggle authenticates (from
    KAGGLE_USERNAME/KAGGLE_KEY, KAGGLE_API_TOKEN, ~/.kaggle/kaggle.json or ~/.kaggle/access_token) and
    prints a banner. The library's request logging is silenced (VERBOSE unset for the call, its
    loggers at WARNING), what it prints is captured and passed on with credentials scrubbed. Every
    failure is a one-line SubmissionError: no credentials, "cannot reach Kaggle: <reason>", or Kaggle's
    refusal. Returns the API's response (None on dry_run)."""
    path = Path(path)
    if not path.exists(): raise SubmissionError(f"no submission file at {path}")
    validate_submission(path, sample_submission_path, known_category_ids)
    if dry_run: return None
    if api is None and not _has_credentials():
        raise SubmissionError(f"no Kaggle credentials found (looked in: {CREDENTIAL_SOURCES})")
    secrets = _secrets()
    with _quiet_kaggle() as printed:
        try:
            if api is None:
                import kaggle
                api = kaggle.api
            if isinstance(getattr(api, "args", None), list):  # imported earlier with VERBOSE set
                api.args = [a for a in api.args if a not in ("--verbose", "-v")]
            res = api.competition_submit(str(path), message, competition)
            failure = None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the library's errors, and its exit(1) without credentials
            failure = e
    said = scrub(printed.getvalue(), secrets).strip()
    if failure is None:
        if said: print(said)
        return res
    reason = scrub(_short_reason(failure), secrets)
    if _is_network_error(failure):
        raise SubmissionError(f"cannot reach Kaggle: {reason}") from None
    raise SubmissionError(f"Kaggle refused the submission of {path.name}: {reason}") from None


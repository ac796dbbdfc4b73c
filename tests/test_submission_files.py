"""Submission files and the Kaggle hand-off: only canonical files validate, values are converted safely and
written canonically, credentials are never printed, errors are one line (cdkit.submit)."""
import base64
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pytest


ROOT = Path(__file__).resolve().parents[1]


def run_python(code, env=None, check=False):
    "Run `code` in a fresh interpreter at the repository root; (returncode, stdout + stderr)"
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    if check: assert p.returncode == 0, p.stdout + p.stderr
    return p.returncode, p.stdout + p.stderr


def encode(doc):
    return bytearray(bson.encode(doc))


# --- submissions: one canonical form ---------------------------------------------------------------

KNOWN = [1000010653, 1000010667]


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text("_id,category_id\n10,1000010653\n14,1000010653\n")
    return path


@pytest.mark.parametrize("text, message", [
    ("_id,category_id\n10,1000010653\n1234567890123456789012345,1000010653\n", "row 1 \\(line 3: '1234567890123456789012345"),
    ("_id,category_id\n10,1000052209.0\n14,1000010653\n", "row 0 \\(line 2: '10,1000052209.0'"),
    ("_id,category_id\n+10,1000010653\n14,1000010653\n", "row 0 \\(line 2: '\\+10,"),
    ("_id,category_id\n10,1000010653\n014,1000010653\n", "row 1 \\(line 3: '014,"),
    ('_id,category_id\n"10",1000010653\n14,1000010653\n', "row 0 \\(line 2: '\"10\","),
    ("_id,category_id\n10, 1000010653\n14,1000010653\n", "row 0"),
    ("_id,category_id\n10,1000010653\n\n14,1000010653\n", "row 1 \\(line 3: ''\\)"),
    ("_id,category_id\n10,1000010653,5\n14,1000010653\n", "row 0"),
    ("\ufeff_id,category_id\n10,1000010653\n14,1000010653\n", "byte order mark"),
    ("_id,category_id\r\n10,1000010653\r\n14,1000010653\r\n", "line 1 ends with a carriage return"),
    ("_id,category_id\n10,1000010653\n14,1000010653", "no line end"),
    ("_id,category_id\n10,1000010653\n14,inf\n", "row 1"),
])
def test_only_canonical_files_validate(tmp_path, sample, text, message):
    from cdkit.submit.submission import SubmissionError, kaggle_submit, validate_submission
    for name, data in (("s.csv", text.encode()), ("s.csv.gz", gzip.compress(text.encode()))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SubmissionError, match=message):
            validate_submission(path, sample, KNOWN)
        api = FakeApi()
        with pytest.raises(SubmissionError, match=message):
            kaggle_submit(path, "m", api=api, sample_submission_path=sample, known_category_ids=KNOWN)
        assert api.calls == []


def test_values_are_converted_safely_and_written_canonically(tmp_path, sample):
    from cdkit.submit.submission import (
        SubmissionError,
        fill_missing,
        make_submission,
        validate_submission,
        write_submission,
    )
    with pytest.raises(SubmissionError, match="1 non-integer category_id values.*row 1: inf"):
        make_submission([10, 14], [1000010653.0, np.inf], sample)
    with pytest.raises(SubmissionError, match="1 non-integer _id values.*row 0: 1234567890123456789012345"):
        make_submission([1234567890123456789012345, 14], KNOWN, sample)
    with pytest.raises(SubmissionError, match="non-integer category_id.*nan"):
        fill_missing(pd.Series([np.nan], index=[10]), [10, 14], KNOWN[0])
    df = pd.DataFrame({"_id": ["10", "14"], "category_id": [1000010653.0, 1000010667.0]})  # normalized, not refused
    out = write_submission(df, tmp_path / "s.csv.gz", sample, KNOWN)
    assert gzip.decompress(out.read_bytes()) == b"_id,category_id\n10,1000010653\n14,1000010667\n"
    assert validate_submission(out, sample, KNOWN)["category_id"].tolist() == KNOWN
    for bad in (["+10", "14"], ["010", "14"], [" 10", "14"], ["1e1", "14"], [True, False]):
        with pytest.raises(SubmissionError, match="non-integer _id"):
            write_submission(df.assign(_id=bad), tmp_path / "t.csv", sample, KNOWN)
    assert not (tmp_path / "t.csv").exists()


# --- credentials never printed; one-line errors -----------------------------------------------------

class FakeApi:
    def __init__(self, fail=None, say=""): self.calls, self.fail, self.say = [], fail, say
    def competition_submit(self, file_name, message, competition):
        self.calls.append(file_name)
        print(self.say)
        if self.fail: raise self.fail
        return "ok"


KEY = "0123456789abcdef0123456789abcdef"


def test_errors_and_output_of_the_library_are_scrubbed(tmp_path, sample, monkeypatch, capsys):
    import requests

    from cdkit.submit.submission import SubmissionError, kaggle_submit, write_submission
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    basic = base64.b64encode(f"alice:{KEY}".encode()).decode()
    path = write_submission(pd.DataFrame({"_id": [10, 14], "category_id": KNOWN}), tmp_path / "s.csv", sample, KNOWN)
    kw = dict(sample_submission_path=sample, known_category_ids=KNOWN)
    api = FakeApi(say=f"send: Authorization: Basic {basic}\nkey={KEY}\nSuccessfully submitted")
    assert kaggle_submit(path, "m", api=api, **kw) == "ok"
    printed = capsys.readouterr()
    assert "Successfully submitted" in printed.out and KEY not in printed.out + printed.err
    assert basic not in printed.out + printed.err
    refused = requests.HTTPError(f"401 for {KEY}, headers {{'Authorization': 'Bearer tok_{KEY}'}}",
                                 response=type("R", (), {"status_code": 401})())
    unreachable = requests.ConnectionError("Max retries exceeded (Caused by NewConnectionError('[Errno -3] "
                                           "Temporary failure in name resolution'))")
    for fail, message in ((refused, "Kaggle refused the submission of s.csv: 401"),
                          (unreachable, "cannot reach Kaggle: \\[Errno -3\\] Temporary failure in name resolution")):
        with pytest.raises(SubmissionError, match=message) as e:
            kaggle_submit(path, "m", api=FakeApi(fail=fail), **kw)
        assert KEY not in str(e.value) and "\n" not in str(e.value) and e.value.__suppress_context__
    capsys.readouterr()


def submit_command(tmp_path, env):
    "Submit in a fresh interpreter with only `env`: (returncode, everything it printed; a refusal on one line)"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    pd.DataFrame({"category_id": KNOWN, "category_level1": "A", "category_level2": "B",
                  "category_level3": ["C", "D"]}).to_csv(tmp_path / "category_names.csv", index=False)
    (tmp_path / "sample_submission.csv").write_text("_id,category_id\n10,1000010653\n14,1000010653\n")
    (tmp_path / "s.csv").write_text("_id,category_id\n10,1000010653\n14,1000010667\n")
    return run_python(f"""
        import sys
        from cdkit.data.catalog import Catalog
        from cdkit.submit.submission import SubmissionError, kaggle_submit
        known = Catalog.from_csv({str(tmp_path / "category_names.csv")!r}).category_ids
        try:
            kaggle_submit({str(tmp_path / "s.csv")!r}, "try", sample_submission_path={str(tmp_path / "sample_submission.csv")!r},
                          known_category_ids=known)
        except SubmissionError as e:
            print(f"refused: {{e}}")
            sys.exit(1)
    """, env={"HOME": str(home), **env})


def test_submit_without_credentials_says_where_it_looked(tmp_path):
    code, text = submit_command(tmp_path, {})
    assert code == 1
    assert text == ("refused: no Kaggle credentials found (looked in: KAGGLE_USERNAME/KAGGLE_KEY, KAGGLE_API_TOKEN, "
                    "~/.kaggle/kaggle.json, ~/.kaggle/access_token)\n")


def test_verbose_kaggle_never_shows_the_key(tmp_path):
    "VERBOSE=1 made the kaggle library print every request with its Authorization header"
    pytest.importorskip("kaggle")
    closed = "http://127.0.0.1:9"  # nothing listens there: Kaggle is unreachable, deterministically
    code, text = submit_command(tmp_path, {"VERBOSE": "1", "KAGGLE_USERNAME": "alice", "KAGGLE_KEY": KEY,
                                           "HTTPS_PROXY": closed, "HTTP_PROXY": closed, "https_proxy": closed})
    assert code == 1, text
    basic = base64.b64encode(f"alice:{KEY}".encode()).decode()
    assert KEY not in text and basic not in text and "Authorization" not in text, text
    assert text.startswith("refused: cannot reach Kaggle: ") and text.count("\n") == 1, text

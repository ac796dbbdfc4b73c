import gzip

import pandas as pd
import pytest

from cdkit.submit.submission import (SubmissionError, fill_missing, kaggle_submit, make_submission, validate_submission,
                              write_submission)

KNOWN = [1000010653, 1000010667, 1000004079]


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample_submission.csv"
    pd.DataFrame({"_id": [10, 14, 21, 35], "category_id": 1000010653}).to_csv(path, index=False)
    return path


def valid(sample):
    return make_submission([35, 10, 21, 14], [KNOWN[0], KNOWN[1], KNOWN[2], KNOWN[0]], sample)


def test_make_and_write_valid(tmp_path, sample):
    df = valid(sample)
    assert df["_id"].tolist() == [10, 14, 21, 35] and df["category_id"].tolist() == [KNOWN[1], KNOWN[0], KNOWN[2], KNOWN[0]]
    out = write_submission(df, tmp_path / "sub" / "s.csv.gz", sample, KNOWN)
    with gzip.open(out, "rt") as f: assert f.readline().strip() == "_id,category_id"
    pd.testing.assert_frame_equal(pd.read_csv(out), df)
    validate_submission(out, sample, KNOWN)
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.csv.gz"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.drop(index=2), "1 _id values of the sample submission are missing, e.g. 21"),
    (lambda d: pd.concat([d, d.iloc[[1]]]), "duplicate _id values, e.g. 14"),
    (lambda d: pd.concat([d, pd.DataFrame({"_id": [99], "category_id": [KNOWN[0]]})]), "not in the sample submission, e.g. 99"),
    (lambda d: d.assign(category_id=[KNOWN[0], 123, KNOWN[0], KNOWN[0]]), "unknown category_id values, e.g. 123"),
    (lambda d: d.rename(columns={"_id": "id"}), "header must be _id,category_id"),
    (lambda d: d.assign(category_id=["1000010653", "x", "1000010653", "1.5"]), "2 non-integer category_id"),
    (lambda d: d.iloc[[1, 0, 2, 3]], "not in sample submission order"),
])
def test_refuses_and_writes_nothing(tmp_path, sample, change, message):
    bad = change(valid(sample))
    with pytest.raises(SubmissionError, match=message): validate_submission(bad, sample, KNOWN)
    with pytest.raises(SubmissionError, match=message): write_submission(bad, tmp_path / "out" / "s.csv.gz", sample, KNOWN)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_make_submission_and_fill_missing(sample):
    with pytest.raises(SubmissionError, match="2 products of the sample submission have no prediction"):
        make_submission([35, 10], [KNOWN[0], KNOWN[1]], sample)
    pred, n = fill_missing(pd.Series([KNOWN[1], KNOWN[2]], index=[35, 10]), pd.read_csv(sample)["_id"], KNOWN[0])
    assert n == 2
    df = make_submission(pred.index, pred.values, sample)
    assert df["category_id"].tolist() == [KNOWN[2], KNOWN[0], KNOWN[0], KNOWN[1]]
    validate_submission(df, sample, KNOWN)
    assert fill_missing(pred, [10, 35], KNOWN[0])[1] == 0


class FakeApi:
    def __init__(self): self.calls = []
    def competition_submit(self, file_name, message, competition):
        self.calls.append((file_name, message, competition)); return "ok"


def test_kaggle_submit_with_fake_api(tmp_path, sample):
    path = write_submission(valid(sample), tmp_path / "s.csv.gz", sample, KNOWN)
    api = FakeApi()
    kw = dict(sample_submission_path=sample, known_category_ids=KNOWN)
    assert kaggle_submit(path, "belief agg", api=api, dry_run=True, **kw) is None and api.calls == []
    assert kaggle_submit(path, "belief agg", api=api, **kw) == "ok"
    assert api.calls == [(str(path), "belief agg", "cdiscount-image-classification-challenge")]
    bad = tmp_path / "bad.csv"
    valid(sample).iloc[:3].to_csv(bad, index=False)
    with pytest.raises(SubmissionError, match="missing"): kaggle_submit(bad, "x", api=api, **kw)
    assert len(api.calls) == 1

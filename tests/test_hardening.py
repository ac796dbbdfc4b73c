"""Damaged inputs and interrupted writes, each built for real: crafted BSON bytes, forged picture
headers, killed subprocesses, a file size limit standing in for a full disk, a closed proxy port
standing in for an unreachable Kaggle. Each case failed (crash, garbage, silent wrong answer) before."""
import base64
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes

from cdkit.data.bsonfile import (
    BadPictureError,
    BsonFormatError,
    BsonReader,
    ImageDecodeError,
    _parse_doc,
    build_index,
    decode_rgb,
    image_table,
    index_matches,
    load_index,
    save_index,
)
from cdkit.base.io import IncompleteFolderError, check_complete, sweep_temps, writing_dataset

ROOT = Path(__file__).resolve().parents[1]
PIC = jpeg_bytes(0)


def run_python(code, env=None, check=False):
    "Run `code` in a fresh interpreter at the repository root; (returncode, stdout + stderr)"
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    if check: assert p.returncode == 0, p.stdout + p.stderr
    return p.returncode, p.stdout + p.stderr


def encode(doc):
    return bytearray(bson.encode(doc))


def set_picture_length(raw, n, which=-1):
    "Overwrite the int32 length of a `picture` binary (the last one by default) inside an encoded document"
    starts = [i for i in range(len(raw)) if raw.startswith(b"\x05picture\x00", i)]
    j = starts[which]
    raw[j + 9:j + 13] = struct.pack("<i", n)
    return raw


# --- 1. document-level damage is found by the index and counted by every reader ---------------------

def damaged_file(path):
    "Products 1..9, one per kind of damage or odd layout, the id saying which; (path, unsound (id, img_idx) pairs)"
    docs = [
        encode({"_id": 1, "imgs": [{"picture": PIC}], "category_id": 7}),                              # sound
        encode({"_id": 2, "imgs": [{"picture": "a string"}, {"picture": PIC}], "category_id": 7}),     # str picture
        encode({"_id": 3, "imgs": [{"pic": PIC}, {"picture": PIC}], "category_id": 7}),               # no picture key
        set_picture_length(encode({"_id": 4, "imgs": [{"picture": PIC}, {"picture": PIC}], "category_id": 7}),
                           2**31 - 1),                                                                # huge length
        set_picture_length(encode({"_id": 5, "imgs": [{"picture": PIC}], "category_id": 8}), -5),     # negative
        encode({"category_id": bson.Int64(8), "imgs": ["x", {"extra": 1, "picture": PIC}], "_id": 6.0}),  # odd
        encode({"_id": bson.Int64(7), "imgs": [{"picture": PIC}] * 11, "category_id": 8}),            # 11 pictures
        encode({"_id": 8, "imgs": [{"picture": 12345}], "category_id": 8}),                            # int picture
        encode({"_id": 9, "imgs": [{"picture": PIC}], "category_id": 8}),                              # sound
    ]
    path.write_bytes(b"".join(docs))
    return path, {(2, 0), (3, 0), (4, 1), (5, 0), (6, 0), (8, 0)}


def test_index_finds_unsound_pictures_and_keeps_their_products(tmp_path):
    path, unsound = damaged_file(tmp_path / "train.bson")
    index, stats = build_index(path, return_stats=True)
    assert index["product_id"].tolist() == list(range(1, 10))
    assert index["n_imgs"].tolist() == [1, 2, 2, 2, 1, 2, 11, 1, 1]
    assert {(p, k) for p, _, k, _ in stats.bad_pictures} == unsound
    assert dict(zip(index["product_id"], index["n_bad"])) == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 0, 8: 1, 9: 0}
    offsets = dict(zip(index["product_id"], index["offset"]))
    assert all(off == offsets[p] for p, off, _, _ in stats.bad_pictures)
    assert stats.bad_products == [2, 3, 4, 5, 6, 8]
    assert "6 unsound pictures in 6 products" in stats.summary() and "_id 2 at byte offset" in stats.summary()
    why = {p: w for p, _, _, w in stats.bad_pictures}
    assert "string" in why[2] and "no picture key" in why[3] and "past the end" in why[4] and "negative" in why[5]


def test_fast_path_and_general_parser_agree(tiny_data):
    "Every row of a competition-layout index is what the general parser reads from the document"
    for name in ("train.bson", "test.bson"):
        index = build_index(tiny_data / name)
        reader = BsonReader(tiny_data / name)
        for r in index.itertuples():
            doc = reader.raw(r.offset, r.length)
            pid, cat, k, pics = _parse_doc(doc, 0, len(doc))
            assert (pid, -1 if cat is None else cat, k, 0) == (r.product_id, r.category_id, r.n_imgs, r.n_bad)
            assert all(isinstance(p, tuple) for p in pics)


def test_reader_md5_and_loaders_count_unsound_pictures(tmp_path):
    from cdkit.data.loaders import BLANK_VALUE, PictureDataset
    from cdkit.infer.md5 import hash_pictures
    path, unsound = damaged_file(tmp_path / "train.bson")
    table = image_table(build_index(path))
    reader = BsonReader(path)
    is_bad = np.array([(p, k) in unsound for p, k in zip(table["product_id"], table["img_idx"])])
    for r, bad in zip(table.itertuples(), is_bad):
        if bad:
            with pytest.raises(BadPictureError, match=f"product _id={r.product_id} at byte offset {r.offset}, "
                                                      f"picture {r.img_idx}"):
                reader.picture(r.offset, r.length, r.img_idx)
            assert reader.pictures(r.offset, r.length)[r.img_idx] == b""
        else:
            assert reader.picture(r.offset, r.length, r.img_idx) == PIC
    hashes, bad = hash_pictures(reader, table, return_bad=True)
    assert (bad == is_bad).all()
    assert len(np.unique(hashes[bad], axis=0)) == bad.sum()          # unsound pictures match nothing ...
    assert not (hashes[bad][:, None] == hashes[~bad][None]).all(2).any()  # ... not even each other
    predict = PictureDataset(table, path, 180, crop="full", with_labels=False, on_bad="blank")
    blank = [(predict[i][0] == BLANK_VALUE).all() for i in range(len(table))]
    assert blank == is_bad.tolist() and predict.bad_pictures == is_bad.sum()
    table["label"] = 0
    train = PictureDataset(table, path, 180, crop="random", split_idx=0)
    for i in range(len(table)):
        x, _ = train[i]
        assert x.shape == (180, 180, 3) and not (x == BLANK_VALUE).all()
    assert train.bad_pictures == is_bad.sum()


def test_frame_damage_names_file_offset_product_and_previous_product(tmp_path):
    docs = [encode({"_id": i, "imgs": [{"picture": b"x" * 40}], "category_id": 1}) for i in range(1, 21)]
    j = docs[15].index(b"imgs\x00")
    docs[15][j + 5:j + 9] = struct.pack("<i", 2**31 - 1)  # the imgs array of product 16 claims 2 GB
    path = tmp_path / "frame.bson"
    path.write_bytes(b"".join(docs))
    offset = sum(len(d) for d in docs[:15])
    with pytest.raises(BsonFormatError) as e:
        build_index(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: at byte offset {offset} (product _id=16)")
    assert "previous product _id=15" in msg  # was read from uninitialised memory


@pytest.mark.parametrize("value, shown", [("abc", "product _id='abc' (a string)"),
                                          (2.5, "product _id=2.5 (a double)"),
                                          (bson.Int64(2**40), f"product _id={2**40}")])
def test_odd_ids_are_named_as_they_are(tmp_path, value, shown):
    raw = encode({"_id": value, "imgs": [{"picture": b"x" * 40}], "category_id": 1})
    if isinstance(value, bson.Int64):  # a sound document with an int64 id: damage its imgs array
        j = raw.index(b"imgs\x00")
        raw[j + 5:j + 9] = struct.pack("<i", 10**6)
    path = tmp_path / "ids.bson"
    first = encode({"_id": 1, "imgs": [], "category_id": 1})
    path.write_bytes(bytes(first + raw))
    with pytest.raises(BsonFormatError, match=f"byte offset {len(first)} .*previous product _id=1") as e:
        build_index(path)
    assert shown in str(e.value)


def test_truncated_document_names_its_id_and_the_previous_document(tmp_path):
    docs = [bytes(encode({"_id": i, "imgs": [{"picture": b"x" * 40}], "category_id": 1})) for i in (10, 11)]
    path = tmp_path / "cut.bson"
    path.write_bytes(docs[0] + docs[1][:30])
    with pytest.raises(BsonFormatError, match=f"byte offset {len(docs[0])} \\(product _id=11\\).*truncated.*"
                                              "previous document starts at byte offset 0"):
        build_index(path)


# --- 2. an index is reused only for the file it was built from ---------------------------------------

def test_index_matches_its_source_only(tmp_path):
    docs = [{"_id": i, "imgs": [{"picture": jpeg_bytes(i)}], "category_id": 1000 + i % 3} for i in range(30)]
    path = tmp_path / "raw" / "train.bson"  # the raw data folder: indices go elsewhere
    path.parent.mkdir()
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    out = tmp_path / "train_index.parquet"
    build_index(path, out=out)
    ok, why = index_matches(out, path)
    assert ok, why
    assert load_index(out).attrs["source"] == str(path)
    # same layout and size, other labels, an older modification time
    stat = path.stat()
    path.write_bytes(b"".join(bson.encode(dict(d, category_id=2000 + d["_id"] % 3)) for d in docs))
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns - 10**12, stat.st_mtime_ns - 10**12))
    ok, why = index_matches(out, path)
    assert not ok and "differs" in why
    # a copy of the right file (another modification time) matches
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    ok, why = index_matches(out, path)
    assert ok and "modification time" in why
    # an index from before the fingerprint, a missing index
    old = load_index(out)
    old.attrs = {"source": str(path)}
    save_index(old, tmp_path / "old.parquet")
    assert index_matches(tmp_path / "old.parquet", path) == (False, f"{tmp_path / 'old.parquet'} records no "
                                                             "fingerprint of its source (written by an older cdkit)")
    assert not index_matches(tmp_path / "none.parquet", path)[0]


def test_index_matches_checks_products_beyond_the_fingerprint(tmp_path):
    "A damaged index (or one a sampled block would not reveal) is caught by reading products back"
    docs = [{"_id": i, "imgs": [{"picture": b"p" * 50}], "category_id": 1000} for i in range(50)]
    path = tmp_path / "raw" / "t.bson"  # the raw data folder: indices go elsewhere
    path.parent.mkdir()
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    index = build_index(path)
    index.loc[25, "category_id"] = 1001
    save_index(index, tmp_path / "i.parquet")
    ok, why = index_matches(tmp_path / "i.parquet", path)
    assert not ok and "category 1000" in why and "category 1001" in why


# --- 3. an interrupted synth leaves a folder that readers refuse ------------------------------------

def test_killed_synth_leaves_an_incomplete_folder(tmp_path):
    out = tmp_path / "data"
    code, text = run_python(f"""
        import os, signal
        from cdkit.data import synth
        real_get = synth._Pictures.get
        def get(self, domain, *a):
            if domain == "test": os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while test.bson is written
            return real_get(self, domain, *a)
        synth._Pictures.get = get
        synth.write_dataset({str(out)!r}, preset="tiny", seed=0)
    """)
    assert code == -signal.SIGKILL, text
    assert (out / "train.bson").exists() and not (out / "test.bson").exists()
    with pytest.raises(IncompleteFolderError, match=f"{out} is incomplete"):
        check_complete(out)
    assert sweep_temps(out) == []  # a data folder is swept only by its writer
    with writing_dataset(out):
        assert [p.name.startswith(".cdkit-tmp-") and p.name.endswith("-test.bson") for p in sweep_temps(out)] == [True]


def test_finished_synth_is_complete(tiny_data):
    assert check_complete(tiny_data) == tiny_data


# --- 4. orphans swept at the next start; a full disk named as such ----------------------------------

def killed_while_writing(path):
    "Leave what a process killed inside atomic_write of `path` leaves (its temp file)"
    code, text = run_python(f"""
        import os, signal
        from cdkit.base.io import atomic_write
        def write(tmp):
            open(tmp, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(path)!r}, write)
    """)
    assert code == -signal.SIGKILL, text
    left = [p for p in Path(path).parent.iterdir() if p.name.startswith(".cdkit-tmp-") and p.name.endswith(f"-{Path(path).name}")]
    assert len(left) == 1
    return left[0]


def test_index_build_sweeps_temps_of_killed_writes(tmp_path, tiny_data):
    out = tmp_path / "idx" / "train_index.parquet"
    left = killed_while_writing(out)
    build_index(tiny_data / "train.bson", out=out)
    assert not left.exists() and out.exists()


def test_store_writer_sweeps_stores_of_killed_writers(tmp_path):
    from cdkit.infer.store import StoreWriter, load_store
    code, text = run_python(f"""
        import os, signal, numpy as np
        from cdkit.infer.store import StoreWriter
        w = StoreWriter({str(tmp_path / "a.store")!r}, n_classes=5, k=2, chunk_rows=4)
        w.add(np.arange(8), np.zeros(8), np.full((8, 1, 5), 0.2))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert code == -signal.SIGKILL, text
    assert [(p.name[:11], p.name[-8:]) for p in tmp_path.iterdir()] == [(".cdkit-tmp-", "-a.store")]
    with StoreWriter(tmp_path / "b.store", n_classes=5, k=2) as w:
        w.add(np.arange(3), np.zeros(3), np.full((3, 5), 0.2))
    assert [p.name for p in tmp_path.iterdir()] == ["b.store"] and len(load_store(tmp_path / "b.store")) == 3


def test_checkpoint_sweeps_temps_of_killed_writes(tmp_path):
    from test_callbacks import tiny_dls, tiny_learner

    from cdkit.train.callbacks import Checkpoint
    path = tmp_path / "checkpoints" / "last.pth"
    left = killed_while_writing(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    older = path.with_name(f"last.pth.tmp{int(dead.stdout)}")  # how earlier versions named theirs
    older.write_bytes(b"half")
    learn = tiny_learner(tiny_dls(), [Checkpoint(path)])
    learn.fit(1, 0.1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]
    assert not left.exists()


def test_full_disk_during_checkpoint_is_named(tmp_path):
    "RLIMIT_FSIZE makes writes past the limit fail (EFBIG) as a full disk does; torch says `unexpected pos`"
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no file size limit on this system")
    path = tmp_path / "ck" / "last.pth"
    code, text = run_python(f"""
        import resource, signal, sys
        sys.path.insert(0, "tests")
        from test_callbacks import tiny_dls, tiny_learner
        from cdkit.train.callbacks import save_checkpoint
        from cdkit.base.io import DiskFullError, atomic_write
        learn = tiny_learner(tiny_dls())
        learn.create_opt()
        learn.train_iter = 0  # as after an epoch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for what, write in (("checkpoint", lambda: save_checkpoint(learn, {str(path)!r}, 1)),
                            ("text", lambda: atomic_write({str(path.with_name("big.txt"))!r},
                                                          lambda tmp: open(tmp, "w").write("x" * 10000)))):
            try:
                write()
                print(what, "written")
            except DiskFullError as e:
                print(what, "DiskFullError:", e)
    """, env={"PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)})
    assert code == 0, text
    assert f"checkpoint DiskFullError: [Errno 28] no space left on device while writing {path}" in text
    assert "text DiskFullError: [Errno 28] no space left on device while writing" in text
    assert not list(path.parent.iterdir())  # no temp file left behind


# --- 5. forged picture headers are refused before any pixel is decoded ------------------------------

def forged_jpeg(width, height):
    "A real JPEG whose frame header (SOF0) claims another size"
    data = bytearray(jpeg_bytes(1))
    j = data.index(b"\xff\xc0")
    data[j + 5:j + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def forged_png(width, height):
    "A real PNG whose IHDR claims another size (with a correct CRC)"
    data = bytearray(jpeg_bytes(1, fmt="PNG"))
    j = data.index(b"IHDR")
    data[j + 4:j + 12] = struct.pack(">II", width, height)
    data[j + 17:j + 21] = struct.pack(">I", zlib.crc32(bytes(data[j:j + 17])))
    return bytes(data)


@pytest.mark.parametrize("forge", [forged_jpeg, forged_png])
def test_forged_picture_size_is_refused_before_decoding(forge):
    with pytest.raises(ImageDecodeError, match="claims (65500x65500 pixels|more pixels than 4096x4096)"):
        decode_rgb(forge(65500, 65500))
    with pytest.raises(ImageDecodeError, match="claims 5000x100 pixels"):
        decode_rgb(forge(5000, 100))


def test_forged_picture_is_a_counted_bad_picture(tmp_path):
    from cdkit.data.loaders import PictureDataset
    path = tmp_path / "f.bson"
    path.write_bytes(bson.encode({"_id": 1, "imgs": [{"picture": forged_jpeg(65500, 65500)}, {"picture": PIC}],
                                  "category_id": 1}))
    table = image_table(build_index(path))
    ds = PictureDataset(table, path, 180, crop="center", with_labels=False)
    assert (ds[0][0] == 128).all() and ds.bad_pictures == 1


# --- 8. stores: named errors, checksums, finite values -----------------------------------------------

def small_store(path, n=6, seed=0, chunk_rows=3):
    from cdkit.infer.store import StoreWriter
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(5), size=n)
    with StoreWriter(path, n_classes=5, k=2, chunk_rows=chunk_rows) as w:
        for a in range(0, n, chunk_rows):
            w.add(np.arange(a, a + chunk_rows) + 100 * seed, np.zeros(chunk_rows), p[a:a + chunk_rows])
    return path


def test_corrupt_store_chunk_or_manifest_names_store_and_chunk(tmp_path):
    from cdkit.infer.store import StoreError, load_store
    store = small_store(tmp_path / "a.store")
    chunk = store / "chunk_00001.npz"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:len(data) // 2])
    with pytest.raises(StoreError, match=f"{store}: chunk chunk_00001.npz"):
        load_store(store)
    manifest = json.loads((store / "manifest.json").read_text())
    for c in manifest["chunks"]: del c["sha256"]  # a store of an older version: no checksums
    del manifest["sha256"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=f"{store}: chunk chunk_00001.npz is unreadable \\(BadZipFile"):
        load_store(store)
    (store / "manifest.json").write_text('{"format": "cdkit-predstore", "vers')
    with pytest.raises(StoreError, match=f"{store / 'manifest.json'} is corrupt"):
        load_store(store)


def test_chunk_from_another_store_is_refused(tmp_path):
    from cdkit.infer.store import StoreError, load_store
    a, b = small_store(tmp_path / "a.store", seed=0), small_store(tmp_path / "b.store", seed=1)
    (a / "chunk_00001.npz").write_bytes((b / "chunk_00001.npz").read_bytes())
    with pytest.raises(StoreError, match="chunk_00001.npz does not match the checksum"):
        load_store(a)
    manifest = json.loads((a / "manifest.json").read_text())
    for c in manifest["chunks"]: del c["sha256"]
    del manifest["sha256"]  # an older version's manifest has no checksum of its own either
    (a / "manifest.json").write_text(json.dumps(manifest))
    assert load_store(a).product_id.tolist() == [0, 1, 2, 103, 104, 105]  # old stores: loaded unchecked


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_probabilities_are_refused(tmp_path, bad):
    import torch

    from cdkit.infer.store import StoreError, StoreWriter
    p = np.full((4, 1, 5), 0.2)
    p[2, 0, 3] = bad
    with StoreWriter(tmp_path / "s.store", n_classes=5, k=2) as w:
        for probs in (p, torch.tensor(p)):
            with pytest.raises(StoreError, match=f"{tmp_path / 's.store'}: probabilities .* row 2 \\(product_id 12\\)"):
                w.add(np.arange(10, 14), np.zeros(4), probs)
        with pytest.raises(StoreError, match="rest .* row 1 \\(product_id 11\\)"):
            w.add_topk(np.arange(10, 14), np.zeros(4), np.zeros((4, 1, 2)), np.full((4, 1, 2), 0.3),
                       np.array([[0.4], [bad], [0.4], [0.4]]))
        w.add(np.arange(10, 14), np.zeros(4), np.full((4, 1, 5), 0.2))
    from cdkit.infer.store import load_store
    assert len(load_store(tmp_path / "s.store")) == 4


# --- 9. submissions: one canonical form ---------------------------------------------------------------

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


# --- 10. credentials never printed; one-line errors -----------------------------------------------------

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


# --- 12. validation never scores another product's picture ----------------------------------------------

def test_bad_validation_picture_becomes_grey_and_training_keeps_its_product(tmp_path):
    from PIL import Image

    from cdkit.data.loaders import BLANK_VALUE, make_dataloaders

    def flat(v):
        import io
        buf = io.BytesIO()
        Image.new("RGB", (180, 180), (v, v, v)).save(buf, "JPEG", quality=95)
        return buf.getvalue()
    # product p: pictures of grey level 10 * p; label p % 3; product 3's picture 0 and product 5's only picture are bad
    docs = []
    for p in range(1, 9):
        pics = [flat(10 * p) for _ in range(2 if p != 5 else 1)]
        if p in (3, 5): pics[0] = pics[0][:200]
        docs.append(bson.encode({"_id": p, "imgs": [{"picture": x} for x in pics], "category_id": p % 3}))
    path = tmp_path / "v.bson"
    path.write_bytes(b"".join(docs))
    t = image_table(build_index(path))
    t["label"] = t["category_id"].to_numpy()
    for valid_products in ({3, 5}, {1, 2, 4, 6, 7, 8}):
        valid = t["product_id"].isin(valid_products).to_numpy()
        dls = make_dataloaders(t, path, 3, valid_mask=valid, size=180, item_size=180, bs=2, device="cpu")
        for ds in (dls.valid.dataset, dls.train.dataset):
            for i in range(len(ds)):
                x, y = ds[i]
                pid, bad = ds.product_id[i], (ds.product_id[i], ds.img_idx[i]) in {(3, 0), (5, 0)}
                shown = round(int(x[90, 90, 0]) / 10)  # whose picture this is
                if ds is dls.valid.dataset:  # validation: grey in a bad picture's place, the row's own label
                    assert (x == BLANK_VALUE).all() if bad else shown == pid
                    assert y == pid % 3
                elif pid == 3 and bad:  # training: the product's other picture
                    assert shown == 3 and y == 0
                elif pid == 5:  # training, no other picture of the product: another row's, with its label
                    assert shown != 5 and y == shown % 3
                else:
                    assert shown == pid and y == pid % 3
        assert dls.bad_pictures() == 2

"""Damaged and mismatched BSON files, built for real from crafted bytes: the index finds unsound pictures and
keeps their products, every reader counts them, frame damage names the file, offset and products around it,
and an index is reused only for the file it was built from (cdkit.data.bsonfile)."""
import os
import struct

import bson
import numpy as np
import pytest
from conftest import jpeg_bytes

from cdkit.data.bsonfile import (
    BadPictureError,
    BsonFormatError,
    BsonReader,
    _parse_doc,
    build_index,
    image_table,
    index_matches,
    load_index,
    save_index,
)

PIC = jpeg_bytes(0)


def encode(doc):
    return bytearray(bson.encode(doc))


def set_picture_length(raw, n, which=-1):
    "Overwrite the int32 length of a `picture` binary (the last one by default) inside an encoded document"
    starts = [i for i in range(len(raw)) if raw.startswith(b"\x05picture\x00", i)]
    j = starts[which]
    raw[j + 9:j + 13] = struct.pack("<i", n)
    return raw


# --- document-level damage is found by the index and counted by every reader ---------------------

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


# --- an index is reused only for the file it was built from ---------------------------------------

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

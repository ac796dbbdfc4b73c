import bson
import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes

from cdkit.data.bsonfile import (NO_LABEL, BsonFormatError, BsonReader, ImageDecodeError, build_index,
                            decode_rgb, image_table, load_index)


def write_docs(path, docs):
    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    return path


@pytest.fixture
def small_file(tmp_path):
    docs = [{"_id": i, "imgs": [{"picture": jpeg_bytes(i * 10 + j)} for j in range(1 + i % 4)],
             "category_id": 1000000000 + i % 3} for i in range(10)]
    (tmp_path / "raw").mkdir()  # the raw data folder: indices go elsewhere
    return write_docs(tmp_path / "raw" / "train.bson", docs), docs


def test_round_trip_against_pymongo(tiny_data):
    "Every product and every picture byte equal what pymongo's own decoder reads"
    for name in ("train.bson", "test.bson"):
        path = tiny_data / name
        index = build_index(path)
        reader = BsonReader(path)
        with open(path, "rb") as f:
            docs = list(bson.decode_file_iter(f))
        assert len(index) == len(docs)
        for row, doc in zip(index.itertuples(), docs):
            assert row.product_id == doc["_id"]
            assert row.category_id == doc.get("category_id", NO_LABEL)
            assert row.n_imgs == len(doc["imgs"])
            assert reader.pictures(row.offset, row.length) == [bytes(i["picture"]) for i in doc["imgs"]]
        if name == "test.bson":
            assert (index["category_id"] == NO_LABEL).all()


def test_index_saved_atomically_and_reloads(small_file, tmp_path):
    path, docs = small_file
    out = tmp_path / "idx" / "train_index.parquet"
    index = build_index(path, out=out)
    back = load_index(out)
    pd.testing.assert_frame_equal(back, index)
    assert back.attrs["source"] == str(path)
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def test_any_key_order_and_int64_ids(tmp_path):
    big = 2**40 + 7
    docs = [{"category_id": bson.Int64(1000000001), "imgs": [{"picture": jpeg_bytes(1)}], "_id": bson.Int64(big)},
            {"imgs": [], "_id": 5, "extra": {"a": [1, "x"], "b": 2.5}, "category_id": 1000000002}]
    index = build_index(write_docs(tmp_path / "t.bson", docs))
    assert index["product_id"].tolist() == [big, 5]
    assert index["category_id"].tolist() == [1000000001, 1000000002]
    assert index["n_imgs"].tolist() == [1, 0]


def test_image_table(small_file):
    path, docs = small_file
    index = build_index(path)
    t = image_table(index)
    assert len(t) == sum(len(d["imgs"]) for d in docs)
    reader = BsonReader(path)
    for r in t.itertuples():
        doc = docs[r.prod_row]
        assert r.product_id == doc["_id"]
        assert reader.picture(r.offset, r.length, r.img_idx) == doc["imgs"][r.img_idx]["picture"]


def test_truncated_file_names_offset_and_product(small_file, tmp_path):
    path, _ = small_file
    data = path.read_bytes()
    index = build_index(path)
    cut = int(index["offset"].iloc[6]) + 100
    bad = tmp_path / "truncated.bson"
    bad.write_bytes(data[:cut])
    with pytest.raises(BsonFormatError) as e:
        build_index(bad)
    msg = str(e.value)
    assert str(bad) in msg and f"byte offset {index['offset'].iloc[6]}" in msg
    assert "product _id=6" in msg and "truncated" in msg


def test_corrupted_length_and_body(small_file, tmp_path):
    path, _ = small_file
    index = build_index(path)
    data = bytearray(path.read_bytes())
    off = int(index["offset"].iloc[3])
    # the inner imgs array's length is overwritten: the document no longer parses
    j = data.index(b"imgs\x00", off)
    data[j + 5:j + 9] = (10**6).to_bytes(4, "little")
    bad = tmp_path / "corrupt.bson"
    bad.write_bytes(bytes(data))
    with pytest.raises(BsonFormatError, match=f"byte offset {off} .*product _id=3"):
        build_index(bad)
    data = bytearray(path.read_bytes())
    data[off:off + 4] = (2).to_bytes(4, "little")  # impossible document length
    bad.write_bytes(bytes(data))
    with pytest.raises(BsonFormatError, match=f"byte offset {off}.*impossible"):
        build_index(bad)


def test_duplicate_ids_refused(tmp_path):
    docs = [{"_id": 1, "imgs": [], "category_id": 1}, {"_id": 1, "imgs": [], "category_id": 2}]
    with pytest.raises(BsonFormatError, match="_id 1 appears more than once"):
        build_index(write_docs(tmp_path / "d.bson", docs))


def test_empty_products_reported(tmp_path):
    docs = [{"_id": 1, "imgs": [], "category_id": 1}, {"_id": 2, "imgs": [{"picture": jpeg_bytes()}], "category_id": 1}]
    index, stats = build_index(write_docs(tmp_path / "e.bson", docs), return_stats=True)
    assert stats.empty_products == [1] and "1 products without pictures" in stats.summary()
    assert len(image_table(index)) == 1


def test_reader_refuses_wrong_offset(small_file):
    path, _ = small_file
    index = build_index(path)
    with pytest.raises(BsonFormatError, match="no document"):
        BsonReader(path).raw(int(index["offset"].iloc[1]) + 3, int(index["length"].iloc[1]))


def test_decode_variants():
    rgb = decode_rgb(jpeg_bytes(0))
    assert rgb.shape == (180, 180, 3) and rgb.dtype == np.uint8
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
        out = decode_rgb(jpeg_bytes(1, mode=mode, fmt=fmt))
        assert out.shape == (180, 180, 3), (mode, fmt)
    corrupt = bytearray(jpeg_bytes(2))
    with pytest.raises(ImageDecodeError):
        decode_rgb(bytes(corrupt[:20]) + b"\x00" * 50)


def test_reader_counts_bad_pictures_instead_of_crashing(tmp_path):
    docs = [{"_id": 1, "imgs": [{"picture": jpeg_bytes(0)}, {"picture": b"\xff\xd8 not a jpeg"}], "category_id": 1}]
    path = write_docs(tmp_path / "b.bson", docs)
    index = build_index(path)
    images = BsonReader(path).images(index["offset"][0], index["length"][0])
    assert images[0].shape == (180, 180, 3) and images[1] is None


def test_reader_pickles_into_other_processes(small_file):
    import multiprocessing as mp
    path, docs = small_file
    index = build_index(path)
    reader = BsonReader(path)
    reader.pictures(index["offset"][0], index["length"][0])  # opens a handle in this process
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(_first_picture, [(reader, int(o), int(n)) for o, n in zip(index["offset"], index["length"])])
    assert got == [d["imgs"][0]["picture"] for d in docs]


def _first_picture(reader, off, n):
    return reader.picture(off, n, 0)


def test_real_train_example(real_dir):
    index, stats = build_index(real_dir / "train_example.bson", return_stats=True)
    assert (stats.products, stats.images, stats.categories) == (82, 110, 36)
    reader = BsonReader(real_dir / "train_example.bson")
    for r in image_table(index).itertuples():
        img = decode_rgb(reader.picture(r.offset, r.length, r.img_idx))
        assert img.shape == (180, 180, 3) and img.dtype == np.uint8

"""Forged and undecodable pictures: a forged header is refused before any pixel is decoded and counted as a
bad picture, and a bad validation picture becomes grey while its product stays (cdkit.data.bsonfile, the loaders)."""
import struct
import zlib

import bson
import pytest
from conftest import jpeg_bytes

from cdkit.data.bsonfile import (
    ImageDecodeError,
    build_index,
    decode_rgb,
    image_table,
)

PIC = jpeg_bytes(0)


def encode(doc):
    return bytearray(bson.encode(doc))


# --- forged picture headers are refused before any pixel is decoded ------------------------------

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


# --- validation never scores another product's picture ----------------------------------------------

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

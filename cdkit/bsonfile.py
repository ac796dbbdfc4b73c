"""The competition's BSON files: a product index built by hopping over documents, and a reader.

train.bson / test.bson are plain concatenations of BSON documents
`{_id, imgs: [{picture: <JPEG bytes>}, ...], category_id}` (test: no category_id). The index records
where each document lies so that any product is one `pread` away; building it never decodes a picture.
"""
from __future__ import annotations

import io
import os
import struct
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_write

NO_LABEL = -1  # category_id of a product in a test file
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")

# Bytes a value of each BSON type occupies after its name, where that size is fixed.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0x06: 0, 0xFF: 0, 0x7F: 0}
# Types whose value starts with an int32 length: (extra bytes after the length's count).
_LEN_PREFIXED = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x05: 5, 0x03: 0, 0x04: 0, 0x0F: 0}


class BsonFormatError(ValueError):
    "The file is not a well-formed sequence of BSON documents; the message names file, offset and product"


class ImageDecodeError(ValueError):
    "A picture's bytes decode as no image"


def _err(path, offset, product, why):
    who = f"product _id={product}" if product is not None else "an unidentified product"
    return BsonFormatError(f"{path}: at byte offset {offset} ({who}): {why}")


def _skip_value(buf, pos, etype, end):
    "Position just after the value of type `etype` that starts at `pos`"
    if etype in _FIXED:
        return pos + _FIXED[etype]
    if etype in _LEN_PREFIXED:
        n = _INT32.unpack_from(buf, pos)[0]
        if n < 0:
            raise ValueError(f"negative length {n}")
        return pos + (n if etype in (0x03, 0x04, 0x0F) else 4 + n + (_LEN_PREFIXED[etype] - 4))
    if etype == 0x0B:  # regex: two cstrings
        pos = buf.index(b"\x00", pos, end) + 1
        return buf.index(b"\x00", pos, end) + 1
    if etype == 0x0C:  # DBPointer
        n = _INT32.unpack_from(buf, pos)[0]
        return pos + 4 + n + 12
    raise ValueError(f"unknown BSON element type 0x{etype:02x}")


def _parse_doc(buf, start, end):
    """(_id, category_id, n_imgs) of the document occupying buf[start:end].

    Only the three fields are read; the pictures inside `imgs` are hopped over by their length
    prefixes. Any key order, int32/int64/double ids."""
    pid = cat = None
    n_imgs = -1
    pos = start + 4
    last = end - 1
    while pos < last:
        etype = buf[pos]
        name_end = buf.index(b"\x00", pos + 1, last)
        name = buf[pos + 1:name_end]
        pos = name_end + 1
        if name == b"imgs" and etype == 0x04:
            alen = _INT32.unpack_from(buf, pos)[0]
            a, aend = pos + 4, pos + alen - 1
            n_imgs = 0
            while a < aend:  # each element: type 0x03, name "0"/"1"/..., then an embedded document
                if buf[a] != 0x03:
                    raise ValueError(f"imgs[{n_imgs}] is not a document (type 0x{buf[a]:02x})")
                a = buf.index(b"\x00", a + 1, aend) + 1
                a += _INT32.unpack_from(buf, a)[0]
                n_imgs += 1
            if a != aend or buf[aend] != 0:
                raise ValueError("imgs array overruns its length")
            pos += alen
        elif name in (b"_id", b"category_id") and etype in (0x10, 0x12, 0x01):
            if etype == 0x10:
                v = _INT32.unpack_from(buf, pos)[0]; pos += 4
            elif etype == 0x12:
                v = _INT64.unpack_from(buf, pos)[0]; pos += 8
            else:
                f = struct.unpack_from("<d", buf, pos)[0]; pos += 8
                if f != int(f):
                    raise ValueError(f"{name.decode()} is a non-integral double {f}")
                v = int(f)
            if name == b"_id":
                pid = v
            else:
                cat = v
        else:
            pos = _skip_value(buf, pos, etype, last)
        if pos > last:
            raise ValueError("an element runs past the end of its document")
    if pos != last or buf[last] != 0:
        raise ValueError("document does not end with its terminating zero byte")
    if pid is None:
        raise ValueError("document has no integer _id")
    if n_imgs < 0:
        raise ValueError("document has no imgs array")
    return pid, cat, n_imgs


@dataclass
class IndexStats:
    "What `build_index` saw: counts for the summary line and the products worth reporting"
    path: str
    products: int
    images: int
    categories: int
    bytes: int
    seconds: float
    empty_products: list  # product ids with no picture (kept in the index with n_imgs=0)

    @property
    def mb_per_s(self):
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def summary(self):
        s = (f"{self.path}: {self.products:,} products, {self.images:,} images, "
             f"{self.categories:,} categories, {self.bytes / 1e6:,.1f} MB in {self.seconds:.2f} s "
             f"({self.mb_per_s:,.0f} MB/s)")
        if self.empty_products:
            s += f"; {len(self.empty_products)} products without pictures (e.g. _id {self.empty_products[:5]})"
        return s


def _peek_id(buf, pos):
    "The _id of a damaged document when it can still be read, for the error message"
    try:
        j = buf.index(b"_id\x00", pos, pos + 64)
        t = buf[j - 1]
        return _INT32.unpack_from(buf, j + 4)[0] if t == 0x10 else _INT64.unpack_from(buf, j + 4)[0]
    except (ValueError, IndexError, struct.error):
        return None


def _hop(mm, size, path):
    """Offsets and lengths of every document, hopping by the length prefixes (one int32 read each)"""
    offs, lens = array("q"), array("i")
    unpack = _INT32.unpack_from
    pos, prev = 0, None
    while pos < size:
        if size - pos < 4:
            raise _err(path, pos, None, f"{size - pos} stray bytes at the end of the file (truncated?)")
        n = unpack(mm, pos)[0]
        if n < 5 or pos + n > size:
            why = (f"file ends {size - pos} bytes into a document of {n} bytes (truncated file?)"
                   if n >= 5 else f"document length {n} is impossible")
            raise _err(path, pos, _peek_id(mm[pos:pos + 64], 0), why)
        offs.append(pos)
        lens.append(n)
        pos += n
    return offs, lens


def _gather32(u8, pos):
    "Little-endian int32 at each position of `pos` (vectorized; positions past the end read as clipped)"
    pos = np.minimum(pos, len(u8) - 4)
    v = (u8[pos].astype(np.uint32) | (u8[pos + 1].astype(np.uint32) << 8)
         | (u8[pos + 2].astype(np.uint32) << 16) | (u8[pos + 3].astype(np.uint32) << 24))
    return v.view(np.int32).astype(np.int64)


def _gather64(u8, pos):
    return (_gather32(u8, pos) & 0xFFFFFFFF) | (_gather32(u8, pos + 4) << 32)


def _matches(u8, pos, sig):
    "Whether the bytes at each position spell `sig`"
    ok = pos + len(sig) <= len(u8)
    pos = np.where(ok, pos, 0)
    for i, b in enumerate(sig):
        ok &= u8[pos + i] == b
    return ok


def _fields_fast(u8, offs, lens, max_imgs=300):
    """(_id, category_id, n_imgs, ok) for documents laid out as the competition writes them:
    `_id` (int32/int64), then `imgs`, then an optional int32/int64 `category_id`. Rows where `ok` is
    False have another layout (or are damaged) and go through the general parser."""
    n = len(offs)
    pid = np.zeros(n, np.int64)
    cat = np.full(n, NO_LABEL, np.int64)
    nimg = np.zeros(n, np.int64)
    id32 = _matches(u8, offs + 4, b"\x10_id\x00")
    id64 = _matches(u8, offs + 4, b"\x12_id\x00")
    ok = id32 | id64
    p = np.where(id64, offs + 17, offs + 13)            # start of the imgs element
    ok &= _matches(u8, p, b"\x04imgs\x00")
    pid[id32] = _gather32(u8, offs[id32] + 9)
    pid[id64] = _gather64(u8, offs[id64] + 9)
    arr = p + 6
    alen = np.where(ok, _gather32(u8, np.where(ok, arr, 0)), 0)
    end = offs + lens
    ok &= (alen >= 5) & (arr + alen < end)
    tail = np.where(ok, arr + alen, 0)                   # just after the imgs array
    bare = ok & (tail + 1 == end)                        # test file: nothing after imgs
    c32 = ok & (tail + 18 == end) & _matches(u8, tail, b"\x10category_id\x00")
    c64 = ok & (tail + 22 == end) & _matches(u8, tail, b"\x12category_id\x00")
    cat[c32] = _gather32(u8, tail[c32] + 13)
    cat[c64] = _gather64(u8, tail[c64] + 13)
    ok &= (bare | c32 | c64) & (u8[np.where(ok, end - 1, 0)] == 0)
    # count the embedded picture documents: each element is 0x03, a one-digit name, its length
    q = np.where(ok, arr + 4, 0)
    aend = arr + alen - 1
    live = ok & (q < aend)
    for _ in range(max_imgs + 1):
        if not live.any():
            break
        ql = q[live]
        good = (u8[ql] == 3) & (u8[ql + 2] == 0)
        sub = np.where(good, _gather32(u8, np.where(good, ql + 3, 0)), 0)
        good &= sub >= 5
        idx = np.flatnonzero(live)
        ok[idx[~good]] = False
        q[idx] = ql + 3 + sub
        nimg[idx] += 1
        live = ok & (q < aend)
    ok &= (q == aend) & (u8[np.where(ok, aend, 0)] == 0)
    return pid, cat, nimg, ok


def build_index(path, out=None, batch=1 << 15, return_stats=False):
    """One row per product of a competition BSON file (see docs/CONTRACTS.md), optionally saved as Parquet.

    Hops over documents by their length prefixes (the only per-document Python work), then reads
    _id, category_id and the number of pictures of a whole batch of documents at once with numpy
    gathers from a memory map; a document of another layout goes through the general parser, so any
    key order and int32/int64 ids work. Pictures are never decoded. Columns are narrow (26 bytes a
    product) and filled in place: 7 M products take about 177 MB. A truncated or corrupt document
    raises BsonFormatError naming the byte offset and the product."""
    import mmap
    t0 = time.perf_counter()
    path = str(path)
    size = os.path.getsize(path)
    empty_file = size == 0
    with open(path, "rb") as f:
        mm = None if empty_file else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            offs, lens = _hop(mm, size, path) if mm is not None else (array("q"), array("i"))
            n = len(offs)
            offset = np.frombuffer(offs, dtype=np.int64) if n else np.zeros(0, np.int64)
            length = np.frombuffer(lens, dtype=np.int32) if n else np.zeros(0, np.int32)
            pids = np.empty(n, np.int64)
            cats = np.empty(n, np.int32)
            nimg = np.empty(n, np.uint8)
            u8 = np.frombuffer(mm, dtype=np.uint8) if n else None
            for s in range(0, n, batch):
                o, l = offset[s:s + batch], length[s:s + batch].astype(np.int64)
                pid, cat, k, ok = _fields_fast(u8, o, l)
                for j in np.flatnonzero(~ok):  # other layouts, or damage: the general parser decides
                    start = int(o[j])
                    doc = mm[start:start + int(l[j])]
                    try:
                        p_, c_, k_ = _parse_doc(doc, 0, len(doc))
                    except (ValueError, IndexError, struct.error) as e:
                        prev = int(pids[s + j - 1]) if s + j else None
                        raise _err(path, start, _peek_id(doc, 0),
                                   f"corrupt document of {int(l[j])} bytes: {e}; previous product _id={prev}") from None
                    pid[j], cat[j], k[j] = p_, NO_LABEL if c_ is None else c_, k_
                if (cat < np.iinfo(np.int32).min).any() or (cat > np.iinfo(np.int32).max).any():
                    raise BsonFormatError(f"{path}: a category_id does not fit in int32")
                if (k > 255).any():
                    raise BsonFormatError(f"{path}: product _id {int(pid[k > 255][0])} has {int(k.max())} pictures "
                                          "(at most 255 are supported; the competition's have 1 to 4)")
                pids[s:s + batch], cats[s:s + batch], nimg[s:s + batch] = pid, cat, k
        finally:
            u8 = None  # numpy's view pins the map; release it before closing
            if mm is not None:
                mm.close()
    index = pd.DataFrame({"product_id": pids, "category_id": cats, "offset": offset,
                          "length": length, "n_imgs": nimg}, copy=False)
    index.attrs["source"] = path
    _check_unique_ids(pids, path)
    if out is not None:
        save_index(index, out)
    stats = IndexStats(path, n, int(nimg.sum()),
                       int(np.unique(cats[cats != NO_LABEL]).size), size,
                       time.perf_counter() - t0, pids[nimg == 0].tolist())
    return (index, stats) if return_stats else index


def _check_unique_ids(pids, path):
    "Refuse a file in which a product id repeats (cheap when ids ascend, as in the competition files)"
    if len(pids) < 2 or bool((pids[1:] > pids[:-1]).all()):
        return
    s = np.sort(pids)
    rep = s[1:] == s[:-1]
    if rep.any():
        raise BsonFormatError(f"{path}: product _id {int(s[1:][rep][0])} appears more than once "
                              f"({int(rep.sum())} duplicate ids)")


def save_index(index, path):
    "Write the index as Parquet, atomically"
    meta = {"source": index.attrs.get("source", "")}
    def write(tmp):
        df = index.copy()
        df.attrs = {}
        df.to_parquet(tmp, index=False)
    atomic_write(path, write)
    Path(str(path) + ".source").write_text(meta["source"])
    return path


def load_index(path):
    "Read an index saved by `save_index`, checking its columns"
    index = pd.read_parquet(path)
    missing = {"product_id", "category_id", "offset", "length", "n_imgs"} - set(index.columns)
    if missing:
        raise ValueError(f"{path}: not a cdkit product index (missing columns {sorted(missing)})")
    src = Path(str(path) + ".source")
    index.attrs["source"] = src.read_text() if src.exists() else ""
    return index


def image_table(index):
    "One row per picture (see docs/CONTRACTS.md); products without pictures contribute no row"
    n = index["n_imgs"].to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(index), dtype=np.int32), n)
    starts = np.cumsum(n) - n
    img_idx = (np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n)).astype(np.int8)
    table = pd.DataFrame({
        "product_id": index["product_id"].to_numpy()[rows],
        "category_id": index["category_id"].to_numpy()[rows],
        "img_idx": img_idx,
        "offset": index["offset"].to_numpy()[rows],
        "length": index["length"].to_numpy()[rows],
        "prod_row": rows,
    })
    table.attrs["source"] = index.attrs.get("source", "")
    return table


class BsonReader:
    """Random access to products of a BSON file by (offset, length) from the index.

    The file handle is opened lazily and re-opened after a fork, so a reader can be handed to
    DataLoader worker processes: each process reads with its own descriptor through pread."""

    def __init__(self, path):
        self.path = str(path)
        self._fd, self._pid = None, None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self._fd, self._pid = state["path"], None, None

    def _handle(self):
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def raw(self, offset, length):
        data = os.pread(self._handle(), int(length), int(offset))
        if len(data) != length or _INT32.unpack_from(data, 0)[0] != length:
            raise BsonFormatError(f"{self.path}: no document of {length} bytes at byte offset {offset} "
                                  "(index built from another file?)")
        return data

    def read_doc(self, offset, length):
        import bson  # pymongo's
        return bson.decode(self.raw(offset, length))

    def pictures(self, offset, length):
        "The JPEG bytes of every picture of the product, in order"
        return [bytes(img["picture"]) for img in self.read_doc(offset, length)["imgs"]]

    def picture(self, offset, length, img_idx):
        pics = self.pictures(offset, length)
        if not 0 <= img_idx < len(pics):
            raise IndexError(f"{self.path}: product at byte offset {offset} has {len(pics)} pictures, "
                             f"no picture {img_idx}")
        return pics[img_idx]

    def images(self, offset, length):
        "Decoded RGB arrays of the product's pictures; a picture that decodes as nothing is None"
        out = []
        for b in self.pictures(offset, length):
            try:
                out.append(decode_rgb(b))
            except ImageDecodeError:
                out.append(None)
        return out


def decode_rgb(data):
    """Decode picture bytes to an (H, W, 3) uint8 RGB array.

    libjpeg-turbo through simplejpeg for ordinary JPEGs (the fast path); PIL for everything else
    (PNG, CMYK or grayscale JPEG). Raises ImageDecodeError when neither can decode it."""
    try:
        import simplejpeg
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:
        pass
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ImageDecodeError(f"{len(data)} bytes that decode as no image ({type(e).__name__}: {e})") from None

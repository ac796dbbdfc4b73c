"""The competition's BSON files: a product index built by hopping over documents, and a reader.

train.bson / test.bson are plain concatenations of BSON documents
`{_id, imgs: [{picture: <JPEG bytes>}, ...], category_id}` (test: no category_id). The index records
where each document lies so that any product is one `pread` away; building it never decodes a picture.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cdkit.base.errors import CdkitError, read_parquet
from cdkit.base.io import atomic_write, guard, sweep_temps

NO_LABEL = -1  # category_id of a product in a test file
MAX_PICTURE_SIDE = 4096  # pictures claiming more pixels a side are refused before decoding (180 in the data)
_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_DOUBLE = struct.Struct("<d")

# Bytes a value of each BSON type occupies after its name, where that size is fixed.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
          0x06: 0, 0xFF: 0, 0x7F: 0}
# Types whose value starts with an int32 length: (extra bytes after the length's count).
_LEN_PREFIXED = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x05: 5, 0x03: 0, 0x04: 0, 0x0F: 0}
_TYPE_NAMES = {0x01: "a double", 0x02: "a string", 0x03: "a document", 0x04: "an array", 0x05: "binary",
               0x07: "an ObjectId", 0x08: "a boolean", 0x09: "a date", 0x0A: "null", 0x10: "an int32",
               0x12: "an int64", 0x13: "a decimal128"}


class BsonFormatError(CdkitError, ValueError):
    "The file is not a well-formed sequence of BSON documents; the message names file, offset and product"


class ImageDecodeError(CdkitError, ValueError):
    "A picture's bytes decode as no image"


class BadPictureError(ImageDecodeError):
    "A picture whose BSON structure is unsound (not binary, no `picture` key, a length past its document)"


def _type_name(etype):
    return _TYPE_NAMES.get(etype, f"BSON type 0x{etype:02x}")


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
        if etype in (0x03, 0x04, 0x0F):
            if n < 5:
                raise ValueError(f"embedded {_type_name(etype)} of impossible length {n}")
            return pos + n
        return pos + 4 + n + (_LEN_PREFIXED[etype] - 4)
    if etype == 0x0B:  # regex: two cstrings
        pos = buf.index(b"\x00", pos, end) + 1
        return buf.index(b"\x00", pos, end) + 1
    if etype == 0x0C:  # DBPointer
        n = _INT32.unpack_from(buf, pos)[0]
        return pos + 4 + n + 12
    raise ValueError(f"unknown BSON element type 0x{etype:02x}")


def _elements(buf, start, end):
    """(type, name, value position, next position) of each element of the document buf[start:end];
    ValueError when an element runs past the document or it lacks its terminating zero byte"""
    pos, last = start + 4, end - 1
    while pos < last:
        etype = buf[pos]
        name_end = buf.index(b"\x00", pos + 1, last)
        name = bytes(buf[pos + 1:name_end])
        nxt = _skip_value(buf, name_end + 1, etype, last)
        if nxt > last:
            raise ValueError(f"element {name.decode(errors='replace')!r} ({_type_name(etype)}) runs past the end "
                             "of its document")
        yield etype, name, name_end + 1, nxt
        pos = nxt
    if pos != last or buf[last] != 0:
        raise ValueError("document does not end with its terminating zero byte")


def _integer(buf, etype, pos, name):
    "The integer value of an int32 / int64 / integral double element; ValueError naming what it is otherwise"
    if etype == 0x10:
        return _INT32.unpack_from(buf, pos)[0]
    if etype == 0x12:
        return _INT64.unpack_from(buf, pos)[0]
    if etype == 0x01:
        f = _DOUBLE.unpack_from(buf, pos)[0]
        if not math.isfinite(f) or f != int(f) or not -2**63 <= f < 2**63:
            raise ValueError(f"{name} is the double {f!r}, not an integer")
        return int(f)
    raise ValueError(f"{name} is {_type_name(etype)}, not an integer")


def _picture_span(buf, start, end):
    "(first, stop) byte positions of the picture bytes of the picture document buf[start:end]; ValueError why not"
    span = None
    for etype, name, v, _ in _elements(buf, start, end):
        if name != b"picture":
            continue
        if etype != 0x05:
            raise ValueError(f"picture is {_type_name(etype)}, not binary")
        n = _INT32.unpack_from(buf, v)[0]
        span = (v + 5, v + 5 + n)
        if buf[v + 4] == 0x02 and n >= 4 and _INT32.unpack_from(buf, v + 5)[0] == n - 4:
            span = (v + 9, v + 5 + n)  # the old binary subtype repeats the length inside
    if span is None:
        raise ValueError("no picture key")
    return span


def _parse_doc(buf, start, end):
    """(_id, category_id, n_imgs, pictures) of the document occupying buf[start:end].

    Any key order, int32/int64/integral double ids. `pictures` has, per element of `imgs`, the
    (first, stop) byte span of its picture or, for a picture whose structure is unsound (not binary,
    no `picture` key, an inner length past its document), the reason as a string. Damage to the
    document's own frame (its length, the `imgs` array's) raises ValueError."""
    pid = cat = None
    pictures = None
    for etype, name, v, nxt in _elements(buf, start, end):
        if name == b"imgs":
            if etype != 0x04:
                raise ValueError(f"imgs is {_type_name(etype)}, not an array")
            pictures = []
            for k, (t, _, sv, snxt) in enumerate(_elements(buf, v, nxt)):
                if t != 0x03:
                    pictures.append(f"imgs[{k}] is {_type_name(t)}, not a document")
                    continue
                try:
                    pictures.append(_picture_span(buf, sv, snxt))
                except (ValueError, IndexError, struct.error) as e:
                    pictures.append(str(e) or type(e).__name__)
        elif name == b"_id":
            pid = _integer(buf, etype, v, "_id")
        elif name == b"category_id":
            cat = _integer(buf, etype, v, "category_id")
    if pid is None:
        raise ValueError("document has no _id")
    if pictures is None:
        raise ValueError("document has no imgs array")
    return pid, cat, len(pictures), pictures


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
    # (product_id, byte offset, img_idx, why) of each picture whose structure is unsound; its product
    # stays in the index (n_bad counts them) and the reader hands it on as a bad picture
    bad_pictures: list = field(default_factory=list)

    @property
    def mb_per_s(self):
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def bad_products(self):
        "Ids of the products with at least one unsound picture, in file order"
        return list(dict.fromkeys(p for p, *_ in self.bad_pictures))

    def summary(self):
        s = (f"{self.path}: {self.products:,} products, {self.images:,} images, "
             f"{self.categories:,} categories, {self.bytes / 1e6:,.1f} MB in {self.seconds:.2f} s "
             f"({self.mb_per_s:,.0f} MB/s)")
        if self.empty_products:
            s += f"; {len(self.empty_products)} products without pictures (e.g. _id {self.empty_products[:5]})"
        if self.bad_pictures:
            pid, off, k, why = self.bad_pictures[0]
            s += (f"; {len(self.bad_pictures)} unsound pictures in {len(self.bad_products)} products, counted as "
                  f"bad pictures when read (e.g. _id {pid} at byte offset {off}, picture {k}: {why})")
        return s


def _describe_id(buf, etype, pos):
    "An _id value for an error message, whatever its type"
    if etype in (0x10, 0x12):
        return _integer(buf, etype, pos, "_id")
    if etype == 0x01:
        f = _DOUBLE.unpack_from(buf, pos)[0]
        return int(f) if math.isfinite(f) and f == int(f) else f"{f!r} (a double)"
    if etype == 0x02:
        n = _INT32.unpack_from(buf, pos)[0]
        text = bytes(buf[pos + 4:pos + 4 + max(min(n - 1, 40), 0)]).decode(errors="replace")
        return f"{text!r} (a string)"
    if etype == 0x07:
        return f"ObjectId({bytes(buf[pos:pos + 12]).hex()})"
    return f"<{_type_name(etype)}>"


def _peek_id(buf, pos=0):
    """The _id of a damaged document (starting at `pos` of `buf`, which may hold only its first bytes),
    read by following its elements as far as they go; None when it cannot be read"""
    try:
        end = min(len(buf), pos + max(_INT32.unpack_from(buf, pos)[0], 5))
        p = pos + 4
        while p < end - 1:
            etype = buf[p]
            name_end = buf.index(b"\x00", p + 1, end)
            if buf[p + 1:name_end] == b"_id":
                return _describe_id(buf, etype, name_end + 1)
            p = _skip_value(buf, name_end + 1, etype, end)
    except (ValueError, IndexError, struct.error):
        pass
    return None


def _hop(mm, size, path, bar=None):
    """Offsets and lengths of every document, hopping by the length prefixes (one int32 read each);
    `bar` (a progress bar in bytes) moves every 64 MB"""
    offs, lens = array("q"), array("i")
    unpack = _INT32.unpack_from
    pos, done, mark = 0, 0, (64 << 20) if bar is not None else size
    while pos < size:
        if pos >= mark:
            bar.update(pos - done)
            done, mark = pos, pos + (64 << 20)
        if size - pos < 4:
            raise _err(path, pos, None, f"{size - pos} stray bytes at the end of the file (truncated?)")
        n = unpack(mm, pos)[0]
        if n < 5 or pos + n > size:
            why = (f"file ends {size - pos} bytes into a document of {n} bytes (truncated file?)"
                   if n >= 5 else f"document length {n} is impossible")
            if offs:
                why += f"; the previous document starts at byte offset {offs[-1]}"
            raise _err(path, pos, _peek_id(mm[pos:pos + 4096]), why)
        offs.append(pos)
        lens.append(n)
        pos += n
    if bar is not None: bar.update(size - done)
    return offs, lens


class _Bytes:
    """A buffer seen as uint8 and as (unaligned, overlapping) little-endian int32 / int64 at every byte
    position, so that reading a field of many documents is one numpy gather"""

    def __init__(self, buf):
        self.u8 = np.frombuffer(buf, dtype=np.uint8)
        self.n = n = len(self.u8)
        self.i32 = np.ndarray((n - 3,), "<i4", buf, 0, (1,))
        self.i64 = np.ndarray((n - 7,), "<i8", buf, 0, (1,))


def _gather32(m, pos):
    "Little-endian int32 at each position of `pos` (positions past the end read as clipped)"
    return m.i32[np.minimum(pos, m.n - 4)].astype(np.int64)


def _gather64(m, pos):
    return m.i64[np.minimum(pos, m.n - 8)]


def _matches(m, pos, sig):
    "Whether the bytes at each position spell `sig` (compared 8, 4, then 1 byte at a time)"
    ok = pos + len(sig) <= m.n
    pos = np.where(ok, pos, 0)
    k = 0
    while k < len(sig):
        width = 8 if len(sig) - k >= 8 else 4 if len(sig) - k >= 4 else 1
        want = int.from_bytes(sig[k:k + width], "little", signed=True) if width > 1 else sig[k]
        ok &= (m.i64 if width == 8 else m.i32 if width == 4 else m.u8)[pos + k] == want
        k += width
    return ok


_PICTURE = b"\x05picture\x00"


def _fields_fast(m, offs, lens, max_imgs=300):
    """(_id, category_id, n_imgs, ok) for documents laid out as the competition writes them:
    `_id` (int32/int64), then `imgs` (one-digit names, each a document holding only a binary
    `picture` whose length fits its document), then an optional int32/int64 `category_id`. Rows
    where `ok` is False have another layout or are damaged, and go through the general parser."""
    n = len(offs)
    pid = np.zeros(n, np.int64)
    cat = np.full(n, NO_LABEL, np.int64)
    nimg = np.zeros(n, np.int64)
    u8 = m.u8
    id32 = _matches(m, offs + 4, b"\x10_id\x00")
    id64 = _matches(m, offs + 4, b"\x12_id\x00")
    ok = id32 | id64
    p = np.where(id64, offs + 17, offs + 13)            # start of the imgs element
    ok &= _matches(m, p, b"\x04imgs\x00")
    pid[id32] = _gather32(m, offs[id32] + 9)
    pid[id64] = _gather64(m, offs[id64] + 9)
    arr = p + 6
    alen = np.where(ok, _gather32(m, np.where(ok, arr, 0)), 0)
    end = offs + lens
    ok &= (alen >= 5) & (arr + alen < end)
    tail = np.where(ok, arr + alen, 0)                   # just after the imgs array
    bare = ok & (tail + 1 == end)                        # test file: nothing after imgs
    c32 = ok & (tail + 18 == end) & _matches(m, tail, b"\x10category_id\x00")
    c64 = ok & (tail + 22 == end) & _matches(m, tail, b"\x12category_id\x00")
    cat[c32] = _gather32(m, tail[c32] + 13)
    cat[c64] = _gather64(m, tail[c64] + 13)
    ok &= (bare | c32 | c64) & (u8[np.where(ok, end - 1, 0)] == 0)
    # walk the picture documents: each element is 0x03, a one-digit name, then a document of exactly
    # {picture: binary subtype 0}, whose length is the binary's plus 19
    q = np.where(ok, arr + 4, 0)
    aend = arr + alen - 1
    live = ok & (q < aend)
    for _ in range(max_imgs + 1):
        if not live.any():
            break
        ql = q[live]
        s = ql + 3                                       # the picture document
        good = (u8[ql] == 3) & (u8[ql + 2] == 0)
        sub = np.where(good, _gather32(m, np.where(good, s, 0)), 0)
        good &= (sub >= 19) & (s + sub <= aend[live])
        good &= _matches(m, np.where(good, s + 4, 0), _PICTURE)
        good &= _gather32(m, np.where(good, s + 13, 0)) == sub - 19
        good &= (u8[np.where(good, s + 17, 0)] == 0) & (u8[np.where(good, s + sub - 1, 0)] == 0)
        idx = np.flatnonzero(live)
        ok[idx[~good]] = False
        q[idx] = s + sub
        nimg[idx] += 1
        live = ok & (q < aend)
    ok &= (q == aend) & (u8[np.where(ok, aend, 0)] == 0)
    return pid, cat, nimg, ok


def build_index(path, out=None, batch=1 << 15, return_stats=False, progress=None):
    """One row per product of a competition BSON file (see docs/CONTRACTS.md), optionally saved as Parquet.

    Hops over documents by their length prefixes (the only per-document Python work), then reads
    _id, category_id, the number of pictures and each picture's frame (binary, length within its
    document) of a whole batch of documents at once with numpy gathers from a memory map; a document
    of another layout, or with an unsound picture, goes through the general parser, so any key order
    and int32/int64/double ids work. Pictures are never decoded. A product with unsound pictures is
    kept (`n_bad` counts them; `IndexStats.bad_pictures` lists them with their offsets). Columns are
    narrow (26 bytes a product) and filled in place: 7 M products take about 184 MB. A truncated
    file or a document whose own frame is corrupt raises BsonFormatError naming the byte offset and
    the product. The index records the source's size, mtime and fingerprint (see `index_matches`).
    `progress`: a bar in bytes read (None: in notebooks and on terminals, see `cdkit.base.progress`)."""
    import mmap
    from cdkit.base.progress import bar as progress_bar
    t0 = time.perf_counter()
    path = str(path)
    if out is not None:
        guard(out, "index")  # never into the raw data (checked before the work, again by atomic_write)
        sweep_temps(Path(out).parent)  # what an index write killed earlier left behind
    fingerprint = source_fingerprint(path)
    size = fingerprint["size"]
    bad_pictures = []
    with open(path, "rb") as f:
        mm = None if size == 0 else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        m = None
        try:
            with progress_bar(total=size, desc=f"indexing {Path(path).name}", unit="B", unit_scale=True,
                              progress=progress if size > (256 << 20) or progress else False) as hop_bar:
                offs, lens = (_hop(mm, size, path, None if hop_bar.disable else hop_bar) if mm is not None
                              else (array("q"), array("i")))
            n = len(offs)
            offset = np.frombuffer(offs, dtype=np.int64) if n else np.zeros(0, np.int64)
            length = np.frombuffer(lens, dtype=np.int32) if n else np.zeros(0, np.int32)
            pids = np.empty(n, np.int64)
            cats = np.empty(n, np.int32)
            nimg = np.empty(n, np.uint8)
            nbad = np.zeros(n, np.uint8)
            m = _Bytes(mm) if size >= 64 else None
            for s in range(0, n, batch):
                o, l = offset[s:s + batch], length[s:s + batch].astype(np.int64)
                if m is not None:
                    pid, cat, k, ok = _fields_fast(m, o, l)
                else:
                    pid, cat, k, ok = (np.zeros(len(o), np.int64), np.full(len(o), NO_LABEL, np.int64),
                                       np.zeros(len(o), np.int64), np.zeros(len(o), bool))
                for j in np.flatnonzero(~ok):  # other layouts, or damage: the general parser decides
                    start = int(o[j])
                    doc = mm[start:start + int(l[j])]
                    try:
                        p_, c_, k_, pics = _parse_doc(doc, 0, len(doc))
                    except (ValueError, IndexError, struct.error) as e:
                        prev = int(pid[j - 1]) if j else int(pids[s - 1]) if s else None
                        where = f"previous product _id={prev}" if prev is not None else "the file's first document"
                        raise _err(path, start, _peek_id(doc),
                                   f"corrupt document of {int(l[j])} bytes: {e}; {where}") from None
                    pid[j], cat[j], k[j] = p_, NO_LABEL if c_ is None else c_, k_
                    bad = [(p_, start, i, why) for i, why in enumerate(pics) if isinstance(why, str)]
                    if bad:
                        nbad[s + j] = min(len(bad), 255)
                        bad_pictures += bad
                for name, v, lo, hi in (("category_id", cat, np.iinfo(np.int32).min, np.iinfo(np.int32).max),
                                        ("number of pictures", k, 0, 255)):
                    out_of_range = np.flatnonzero((v < lo) | (v > hi))
                    if len(out_of_range):
                        j = int(out_of_range[0])
                        raise _err(path, int(o[j]), int(pid[j]),
                                   f"{name} {int(v[j])} is outside {lo}..{hi}"
                                   + (" (the competition's products have 1 to 4 pictures)" if hi == 255 else ""))
                pids[s:s + batch], cats[s:s + batch], nimg[s:s + batch] = pid, cat, k
        finally:
            m = None  # numpy's views pin the map; release them before closing
            if mm is not None:
                mm.close()
    now = os.stat(path)
    if (now.st_size, now.st_mtime_ns) != (size, fingerprint["mtime_ns"]):
        raise BsonFormatError(f"{path} changed while it was being indexed; index it again")
    index = pd.DataFrame({"product_id": pids, "category_id": cats, "offset": offset,
                          "length": length, "n_imgs": nimg, "n_bad": nbad}, copy=False)
    index.attrs["source"] = path
    index.attrs["source_fingerprint"] = fingerprint
    _check_unique_ids(pids, offset, path)
    if out is not None:
        save_index(index, out)
    stats = IndexStats(path, n, int(nimg.sum()),
                       int(np.unique(cats[cats != NO_LABEL]).size), size,
                       time.perf_counter() - t0, pids[nimg == 0].tolist(), bad_pictures)
    return (index, stats) if return_stats else index


def _check_unique_ids(pids, offsets, path):
    "Refuse a file in which a product id repeats (cheap when ids ascend, as in the competition files)"
    if len(pids) < 2 or bool((pids[1:] > pids[:-1]).all()):
        return
    order = np.argsort(pids, kind="stable")
    s = pids[order]
    rep = np.flatnonzero(s[1:] == s[:-1])
    if len(rep):
        a, b = order[rep[0]], order[rep[0] + 1]
        raise BsonFormatError(f"{path}: product _id {int(pids[a])} appears more than once (at byte offsets "
                              f"{int(offsets[a])} and {int(offsets[b])}; {len(rep)} duplicate ids)")


# The fingerprint of a source file: its size and the sha256 of its first and last MB and of
# _FP_SAMPLES blocks spread evenly between them (a few hundred reads, whatever the file's size)
_FP_SCHEME = "size+sha256(first MB, last MB, 64 blocks of 4 KB)/1"
_FP_EDGE, _FP_SAMPLES, _FP_BLOCK = 1 << 20, 64, 4096


def picture_md5(picture: bytes) -> bytes:
    "The 16-byte MD5 digest by which byte-identical pictures are recognized (step 01's duplicates, the MD5 lookup)"
    return hashlib.md5(picture).digest()


def source_fingerprint(path):
    "dict(size, mtime_ns, sha256, scheme) of a file, cheap at any size (see `index_matches`)"
    fd = os.open(str(path), os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        h = hashlib.sha256(str(size).encode())
        blocks = [(0, _FP_EDGE)] + [(size * (i + 1) // (_FP_SAMPLES + 1), _FP_BLOCK) for i in range(_FP_SAMPLES)]
        for off, n in blocks + [(max(size - _FP_EDGE, 0), _FP_EDGE)]:
            h.update(os.pread(fd, n, off))
    finally:
        os.close(fd)
    return {"size": size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest(), "scheme": _FP_SCHEME}


_META_KEY = b"cdkit.index"
_COLUMNS = ("product_id", "category_id", "offset", "length", "n_imgs")


def save_index(index, path):
    """Write the index as Parquet, atomically, with its source path and fingerprint (index.attrs) in
    the file's metadata"""
    import pyarrow as pa
    import pyarrow.parquet as pq
    meta = {"source": index.attrs.get("source", ""), "source_fingerprint": index.attrs.get("source_fingerprint")}
    df = index.copy()
    df.attrs = {}
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return path


def _index_meta(path):
    import pyarrow.parquet as pq
    raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    return json.loads(raw) if raw else {}


def load_index(path):
    "Read an index saved by `save_index`, checking its columns (an index of an older cdkit gets n_bad = 0)"
    index = read_parquet(path)
    missing = set(_COLUMNS) - set(index.columns)
    if missing:
        raise ValueError(f"{path}: not a cdkit product index (missing columns {sorted(missing)})")
    if "n_bad" not in index:
        index["n_bad"] = np.zeros(len(index), np.uint8)
    meta = _index_meta(path)
    src = Path(str(path) + ".source")  # where older versions kept the source path
    index.attrs = {"source": meta.get("source") or (src.read_text() if src.exists() else "")}
    if meta.get("source_fingerprint"):
        index.attrs["source_fingerprint"] = meta["source_fingerprint"]
    return index


def index_matches(index_path, bson_path, spot_checks=256):
    """(True, why) when the index at `index_path` was built from the file now at `bson_path`, else
    (False, why): compares size and fingerprint (see `source_fingerprint`) with what the index
    recorded, then reads `spot_checks` products spread over the file and compares their _id,
    category_id and picture count with the index's rows. The modification time alone decides
    nothing (a copy changes it; a replaced file may carry an older one)."""
    index_path, bson_path = Path(index_path), Path(bson_path)
    if not index_path.exists():
        return False, f"no index at {index_path}"
    if not bson_path.exists():
        return False, f"no file at {bson_path}"
    try:
        fp = _index_meta(index_path).get("source_fingerprint")
    except Exception as e:
        return False, f"{index_path} is unreadable ({type(e).__name__}: {e})"
    if not fp or fp.get("scheme") != _FP_SCHEME:
        return False, f"{index_path} records no fingerprint of its source (written by an older cdkit)"
    now = source_fingerprint(bson_path)
    if now["size"] != fp["size"]:
        return False, f"{bson_path} has {now['size']:,} bytes; the index was built from {fp['size']:,}"
    if now["sha256"] != fp["sha256"]:
        return False, f"{bson_path} differs from the file the index was built from (fingerprint)"
    try:
        index = load_index(index_path)
    except Exception as e:
        return False, f"{index_path} is unreadable ({type(e).__name__}: {e})"
    n = len(index)
    if n and int(index["offset"].iat[-1]) + int(index["length"].iat[-1]) != now["size"]:
        return False, f"the index's last document does not end where {bson_path} ends"
    rows = np.unique(np.linspace(0, n - 1, min(n, spot_checks)).astype(np.int64)) if n else []
    reader = BsonReader(bson_path)
    try:
        for r in rows:
            row = index.iloc[int(r)]
            try:
                doc = reader.raw(row["offset"], row["length"])
                pid, cat, k, _ = _parse_doc(doc, 0, len(doc))
            except (ValueError, IndexError, struct.error) as e:
                return False, f"product {int(row['product_id'])} of the index is not where it was: {e}"
            cat = NO_LABEL if cat is None else cat
            if (pid, cat, k) != (int(row["product_id"]), int(row["category_id"]), int(row["n_imgs"])):
                return False, (f"the document at byte offset {int(row['offset'])} is product {pid} of category {cat} "
                               f"with {k} pictures; the index says product {int(row['product_id'])} of category "
                               f"{int(row['category_id'])} with {int(row['n_imgs'])}")
    finally:
        reader.close()
    same = "same" if now["mtime_ns"] == fp["mtime_ns"] else "another (copied or touched?)"
    return True, (f"{bson_path} matches the index: {now['size']:,} bytes, same fingerprint, {len(rows)} products "
                  f"checked, {same} modification time")


# img_idx is int8 (the image table, prediction stores): positions 0..127. The competition's products
# have 1 to 4 pictures; step 02 refuses a product with more than this many (`cdkit.data.prepare.check_data`).
MAX_PICTURES = int(np.iinfo(np.int8).max) + 1


def image_table(index):
    "One row per picture (see docs/CONTRACTS.md); products without pictures contribute no row"
    n = index["n_imgs"].to_numpy().astype(np.int64)
    if len(n) and int(n.max()) > MAX_PICTURES:
        j = int(np.argmax(n))
        raise BsonFormatError(f"{index.attrs.get('source', 'the index')}: product _id {int(index['product_id'].iloc[j])} "
                              f"has {int(n[j])} pictures, more than the {MAX_PICTURES} an int8 img_idx holds "
                              "(the competition's products have 1 to 4)")
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

    def slots(self, offset, length):
        """Each picture of the product: its bytes, or, for a picture whose structure is unsound, a
        BadPictureError naming the file, the product, its byte offset and the picture, and why"""
        data = self.raw(offset, length)
        fast = _sound_pictures(data)
        if fast is not None:
            return fast
        try:
            pid, _, _, pics = _parse_doc(data, 0, len(data))
        except (ValueError, IndexError, struct.error) as e:
            raise _err(self.path, offset, _peek_id(data), f"corrupt document of {length} bytes: {e}") from None
        return [data[p[0]:p[1]] if isinstance(p, tuple) else
                BadPictureError(f"{self.path}: product _id={pid} at byte offset {offset}, picture {k}: {p}")
                for k, p in enumerate(pics)]

    def pictures(self, offset, length):
        "The bytes of every picture of the product, in order; an unsound picture reads as b'' (see `slots`)"
        return [s if isinstance(s, bytes) else b"" for s in self.slots(offset, length)]

    def picture(self, offset, length, img_idx):
        "The bytes of one picture; BadPictureError (an ImageDecodeError) when its structure is unsound"
        pics = self.slots(offset, length)
        if not 0 <= img_idx < len(pics):
            raise IndexError(f"{self.path}: product at byte offset {offset} has {len(pics)} pictures, "
                             f"no picture {img_idx}")
        if isinstance(pics[img_idx], BadPictureError):
            raise pics[img_idx]
        return pics[img_idx]

    def images(self, offset, length):
        "Decoded RGB arrays of the product's pictures; a picture that decodes as nothing is None"
        out = []
        for b in self.slots(offset, length):
            try:
                out.append(decode_rgb(b) if isinstance(b, bytes) else None)
            except ImageDecodeError:
                out.append(None)
        return out


def _sound_pictures(data):
    """The pictures of a sound document through pymongo's C decoder (the common case, several times
    faster than the validating parser), or None when anything is odd (the caller then runs
    `_parse_doc`, which names what is wrong)"""
    import bson
    try:
        imgs = bson.decode(data)["imgs"]
        pics = [img["picture"] for img in imgs]
    except Exception:
        return None
    return pics if all(type(p) is bytes for p in pics) else None


def _refuse_size(width, height, data):
    if not (0 < width <= MAX_PICTURE_SIDE and 0 < height <= MAX_PICTURE_SIDE):
        raise ImageDecodeError(f"{len(data)} bytes whose header claims {width}x{height} pixels "
                               f"(at most {MAX_PICTURE_SIDE} a side are decoded)")


def _pil_image():
    from PIL import Image
    limit = MAX_PICTURE_SIDE * MAX_PICTURE_SIDE
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > limit:
        Image.MAX_IMAGE_PIXELS = limit  # PIL's own bomb check, at the size this kit accepts
    return Image


def decode_rgb(data):
    """Decode picture bytes to an (H, W, 3) uint8 RGB array.

    The header is read first (simplejpeg for JPEG, PIL's lazy open otherwise): a picture claiming
    more than MAX_PICTURE_SIDE pixels a side is refused before any pixel is decoded. libjpeg-turbo
    through simplejpeg decodes ordinary JPEGs (the fast path); PIL everything else (PNG, CMYK or
    grayscale JPEG). Raises ImageDecodeError when neither can decode it."""
    import simplejpeg
    if not len(data):
        raise ImageDecodeError("0 bytes: no picture")
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:
        height = width = None  # not a JPEG libjpeg-turbo reads: PIL's turn
    if height is not None:
        _refuse_size(width, height, data)
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except Exception:
            pass
    Image = _pil_image()
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own size check, at MAX_PICTURE_SIDE (see _pil_image)
        raise ImageDecodeError(f"{len(data)} bytes whose header claims more pixels than {MAX_PICTURE_SIDE}x"
                               f"{MAX_PICTURE_SIDE} ({e})") from None
    except Exception as e:
        raise ImageDecodeError(f"{len(data)} bytes that decode as no image ({type(e).__name__}: {e})") from None
    with im:
        _refuse_size(*im.size, data)
        try:
            return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ImageDecodeError(f"{len(data)} bytes that decode as no image ({type(e).__name__}: {e})") from None

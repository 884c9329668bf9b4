"""
Datasets for the object-centric models in this repo, read from their original on-disk formats.

    ds = build_dataset("clevrtex", "train", root="data/CLEVRTEX", image_size=128)
    item = ds[0]   # {"image": float32 [3,H,W] in [0,1], "mask": int64 [H,W], 0 = background}

Names (DATASETS holds, for each, the script that uses it, the download source, the expected
on-disk layout, the splits and the masks; `python data.py --list` prints it):
    synthetic        procedural 2-6 shapes on a plain background, exact masks, no files (default)
    synthetic_video  the same scenes with moving objects: "video" [T,3,H,W], "mask" [T,H,W]
    shapestacks      ShapeStacks renders with instance maps
    objectsroom      DeepMind Objects Room (GZIP TFRecord, or BO-QSA's PNG export)
    clevr, clevr6    DeepMind CLEVR with masks (GZIP TFRecord, or a per-scene PNG export)
    clevrtex, clevrtex_ood, clevrtex_camo   ClevrTex (full / outd / camo variants)
    movi_a           Kubric MOVi-A videos (TFDS shards or Kubric PNG sequences)
    birds, dogs, cars, flowers   single-object foreground datasets (DRC / BO-QSA release layouts)
    ycb, scannet, coco           multi-object real images of Yang & Yang 2022 (BO-QSA Tab. 4)

Also here, with no TensorFlow or protobuf dependency:
    read_tfrecord    the records of a TFRecord file (none/GZIP/ZLIB), masked CRC-32C checked
    parse_example    tf.train.Example wire format, decoded by hand
    crc32c           CRC-32C (Castagnoli), by the google-crc32c package
    GZIP / ZLIB      inflated by the zlib-ng package where installed (~3x faster), else by zlib

Conventions: images are float32 in [0,1]; masks are int64 label maps, 0 = background, ids need
not be contiguous; masks are resized with PIL NEAREST, images with PIL BILINEAR (which, like
torchvision's Resize on PIL images, antialiases when downscaling). Every loader checks its input
and raises DatasetError with a one-line message: the path it expected, what it found there, and
where to download the dataset.

Command line:
    python data.py [--list] [--markdown]     the DATASETS table (the default)
    python data.py NAME [--root PATH]        a summary of one item and the reading speed (items/s)
    python data.py convert objectsroom|clevr --root SRC --out DST   unpack a GZIP TFRecord into PNGs
"""

import bisect
import colorsys
import inspect
import io
import os
import re
import struct
import sys
import time
import warnings
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

try:   # zlib-ng: the same API and the same bytes as zlib, and it inflates DeepMind's GZIP TFRecords ~3x faster
    from zlib_ng import zlib_ng as zlib
except ImportError:
    import zlib

SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """A dataset is missing or malformed. The message is one line: the path that was expected,
    what was found there, and where to download the dataset. Scripts catch it and print it."""


_WARNED = set()


def _warn_once(msg):
    # the same message (e.g. "no splits folder") is printed once per process, not per split
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def _size2(image_size, default):
    """image_size (None | int | (H, W)) -> (H, W) ints."""
    s = default if image_size is None else image_size
    if isinstance(s, (int, np.integer)):
        return int(s), int(s)
    h, w = s
    return int(h), int(w)


def _hint(name):
    info = DATASETS.get(name)
    return f"download from {info.url} ({info.files}) and pass --data_dir=PATH" if info and info.url else ""


def _describe(path):
    """Short description of what is at `path`, for error messages."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isfile(path):
        return f"is a file of {os.path.getsize(path)} bytes"
    names = sorted(os.listdir(path))
    if not names:
        return "is an empty folder"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"contains {len(names)} entries: {shown}"


def _need_root(name, root, expected):
    if root is None or str(root) == "":
        raise DatasetError(f"{name}: no data folder given (expected {expected}); {_hint(name)}")
    root = os.path.expanduser(str(root))
    if not os.path.exists(root):
        raise DatasetError(f"{name}: expected {expected} at {root} (folder does not exist); {_hint(name)}")
    return root


# -----------------------------------------------------------------------------
# CRC-32C (Castagnoli), as used by TFRecord: google-crc32c (C, Apache-2.0; see requirements.txt),
# imported on first use, so that datasets without TFRecords work without it

_CRC32C = []   # [google_crc32c.value] once imported


def crc32c(data):
    """CRC-32C (Castagnoli, as in iSCSI and TFRecord) of `data` (bytes-like) -> int in [0, 2**32).

    Computed by the google-crc32c package (hardware CRC32 instructions where available, several
    GB/s). Raises DatasetError (one line, saying how to install it) when that package is missing;
    readers that verify CRCs need it, check_crc=False does not.
    """
    if not _CRC32C:
        try:
            import google_crc32c
        except ImportError:
            raise DatasetError("reading TFRecords with CRC checks needs the package google-crc32c "
                               "(pip install google-crc32c, listed in requirements.txt); or pass "
                               "check_crc=False") from None
        if getattr(google_crc32c, "implementation", "c") != "c":
            _warn_once("google-crc32c runs its pure-Python fallback (no C extension for this platform): "
                       "TFRecord CRC checks will be slow")
        _CRC32C.append(google_crc32c.value)
    return _CRC32C[0](bytes(data) if not isinstance(data, bytes) else data)


def _masked_crc(data):
    """TFRecord's masked CRC: rotate the CRC-32C right by 15 bits and add 0xA282EAD8 (mod 2**32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -----------------------------------------------------------------------------
# TFRecord files: [uint64 length][uint32 masked crc32c(length)][data][uint32 masked crc32c(data)]

_GZIP_WBITS, _ZLIB_WBITS = 31, 15


def _norm_compression(path, compression):
    c = (compression or "").upper()
    if c == "AUTO":
        with open(path, "rb") as f:
            return "GZIP" if f.read(2) == b"\x1f\x8b" else None
    if c not in ("", "GZIP", "ZLIB"):
        raise ValueError(f"compression must be None, '', 'GZIP', 'ZLIB' or 'auto', got {compression!r}")
    return c or None


class _Inflater:
    """Sequential reader of the decompressed bytes of a GZIP (multi-member) or ZLIB file.

    Optionally records snapshots (compressed offset, copy of the zlib state, decompressed offset)
    every `every` decompressed bytes past the last known snapshot, so that a later reader can
    resume near any position instead of decompressing from the start.
    """
    # compressed bytes per zlib call: DeepMind records (one-byte strings) inflate ~16x, and outputs of
    # ~256 KiB stay in cache (the ~1 MiB outputs of 64 KiB calls inflated up to 1.7x slower)
    CHUNK = 1 << 14

    def __init__(self, path, wbits, comp_pos=0, state=None, out_pos=0, snapshots=None, every=0):
        self.path, self.wbits = path, wbits
        self.f = open(path, "rb")
        self.f.seek(comp_pos)
        self.comp_pos = comp_pos
        self.d = state.copy() if state is not None else zlib.decompressobj(wbits)
        self.buf, self.pos = b"", 0   # the last zlib output; self.buf[self.pos:] is not consumed yet
        self.out_pos = out_pos        # stream offset of self.buf[self.pos]
        self.total_out = out_pos      # stream offset of the next byte the decompressor emits
        self.snapshots, self.every = snapshots, every

    def _inflate(self):
        """The next piece of decompressed bytes (may be empty), or None at the end of the file."""
        s = self.snapshots
        if s is not None and self.total_out >= s[-1][2] + self.every:
            s.append((self.comp_pos, self.d.copy(), self.total_out))
        chunk = self.f.read(self.CHUNK)
        if not chunk:
            return None
        self.comp_pos += len(chunk)
        try:
            out = self.d.decompress(chunk)
            while self.d.eof and self.d.unused_data:   # next gzip member
                rest = self.d.unused_data
                self.d = zlib.decompressobj(self.wbits)
                out += self.d.decompress(rest)
        except zlib.error as e:
            raise DatasetError(f"{self.path}: corrupt compressed data near byte {self.comp_pos} ({e})") from None
        self.total_out += len(out)
        return out

    def read(self, n):
        """The next n bytes (fewer at the end of the stream), copied once from zlib's outputs."""
        parts, got = [], 0
        while True:
            k = min(len(self.buf) - self.pos, n - got)
            if k:
                parts.append(memoryview(self.buf)[self.pos:self.pos + k])
                self.pos += k
                got += k
            if got == n:
                break
            out = self._inflate()
            if out is None:
                break
            self.buf, self.pos = out, 0
        self.out_pos += got
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def skip(self, n):
        """Advance n bytes; returns how many were skipped (less at end of stream)."""
        done = 0
        while done < n:
            avail = len(self.buf) - self.pos
            if avail == 0:
                out = self._inflate()
                if out is None:
                    break
                self.buf, self.pos = out, 0
                continue
            k = min(avail, n - done)
            self.pos += k
            self.out_pos += k
            done += k
        return done

    def close(self):
        self.f.close()


def _open_stream(path, compression):
    if compression is None:
        return open(path, "rb")
    return _Inflater(path, _GZIP_WBITS if compression == "GZIP" else _ZLIB_WBITS)


def _read_record(stream, path, i, check_crc):
    """Next record from a sequential stream, or None at a clean end of file."""
    head = stream.read(12)
    if not head:
        return None
    if len(head) < 12:
        raise DatasetError(f"{path}: truncated TFRecord at record {i} (header has {len(head)} of 12 bytes)")
    length, lcrc = struct.unpack("<QI", head)
    if check_crc and _masked_crc(head[:8]) != lcrc:
        raise DatasetError(f"{path}: corrupt TFRecord at record {i}: length CRC mismatch")
    if length > (1 << 40):
        raise DatasetError(f"{path}: corrupt TFRecord at record {i}: implausible length {length}")
    data = stream.read(length)
    tail = stream.read(4)
    if len(data) < length or len(tail) < 4:
        raise DatasetError(f"{path}: truncated TFRecord at record {i} (data ends early)")
    if check_crc and _masked_crc(data) != struct.unpack("<I", tail)[0]:
        raise DatasetError(f"{path}: corrupt TFRecord at record {i}: data CRC mismatch")
    return data


def read_tfrecord(path, compression=None, check_crc=True):
    """Yield the records (bytes) of a TFRecord file, in order.

    compression: None or "" (plain), "GZIP", "ZLIB", or "auto" (GZIP iff the file starts with the
    gzip magic bytes 1f 8b, else plain). Nothing else is inferred: DeepMind's multi-object files
    are GZIP, TFDS shards (MOVi) are plain. With check_crc, both masked CRC-32C values of every
    record (of the length and of the data) are verified.
    Raises DatasetError naming the file and record index on a CRC mismatch, truncation or corrupt
    compressed data, and (with check_crc) when the google-crc32c package is missing;
    FileNotFoundError if the file does not exist; ValueError for an unknown compression.
    """
    compression = _norm_compression(path, compression)
    stream = _open_stream(path, compression)
    try:
        i = 0
        while True:
            rec = _read_record(stream, path, i, check_crc)
            if rec is None:
                return
            yield rec
            i += 1
    finally:
        stream.close()


class _RecordIndex:
    """Random access to the records of one TFRecord file through an index of record offsets.

    The index (offset and length of each record's data in the *decompressed* stream) is built
    lazily and incrementally: `ensure(n)` scans headers until n records are known, so the test
    split of a 1M-record file only scans its first records. Plain files are scanned with seeks
    (12 bytes per record). GZIP/ZLIB files must be decompressed to be scanned (a few minutes for
    ObjectsRoom); the scan keeps zlib snapshots every 16 MiB of output, and a read resumes from
    the nearest snapshot (or continues the previous read when reading in order), so a random
    access costs at most ~16 MiB of decompression and sequential reading runs at stream speed.
    The index lives in memory, one per file for all datasets of the process (module cache, forked
    DataLoader workers inherit it). Pickling keeps the offsets and drops the zlib snapshots,
    which a new process rebuilds as it reads.
    """
    SNAPSHOT_EVERY = 16 << 20

    def __init__(self, path, compression="auto", check_crc=True):
        self.path = path
        self.compression = _norm_compression(path, compression)
        self.check_crc = check_crc
        self.offsets, self.lengths = array("q"), array("q")
        self.next_head = 0     # stream offset of the next header to scan
        self.done = False
        self._hinted = False   # the long-scan hint was printed
        self.file_size = os.path.getsize(path)
        self._reset()

    def _reset(self):
        self._pid = os.getpid()
        self._file = None
        self._scanner = None
        self._cursor = None
        if self.compression:
            wbits = _GZIP_WBITS if self.compression == "GZIP" else _ZLIB_WBITS
            self._snapshots = [(0, zlib.decompressobj(wbits), 0)]

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in ("_file", "_scanner", "_cursor", "_snapshots"):
            d.pop(k, None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._reset()

    def _check_pid(self):
        if os.getpid() != self._pid:   # forked: the open files' positions are the parent's too
            snaps = getattr(self, "_snapshots", None)
            self._reset()
            if snaps is not None:
                self._snapshots = snaps

    def _inflater_at(self, pos):
        wbits = _GZIP_WBITS if self.compression == "GZIP" else _ZLIB_WBITS
        k = bisect.bisect_right([s[2] for s in self._snapshots], pos) - 1
        comp, state, out = self._snapshots[k]
        inf = _Inflater(self.path, wbits, comp, state, out, self._snapshots, self.SNAPSHOT_EVERY)
        inf.skip(pos - out)
        return inf

    def ensure(self, n=None):
        """Scan until at least n records are indexed (all records if n is None)."""
        self._check_pid()
        t0 = t_last = time.time()
        while not self.done and (n is None or len(self.offsets) < n):
            i = len(self.offsets)
            if i % 1024 == 0 and time.time() - t_last > 10:   # long scans (GZIP) say what they do
                t_last = time.time()
                hint = "" if self.compression is None or self._hinted else (
                    " (each process indexes a GZIP file once; `python data.py convert objectsroom|clevr` makes a "
                    "PNG copy that needs no index)")
                self._hinted = True
                print(f"indexing {self.path}: {i} records in {t_last - t0:.0f} s ...{hint}", file=sys.stderr)
            if self.compression is None:
                if self._file is None:
                    self._file = open(self.path, "rb")
                self._file.seek(self.next_head)
                head = self._file.read(12)
            else:
                if self._scanner is None or self._scanner.out_pos != self.next_head:
                    self._scanner = self._inflater_at(self.next_head)
                head = self._scanner.read(12)
            if not head:
                self.done = True
                break
            if len(head) < 12:
                raise DatasetError(f"{self.path}: truncated TFRecord at record {i} (header has {len(head)} of 12 bytes)")
            length, lcrc = struct.unpack("<QI", head)
            if self.check_crc and _masked_crc(head[:8]) != lcrc:
                raise DatasetError(f"{self.path}: corrupt TFRecord at record {i}: length CRC mismatch")
            if self.compression is None:
                end = self.next_head + 12 + length + 4
                if end > self.file_size:
                    raise DatasetError(f"{self.path}: truncated TFRecord at record {i} (data ends early)")
            elif self._scanner.skip(length + 4) < length + 4:
                raise DatasetError(f"{self.path}: truncated TFRecord at record {i} (data ends early)")
            self.offsets.append(self.next_head + 12)
            self.lengths.append(length)
            self.next_head += 12 + length + 4
        return len(self.offsets)

    def __len__(self):
        return self.ensure(None)

    def read(self, i, check_crc=None):
        """Bytes of record i, data CRC checked if check_crc (None: the index's setting).
        IndexError past the end."""
        check_crc = self.check_crc if check_crc is None else check_crc
        if self.ensure(i + 1) <= i:
            raise IndexError(i)
        self._check_pid()
        off, length = self.offsets[i], self.lengths[i]
        if self.compression is None:
            if self._file is None:
                self._file = open(self.path, "rb")
            self._file.seek(off)
            data, tail = self._file.read(length), self._file.read(4)
        else:
            c = self._cursor
            if c is None or not (c.out_pos <= off <= c.out_pos + 2 * self.SNAPSHOT_EVERY):
                if c is not None:
                    c.close()
                c = self._cursor = self._inflater_at(off)
            else:
                c.skip(off - c.out_pos)
            data, tail = c.read(length), c.read(4)
        if len(data) < length or len(tail) < 4:
            raise DatasetError(f"{self.path}: truncated TFRecord at record {i} (data ends early)")
        if check_crc and _masked_crc(data) != struct.unpack("<I", tail)[0]:
            raise DatasetError(f"{self.path}: corrupt TFRecord at record {i}: data CRC mismatch")
        return data


_INDEX_CACHE = {}


def _record_index(path, compression="auto", check_crc=True):
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, compression, check_crc)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = _RecordIndex(path, compression, check_crc)
    return _INDEX_CACHE[key]


# -----------------------------------------------------------------------------
# tf.train.Example, protobuf wire format by hand
#   Example  { Features features = 1; }
#   Features { map<string, Feature> feature = 1; }   map entry: { string key = 1; Feature value = 2; }
#   Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
#   *List    { repeated <type> value = 1; }   floats and int64s normally packed

def _varint(buf, pos):
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DatasetError("malformed tf.train.Example: varint longer than 10 bytes")


def _fields(buf, start, end):
    """Yield (field number, wire type, value or (start, end) of a length-delimited payload)."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = (pos, pos + 8), pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val, pos = (pos, pos + n), pos + n
        elif wt == 5:
            val, pos = (pos, pos + 4), pos + 4
        else:
            raise DatasetError(f"malformed tf.train.Example: wire type {wt} at byte {pos}")
        if pos > end:
            raise DatasetError("malformed tf.train.Example: field runs past the end of its message")
        yield num, wt, val


def _decode_varints(a):
    """Packed varints (uint8 array) -> int64 array (two's complement for negatives), vectorised."""
    if a.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(a < 0x80)
    if ends.size == 0 or ends[-1] != a.size - 1:
        raise DatasetError("malformed tf.train.Example: truncated packed varint")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lens = ends - starts + 1
    if lens.max() > 10:
        raise DatasetError("malformed tf.train.Example: varint longer than 10 bytes")
    shift = (np.arange(a.size) - np.repeat(starts, lens)) * 7
    vals = (a & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.bitwise_or.reduceat(vals, starts).view(np.int64)


def _decode_bytes_list(buf, arr, s, e, one_byte_as_array, copy=True):
    n = e - s
    if one_byte_as_array and n and n % 3 == 0:
        # DeepMind layout: every entry is one byte, encoded 0a 01 XX; check and read by strided views
        m = n // 3
        tags = np.ndarray((m,), dtype="<u2", buffer=arr, offset=s, strides=(3,))
        if (tags == 0x010A).all():
            v = np.ndarray((m,), dtype=np.uint8, buffer=arr, offset=s + 2, strides=(3,))
            return v.copy() if copy else v
    vals = []
    for num, wt, val in _fields(buf, s, e):
        if num == 1 and wt == 2:
            vals.append(bytes(buf[val[0]:val[1]]))
    if one_byte_as_array and vals and all(len(v) == 1 for v in vals):
        return np.frombuffer(b"".join(vals), dtype=np.uint8).copy()
    return vals


def _decode_float_list(buf, arr, s, e):
    parts = []
    for num, wt, val in _fields(buf, s, e):
        if num == 1 and wt in (2, 5):   # packed run, or one unpacked float
            if (val[1] - val[0]) % 4:
                raise DatasetError("malformed tf.train.Example: float list length not a multiple of 4")
            parts.append(np.frombuffer(arr[val[0]:val[1]].tobytes(), dtype="<f4"))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _decode_int64_list(buf, arr, s, e):
    parts = []
    for num, wt, val in _fields(buf, s, e):
        if num == 1 and wt == 2:
            parts.append(_decode_varints(arr[val[0]:val[1]]))
        elif num == 1 and wt == 0:
            parts.append(np.array([val], dtype=np.uint64).view(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def parse_example(record, one_byte_as_array=True, copy=True):
    """Decode a serialized tf.train.Example -> {feature name: value}.

    bytes_list -> list[bytes]; float_list -> np.float32 array; int64_list -> np.int64 array
    (packed and unpacked encodings). A bytes_list whose entries are ALL one byte long (the
    DeepMind multi-object layout: an image as H*W*3 one-byte strings) comes back as one uint8
    np.ndarray instead, decoded with a strided view (a 3 MB CLEVR mask in a few ms); pass
    one_byte_as_array=False to always get list[bytes]. copy=False returns those uint8 arrays as
    read-only strided views into the record instead (no copy; they keep the record alive).
    A feature with no kind set -> [].
    Raises DatasetError on malformed input.
    """
    buf = bytes(record)
    arr = np.frombuffer(buf, dtype=np.uint8)
    out = {}
    try:
        for num, wt, val in _fields(buf, 0, len(buf)):
            if num != 1 or wt != 2:
                continue
            for fnum, fwt, entry in _fields(buf, *val):
                if fnum != 1 or fwt != 2:
                    continue
                key, value = None, []
                for enum, ewt, ev in _fields(buf, *entry):
                    if enum == 1 and ewt == 2:
                        key = buf[ev[0]:ev[1]].decode("utf-8")
                    elif enum == 2 and ewt == 2:
                        for knum, kwt, kv in _fields(buf, *ev):
                            if kwt != 2:
                                continue
                            if knum == 1:
                                value = _decode_bytes_list(buf, arr, kv[0], kv[1], one_byte_as_array, copy)
                            elif knum == 2:
                                value = _decode_float_list(buf, arr, kv[0], kv[1])
                            elif knum == 3:
                                value = _decode_int64_list(buf, arr, kv[0], kv[1])
                if key is not None:
                    out[key] = value
    except IndexError:
        raise DatasetError("malformed tf.train.Example: message ends inside a field") from None
    except UnicodeDecodeError:
        raise DatasetError("malformed tf.train.Example: feature name is not UTF-8") from None
    return out


# -----------------------------------------------------------------------------
# image helpers

def _open_image(path, label=None):
    """PIL image, fully loaded. Raises DatasetError naming the file when it is missing or corrupt."""
    try:
        img = Image.open(path) if not isinstance(path, (bytes, bytearray)) else Image.open(io.BytesIO(path))
        img.load()
        return img
    except FileNotFoundError:
        raise DatasetError(f"expected image file {label or path} (not found)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise DatasetError(f"cannot read image {label or path}: {type(e).__name__}: {e}") from None


def _image_hw(path):
    """(H, W) from the file's header only (PIL decodes lazily). DatasetError if missing/corrupt."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except FileNotFoundError:
        raise DatasetError(f"expected image file {path} (not found)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _check_mask_size(mask_path, mask_hw, image_path, image_hw):
    """Raise DatasetError unless a mask [H,W] has its image's (H, W).

    Called on the decoded sizes before any crop or resize: a mask of another size would be cut
    with the image's crop box and give wrong ground truth without any error. The paths may be
    labels (e.g. "FILE record 3 frame 0") for data inside a TFRecord.
    """
    (mh, mw), (ih, iw) = tuple(mask_hw)[:2], tuple(image_hw)[:2]
    if (mh, mw) != (ih, iw):
        raise DatasetError(f"{mask_path}: mask is {mw}x{mh} but its image {image_path} is {iw}x{ih}; "
                           f"the mask must have the image's size (re-export the dataset)")


def _rgb(img):
    """PIL image -> uint8 [H,W,3] (alpha dropped, grey expanded)."""
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGB")
    return np.asarray(img)[..., :3]


def _centre_box(w, h, crop):
    """Centred square crop box: crop is a fraction of the short side (float <= 1) or pixels (int)."""
    c = int(crop * min(w, h)) if crop <= 1 else int(crop)
    return (w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2


def _resize_rgb(a, size):
    """uint8 [H,W,3] -> uint8 [h,w,3] with PIL BILINEAR (no-op at the same size)."""
    if a.shape[:2] == tuple(size):
        return a
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size[1], size[0]), Image.BILINEAR))


def _resize_labels(m, size):
    """int label map [H,W] -> [h,w] with PIL NEAREST."""
    if m.shape == tuple(size):
        return m
    mode_img = Image.fromarray(m.astype(np.uint8)) if m.max(initial=0) < 256 else Image.fromarray(m.astype(np.int32))
    return np.asarray(mode_img.resize((size[1], size[0]), Image.NEAREST))


def _crop(a, box):
    return a if box is None else a[box[1]:box[3], box[0]:box[2]]


def _item(image, mask=None):
    """uint8 [H,W,3] (+ label map) -> item dict of tensors."""
    out = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)}
    if mask is not None:
        out["mask"] = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
    return out


def _split_slice(n, split, fractions=(0.1, 0.1)):
    """ClevrTex convention on n sorted items: test = first 10%, val = next 10%, train = rest."""
    a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
    return {"test": (0, a), "val": (a, b), "train": (b, n)}[split]


def _empty_split_error(name, root, split, found, unit="images"):
    """DatasetError for a split of _split_slice that came out empty: the counts and the rule.

    E.g. 3 images: test = int(0.3) = 0 images. The minimum is the smallest n whose slice is not
    empty (test 10, val 5, train 1).
    """
    need = next(n for n in range(1, 1000) if (lambda a, b: b > a)(*_split_slice(n, split)))
    rule = {"test": "the first 10%", "val": "the next 10%", "train": "what is left after 20%"}[split]
    return DatasetError(f"{name} at {root}: the {split} split is empty ({found} {unit} found; the {split} split "
                        f"is {rule}, so at least {need} {unit} are needed)")


def _check_split(name, split):
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


class _Base(torch.utils.data.Dataset):
    """Common attributes: name, split, has_masks, video, image_size (H, W)."""
    name, video, has_masks = "", False, True

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, " \
               f"image_size={self.image_size}, has_masks={self.has_masks})"


# -----------------------------------------------------------------------------
# synthetic shapes

_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
# saturated, well-separated hues; backgrounds are muted (low saturation), so objects stand out
_PALETTE = np.array([
    [230, 25, 35], [245, 130, 20], [235, 215, 25], [40, 185, 50],
    [30, 200, 215], [40, 80, 235], [150, 45, 225], [235, 45, 185]], dtype=np.uint8)
SHAPES = ("circle", "square", "triangle", "diamond", "ellipse")
_GRIDS = {}


def _grid(h, w):
    if (h, w) not in _GRIDS:   # pixel centres
        _GRIDS[(h, w)] = (np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5)
    return _GRIDS[(h, w)]


def _shape_mask(kind, cy, cx, r, orient, h, w):
    """Boolean [H,W] mask of one shape, which fits in the box centre +- r."""
    yy, xx = _grid(h, w)
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return dx * dx + dy * dy <= r * r
    if kind == 1:
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if kind == 2:   # apex up, base at 0.8 r, half width r at the base
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if kind == 3:
        return np.abs(dx) + np.abs(dy) <= r
    a, b = (r, 0.55 * r) if orient == 0 else (0.55 * r, r)
    return (dx / a) ** 2 + (dy / b) ** 2 <= 1.0


def _background(rng, h, w, textured):
    """Muted background: uint8 [H,W,3]; a plain colour, or two close muted colours in stripes or checks."""
    hue = rng.random()
    c1 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.55)))
    if not textured:
        return np.broadcast_to((c1 * 255).astype(np.uint8), (h, w, 3)).copy()
    c2 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.1, 0.3), rng.uniform(0.3, 0.55)))
    yy, xx = _grid(h, w)
    period = rng.uniform(4, 12) * min(h, w) / 64
    if rng.random() < 0.5:
        ang = rng.uniform(0, np.pi)
        pat = (np.floor((xx * np.cos(ang) + yy * np.sin(ang)) / period) % 2).astype(bool)
    else:
        pat = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(bool)
    return (np.where(pat[..., None], c1, c2) * 255).astype(np.uint8)


def _scene(rng, h, w, num_objects, min_visible=0.3):
    """Sample objects one by one, each painted on top of the previous ones; an object is kept only
    if every earlier object stays at least `min_visible` visible. Returns a list of dicts."""
    lo, hi = num_objects
    target = int(rng.integers(lo, hi + 1))
    s = min(h, w)
    colours = rng.permutation(len(_PALETTE)) if target <= len(_PALETTE) else rng.integers(0, len(_PALETTE), target)
    label = np.zeros((h, w), np.int16)
    objs, areas = [], []
    tries = 0
    while len(objs) < target and tries < 30 * target:
        tries += 1
        shrink = 0.7 if tries > 15 * target else 1.0   # small objects if space is tight
        r = rng.uniform(0.1, 0.2) * s * shrink
        obj = dict(kind=int(rng.integers(len(SHAPES))), r=r, orient=int(rng.integers(2)),
                   cy=rng.uniform(r, h - r), cx=rng.uniform(r, w - r),
                   colour=_PALETTE[colours[len(objs)]])
        m = _shape_mask(obj["kind"], obj["cy"], obj["cx"], r, obj["orient"], h, w)
        area = int(m.sum())
        if area == 0:
            continue
        new = label.copy()
        new[m] = len(objs) + 1
        counts = np.bincount(new.ravel(), minlength=len(objs) + 2)
        if len(objs) and (counts[1:len(objs) + 1] < min_visible * np.array(areas)).any():
            continue
        label = new
        objs.append(obj)
        areas.append(area)
    return objs


def _render(objs, bg, centres=None):
    """Paint objects in order (later on top) -> (uint8 image [H,W,3], label map [H,W])."""
    h, w = bg.shape[:2]
    label = np.zeros((h, w), np.int64)
    for k, o in enumerate(objs):
        cy, cx = (o["cy"], o["cx"]) if centres is None else centres[k]
        label[_shape_mask(o["kind"], cy, cx, o["r"], o["orient"], h, w)] = k + 1
    lut = np.zeros((len(objs) + 1, 3), np.uint8)   # colour of each label, 0 unused
    for k, o in enumerate(objs):
        lut[k + 1] = o["colour"]
    image = np.where(label[..., None] > 0, lut[label], bg)
    return image, label


class SyntheticShapes(_Base):
    """Procedural multi-object scenes, generated on the fly; no files.

    Each item: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W] with 0 = background and
    1..K the objects in painting order (K in num_objects). Shapes: circle, square, triangle,
    diamond, ellipse; radius 0.1-0.2 of the image side; each object one of 8 saturated colours,
    all different within an image; the background a random muted colour (or a muted stripe/check
    texture with textured_background=True). Objects may overlap, the later one on top, and each
    object keeps at least 30% of its area visible. Deterministic per (seed, split, index): split
    differences come only from the seed. Under 1 ms per 64x64 image.
    """
    name = "synthetic"

    def __init__(self, split="train", root=None, image_size=None, num_objects=(2, 6), size=None, seed=0,
                 textured_background=False):
        _check_split(self.name, split)
        self.split, self.image_size = split, _size2(image_size, 64)
        lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
        if not 1 <= lo <= hi:
            raise DatasetError(f"{self.name}: num_objects must be (min, max) with 1 <= min <= max, got {num_objects}")
        self.num_objects = (int(lo), int(hi))
        self.size = int(size) if size is not None else {"train": 100_000, "val": 512, "test": 512}[split]
        self.seed, self.textured_background = int(seed), bool(textured_background)

    def __len__(self):
        return self.size

    def _sample_scene(self, index):
        """(rng, background, objects) of item `index`; the rng continues where the scene left it."""
        if not -self.size <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index % self.size])
        h, w = self.image_size
        bg = _background(rng, h, w, self.textured_background)
        return rng, bg, _scene(rng, h, w, self.num_objects)

    def __getitem__(self, index):
        _, bg, objs = self._sample_scene(index)
        return _item(*_render(objs, bg))


def _bounce(p0, v, t, lo, hi):
    """Position at time t of a point moving at constant speed and bouncing between lo and hi."""
    span = hi - lo
    if span <= 0:
        return lo
    u = (p0 - lo + v * t) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


class SyntheticVideo(SyntheticShapes):
    """The synthetic scenes with objects moving at constant velocity, bouncing off the borders.

    Each item: "video" float32 [T,3,H,W] in [0,1], "mask" int64 [T,H,W] (T = num_frames) with
    object ids fixed over time. Frame 0 is the SyntheticShapes scene of the same (seed, split,
    index); later frames may hide an object completely (its id is then absent from that frame).
    Speeds are 2-5% of the image side per frame.
    """
    name, video = "synthetic_video", True

    def __init__(self, split="train", root=None, image_size=None, num_objects=(2, 6), size=None, seed=0,
                 textured_background=False, num_frames=8):
        super().__init__(split, root, image_size, num_objects, size, seed, textured_background)
        if size is None:
            self.size = {"train": 10_000, "val": 256, "test": 256}[split]
        self.num_frames = int(num_frames)

    def __getitem__(self, index):
        rng, bg, objs = self._sample_scene(index)
        h, w = self.image_size
        vel = []
        for _ in objs:
            speed, ang = rng.uniform(0.02, 0.05) * min(h, w), rng.uniform(0, 2 * np.pi)
            vel.append((speed * np.sin(ang), speed * np.cos(ang)))
        frames, masks = [], []
        for t in range(self.num_frames):
            centres = [(_bounce(o["cy"], vy, t, o["r"], h - o["r"]), _bounce(o["cx"], vx, t, o["r"], w - o["r"]))
                       for o, (vy, vx) in zip(objs, vel)]
            image, label = _render(objs, bg, centres)
            frames.append(image)
            masks.append(label)
        video = torch.from_numpy(np.stack(frames).transpose(0, 3, 1, 2).copy()).float().div_(255.0)
        return {"video": video, "mask": torch.from_numpy(np.stack(masks))}


# -----------------------------------------------------------------------------
# ShapeStacks

_SS_RGB = re.compile(r"^rgb-.*-cam_(\d+)-mono-0\.png$")


class ShapeStacks(_Base):
    """ShapeStacks (Groth et al. 2018), as used by GENESIS, BO-QSA and AST-Seg.

    Download, on-disk layout, splits and masks: DATASETS["shapestacks"] (`python data.py --list`).
    Every rgb-*-mono-0.png of a scenario is an item (as GENESIS does); its mask is the iseg .map
    of the same camera, decoded as label = round(red channel / 32) (matplotlib's gray colormap
    with vmin=0, vmax=8 writes R=G=B=32*label), 0 = background, 1..6 the shapes, 7 'unassigned'
    (and anything above) -> background 0. root may be the dataset folder or its recordings/
    folder; split_name picks splits/<split_name>/ (val = eval.txt). Without a splits folder (like
    the repository's example scenario) every split uses all scenarios, with a warning. Without
    .map files has_masks is False and items carry no "mask" (a warning when only some exist).
    Items: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W].
    Preprocessing: centre crop `crop` pixels (196; 0/None = none), resize to image_size (64 for
    GENESIS/AST, 128 for BO-QSA): BILINEAR image, NEAREST mask.
    Raises DatasetError when the folder, a listed scenario or every rgb image is missing, and on
    reading a missing or corrupt file or a map of another size than its image.
    """
    name = "shapestacks"

    def __init__(self, split="train", root=None, image_size=None, crop=196, split_name="default"):
        _check_split(self.name, split)
        self.split, self.image_size, self.crop = split, _size2(image_size, 64), crop
        expected = "a folder with recordings/<scenario>/rgb-*-mono-0.png"
        root = _need_root(self.name, root, expected)
        if os.path.isdir(os.path.join(root, "recordings")):
            rec, base = os.path.join(root, "recordings"), root
        elif os.path.basename(os.path.normpath(root)) == "recordings":
            rec, base = root, os.path.dirname(os.path.normpath(root))
        else:
            raise DatasetError(f"{self.name}: expected folder {os.path.join(root, 'recordings')} with "
                               f"<scenario>/rgb-*.png (not found; {root} {_describe(root)}); {_hint(self.name)}")
        split_file = os.path.join(base, "splits", split_name, {"val": "eval"}.get(split, split) + ".txt")
        if os.path.isfile(split_file):
            with open(split_file) as f:
                scenarios = [s.strip() for s in f.read().split("\n") if s.strip()]
        else:
            scenarios = sorted(d for d in os.listdir(rec) if os.path.isdir(os.path.join(rec, d)))
            _warn_once(f"{self.name}: no split files in {os.path.dirname(split_file)}; every split uses all "
                       f"{len(scenarios)} scenarios in {rec}")
        self.files = []   # (rgb path, map path or None)
        for sc in scenarios:
            d = os.path.join(rec, sc)
            if not os.path.isdir(d):
                raise DatasetError(f"{self.name}: expected scenario folder {d} listed in {split_file} "
                                   f"(not found); {_hint(self.name)}")
            names = os.listdir(d)
            have = set(names)
            for fn in sorted(names):
                m = _SS_RGB.match(fn)
                if m:
                    mp = f"iseg-w=0-f=0-l=0-c=original-cam_{m.group(1)}-mono-0.map"
                    self.files.append((os.path.join(d, fn), os.path.join(d, mp) if mp in have else None))
        if not self.files:
            raise DatasetError(f"{self.name}: expected rgb-*-mono-0.png files in {rec}/<scenario>/ "
                               f"(found 0 in {len(scenarios)} scenarios); {_hint(self.name)}")
        with_map = sum(m is not None for _, m in self.files)
        self.has_masks = with_map == len(self.files)
        if 0 < with_map < len(self.files):
            _warn_once(f"{self.name}: only {with_map} of {len(self.files)} images have an iseg .map file; "
                       f"masks disabled")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        rgb_path, map_path = self.files[index]
        img = _rgb(_open_image(rgb_path))
        box = _centre_box(img.shape[1], img.shape[0], self.crop) if self.crop else None
        image = _resize_rgb(_crop(img, box), self.image_size)
        if not self.has_masks:
            return _item(image)
        seg = np.asarray(_open_image(map_path))
        _check_mask_size(map_path, seg.shape, rgb_path, img.shape)
        seg = seg[..., 0] if seg.ndim == 3 else seg
        label = np.rint(seg.astype(np.float32) / 32).astype(np.int64)
        label[label >= 7] = 0   # 7 = unassigned pixels
        return _item(image, _resize_labels(_crop(label, box), self.image_size))


# -----------------------------------------------------------------------------
# DeepMind multi-object datasets (ObjectsRoom, CLEVR with masks)

def _labels_from_channels(masks, n_background):
    """[K,H,W] 0/255 entity masks -> int64 label map [H,W]: channel c >= n_background -> c - n_background
    + 1, background channels and uncovered pixels -> 0. The masks partition the image, so argmax is
    exact; with overlaps the first channel of the largest value wins (np.argmax's rule)."""
    if len(masks) == 0:
        masks.argmax(0)   # numpy's ValueError, as before
    # argmax over channels one channel at a time: K contiguous passes, 5x faster than argmax(0)'s strided one
    masks = np.ascontiguousarray(masks)   # (a strided view of a record: one copy beats K strided passes)
    best, k = masks[0].copy(), np.zeros(masks.shape[1:], np.int64)
    gt = np.empty(masks.shape[1:], bool)
    for c in range(1, len(masks)):
        np.greater(masks[c], best, out=gt)   # strictly larger: ties keep the earlier channel, as argmax
        np.copyto(k, c, where=gt)
        np.maximum(best, masks[c], out=best)
    lab = np.where(k >= n_background, k - n_background + 1, 0)
    lab[best == 0] = 0
    return lab.astype(np.int64)


class _DeepMindTFRecord(_Base):
    """Records [start, stop) of a DeepMind multi-object GZIP TFRecord, decoded on access.

    Splits are record ranges: test = the first `test_size` records, val = the next `val_size`,
    train = the rest; when the file is too small for the requested split (e.g. a sample file),
    every split uses all its records, with a warning. See _RecordIndex for how random access
    into a GZIP stream works and what it costs. `max_items` caps the number of items (and how
    far the file is scanned), for quick runs. `compression`: "auto" (GZIP if the file starts with
    the gzip magic, else plain), or "GZIP" / "ZLIB" / None explicitly.
    """

    native = (0, 0)   # (H, W) of the records

    def _setup_records(self, path, split, n_background, test_size, val_size, max_items,
                       all_splits=False, max_objects=None, check_crc=True, compression="auto"):
        self.path, self.n_background = path, n_background
        self.index = _record_index(path, compression, check_crc)
        a, b = (0, None) if all_splits else {"test": (0, test_size), "val": (test_size, test_size + val_size),
                                              "train": (test_size + val_size, None)}[split]
        if self.index.ensure(a + 1) <= a:   # file too small for this split (e.g. a sample)
            if self.index.ensure(1) == 0:
                raise DatasetError(f"{self.name}: {path} holds no records; {_hint(self.name)}")
            _warn_once(f"{self.name}: {path} has only {len(self.index)} records, fewer than the split ranges "
                       f"(test {test_size}, val {val_size}, train the rest); every split uses all of them")
            a, b = 0, None
        if max_objects is None:
            stop = b if max_items is None else (a + max_items if b is None else min(b, a + max_items))
            n = self.index.ensure(stop)
            self.records = range(a, n if stop is None else min(stop, n))
            return
        # CLEVR6: keep scenes with at most max_objects non-empty object masks (one pass, cached)
        key = (id(self.index), a, b, max_objects, max_items, n_background)   # indexes live forever
        if key not in _FILTER_CACHE:
            keep, i = array("q"), a
            while (b is None or i < b) and (max_items is None or len(keep) < max_items):
                if self.index.ensure(i + 1) <= i:
                    break
                _, masks = self._decode(i, check_crc=False)   # checked when the item is read
                if (masks[n_background:].reshape(len(masks) - n_background, -1).max(1) > 0).sum() <= max_objects:
                    keep.append(i)
                i += 1
            _FILTER_CACHE[key] = keep
        self.records = _FILTER_CACHE[key]

    def _decode(self, i, check_crc=None):
        """Record i -> (uint8 image [H,W,3], uint8 masks [K,H,W]), read-only strided views into the
        record: the callers crop before they copy."""
        ex = parse_example(self.index.read(i, check_crc), copy=False)
        h, w = self.native
        img, msk = ex.get("image"), ex.get("mask")
        if not isinstance(img, np.ndarray) or not isinstance(msk, np.ndarray) or img.size != h * w * 3 \
                or msk.size % (h * w):
            raise DatasetError(f"{self.name}: record {i} of {self.path} is not in the DeepMind layout (expected "
                               f"'image' {h}*{w}*3 one-byte strings and 'mask' K*{h}*{w} one-byte strings)")
        return img.reshape(h, w, 3), msk.reshape(-1, h, w)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        image, masks = self._decode(self.records[index])
        box = _centre_box(image.shape[1], image.shape[0], self.crop) if self.crop else None
        if box is not None:   # labels of the crop only: they are per pixel, so the same as cropping them after
            masks = masks[:, box[1]:box[3], box[0]:box[2]]
        label = _labels_from_channels(masks, self.n_background)
        return _item(_resize_rgb(_crop(image, box), self.image_size), _resize_labels(label, self.image_size))

    def _finish(self, image, label):
        box = _centre_box(image.shape[1], image.shape[0], self.crop) if self.crop else None
        return _item(_resize_rgb(_crop(image, box), self.image_size), _resize_labels(_crop(label, box), self.image_size))


_FILTER_CACHE = {}

_OR_FILES = {"train": "objects_room_train.tfrecords", "empty_room": "objects_room_test_empty_room.tfrecords",
             "identical_color": "objects_room_test_identical_color.tfrecords",
             "six_objects": "objects_room_test_six_objects.tfrecords"}


class ObjectsRoom(_DeepMindTFRecord):
    """ObjectsRoom (DeepMind multi_object_datasets), 64x64.

    Download, on-disk layout, splits and masks: DATASETS["objectsroom"] (`python data.py --list`).
    Sources, picked by what is in root: (1) BO-QSA's PNG export {split}/images/img_N.png +
    masks/mask_N.png, mask value = entity channel + 1 (see convert); (2) the GZIP TFRecord (or
    root = the file itself): 'image' 64*64*3 and 'mask' K*64*64*1 one-byte strings, K = 7 in
    train. Entity masks 0-3 (sky, floor, walls) -> background 0; objects (channels 4..) -> 1, 2, ...
    TFRecord splits are record ranges (test_size, val_size: 10k each, as GENESIS/BO-QSA); variant
    picks a test file instead (empty_room K=4, identical_color K=10, six_objects K=10), used whole
    for every split. Items: "image" float32 [3,64,64] in [0,1] (resized to image_size), "mask"
    int64 [H,W]. Random access into the GZIP file costs up to ~16 MiB of decompression per item
    (see _RecordIndex); for long training runs unpack it once with `python data.py convert
    objectsroom --root SRC --out DST` and pass --data_dir=DST.
    Raises DatasetError for a missing file or folder, an unknown variant, a record not in the
    DeepMind layout, a CRC mismatch or truncation, and a mask of another size than its image.
    """
    name, native = "objectsroom", (64, 64)

    def __init__(self, split="train", root=None, image_size=None, variant="train", max_items=None,
                 test_size=10_000, val_size=10_000, check_crc=True, compression="auto"):
        _check_split(self.name, split)
        self.split, self.image_size, self.crop = split, _size2(image_size, 64), None
        if variant not in _OR_FILES:
            raise DatasetError(f"{self.name}: unknown variant {variant!r}; valid: {', '.join(_OR_FILES)}")
        expected = f"{_OR_FILES[variant]} or {split}/images/*.png"
        root = _need_root(self.name, root, expected)
        self.png_dir = None
        if os.path.isfile(root):
            path = root
        elif variant == "train" and os.path.isdir(os.path.join(root, split, "images")):
            self.png_dir = os.path.join(root, split)
            self.files = sorted(f for f in os.listdir(os.path.join(self.png_dir, "images")) if f.endswith(".png"))
            if not self.files:
                raise DatasetError(f"{self.name}: expected images in {self.png_dir}/images (found 0 *.png files); "
                                   f"{_hint(self.name)}")
            if max_items is not None:
                self.files = self.files[:max_items]
            return
        else:
            cands = [os.path.join(root, _OR_FILES[variant]), os.path.join(root, "objects_room", _OR_FILES[variant])]
            path = next((c for c in cands if os.path.isfile(c)), None)
            if path is None:
                raise DatasetError(f"{self.name}: expected {cands[0]} or {os.path.join(root, split, 'images')} "
                                   f"(not found; {root} {_describe(root)}); {_hint(self.name)}")
        self._setup_records(path, split, 4, test_size, val_size, max_items,
                            all_splits=(variant != "train"), check_crc=check_crc, compression=compression)

    def __len__(self):
        return len(self.files) if self.png_dir else len(self.records)

    def __getitem__(self, index):
        if not self.png_dir:
            return super().__getitem__(index)
        fn = self.files[index]
        ipath = os.path.join(self.png_dir, "images", fn)
        image = _rgb(_open_image(ipath))
        mpath = os.path.join(self.png_dir, "masks", fn.replace("img_", "mask_"))
        raw = np.asarray(_open_image(mpath)).astype(np.int64)
        _check_mask_size(mpath, raw.shape, ipath, image.shape)
        label = np.where(raw > self.n_bg_png, raw - self.n_bg_png, 0)   # value c + 1 for channel c
        return self._finish(image, label)

    n_bg_png = 4   # BO-QSA writes channel c as c + 1, so objects (c >= 4) are 5.. -> 1..


_CLEVR_TF = "clevr_with_masks_train.tfrecords"
_CLEVR_PNG = re.compile(r"^CLEVR_image_(\d+)\.png$")


class Clevr(_DeepMindTFRecord):
    """CLEVR with masks (DeepMind multi_object_datasets), 240x320, 11 entity masks (0 = background).

    Download, on-disk layout, splits and masks: DATASETS["clevr"] (`python data.py --list`).
    Sources, picked by what is in root: (1) the GZIP TFRecord (or root = a .tfrecords file):
    'image' 240*320*3 and 'mask' 11*240*320*1 one-byte strings, 0/255; (2) the per-scene PNG
    export, whose CLEVR_image_N.png is stored BGR by OpenCV (channels are reversed back when
    bgr=True). The label of a pixel is the index k of its mask (1..10, not renumbered; 0 =
    background), identical for both sources. max_objects keeps scenes with at most that many
    non-empty object masks (clevr6: 6); the scan needed for that runs once per process.
    TFRecord splits are record ranges (test_size, val_size: 10k each, i.e. 10/10/80% of the 100k
    scenes); a PNG folder is cut by sorted scene id (10/10/80%, all scenes in every split, with a
    warning, when there are fewer than 10).
    Items: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W]. Preprocessing: centre square
    crop of `crop` x the short side (0.8 -> box (64,24,256,216), the ClevrTex convention; None =
    full frame), resize to image_size (128): BILINEAR image, NEAREST mask.
    Raises DatasetError for a missing file or folder, a record not in the DeepMind layout, a CRC
    mismatch or truncation, an empty CLEVR6 split, and a mask of another size than its image.
    """
    name, native = "clevr", (240, 320)

    def __init__(self, split="train", root=None, image_size=None, crop=0.8, max_objects=None, max_items=None,
                 bgr=True, test_size=10_000, val_size=10_000, check_crc=True, compression="auto"):
        _check_split(self.name, split)
        self.split, self.image_size, self.crop, self.bgr = split, _size2(image_size, 128), crop, bgr
        root = _need_root(self.name, root, f"{_CLEVR_TF} or CLEVR_image_N.png + CLEVR_mask_N_k.png")
        self.png_dir = None
        if os.path.isfile(root):
            path = root
        else:
            cands = [os.path.join(root, _CLEVR_TF), os.path.join(root, "clevr_with_masks", _CLEVR_TF)]
            path = next((c for c in cands if os.path.isfile(c)), None)
            if path is None:
                others = sorted(f for f in os.listdir(root) if f.endswith(".tfrecords"))
                path = os.path.join(root, others[0]) if len(others) == 1 else None
        if path is not None:
            self._setup_records(path, split, 1, test_size, val_size, max_items,
                                max_objects=max_objects, check_crc=check_crc, compression=compression)
            return
        ids = sorted(int(m.group(1)) for m in map(_CLEVR_PNG.match, os.listdir(root)) if m)
        if not ids:
            raise DatasetError(f"{self.name}: expected {os.path.join(root, _CLEVR_TF)} or CLEVR_image_N.png files "
                               f"in {root} (found neither; {root} {_describe(root)}); {_hint(self.name)}")
        self.png_dir, self.n_background = root, 1
        if len(ids) < 10:
            _warn_once(f"{self.name}: only {len(ids)} scene(s) in {root}; every split uses all of them")
        else:
            a, b = _split_slice(len(ids), split)
            ids = ids[a:b]
        if max_objects is not None:
            n_split = len(ids)
            ids = [i for i in ids if (self._png_masks(i)[1:].reshape(10, -1).max(1) > 0).sum() <= max_objects]
            if not ids:
                raise DatasetError(f"{self.name} at {root}: the {split} split is empty (none of its {n_split} "
                                   f"scene(s) has at most {max_objects} objects)")
        self.records = ids[:max_items] if max_items is not None else ids

    def _png_masks(self, i, image_hw=None):
        """uint8 masks [11,H,W] of scene i, each checked against the image's size (read from its
        header when image_hw is None, as in the CLEVR6 filter)."""
        ipath = os.path.join(self.png_dir, f"CLEVR_image_{i}.png")
        image_hw = _image_hw(ipath) if image_hw is None else image_hw
        ms = []
        for k in range(11):
            mpath = os.path.join(self.png_dir, f"CLEVR_mask_{i}_{k}.png")
            m = np.asarray(_open_image(mpath))
            _check_mask_size(mpath, m.shape, ipath, image_hw)
            ms.append(m[..., 0] if m.ndim == 3 else m)
        return np.stack(ms)

    def __getitem__(self, index):
        if not self.png_dir:
            return super().__getitem__(index)
        i = self.records[index]
        image = _rgb(_open_image(os.path.join(self.png_dir, f"CLEVR_image_{i}.png")))
        if self.bgr:
            image = image[..., ::-1]
        return self._finish(image, _labels_from_channels(self._png_masks(i, image.shape[:2]), 1))


class Clevr6(Clevr):
    """CLEVR6: CLEVR-with-masks scenes with at most 6 objects (same options as clevr)."""
    name = "clevr6"

    def __init__(self, split="train", root=None, image_size=None, crop=0.8, max_items=None, bgr=True,
                 test_size=10_000, val_size=10_000, check_crc=True, compression="auto"):
        super().__init__(split, root, image_size, crop, 6, max_items, bgr, test_size, val_size, check_crc, compression)


# -----------------------------------------------------------------------------
# ClevrTex

class ClevrTex(_Base):
    """ClevrTex (Karazija et al. 2021), variant "full"; items "image" [3,H,W], "mask" [H,W].

    Download, on-disk layout, splits and masks: DATASETS["clevrtex"] (`python data.py --list`).
    The mask is the _flat.png palette PNG read as indices (object ids 0..10, 0 = background;
    never converted to RGB); root may be the clevrtex_<variant> folder itself. Splits (ClevrTex
    benchmark): sorted indices, test = first 10%, val = next 10%, train = rest; the outd variant
    (clevrtex_ood) uses all images for every split. Preprocessing: centre square crop of `crop` x
    the short side (0.8 -> box (64,24,256,216)), resize to image_size (128), BILINEAR image /
    NEAREST mask, alpha dropped. crop=None resizes the full frame (BO-QSA's code).
    Items: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W].
    Raises DatasetError for a missing folder, an image without its _flat.png, an empty split, a
    mask that is not a palette/grey PNG, and a mask of another size than its image.
    """
    name, variant = "clevrtex", "full"

    def __init__(self, split="train", root=None, image_size=None, crop=0.8, max_items=None):
        _check_split(self.name, split)
        self.split, self.image_size, self.crop = split, _size2(image_size, 128), crop
        sub = f"clevrtex_{self.variant}"
        root = _need_root(self.name, root, f"{sub}/<idx//1000>/CLEVRTEX_{self.variant}_NNNNNN.png")
        base = root if os.path.basename(os.path.normpath(root)) == sub else os.path.join(root, sub)
        if not os.path.isdir(base):
            raise DatasetError(f"{self.name}: expected folder {base} with <idx//1000>/CLEVRTEX_{self.variant}_NNNNNN.png "
                               f"(not found; {root} {_describe(root)}); {_hint(self.name)}")
        pat = re.compile(rf"^CLEVRTEX_{self.variant}_(\d{{6}})\.png$")
        items = []
        for d in sorted(os.scandir(base), key=lambda e: e.name):
            if not d.is_dir():
                continue
            names = os.listdir(d.path)
            have = set(names)
            for fn in names:
                m = pat.match(fn)
                if m:
                    flat = fn[:-4] + "_flat.png"
                    if flat not in have:
                        raise DatasetError(f"{self.name}: expected mask {os.path.join(d.path, flat)} next to {fn} "
                                           f"(not found); {_hint(self.name)}")
                    items.append((int(m.group(1)), os.path.join(d.path, fn), os.path.join(d.path, flat)))
        if not items:
            raise DatasetError(f"{self.name}: expected {base}/<idx//1000>/CLEVRTEX_{self.variant}_NNNNNN.png "
                               f"(found 0 files matching CLEVRTEX_{self.variant}_*.png; {base} {_describe(base)}); "
                               f"{_hint(self.name)}")
        items.sort()
        if self.variant != "outd":
            a, b = _split_slice(len(items), split)
            if a == b:
                raise _empty_split_error(self.name, root, split, len(items))
            items = items[a:b]
        self.items = items[:max_items] if max_items is not None else items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        _, ip, mp = self.items[index]
        img = _rgb(_open_image(ip))
        msk = _open_image(mp)
        if msk.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{self.name}: {mp} is a {msk.mode} image, expected a palette PNG of object ids")
        label = np.asarray(msk).astype(np.int64)
        _check_mask_size(mp, label.shape, ip, img.shape)
        box = _centre_box(img.shape[1], img.shape[0], self.crop) if self.crop else None
        return _item(_resize_rgb(_crop(img, box), self.image_size), _resize_labels(_crop(label, box), self.image_size))


class ClevrTexOOD(ClevrTex):
    """ClevrTex out-of-distribution test set (variant "outd"); all images in every split."""
    name, variant = "clevrtex_ood", "outd"


class ClevrTexCamo(ClevrTex):
    """ClevrTex camouflage variant ("camo"); same splits as clevrtex."""
    name, variant = "clevrtex_camo", "camo"


# -----------------------------------------------------------------------------
# MOVi-A (Kubric)

def _png_labels(data, label):
    img = _open_image(data, label)
    if img.mode not in ("P", "L", "I", "I;16"):
        raise DatasetError(f"movi_a: segmentation {label} is a {img.mode} image, expected single-channel ids")
    a = np.asarray(img)
    return a.astype(np.int64)


class MoviA(_Base):
    """MOVi-A (Kubric; Greff et al. 2022), 128x128 videos of 24 frames with 3-10 objects.

    Download, on-disk layout, splits and masks: DATASETS["movi_a"] (`python data.py --list`).
    Sources: (1) TFDS shards, uncompressed TFRecords of tf.train.Example, found by
    {root}/*{split}*tfrecord* (split names train / validation / test; searched recursively
    when root has none, e.g. root = .../movi_a): 'video' and 'segmentations' are bytes lists of
    24 PNG frames (segmentation single-channel, 0 = background); (2) Kubric PNG sequences (split
    folder 'validation' or 'val' for val). MOVi-A publishes no test split: test falls back to
    validation with a warning. Frames: frame_offset, frame_offset + frame_stride, ... (num_frames
    of them; None = as many as fit). crop: centre square crop of crop x the short side before the
    resize (Min-cut OCL Sec. 6.3: 0.8; None = the whole frame).
    Items: "video" float32 [T,3,H,W] in [0,1], "mask" int64 [T,H,W].
    Raises DatasetError for missing shards and folders, a crop outside (0, 1], more frames than
    the video has, a record without PNG frame lists, a segmentation that is not single-channel,
    and a segmentation of another size than its frame.
    """
    name, video = "movi_a", True

    def __init__(self, split="train", root=None, image_size=None, num_frames=None, frame_stride=1,
                 frame_offset=0, max_items=None, check_crc=True, crop=None):
        _check_split(self.name, split)
        if crop is not None and not 0 < crop <= 1:
            raise DatasetError(f"{self.name}: crop must be a fraction in (0, 1], got {crop}")
        self.split, self.image_size, self.crop = split, _size2(image_size, 128), crop
        self.num_frames, self.frame_stride, self.frame_offset = num_frames, int(frame_stride), int(frame_offset)
        root = _need_root(self.name, root, "movi_a-<split>.tfrecord-* shards or <split>/<video>/rgba_00000.png")
        self.shards, self.videos = [], []
        for s in ([split] if split != "test" else ["test", "validation"]):
            tf_name = {"val": "validation"}.get(s, s)
            self.shards = self._find_shards(root, tf_name)
            if not self.shards:
                for folder in ([tf_name, "val"] if tf_name == "validation" else [tf_name]):
                    d = os.path.join(root, folder)
                    if os.path.isdir(d):
                        self.videos = sorted(os.path.join(d, v) for v in os.listdir(d)
                                             if os.path.isfile(os.path.join(d, v, "rgba_00000.png")))
                        if self.videos:
                            break
            if self.shards or self.videos:
                if s != split:
                    _warn_once(f"{self.name}: no test split in {root}; test uses the validation split")
                break
        if not self.shards and not self.videos:
            tf_name = {"val": "validation"}.get(split, split)
            raise DatasetError(f"{self.name}: expected TFRecord shards {root}/*{tf_name}*.tfrecord* or folders "
                               f"{root}/{split}/<video>/rgba_00000.png (found neither; {root} "
                               f"{_describe(root)}); {_hint(self.name)}")
        self.check_crc, self.max_items, self._flat = check_crc, max_items, None

    @staticmethod
    def _find_shards(root, split):
        pat = re.compile(rf"(^|[-_.]){split}([-_.]|$)")   # "train" matches -train. but not trainval

        def ok(f):
            return "tfrecord" in f and pat.search(f)
        found = sorted(os.path.join(root, f) for f in os.listdir(root) if ok(f))
        if not found:
            for d, _, files in os.walk(root):
                found += sorted(os.path.join(d, f) for f in files if ok(f))
        return found

    def _index(self):
        # (shard, record) pairs, built on first use from the shards' record headers
        if self._flat is None:
            flat = []
            for s, path in enumerate(self.shards):
                idx = _record_index(path, None, self.check_crc)
                flat += [(s, r) for r in range(len(idx))]
                if self.max_items is not None and len(flat) >= self.max_items:
                    break
            self._flat = flat[:self.max_items] if self.max_items is not None else flat
        return self._flat

    def __len__(self):
        if self.videos:
            return len(self.videos[:self.max_items] if self.max_items is not None else self.videos)
        return len(self._index())

    def _frames(self, total):
        stop = total if self.num_frames is None else self.frame_offset + self.num_frames * self.frame_stride
        if stop > total:
            raise DatasetError(f"{self.name}: asked for {self.num_frames} frames with stride {self.frame_stride} "
                               f"from frame {self.frame_offset}, but the video has {total}")
        return list(range(self.frame_offset, stop, self.frame_stride))

    def __getitem__(self, index):
        if self.videos:
            d = self.videos[index]
            total = sum(1 for f in os.listdir(d) if f.startswith("rgba_") and f.endswith(".png"))
            frames = self._frames(total)
            rgb = [_rgb(_open_image(os.path.join(d, f"rgba_{t:05d}.png"))) for t in frames]
            seg = [_png_labels(os.path.join(d, f"segmentation_{t:05d}.png"), os.path.join(d, f"segmentation_{t:05d}.png"))
                   for t in frames]
            names = [(os.path.join(d, f"segmentation_{t:05d}.png"), os.path.join(d, f"rgba_{t:05d}.png")) for t in frames]
        else:
            s, r = self._index()[index]
            path = self.shards[s]
            ex = parse_example(_record_index(path, None, self.check_crc).read(r), one_byte_as_array=False)
            if not isinstance(ex.get("video"), list) or not isinstance(ex.get("segmentations"), list):
                raise DatasetError(f"{self.name}: record {r} of {path} has no 'video'/'segmentations' PNG frame lists")
            frames = self._frames(len(ex["video"]))
            rgb = [_rgb(_open_image(ex["video"][t], f"{path} record {r} video frame {t}")) for t in frames]
            seg = [_png_labels(ex["segmentations"][t], f"{path} record {r} segmentation frame {t}") for t in frames]
            names = [(f"{path} record {r} segmentation frame {t}", f"{path} record {r} video frame {t}") for t in frames]
        for a, b, (mask_name, image_name) in zip(seg, rgb, names):
            _check_mask_size(mask_name, a.shape, image_name, b.shape)
        seg = [a[..., 0] if a.ndim == 3 else a for a in seg]
        box = _centre_box(rgb[0].shape[1], rgb[0].shape[0], self.crop) if self.crop else None
        rgb = np.stack([_resize_rgb(_crop(a, box), self.image_size) for a in rgb])
        seg = np.stack([_resize_labels(_crop(a, box), self.image_size) for a in seg])
        return {"video": torch.from_numpy(rgb.transpose(0, 3, 1, 2).copy()).float().div_(255.0),
                "mask": torch.from_numpy(seg.astype(np.int64))}


# -----------------------------------------------------------------------------
# foreground extraction datasets (Birds, Dogs, Cars, Flowers): mask 1 = foreground

def _load_sel(path):
    try:
        return [str(t) for t in np.load(path, allow_pickle=False).ravel()]
    except ValueError as e:
        raise DatasetError(f"cannot read {path} as a plain numpy array of names ({e})") from None


def _flowers_foreground(seg):
    """Oxford-102 segmim (uint8 [H,W,3], RGB) -> bool [H,W] foreground, the official BO-QSA rule
    (official: data/flowers_dataset.py): background where R == 0 or G == 0 or B == 254."""
    return ~((seg[..., 0] == 0) | (seg[..., 1] == 0) | (seg[..., 2] == 254))


class Foreground(_Base):
    """Single-object foreground datasets; items: "image" [3,H,W], "mask" [H,W] with 1 = foreground.

    Download, on-disk layouts, splits and masks: DATASETS[name] (`python data.py --list`). The
    layout is picked by what is in root:
      birds (CUB-200-2011, DRC split file): segmentations/<name>.png are soft 0..255, foreground =
        > 127. The image is cropped to a square of 1.5 x the longer bounding-box side around the
        box centre (clipped to the image), as DRC does (bbox_crop=False to skip).
      dogs, cars (DRC release): masks <name>_maskresized.png, foreground = > 127. Loaded as RGB
        (the official code loads BGR). No val list is published: val = test.
      flowers (Oxford 102): segmim/segmim_NNNNN.jpg paints the background blue; the foreground rule
        is the official BO-QSA one (official: data/flowers_dataset.py, FlowersDataset.__getitem__:
        `seg = 1 - ((seg[:,:,0:1] == 0) + (seg[:,:,1:2] == 0) + (seg[:,:,2:3] == 254))`), i.e.
        background = R == 0 or G == 0 or B == 254 on the decoded JPEG, foreground = the rest.
        setid.mat trnid / valid / tstid are used as train / val / test (the official code swaps
        train and test: it trains on tstid). The official code resizes the 0/255 mask BILINEAR and
        thresholds it at 0.5 in its IoU; here, like every loader, the 0/1 mask is resized NEAREST
        (the same at the native size; boundary pixels may differ after a resize).
      any of them, generic: images/<name>.{jpg,png} + masks/<name>.png (> 127 = foreground),
        optional splits/{train,val,test}.txt listing names; without them sorted names, test = first
        10%, val = next 10%, train = rest.
    Items: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W] in {0, 1}. Resize to image_size
    (128): BILINEAR image, NEAREST mask.
    Raises DatasetError for a missing or unrecognised folder, a missing split/selection file, an
    empty split, a missing or corrupt image or mask, and a mask of another size than its image.
    """
    name = "birds"

    def __init__(self, split="train", root=None, image_size=None, bbox_crop=True, max_items=None):
        _check_split(self.name, split)
        self.split, self.image_size = split, _size2(image_size, 128)
        root = _need_root(self.name, root, DATASETS[self.name].layout)
        self.root, self.items = root, None   # items: (image path, mask path, crop box or None)
        j = os.path.join
        if self.name == "birds" and os.path.isfile(j(root, "images.txt")):
            self.items = self._cub(root, split, bbox_crop)
        elif self.name in ("dogs", "cars") and os.path.isdir(j(root, "data_mrcnn")):
            self.items = self._drc(root, split)
        elif self.name == "flowers" and os.path.isfile(j(root, "setid.mat")):
            self.items = self._flowers(root, split)
        elif os.path.isdir(j(root, "images")) and os.path.isdir(j(root, "masks")):
            self.items = self._generic(root, split)
        if self.items is None:
            raise DatasetError(f"{self.name}: expected {DATASETS[self.name].layout} in {root} "
                               f"(not found; {root} {_describe(root)}); {_hint(self.name)}")
        if not self.items:
            raise DatasetError(f"{self.name}: found 0 {split} images in {root}; {_hint(self.name)}")
        if max_items is not None:
            self.items = self.items[:max_items]

    def _cub(self, root, split, bbox_crop):
        j = os.path.join
        with open(j(root, "images.txt")) as f:
            names = {int(a): b for a, b in (l.split() for l in f if l.strip())}
        boxes = {}
        if bbox_crop and os.path.isfile(j(root, "bounding_boxes.txt")):
            with open(j(root, "bounding_boxes.txt")) as f:
                for l in f:
                    if l.strip():
                        v = l.split()
                        boxes[int(v[0])] = [int(float(x)) for x in v[1:5]]
        want = {"train": 0, "val": 1, "test": 2}[split]
        if os.path.isfile(j(root, "train_val_test_split.txt")):
            with open(j(root, "train_val_test_split.txt")) as f:
                ids = [int(a) for a, b in (l.split() for l in f if l.strip()) if int(b) == want]
        elif os.path.isfile(j(root, "train_test_split.txt")):
            _warn_once(f"{self.name}: no train_val_test_split.txt in {root}; using CUB's train_test_split.txt, val = test")
            with open(j(root, "train_test_split.txt")) as f:
                ids = [int(a) for a, b in (l.split() for l in f if l.strip()) if int(b) == (1 if split == "train" else 0)]
        else:
            raise DatasetError(f"{self.name}: expected {j(root, 'train_val_test_split.txt')} (not found); "
                               f"{_hint(self.name)}")
        items = []
        for i in ids:
            stem = names[i][:-4] if names[i].lower().endswith(".jpg") else names[i]
            items.append((j(root, "images", names[i]), j(root, "segmentations", stem + ".png"), boxes.get(i)))
        return items

    def _drc(self, root, split):
        j = os.path.join
        sel = {"dogs": ("data_tr_sel.npy", "data_te_sel.npy"),
               "cars": ("data_mrcnn_train_select.npy", "data_mrcnn_test_select.npy")}[self.name]
        part = "train" if split == "train" else "test"
        sel_file = j(root, sel[0] if split == "train" else sel[1])
        folder = j(root, "data_mrcnn", part, "resized")
        if os.path.isfile(sel_file):
            names = _load_sel(sel_file)
        else:   # no selection list: every image of the folder
            names = sorted(f[:-len("_resized.png")] for f in os.listdir(folder) if f.endswith("_resized.png")) \
                if os.path.isdir(folder) else []
        return [(j(folder, f"{n}_resized.png"), j(folder, f"{n}_maskresized.png"), None) for n in names]

    def _flowers(self, root, split):
        from scipy.io import loadmat
        j = os.path.join
        try:
            ids = loadmat(j(root, "setid.mat"))[{"train": "trnid", "val": "valid", "test": "tstid"}[split]].ravel()
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"{self.name}: cannot read {j(root, 'setid.mat')} ({e})") from None
        return [(j(root, "jpg", f"image_{int(i):05d}.jpg"), j(root, "segmim", f"segmim_{int(i):05d}.jpg"), None)
                for i in sorted(ids)]

    def _generic(self, root, split):
        j = os.path.join
        imgs = {os.path.splitext(f)[0]: f for f in os.listdir(j(root, "images"))
                if f.lower().endswith((".jpg", ".jpeg", ".png"))}
        split_file = j(root, "splits", f"{split}.txt")
        if os.path.isfile(split_file):
            with open(split_file) as f:
                names = [os.path.splitext(l.strip())[0] for l in f if l.strip()]
        else:
            names = sorted(imgs)
            a, b = _split_slice(len(names), split)
            if a == b:
                raise _empty_split_error(self.name, root, split, len(names))
            names = names[a:b]
        items = []
        for n in names:
            if n not in imgs:
                raise DatasetError(f"{self.name}: expected image {j(root, 'images', n)}.jpg/.png listed in "
                                   f"{split_file} (not found)")
            items.append((j(root, "images", imgs[n]), j(root, "masks", n + ".png"), None))
        return items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        ip, mp, bbox = self.items[index]
        img = _rgb(_open_image(ip))
        m = _open_image(mp)
        if self.name == "flowers" and os.path.basename(mp).startswith("segmim_"):
            fg = _flowers_foreground(np.asarray(m.convert("RGB")))
        else:
            fg = np.asarray(m.convert("L")) > 127
        # every layout stores the mask at its image's size (DRC: both *_resized.png files are already
        # resized; CUB: the bounding-box crop is applied below to both), so any difference is an error
        _check_mask_size(mp, fg.shape, ip, img.shape)
        box = None
        if bbox is not None:   # DRC: square of 1.5 x the longer box side around the box centre
            x, y, bw, bh = bbox
            r, cx, cy = int(max(bw, bh) * 0.75), int((2 * x + bw) / 2), int((2 * y + bh) / 2)
            H, W = fg.shape
            box = (max(0, cx - r), max(0, cy - r), min(W, cx + r), min(H, cy + r))
        return _item(_resize_rgb(_crop(img, box), self.image_size),
                     _resize_labels(_crop(fg.astype(np.int64), box), self.image_size))


class Birds(Foreground):
    __doc__ = Foreground.__doc__
    name = "birds"


class Dogs(Foreground):
    __doc__ = Foreground.__doc__
    name = "dogs"


class Cars(Foreground):
    __doc__ = Foreground.__doc__
    name = "cars"


class Flowers(Foreground):
    __doc__ = Foreground.__doc__
    name = "flowers"


# -----------------------------------------------------------------------------
# multi-object real-image sets of Yang & Yang (2022) (YCB, ScanNet, COCO), as used by BO-QSA Tab. 4

class YangYang(_Base):
    """YCB / ScanNet / COCO variants of Yang & Yang (2022); items "image" [3,H,W], "mask" [H,W].

    Download, on-disk layout, splits and masks: DATASETS[name] (`python data.py --list`); the
    authors' release, read by the official BO-QSA loaders. A mask is a one-channel PNG (L or
    palette) whose pixel values are object ids, 0 = background (`np.array(Image.open(f))`; never
    converted to RGB; of an RGB mask the first channel is used, as the official code does). Train
    images without a mask file come without "mask". There is no val split (the official code
    validates on test, which we do not copy): split "val" raises DatasetError.
    Items: "image" float32 [3,H,W] in [0,1], "mask" int64 [H,W]. Resize to image_size (128):
    BILINEAR image, NEAREST mask.
    Raises DatasetError for split "val", a missing folder, no images, a test image without its
    mask, and a mask of another size than its image.
    """
    name = "ycb"

    def __init__(self, split="train", root=None, image_size=None, max_items=None):
        _check_split(self.name, split)
        self.split, self.image_size = split, _size2(image_size, 128)
        layout = DATASETS[self.name].layout
        if split == "val":
            raise DatasetError(f"{self.name}: the release has only train/ and test/ (no val split); use "
                               f"split train or test")
        root = _need_root(self.name, root, layout)
        folder = os.path.join(root, split, "image")
        if not os.path.isdir(folder):
            raise DatasetError(f"{self.name}: expected {layout} in {root} (no {folder}; {root} {_describe(root)}); "
                               f"{_hint(self.name)}")
        self.files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
        if not self.files:
            raise DatasetError(f"{self.name}: found 0 {split} images (*.png) in {folder}; {_hint(self.name)}")
        if max_items is not None:
            self.files = self.files[:max_items]
        self.root = root
        mask_dir = os.path.join(root, split, "mask")
        self.has_masks = all(os.path.isfile(os.path.join(mask_dir, f)) for f in self.files)
        if split == "test" and not self.has_masks:
            raise DatasetError(f"{self.name}: expected a mask for every test image in {mask_dir} "
                               f"(same file names as {folder})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        name = self.files[index]
        img = _rgb(_open_image(os.path.join(self.root, self.split, "image", name)))
        mask = None
        if self.has_masks:
            mp = os.path.join(self.root, self.split, "mask", name)
            mask = np.asarray(_open_image(mp))
            mask = mask[..., 0] if mask.ndim == 3 else mask
            _check_mask_size(mp, mask.shape, os.path.join(self.root, self.split, "image", name), img.shape)
            mask = _resize_labels(mask.astype(np.int64), self.image_size)
        return _item(_resize_rgb(img, self.image_size), mask)


class YCB(YangYang):
    __doc__ = YangYang.__doc__
    name = "ycb"


class ScanNet(YangYang):
    __doc__ = YangYang.__doc__
    name = "scannet"


class COCO(YangYang):
    __doc__ = YangYang.__doc__
    name = "coco"


# -----------------------------------------------------------------------------
# registry

@dataclass
class DatasetInfo:
    """One dataset: the single source of its download source and on-disk layout (README.md's
    table and the class docstrings point here; `python data.py --list` prints every entry).

    name: the key for build_dataset / --dataset. used_by: the scripts with a preset for it.
    url: the page (or repository) to download from ("" = nothing to download). files: what to
    fetch there. layout: the files expected under --data_dir=PATH. splits: how train / val /
    test are formed. masks: what the masks are. has_masks: items carry "mask". video: items are
    videos ("video" [T,3,H,W], "mask" [T,H,W]). default_image_size: the side used when
    image_size=None. cls: the Dataset class.
    """
    name: str
    used_by: tuple
    url: str
    files: str
    layout: str
    splits: str
    masks: str
    has_masks: bool
    video: bool
    default_image_size: int
    cls: type = field(repr=False, default=None)


_ALL3 = ("boqsa.py", "mincut_ocl.py", "ast_seg.py")
_DM = "https://github.com/deepmind/multi_object_datasets"
_CTX = "https://www.robots.ox.ac.uk/~vgg/data/clevrtex/"
_DRC = "https://github.com/yuPeiyu98/Deep-Region-Competition"
_YY = "https://github.com/vLAR-group/UnsupervisedMultiObjectSegmentation"
_GENERIC = "or the generic images/<name>.{jpg,png} + masks/<name>.png"
_GENERIC_SPLITS = ("generic layout: splits/{train,val,test}.txt listing names, else sorted names, test = first "
                   "10%, val = next 10%, train = rest")


def _clevrtex_info(name, variant, archive, splits, cls):
    return DatasetInfo(
        name, _ALL3, _CTX, archive,
        f"clevrtex_{variant}/<idx//1000>/CLEVRTEX_{variant}_NNNNNN.png (RGBA 320x240) + "
        f"CLEVRTEX_{variant}_NNNNNN_flat.png (palette PNG of object ids); PATH may be clevrtex_{variant}/ itself",
        splits, "instance (object ids 0..10, 0 = background)", True, False, 128, cls)


def _yy_info(name, cls):
    return DatasetInfo(
        name, ("boqsa.py",), _YY, "the Yang & Yang 2022 release: dataset links in the repository's README",
        "{train,test}/image/<name>.png + {train,test}/mask/<name>.png (one-channel PNG of object ids), 128x128",
        "train / test; no val split (split val is an error; the official code validates on test)",
        "instance (object ids, 0 = background)", True, False, 128, cls)


DATASETS = {i.name: i for i in [
    DatasetInfo("synthetic", _ALL3, "", "none: generated on the fly",
                "no files; 2-6 shapes (circle, square, triangle, diamond, ellipse) on a muted background",
                "train 100,000 / val 512 / test 512 items (size=N), deterministic per (seed, split, index)",
                "instance, exact (1..K in painting order)", True, False, 64, SyntheticShapes),
    DatasetInfo("synthetic_video", ("mincut_ocl.py",), "", "none: generated on the fly",
                "no files; the synthetic scenes, objects moving for num_frames (8) frames",
                "train 10,000 / val 256 / test 256 videos (size=N)",
                "instance per frame, ids fixed over time", True, True, 64, SyntheticVideo),
    DatasetInfo("shapestacks", ("boqsa.py", "ast_seg.py"), "https://shapestacks.robots.ox.ac.uk/",
                "shapestacks-{rgb,iseg,meta}.tar.gz from http://shapestacks-file.robots.ox.ac.uk/static/download/v1/",
                "recordings/<scenario>/rgb-w=0-f=0-l=0-c=original-cam_N-mono-0.png (224x224) + "
                "iseg-w=0-f=0-l=0-c=original-cam_N-mono-0.map (PNG by matplotlib imsave(vmin=0, vmax=8, "
                "cmap='gray'): RGBA, R=G=B=32*label); splits/default/{train,eval,test}.txt; PATH may be recordings/",
                "scenarios listed in splits/default/{train,eval,test}.txt (val = eval); without them every split "
                "uses all scenarios, with a warning",
                "instance (1..6; 7 = unassigned -> background); none without .map files", True, False, 64, ShapeStacks),
    DatasetInfo("objectsroom", ("boqsa.py", "ast_seg.py"), _DM,
                "gs://multi-object-datasets/objects_room/objects_room_train.tfrecords",
                "objects_room_train.tfrecords (GZIP TFRecord; PATH may be the file), or BO-QSA's PNG export "
                "{train,val,test}/images/img_N.png + masks/mask_N.png (python data.py convert objectsroom)",
                "TFRecord: test = first 10k records, val = next 10k, train = rest; PNG export: its split folders",
                "instance (sky, floor, walls -> background)", True, False, 64, ObjectsRoom),
    DatasetInfo("clevr", _ALL3, _DM, "gs://multi-object-datasets/clevr_with_masks/clevr_with_masks_train.tfrecords",
                "clevr_with_masks_train.tfrecords (GZIP TFRecord; PATH may be the file), or the PNG export of "
                "github.com/hello-jinwoo/clevr_with_mask: CLEVR_image_N.png (stored BGR) + CLEVR_mask_N_{0..10}.png "
                "(L, 0/255; mask 0 = background)",
                "TFRecord: test = first 10k records, val = next 10k, train = rest; PNG: sorted scene ids, "
                "10% / 10% / 80% (all scenes in every split when fewer than 10)",
                "instance (mask index 1..10)", True, False, 128, Clevr),
    DatasetInfo("clevr6", _ALL3, _DM, "gs://multi-object-datasets/clevr_with_masks/clevr_with_masks_train.tfrecords",
                "as clevr",
                "as clevr, then only scenes with at most 6 objects", "instance (mask index 1..10)",
                True, False, 128, Clevr6),
    _clevrtex_info("clevrtex", "full", "clevrtex_full_part{1..5}.tar.gz",
                   "sorted indices: test = first 10%, val = next 10%, train = rest", ClevrTex),
    _clevrtex_info("clevrtex_ood", "outd", "clevrtex_outd.tar.gz", "all images in every split", ClevrTexOOD),
    _clevrtex_info("clevrtex_camo", "camo", "clevrtex_camo.tar.gz", "as clevrtex", ClevrTexCamo),
    DatasetInfo("movi_a", ("mincut_ocl.py",), "https://github.com/google-research/kubric/tree/main/challenges/movi",
                "gs://kubric-public/tfds/movi_a/128x128/1.0.0",
                "TFDS shards movi_a-{train,validation}.tfrecord-NNNNN-of-NNNNN (plain TFRecords of PNG frames; "
                "searched recursively), or Kubric PNGs {train,validation}/<video>/rgba_NNNNN.png + "
                "segmentation_NNNNN.png",
                "train / validation; no test split (test = validation, with a warning)",
                "instance per frame (0 = background)", True, True, 128, MoviA),
    DatasetInfo("birds", ("boqsa.py",), "https://www.vision.caltech.edu/datasets/cub_200_2011/",
                f"CUB_200_2011.tgz + segmentations.tgz; train_val_test_split.txt from {_DRC}",
                "images.txt, bounding_boxes.txt, train_val_test_split.txt, images/<name>.jpg, "
                f"segmentations/<name>.png; {_GENERIC}",
                "train_val_test_split.txt 0 / 1 / 2 = train / val / test (without it CUB's train_test_split.txt, "
                f"val = test); {_GENERIC_SPLITS}",
                "foreground (1): segmentation > 127", True, False, 128, Birds),
    DatasetInfo("dogs", ("boqsa.py",), _DRC, "the DRC release: Google Drive link in the repository's README",
                "data_tr_sel.npy, data_te_sel.npy, data_mrcnn/{train,test}/resized/<name>_resized.png + "
                f"<name>_maskresized.png; {_GENERIC}",
                f"train = data_tr_sel.npy, val = test = data_te_sel.npy; {_GENERIC_SPLITS}",
                "foreground (1): mask > 127", True, False, 128, Dogs),
    DatasetInfo("cars", ("boqsa.py",), _DRC, "the DRC release: Google Drive link in the repository's README",
                "data_mrcnn_train_select.npy, data_mrcnn_test_select.npy, data_mrcnn/{train,test}/resized/"
                f"<name>_resized.png + <name>_maskresized.png; {_GENERIC}",
                f"train = data_mrcnn_train_select.npy, val = test = data_mrcnn_test_select.npy; {_GENERIC_SPLITS}",
                "foreground (1): mask > 127", True, False, 128, Cars),
    DatasetInfo("flowers", ("boqsa.py",), "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                "102flowers.tgz, 102segmentations.tgz, setid.mat",
                f"jpg/image_NNNNN.jpg, segmim/segmim_NNNNN.jpg, setid.mat; {_GENERIC}",
                f"setid.mat: train = trnid, val = valid, test = tstid (the official code swaps train and test); "
                f"{_GENERIC_SPLITS}",
                "foreground (1): segmim background = R == 0 or G == 0 or B == 254 (official BO-QSA rule)",
                True, False, 128, Flowers),
    _yy_info("ycb", YCB),
    _yy_info("scannet", ScanNet),
    _yy_info("coco", COCO),
]}


def build_dataset(name, split, root=None, image_size=None, **options):
    """The dataset `name` (a key of DATASETS) for split "train" | "val" | "test".

    root: the dataset's folder (or file, for TFRecord datasets); not needed for synthetic*.
    image_size: int or (H, W); None = DATASETS[name].default_image_size.
    options: per-dataset keyword options (see each class, e.g. crop, max_items, num_frames).
    Returns a torch Dataset of dicts: "image" float32 [3,H,W] in [0,1] and, where the dataset
    has masks, "mask" int64 [H,W] (0 = background); video datasets give "video" [T,3,H,W] and
    "mask" [T,H,W]. The dataset has attributes name, has_masks, video and split.
    Raises DatasetError for an unknown name or split, for missing/malformed data and for an
    empty split (the loaders that cut splits by fraction say how many items they found and how
    many the split needs), TypeError for an unknown option.
    """
    key = str(name).lower()
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    _check_split(key, split)
    cls = DATASETS[key].cls
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "split", "root", "image_size")]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise TypeError(f"{key}: unknown option(s) {', '.join(bad)}; valid options: {', '.join(valid)}")
    ds = cls(split, root=root, image_size=image_size, **options)
    # an empty split would train on nothing or print an empty metrics line and exit 0
    if len(ds) == 0:
        why = ", max_items=0" if options.get("max_items") == 0 else ""
        raise DatasetError(f"{key} at {root}: the {split} split is empty (0 items{why}); {_hint(key)}")
    return ds


# -----------------------------------------------------------------------------
# command line: summary + timing, and TFRecord -> PNG conversion

def convert(name, root, out, splits=SPLITS, max_items=None):
    """Unpack a DeepMind TFRecord into PNGs read much faster at random: objectsroom -> BO-QSA's
    layout {out}/{split}/images/img_N.png + masks/mask_N.png (object k saved as 4 + k, background
    0); clevr -> {out}/CLEVR_image_N.png (BGR, like the public export) + CLEVR_mask_N_k.png, N the
    record index. Reads each split in order (streaming). Returns the number of items written."""
    n_written = 0
    for split in splits:
        if name == "objectsroom":
            ds = ObjectsRoom(split, root, max_items=max_items)
            os.makedirs(os.path.join(out, split, "images"), exist_ok=True)
            os.makedirs(os.path.join(out, split, "masks"), exist_ok=True)
            for j, i in enumerate(ds.records):
                image, masks = ds._decode(i)
                label = _labels_from_channels(masks, 4)
                Image.fromarray(image).save(os.path.join(out, split, "images", f"img_{j:06d}.png"))
                Image.fromarray(np.where(label > 0, label + 4, 0).astype(np.uint8), "L").save(
                    os.path.join(out, split, "masks", f"mask_{j:06d}.png"))
                n_written += 1
        elif name == "clevr":
            ds = Clevr(split, root, max_items=max_items)
            os.makedirs(out, exist_ok=True)
            for i in ds.records:
                image, masks = ds._decode(i)
                Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(os.path.join(out, f"CLEVR_image_{i}.png"))
                for k in range(masks.shape[0]):
                    Image.fromarray(masks[k]).save(os.path.join(out, f"CLEVR_mask_{i}_{k}.png"))
                n_written += 1
        else:
            raise DatasetError(f"convert: only objectsroom and clevr are stored as TFRecords, not {name!r}")
    return n_written


def dataset_table(markdown=False):
    """The DATASETS registry as text (str): per dataset its name, the scripts that use it, the
    download source (url and files), the on-disk layout, the splits and the masks. markdown=True
    gives one Markdown table row per dataset (columns: name, used by, download, layout, splits,
    masks) instead of an indented block."""
    rows = []
    for i in DATASETS.values():
        download = f"{i.url} ({i.files})" if i.url else i.files
        rows.append((i.name, ", ".join(i.used_by), download, i.layout, i.splits, i.masks))
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in rows]
        return "\n".join(["| name | used by | download | layout (--data_dir=PATH) | splits | masks |",
                          "|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in esc])
    out = []
    for name, used, download, layout, splits, masks in rows:
        out += [f"{name}  (used by {used})", f"  download: {download}", f"  layout:   {layout}",
                f"  splits:   {splits}", f"  masks:    {masks}", ""]
    return "\n".join(out).rstrip("\n")


def _main(argv):
    import argparse
    p = argparse.ArgumentParser(description="List the datasets (the default), show one item of a dataset and time "
                                            "reading it, or convert a TFRecord to PNGs.")
    p.add_argument("name", nargs="?", help=f"'convert' or one of: {', '.join(DATASETS)}")
    p.add_argument("what", nargs="?", help="for convert: objectsroom | clevr")
    p.add_argument("--list", action="store_true", help="print every dataset: scripts, download, layout, splits, masks")
    p.add_argument("--markdown", action="store_true", help="with --list: as a Markdown table")
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--n", type=int, default=64, help="items to time")
    p.add_argument("--max_items", type=int, default=None)
    a = p.parse_args(argv)
    if a.list or a.name is None:
        print(dataset_table(markdown=a.markdown))
        return 0
    try:
        if a.name == "convert":
            n = convert(a.what, a.root, a.out, max_items=a.max_items)
            print(f"wrote {n} items to {a.out}")
            return 0
        opts = {"max_items": a.max_items} if a.max_items is not None else {}
        ds = build_dataset(a.name, a.split, root=a.root, image_size=a.image_size, **opts)
        print(ds)
        item = ds[0]
        for k, v in item.items():
            print(f"  {k}: {tuple(v.shape)} {v.dtype} range [{v.min().item():.3g}, {v.max().item():.3g}]"
                  + (f" labels {torch.unique(v).tolist()}" if k == "mask" else ""))
        n = min(a.n, len(ds))
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        dt = time.perf_counter() - t
        print(f"{n} items in {dt:.2f} s: {n / dt:.1f} items/s ({1e3 * dt / n:.2f} ms per item)")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

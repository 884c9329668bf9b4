"""The test suite: data.py, common.py, boqsa.py (run: python -m pytest -q test_all.py).

Tests assert behaviour against independent references: sklearn / hand-computed metrics, files
written here in each dataset's original format, the real samples in ../shared/data/real, a
functional re-statement of the official BO-QSA forward, finite differences and gradcheck.
"""
import dataclasses
import gzip
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFont
from sklearn.metrics import adjusted_rand_score

import data
from data import DatasetError, build_dataset, make_example, parse_example, read_tfrecord, write_tfrecord
import common
from common import (CheckpointError, MetricsLog, ari, fg_iou_dice, miou, msc, mse,
                    nanmean, parse_args, segmentation_metrics)
import boqsa
from boqsa import BOQSA, Config, SlotAttention, convert_official_state_dict


# =============================================================================
# data.py
# =============================================================================
HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "..", "shared", "data", "real")   # real dataset samples (read-only)


# -----------------------------------------------------------------------------
# helpers

def _data_pb_varint(v):
    v &= (1 << 64) - 1
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def _data_pb_ld(num, payload):   # length-delimited field
    return _data_pb_varint(num << 3 | 2) + _data_pb_varint(len(payload)) + payload


def _data_pb_example(feats):
    """feats: {name: (kind 1/2/3, list body bytes)} -> Example bytes, built by hand."""
    body = b"".join(_data_pb_ld(1, _data_pb_ld(1, k.encode()) + _data_pb_ld(2, _data_pb_ld(kind, lst))) for k, (kind, lst) in feats.items())
    return _data_pb_ld(1, body)


def _data_save_png(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def _data_png_bytes(arr, mode=None):
    import io
    b = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(b, format="PNG")
    return b.getvalue()


def _data_nearest(label, size_hw):
    return np.asarray(Image.fromarray(label.astype(np.uint8)).resize((size_hw[1], size_hw[0]), Image.NEAREST))


def _data_partition_masks(rng, k, h, w):
    """k 0/255 masks [K,H,W] that partition the image, plus the owner index per pixel."""
    owner = np.zeros((h, w), np.int64)
    for c in range(1, k):   # rectangles on top of each other; channel 0 is what is left
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        owner[y:y + rng.integers(2, h // 2), x:x + rng.integers(2, w // 2)] = c
    masks = np.stack([(owner == c) for c in range(k)]).astype(np.uint8) * 255
    return masks, owner


def _data_check_item(item, h, w):
    img = item["image"]
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, h, w)
    assert 0.0 <= img.min().item() and img.max().item() <= 1.0
    if "mask" in item:
        assert item["mask"].dtype == torch.int64 and tuple(item["mask"].shape) == (h, w)


# -----------------------------------------------------------------------------
# CRC, TFRecord, Example

def test_data_crc32c():
    assert data.crc32c(b"123456789") == 0xE3069283   # the standard CRC-32C check value
    assert data.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in [1, 7, 1023, 1024, 1025, 5000, 70001]:
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert data.crc32c(b) == data._crc_raw_py(b, 0xFFFFFFFF) ^ 0xFFFFFFFF
    # a TFRecord header: masked crc of the 8 length bytes, as TensorFlow computes it
    c = data.crc32c(struct.pack("<Q", 5))
    assert data._masked_crc(struct.pack("<Q", 5)) == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("comp", [None, "GZIP", "ZLIB"])
def test_data_tfrecord_roundtrip(tmp_path, comp):
    recs = [b"", b"a", os.urandom(3000), b"xyz" * 1000]
    p = str(tmp_path / "f.tfrecord")
    assert write_tfrecord(p, recs, compression=comp) == 4
    assert list(read_tfrecord(p, compression=comp)) == recs
    if comp != "ZLIB":
        assert list(read_tfrecord(p, compression="auto")) == recs
    with open(p, "rb") as f:
        magic = f.read(2)
    assert (magic == b"\x1f\x8b") == (comp == "GZIP")
    idx = data._RecordIndex(p, comp)   # random access, in any order
    assert len(idx) == 4 and idx.read(2) == recs[2] and idx.read(0) == b"" and idx.read(3) == recs[3]


def test_data_tfrecord_corruption(tmp_path):
    recs = [b"first record", b"second record", b"third"]
    p = str(tmp_path / "f.tfrecord")
    write_tfrecord(p, recs)
    raw = bytearray(open(p, "rb").read())
    second = 12 + len(recs[0]) + 4
    # a flipped data byte of record 1
    bad = bytearray(raw)
    bad[second + 12 + 3] ^= 0x01
    open(p, "wb").write(bad)
    with pytest.raises(DatasetError, match=r"f\.tfrecord.*record 1.*data CRC"):
        list(read_tfrecord(p))
    assert list(read_tfrecord(p, check_crc=False))[1] != recs[1]
    with pytest.raises(DatasetError, match="record 1"):
        data._RecordIndex(p, None).read(1)
    # a flipped length byte
    bad = bytearray(raw)
    bad[second] ^= 0x01
    open(p, "wb").write(bad)
    with pytest.raises(DatasetError, match="record 1.*length CRC"):
        list(read_tfrecord(p))
    # truncated file
    open(p, "wb").write(raw[:-3])
    with pytest.raises(DatasetError, match="truncated.*record 2"):
        list(read_tfrecord(p))
    # the same corruption inside a GZIP stream
    bad = bytearray(raw)
    bad[12 + 2] ^= 0x40
    gz = str(tmp_path / "g.tfrecord")
    with gzip.open(gz, "wb") as f:
        f.write(bytes(bad))
    with pytest.raises(DatasetError, match=r"g\.tfrecord.*record 0"):
        list(read_tfrecord(gz, compression="GZIP"))


def test_data_parse_example_handbuilt():
    floats = struct.pack("<3f", 1.5, -2.0, 1e-3)
    ints = _data_pb_varint(1) + _data_pb_varint(300) + _data_pb_varint(-5) + _data_pb_varint(2 ** 40)
    rec = _data_pb_example({
        "name": (1, _data_pb_ld(1, b"hello") + _data_pb_ld(1, b"") + _data_pb_ld(1, b"wo")),
        "f": (2, _data_pb_ld(1, floats)),                                        # packed floats
        "fu": (2, b"\x0d" + struct.pack("<f", 0.25) + b"\x0d" + struct.pack("<f", 4.0)),   # unpacked
        "i": (3, _data_pb_ld(1, ints)),                                          # packed int64
        "iu": (3, b"\x08" + _data_pb_varint(7) + b"\x08" + _data_pb_varint(-1)),      # unpacked int64
        "px": (1, b"".join(_data_pb_ld(1, bytes([v])) for v in [0, 255, 7])),    # one-byte strings
        "empty": (3, b""),
    })
    ex = parse_example(rec)
    assert ex["name"] == [b"hello", b"", b"wo"]
    assert ex["f"].dtype == np.float32 and np.allclose(ex["f"], [1.5, -2.0, 1e-3])
    assert ex["fu"].tolist() == [0.25, 4.0]
    assert ex["i"].dtype == np.int64 and ex["i"].tolist() == [1, 300, -5, 2 ** 40]
    assert ex["iu"].tolist() == [7, -1]
    assert ex["px"].dtype == np.uint8 and ex["px"].tolist() == [0, 255, 7]
    assert parse_example(rec, one_byte_as_array=False)["px"] == [b"\x00", b"\xff", b"\x07"]
    assert ex["empty"].size == 0
    with pytest.raises(DatasetError):
        parse_example(rec[:-3])


def test_data_make_example_roundtrip():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, 20 * 30 * 3, dtype=np.uint8)
    feats = {"image": img, "label": [3, -4], "x": np.array([0.5, 2.0], np.float32), "s": b"abc",
             "strs": [b"aa", "bb"], "one": 5}
    ex = parse_example(make_example(feats))
    assert np.array_equal(ex["image"], img)
    assert ex["label"].tolist() == [3, -4] and ex["x"].tolist() == [0.5, 2.0]
    assert ex["s"] == [b"abc"] and ex["strs"] == [b"aa", b"bb"] and ex["one"].tolist() == [5]
    # the encoder writes the same bytes as a hand-built message
    assert make_example({"i": [1, 300]}) == _data_pb_example({"i": (3, _data_pb_ld(1, _data_pb_varint(1) + _data_pb_varint(300)))})
    with pytest.raises(TypeError):
        make_example({"bad": {"a": 1}})


# -----------------------------------------------------------------------------
# registry and errors

def test_data_registry_and_errors(tmp_path):
    names = ["synthetic", "synthetic_video", "shapestacks", "objectsroom", "clevr", "clevr6", "clevrtex",
             "clevrtex_ood", "clevrtex_camo", "movi_a", "birds", "dogs", "cars", "flowers"]
    for n in names:
        info = data.DATASETS[n]
        assert info.url and info.layout and isinstance(info.has_masks, bool) and isinstance(info.video, bool)
        assert info.default_image_size in (64, 128)
    with pytest.raises(DatasetError, match="valid names:.*clevrtex"):
        build_dataset("nope", "train")
    with pytest.raises(DatasetError, match="split"):
        build_dataset("synthetic", "training")
    with pytest.raises(TypeError, match="colour"):
        build_dataset("synthetic", "train", colour=3)
    missing = str(tmp_path / "not_here")
    for n in names[2:]:
        with pytest.raises(DatasetError) as e:
            build_dataset(n, "train", root=missing)
        msg = str(e.value)
        assert missing in msg and "\n" not in msg and ("http" in msg or "github" in msg), msg
        with pytest.raises(DatasetError, match="no data folder"):
            build_dataset(n, "train")
    # an existing folder with the wrong content says what it found
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="found 0 files matching CLEVRTEX_full_|readme.txt"):
        build_dataset("clevrtex", "train", root=str(tmp_path / "junk"))


# -----------------------------------------------------------------------------
# synthetic

def test_data_synthetic_scenes():
    ds = build_dataset("synthetic", "train", size=60)
    assert len(ds) == 60 and ds.has_masks and ds.name == "synthetic"
    counts = []
    for i in range(60):
        item = ds[i]
        _data_check_item(item, 64, 64)
        m, img = item["mask"].numpy(), (item["image"].numpy() * 255).round().astype(int).transpose(1, 2, 0)
        ids = np.unique(m)
        k = ids.max()
        assert np.array_equal(ids, np.arange(k + 1)), ids        # 0 and contiguous 1..K
        assert 2 <= k <= 6
        counts.append(k)
        colours = []
        for j in range(k + 1):   # every object (and the plain background) has exactly one colour
            c = np.unique(img[m == j], axis=0)
            assert len(c) == 1
            colours.append(tuple(c[0]))
        assert len(set(colours)) == k + 1                         # all distinct, also from the background
        assert (m > 0).sum() >= 0.1 * 0.1 * 64 * 64 * 0.3        # objects are not tiny
    assert len(set(counts)) >= 3
    # deterministic per (seed, split, index); the seed and the split change the scenes
    a, b = ds[5], build_dataset("synthetic", "train", size=60)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], build_dataset("synthetic", "train", seed=1)[5]["image"])
    assert not torch.equal(a["image"], build_dataset("synthetic", "val")[5]["image"])
    assert len(build_dataset("synthetic", "test")) == 512
    # options
    ds = build_dataset("synthetic", "val", image_size=32, num_objects=(3, 3), textured_background=True)
    it = ds[0]
    _data_check_item(it, 32, 32)
    assert it["mask"].max() == 3
    bg = it["image"].permute(1, 2, 0)[it["mask"] == 0]
    assert len(torch.unique(bg, dim=0)) == 2       # two-colour texture
    batch = next(iter(torch.utils.data.DataLoader(build_dataset("synthetic", "train"), batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)


def test_data_synthetic_video():
    ds = build_dataset("synthetic_video", "train", num_frames=6, size=10)
    assert ds.video and len(ds) == 10
    still = build_dataset("synthetic", "train")
    for i in range(3):
        it = ds[i]
        v, m = it["video"], it["mask"]
        assert v.shape == (6, 3, 64, 64) and v.dtype == torch.float32 and m.shape == (6, 64, 64) and m.dtype == torch.int64
        # frame 0 is the still scene of the same index
        assert torch.equal(v[0], still[i]["image"]) and torch.equal(m[0], still[i]["mask"])
        k = int(m[0].max())
        colour = {}
        moved = False
        for t in range(6):
            assert m[t].max() <= k
            for j in torch.unique(m[t]).tolist():
                c = torch.unique(v[t].permute(1, 2, 0)[m[t] == j], dim=0)
                assert len(c) == 1                              # ids keep one colour over time
                colour.setdefault(j, c[0])
                assert torch.equal(colour[j], c[0])
            moved |= not torch.equal(m[t], m[0])
        assert moved


# -----------------------------------------------------------------------------
# ShapeStacks

def _data_write_shapestacks(root, scenarios, with_maps=True, splits=True):
    rng = np.random.default_rng(0)
    labels = {}
    for sc in scenarios:
        d = os.path.join(root, "recordings", sc)
        for cam in (1, 2):
            img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
            _data_save_png(os.path.join(d, f"rgb-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.png"), img)
            lab = np.zeros((224, 224), np.uint8)
            lab[40:120, 50:150] = 1
            lab[120:200, 60:140] = 2 + cam
            lab[10:30, 10:30] = 7      # unassigned -> background
            lab[0:14, 100:120] = 5     # outside the 196 crop
            if with_maps:   # as matplotlib imsave(vmin=0, vmax=8, cmap='gray') writes it
                v = (32 * lab.astype(int)).clip(0, 255).astype(np.uint8)
                rgba = np.stack([v, v, v, np.full_like(v, 255)], -1)
                Image.fromarray(rgba, "RGBA").save(os.path.join(d, f"iseg-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.map"),
                                                   format="PNG")
            labels[(sc, cam)] = (img, lab)
    if splits:
        sp = os.path.join(root, "splits", "default")
        os.makedirs(sp)
        for name, scs in (("train", scenarios[:2]), ("eval", scenarios[2:3]), ("test", scenarios[3:])):
            with open(os.path.join(sp, name + ".txt"), "w") as f:
                f.write("".join(s + "\n" for s in scs))
    return labels


def test_data_shapestacks(tmp_path):
    scs = ["env_ccs-easy-h=2-vcom=0-vpsf=0-v=1", "env_ccs-easy-h=3-vcom=1-vpsf=0-v=2",
           "env_ccs-hard-h=4-vcom=0-vpsf=0-v=3", "env_ccs-hard-h=5-vcom=0-vpsf=2-v=4"]
    labels = _data_write_shapestacks(str(tmp_path), scs)
    tr = build_dataset("shapestacks", "train", root=str(tmp_path), image_size=196)
    assert len(tr) == 4 and tr.has_masks
    assert len(build_dataset("shapestacks", "val", root=str(tmp_path))) == 2      # eval.txt
    it = tr[0]
    _data_check_item(it, 196, 196)
    img, lab = labels[(scs[0], 1)]
    exp = lab[14:210, 14:210].astype(np.int64)
    exp[exp == 7] = 0
    assert np.array_equal(it["mask"].numpy(), exp)
    assert np.allclose(it["image"].numpy(), img[14:210, 14:210].transpose(2, 0, 1) / 255.0)
    it = build_dataset("shapestacks", "test", root=str(tmp_path), image_size=64)[1]
    _data_check_item(it, 64, 64)
    exp = _data_nearest(np.where(labels[(scs[3], 2)][1] == 7, 0, labels[(scs[3], 2)][1])[14:210, 14:210], (64, 64))
    assert np.array_equal(it["mask"].numpy(), exp) and set(np.unique(exp)) == {0, 1, 4}
    # root may be the recordings folder itself
    assert len(build_dataset("shapestacks", "train", root=str(tmp_path / "recordings"))) == 4


def test_data_shapestacks_no_maps_no_splits(tmp_path):
    _data_write_shapestacks(str(tmp_path), ["a", "b"], with_maps=False, splits=False)
    data._WARNED.clear()
    with pytest.warns(UserWarning, match="all 2 scenarios"):
        ds = build_dataset("shapestacks", "test", root=str(tmp_path), image_size=32)
    assert not ds.has_masks and len(ds) == 4 and "mask" not in ds[0]


def test_data_shapestacks_real_example():
    data._WARNED.clear()   # warnings are printed once per process
    with pytest.warns(UserWarning, match="no split files"):
        ds = build_dataset("shapestacks", "train", root=os.path.join(REAL, "shapestacks_example"), image_size=64)
    assert ds.has_masks is False and ds.name == "shapestacks" and len(ds) == 2
    it = ds[0]
    assert set(it) == {"image"}
    _data_check_item(it, 64, 64)
    assert it["image"].std() > 0.05


# -----------------------------------------------------------------------------
# ClevrTex

def _data_write_clevrtex(root, variant, n, h=240, w=320):
    rng = np.random.default_rng(2)
    out = {}
    for i in range(n):
        d = os.path.join(root, f"clevrtex_{variant}", str(i // 1000))
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        ids = np.zeros((h, w), np.uint8)
        for k in range(1, 1 + i % 5 + 1):
            s = min(50, h // 3)
            y, x = rng.integers(0, h - s), rng.integers(0, w - s)
            ids[y:y + s, x:x + s] = k
        _data_save_png(os.path.join(d, f"CLEVRTEX_{variant}_{i:06d}.png"), rgba, "RGBA")
        p = Image.fromarray(ids, "P")
        p.putpalette(list(rng.integers(0, 256, 768)))
        p.save(os.path.join(d, f"CLEVRTEX_{variant}_{i:06d}_flat.png"))
        out[i] = (rgba, ids)
    return out


def test_data_clevrtex(tmp_path):
    written = _data_write_clevrtex(str(tmp_path), "full", 10)
    sizes = {s: len(build_dataset("clevrtex", s, root=str(tmp_path))) for s in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 1, "test": 1}
    ds = build_dataset("clevrtex", "train", root=str(tmp_path / "clevrtex_full"), image_size=192)
    it = ds[0]                                      # index 2: test = 0, val = 1
    _data_check_item(it, 192, 192)
    rgba, ids = written[2]
    assert np.array_equal(it["mask"].numpy(), ids[24:216, 64:256])
    assert np.allclose(it["image"].numpy(), rgba[24:216, 64:256, :3].transpose(2, 0, 1) / 255.0)
    it = build_dataset("clevrtex", "test", root=str(tmp_path))[0]
    _data_check_item(it, 128, 128)
    assert np.array_equal(it["mask"].numpy(), _data_nearest(written[0][1][24:216, 64:256], (128, 128)))
    it = build_dataset("clevrtex", "test", root=str(tmp_path), crop=None, image_size=(240, 320))[0]
    assert np.array_equal(it["mask"].numpy(), written[0][1])
    # out-of-distribution variant: everything in every split
    _data_write_clevrtex(str(tmp_path), "outd", 3)
    assert len(build_dataset("clevrtex_ood", "train", root=str(tmp_path))) == 3
    assert len(build_dataset("clevrtex_ood", "test", root=str(tmp_path))) == 3
    with pytest.raises(DatasetError, match="clevrtex_camo"):
        build_dataset("clevrtex_camo", "test", root=str(tmp_path))


def test_data_clevrtex_bad_files(tmp_path):
    _data_write_clevrtex(str(tmp_path), "full", 10, h=24, w=32)
    bad = tmp_path / "clevrtex_full" / "0" / "CLEVRTEX_full_000000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="CLEVRTEX_full_000000.png"):
        build_dataset("clevrtex", "test", root=str(tmp_path))[0]
    os.remove(tmp_path / "clevrtex_full" / "0" / "CLEVRTEX_full_000003_flat.png")
    with pytest.raises(DatasetError, match="CLEVRTEX_full_000003_flat.png"):
        build_dataset("clevrtex", "test", root=str(tmp_path))


# -----------------------------------------------------------------------------
# DeepMind TFRecords: ObjectsRoom, CLEVR

def _data_objectsroom_records(n, rng):
    recs, truth = [], []
    for _ in range(n):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        masks, owner = _data_partition_masks(rng, 7, 64, 64)
        recs.append(make_example({"image": img, "mask": masks[..., None]}))
        truth.append((img, np.where(owner >= 4, owner - 3, 0)))
    return recs, truth


@pytest.mark.parametrize("comp", ["GZIP", "ZLIB", None])
def test_data_objectsroom_tfrecord(tmp_path, comp):
    recs, truth = _data_objectsroom_records(5, np.random.default_rng(3))
    write_tfrecord(str(tmp_path / "objects_room_train.tfrecords"), recs, compression=comp)
    kw = dict(root=str(tmp_path), test_size=2, val_size=1, compression="ZLIB" if comp == "ZLIB" else "auto")
    ds = {s: build_dataset("objectsroom", s, **kw) for s in ("test", "val", "train")}
    assert [len(ds[s]) for s in ("test", "val", "train")] == [2, 1, 2]
    for s, first in (("test", 0), ("val", 2), ("train", 3)):
        for j in reversed(range(len(ds[s]))):       # backwards: random access into the stream
            it = ds[s][j]
            _data_check_item(it, 64, 64)
            img, lab = truth[first + j]
            assert np.array_equal(it["mask"].numpy(), lab)
            assert np.allclose(it["image"].numpy(), img.transpose(2, 0, 1) / 255.0)
    assert len(build_dataset("objectsroom", "train", max_items=1, **kw)) == 1
    # the file itself as root; default split sizes exceed this file -> every split uses all 5
    data._WARNED.clear()
    with pytest.warns(UserWarning, match="only 5 records"):
        assert len(build_dataset("objectsroom", "train", root=str(tmp_path / "objects_room_train.tfrecords"),
                                 compression=kw["compression"])) == 5


def test_data_gzip_random_access_snapshots(tmp_path, monkeypatch):
    # small snapshot spacing so that reads resume from zlib snapshots in the middle of the stream
    monkeypatch.setattr(data._RecordIndex, "SNAPSHOT_EVERY", 20_000)
    monkeypatch.setattr(data._Inflater, "CHUNK", 4096)
    rng = np.random.default_rng(4)
    recs = [rng.integers(0, 4, rng.integers(1000, 9000), dtype=np.uint8).tobytes() for _ in range(40)]
    p = str(tmp_path / "s.tfrecords")
    write_tfrecord(p, recs, compression="GZIP")
    idx = data._RecordIndex(p, "auto")
    assert len(idx) == 40 and len(idx._snapshots) > 5
    for i in rng.permutation(40):
        assert idx.read(int(i)) == recs[i]
    import pickle   # a new process keeps the offsets and rebuilds snapshots as it reads
    idx2 = pickle.loads(pickle.dumps(idx))
    assert idx2.read(33) == recs[33] and idx2.read(2) == recs[2]


def test_data_objectsroom_png_export(tmp_path):
    recs, truth = _data_objectsroom_records(4, np.random.default_rng(5))
    src = tmp_path / "src"
    src.mkdir()
    write_tfrecord(str(src / "objects_room_train.tfrecords"), recs, compression="GZIP")
    n = data.convert("objectsroom", str(src), str(tmp_path / "out"), splits=("test",))
    assert n == 4 and len(os.listdir(tmp_path / "out" / "test" / "masks")) == 4
    ds = build_dataset("objectsroom", "test", root=str(tmp_path / "out"))
    assert len(ds) == 4
    for j in range(4):
        assert np.array_equal(ds[j]["mask"].numpy(), truth[j][1])
        assert np.allclose(ds[j]["image"].numpy(), truth[j][0].transpose(2, 0, 1) / 255.0)


def _data_real_clevr():
    d = os.path.join(REAL, "clevr_with_masks")
    img = np.asarray(Image.open(os.path.join(d, "CLEVR_image_0.png")))[..., ::-1]   # stored BGR
    masks = np.stack([np.asarray(Image.open(os.path.join(d, f"CLEVR_mask_0_{k}.png"))) for k in range(11)])
    return np.ascontiguousarray(img), masks


def test_data_clevr_real_png():
    root = os.path.join(REAL, "clevr_with_masks")
    img, masks = _data_real_clevr()
    nonempty = int((masks.reshape(11, -1).max(1) > 0).sum())
    data._WARNED.clear()
    with pytest.warns(UserWarning, match="only 1 scene"):
        ds = build_dataset("clevr", "test", root=root, crop=None, image_size=(240, 320))
    assert len(ds) == 1 and ds.has_masks
    it = ds[0]
    _data_check_item(it, 240, 320)
    m = it["mask"].numpy()
    assert len(np.unique(m)) == nonempty == 8                    # background + 7 objects
    for k in range(11):
        assert np.array_equal(m == k, masks[k] > 127)
    assert np.allclose(it["image"].numpy(), img.transpose(2, 0, 1) / 255.0)
    it = build_dataset("clevr", "train", root=root)[0]          # 0.8 centre crop, 128 px
    _data_check_item(it, 128, 128)
    label = np.argmax(masks, 0)
    assert np.array_equal(it["mask"].numpy(), _data_nearest(label[24:216, 64:256], (128, 128)))
    with pytest.warns(UserWarning, match="only 1 scene"):
        assert len(build_dataset("clevr6", "train", root=root)) == 0   # 7 objects: not in CLEVR6


def test_data_clevr_real_tfrecord(tmp_path):
    img, masks = _data_real_clevr()
    rec = make_example({"image": img, "mask": masks[..., None], "visibility": np.ones(11, np.float32)})
    assert len(rec) > 3 * (240 * 320 * 3 + 11 * 240 * 320)          # one-byte strings: 3 bytes per value
    p = tmp_path / "clevr_with_masks_train.tfrecords"
    write_tfrecord(str(p), [rec], compression="GZIP")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = build_dataset("clevr", "test", root=os.path.join(REAL, "clevr_with_masks"), crop=None, image_size=(240, 320))
    for root in (str(p), str(tmp_path)):
        ds = build_dataset("clevr", "test", root=root, crop=None, image_size=(240, 320))
        assert len(ds) == 1
        it = ds[0]
        assert torch.equal(it["mask"], ref[0]["mask"]) and torch.equal(it["image"], ref[0]["image"])
    it = build_dataset("clevr", "test", root=str(p))[0]
    assert torch.equal(it["mask"], build_dataset("clevr", "test", root=os.path.join(REAL, "clevr_with_masks"))[0]["mask"])
    # and back to the PNG export layout
    assert data.convert("clevr", str(p), str(tmp_path / "png"), splits=("test",)) == 1
    assert sorted(os.listdir(tmp_path / "png")) == sorted(os.listdir(os.path.join(REAL, "clevr_with_masks")))
    with pytest.warns(UserWarning, match="only 1 scene"):
        it = build_dataset("clevr", "test", root=str(tmp_path / "png"), crop=None, image_size=(240, 320))[0]
    assert torch.equal(it["mask"], ref[0]["mask"]) and torch.equal(it["image"], ref[0]["image"])


def test_data_clevr6_filter(tmp_path):
    class SmallClevr6(data.Clevr6):   # the same reader on 24x32 scenes, to keep the test small
        native = (24, 32)
    rng = np.random.default_rng(6)
    recs, nobj = [], []
    for n in [3, 7, 5, 10, 6, 2]:
        owner = np.zeros((24, 32), np.int64)
        for k in range(1, n + 1):   # object k in its own cell of a 3x4 grid
            y, x = divmod(k - 1, 4)
            owner[y * 8 + 1:y * 8 + 7, x * 8 + 1:x * 8 + 7] = k
        masks = np.stack([(owner == c) for c in range(11)]).astype(np.uint8) * 255
        nobj.append(n)
        recs.append(make_example({"image": rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "mask": masks}))
    p = str(tmp_path / "c.tfrecords")
    write_tfrecord(p, recs, compression="GZIP")
    ds = SmallClevr6("test", root=p, crop=None, image_size=(24, 32), test_size=6, val_size=0)
    assert list(ds.records) == [0, 2, 4, 5]
    assert all(int(ds[j]["mask"].max()) == nobj[i] for j, i in enumerate(ds.records))
    assert list(SmallClevr6("test", root=p, crop=None, test_size=6, val_size=0, max_items=2).records) == [0, 2]


# -----------------------------------------------------------------------------
# MOVi-A

def _data_movi_video(rng, t=4, h=32, w=32):
    rgb = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    seg = np.zeros((t, h, w), np.uint8)
    for f in range(t):
        seg[f, 4 + f:14 + f, 5:15] = 1
        seg[f, 16:30, 10 + f:20 + f] = 3
    return rgb, seg


def test_data_movi_tfrecord(tmp_path):
    rng = np.random.default_rng(7)
    vids = {}
    for split, shards in (("train", [2, 1]), ("validation", [1])):
        for s, n in enumerate(shards):
            recs = []
            for r in range(n):
                rgb, seg = _data_movi_video(rng)
                vids[(split, s, r)] = (rgb, seg)
                recs.append(make_example({"video": [_data_png_bytes(f) for f in rgb],
                                          "segmentations": [_data_png_bytes(f, "L") for f in seg],
                                          "metadata/num_frames": 4}))
            write_tfrecord(str(tmp_path / f"movi_a-{split}.tfrecord-{s:05d}-of-{len(shards):05d}"), recs)
    ds = build_dataset("movi_a", "train", root=str(tmp_path), image_size=32)
    assert len(ds) == 3 and ds.video and ds.has_masks
    it = ds[2]
    rgb, seg = vids[("train", 1, 0)]
    assert it["video"].shape == (4, 3, 32, 32) and it["video"].dtype == torch.float32
    assert it["mask"].shape == (4, 32, 32) and it["mask"].dtype == torch.int64
    assert np.array_equal(it["mask"].numpy(), seg)
    assert np.allclose(it["video"].numpy(), rgb.transpose(0, 3, 1, 2) / 255.0)
    it = build_dataset("movi_a", "val", root=str(tmp_path), image_size=32, num_frames=2, frame_stride=2)[0]
    assert np.array_equal(it["mask"].numpy(), vids[("validation", 0, 0)][1][[0, 2]])
    data._WARNED.clear()
    with pytest.warns(UserWarning, match="validation"):
        assert len(build_dataset("movi_a", "test", root=str(tmp_path), image_size=32)) == 1
    it = build_dataset("movi_a", "train", root=str(tmp_path))[0]    # default 128 px
    assert it["video"].shape == (4, 3, 128, 128) and it["mask"].shape == (4, 128, 128)
    with pytest.raises(DatasetError, match="frames"):
        build_dataset("movi_a", "train", root=str(tmp_path), num_frames=5)[0]


def test_data_movi_png_sequence(tmp_path):
    rng = np.random.default_rng(8)
    truth = {}
    for v in ("vid_b", "vid_a"):
        rgb, seg = _data_movi_video(rng, t=3)
        truth[v] = (rgb, seg)
        for t in range(3):
            rgba = np.concatenate([rgb[t], np.full((32, 32, 1), 255, np.uint8)], -1)
            _data_save_png(str(tmp_path / "validation" / v / f"rgba_{t:05d}.png"), rgba, "RGBA")
            p = Image.fromarray(seg[t], "P")
            p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
            p.save(str(tmp_path / "validation" / v / f"segmentation_{t:05d}.png"))
    ds = build_dataset("movi_a", "val", root=str(tmp_path), image_size=32)
    assert len(ds) == 2
    it = ds[0]                                                       # sorted: vid_a first
    assert np.array_equal(it["mask"].numpy(), truth["vid_a"][1])
    assert np.allclose(it["video"].numpy(), truth["vid_a"][0].transpose(0, 3, 1, 2) / 255.0)


# -----------------------------------------------------------------------------
# foreground datasets

def test_data_birds_cub_layout(tmp_path):
    rng = np.random.default_rng(9)
    lines, boxes, split, truth = [], [], [], {}
    for i in range(1, 5):
        name = f"001.Bird/bird_{i}.jpg"
        img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        seg = np.zeros((60, 80), np.uint8)
        seg[20:40, 30:60] = 255
        seg[20:40, 30:32] = 100                      # soft edge below 128: background
        _data_save_png(str(tmp_path / "images" / name), img)  # saved by extension: JPEG
        _data_save_png(str(tmp_path / "segmentations" / name.replace(".jpg", ".png")), seg)
        lines.append(f"{i} {name}\n")
        boxes.append(f"{i} 30.0 20.0 30.0 20.0\n")
        split.append(f"{i} {[0, 0, 1, 2][i - 1]}\n")
        truth[i] = seg
    (tmp_path / "images.txt").write_text("".join(lines))
    (tmp_path / "bounding_boxes.txt").write_text("".join(boxes))
    (tmp_path / "train_val_test_split.txt").write_text("".join(split))
    assert [len(build_dataset("birds", s, root=str(tmp_path))) for s in ("train", "val", "test")] == [2, 1, 1]
    it = build_dataset("birds", "test", root=str(tmp_path), image_size=44)[0]
    _data_check_item(it, 44, 44)
    # crop: r = 0.75 * 30 = 22 around the box centre (45, 30) -> x 23..67, y 8..52
    exp = (truth[4] > 127)[8:52, 23:67].astype(np.int64)
    assert np.array_equal(it["mask"].numpy(), exp) and set(np.unique(exp)) == {0, 1}
    it = build_dataset("birds", "test", root=str(tmp_path), bbox_crop=False)[0]
    _data_check_item(it, 128, 128)


def test_data_foreground_generic_drc_flowers(tmp_path):
    rng = np.random.default_rng(10)
    # generic layout images/ + masks/, no split files: sorted, 10% / 10% / 80%
    g = tmp_path / "generic"
    for i in range(10):
        _data_save_png(str(g / "images" / f"im{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        m = np.zeros((40, 40), np.uint8)
        m[10:30, 5 + i:25 + i] = 255
        _data_save_png(str(g / "masks" / f"im{i}.png"), m)
    ds = build_dataset("dogs", "train", root=str(g), image_size=40)
    assert len(ds) == 8 and np.array_equal(ds[0]["mask"].numpy(), (np.asarray(Image.open(g / "masks" / "im2.png")) > 127))
    # DRC cars layout with selection lists
    c = tmp_path / "cars"
    for part, names in (("train", ["a", "b"]), ("test", ["c"])):
        for n in names:
            _data_save_png(str(c / "data_mrcnn" / part / "resized" / f"{n}_resized.png"),
                      rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            m = np.zeros((32, 32), np.uint8)
            m[8:24, 8:20] = 255
            _data_save_png(str(c / "data_mrcnn" / part / "resized" / f"{n}_maskresized.png"), m)
    np.save(c / "data_mrcnn_train_select.npy", np.array(["a", "b"]))
    np.save(c / "data_mrcnn_test_select.npy", np.array(["c"]))
    assert len(build_dataset("cars", "train", root=str(c))) == 2
    it = build_dataset("cars", "test", root=str(c), image_size=32)[0]
    img = np.asarray(Image.open(c / "data_mrcnn" / "test" / "resized" / "c_resized.png"))
    assert np.allclose(it["image"].numpy(), img.transpose(2, 0, 1) / 255.0)     # RGB, not BGR
    assert it["mask"].sum() == 16 * 12
    # Oxford flowers: setid.mat, train = trnid (not swapped)
    from scipy.io import savemat
    f = tmp_path / "flowers"
    for i in range(1, 6):
        _data_save_png(str(f / "jpg" / f"image_{i:05d}.jpg"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
        seg = np.zeros((40, 50, 3), np.uint8)
        seg[...] = (0, 0, 254)
        seg[10:30, 10:40] = (200, 120, 60)
        _data_save_png(str(f / "segmim" / f"segmim_{i:05d}.jpg"), seg)
    savemat(str(f / "setid.mat"), {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[4, 5]])})
    tr = build_dataset("flowers", "train", root=str(f), image_size=(40, 50))
    assert [p[0][-9:] for p in tr.items] == ["00001.jpg", "00002.jpg"]
    m = tr[0]["mask"].numpy()
    assert abs(int(m.sum()) - 20 * 30) < 150 and m[20, 25] == 1 and m[2, 2] == 0


# =============================================================================
# common.py
# =============================================================================
# A 2x4 scene used for hand-computed metrics.
# true: 0 = left 2x2 block (4 px), 1 = top right pair, 2 = bottom right pair
# pred: 5 = left block + (0,2) (5 px), 7 = (0,3), (1,2), (1,3) (3 px)
# IoU table (true x pred): 0: [4/5, 0]; 1: [1/6, 1/4]; 2: [0, 2/3]
TRUE_2x4 = torch.tensor([[[0, 0, 1, 1],
                          [0, 0, 2, 2]]])
PRED_2x4 = torch.tensor([[[5, 5, 5, 7],
                          [5, 5, 7, 7]]])


# ----------------------------------------------------------------------------- ARI

def test_common_ari_matches_sklearn_on_random_maps():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (6, 12, 10), generator=g)
    pred = torch.randint(0, 4, (6, 12, 10), generator=g)
    pred[0] = true[0] * 3 + 1  # one strongly related pair
    got = ari(true, pred)
    got_fg = ari(true, pred, foreground_only=True)
    assert got.shape == (6,) and got_fg.shape == (6,)
    for b in range(6):
        t, p = true[b].flatten().numpy(), pred[b].flatten().numpy()
        assert got[b].item() == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
        fg = t > 0
        assert got_fg[b].item() == pytest.approx(adjusted_rand_score(t[fg], p[fg]), abs=1e-12)


def test_common_ari_hand_cases():
    # perfect segmentation with permuted, non-contiguous labels
    assert ari(TRUE_2x4, TRUE_2x4 * 10 + 3).item() == pytest.approx(1.0)
    # ARI-FG ignores background pixels: foreground right, background split arbitrarily
    pred = torch.tensor([[[9, 4, 8, 8],
                          [4, 9, 6, 6]]])
    assert ari(TRUE_2x4, pred, foreground_only=True).item() == pytest.approx(1.0)
    # all pixels: contingency pairs sum 4, true pairs 8, pred pairs 4, C(8,2) = 28
    # ARI = (4 - 8*4/28) / ((8+4)/2 - 8*4/28) = 10/17
    assert ari(TRUE_2x4, pred).item() == pytest.approx(10 / 17)
    # single-segment images: sklearn gives 1.0 when both partitions are constant ...
    bg = torch.zeros(1, 2, 4, dtype=torch.long)
    assert ari(bg, bg + 4).item() == 1.0
    # ... and 0.0 when only the true one is
    assert ari(bg, TRUE_2x4).item() == pytest.approx(0.0)
    # empty foreground under ARI-FG: NaN, ignored by nanmean
    both = ari(torch.cat([bg, TRUE_2x4]), torch.cat([bg, TRUE_2x4]), foreground_only=True)
    assert math.isnan(both[0].item()) and both[1].item() == pytest.approx(1.0)
    assert nanmean(both) == pytest.approx(1.0)


def test_common_metrics_input_checks():
    with pytest.raises(TypeError):
        ari(TRUE_2x4.float(), PRED_2x4)
    with pytest.raises(ValueError):
        miou(TRUE_2x4, PRED_2x4[:, :1])
    # GENESIS-style [B, 1, H, W] is accepted
    assert miou(TRUE_2x4[:, None], PRED_2x4[:, None]).item() == pytest.approx(22 / 45)


# ----------------------------------------------------------------------------- mIoU

def test_common_miou_hand_computed():
    # best matching: 0<->5 (4/5), 2<->7 (2/3), true 1 unmatched (IoU 0); 3 non-empty pairs
    assert miou(TRUE_2x4, PRED_2x4).item() == pytest.approx((4 / 5 + 2 / 3) / 3)


def test_common_miou_segment_count_mismatch():
    # prediction covering everything: IoUs 4/8, 2/8, 2/8; only one pair can match
    everything = torch.full_like(TRUE_2x4, 3)
    assert miou(TRUE_2x4, everything).item() == pytest.approx(0.5 / 3)
    # more predicted than true segments: the surplus predicted segment counts with IoU 0
    bg = torch.zeros(1, 2, 4, dtype=torch.long)
    halves = torch.tensor([[[1, 1, 1, 1], [2, 2, 2, 2]]])
    assert miou(bg, halves).item() == pytest.approx(0.5 / 2)
    # perfect up to label permutation, and batch independence
    batch_t = torch.cat([TRUE_2x4, bg])
    batch_p = torch.cat([(TRUE_2x4 + 1) % 3, halves])
    assert torch.allclose(miou(batch_t, batch_p), torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_common_miou_bruteforce_random():
    # independent check: try every injective assignment of true to padded pred segments
    import itertools
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        t = torch.randint(0, 4, (1, 5, 5), generator=g)
        p = torch.randint(0, 3, (1, 5, 5), generator=g) * 2
        tl, pl = t.unique().tolist(), p.unique().tolist()
        k = max(len(tl), len(pl))
        iou = np.zeros((k, k))
        for i, a in enumerate(tl):
            for j, c in enumerate(pl):
                inter = ((t == a) & (p == c)).sum().item()
                union = ((t == a) | (p == c)).sum().item()
                iou[i, j] = inter / union
        best = max(sum(iou[i, perm[i]] for i in range(k)) for perm in itertools.permutations(range(k)))
        assert miou(t, p).item() == pytest.approx(best / k)


# ----------------------------------------------------------------------------- MSC

def test_common_msc_hand_computed():
    # fg segments: 1 -> max(1/6, 1/4), 2 -> max(0, 2/3); unweighted mean
    assert msc(TRUE_2x4, PRED_2x4).item() == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert msc(TRUE_2x4, PRED_2x4, foreground_only=False).item() == pytest.approx(
        (4 / 5 + 1 / 4 + 2 / 3) / 3)
    # image without foreground contributes 0
    bg = torch.zeros(1, 2, 4, dtype=torch.long)
    assert msc(bg, PRED_2x4).item() == 0.0
    assert msc(TRUE_2x4, TRUE_2x4 + 7).item() == pytest.approx(1.0)


def test_common_segmentation_metrics_keys():
    out = segmentation_metrics(torch.cat([TRUE_2x4] * 2), torch.cat([PRED_2x4] * 2))
    assert set(out) == {"ari", "ari_fg", "miou", "msc_fg"}
    assert all(v.shape == (2,) for v in out.values())
    assert out["miou"][0].item() == pytest.approx(22 / 45)


def test_common_nanmean():
    assert nanmean(torch.tensor([1.0, float("nan"), 3.0])) == 2.0
    assert nanmean([torch.tensor([1.0]), torch.tensor([float("nan"), 2.0])]) == 1.5
    assert math.isnan(nanmean(torch.tensor([float("nan")])))
    assert math.isnan(nanmean([]))


# ----------------------------------------------------------------------------- MSE, fg IoU

def test_common_mse_per_image_sum():
    target = torch.zeros(2, 3, 2, 2)
    recon = torch.zeros(2, 3, 2, 2)
    recon[0, 0, 0, 0] = 0.5   # 0.25
    recon[0, 2, 1, 1] = 1.0   # 1.0
    recon[1] = 0.1            # 12 * 0.01
    got = mse(target, recon)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([1.25, 0.12])
    with pytest.raises(ValueError):
        mse(target, recon[:, :2])


def test_common_fg_iou_dice_hand_computed():
    true_fg = torch.tensor([[[1, 1, 0, 0],
                             [1, 0, 0, 0]]])
    slot0 = torch.tensor([[1, 1, 1, 0],
                          [0, 0, 0, 0]], dtype=torch.bool)
    masks = torch.stack([slot0, ~slot0])[None]  # [1, 2, 2, 4]
    # slot0: inter 2, union 4 -> IoU 1/2, Dice 4/6; slot1: inter 1, union 7, Dice 2/8
    iou, dice = fg_iou_dice(true_fg, masks)
    assert iou.item() == pytest.approx(0.5) and dice.item() == pytest.approx(2 / 3)
    # soft masks binarise as argmax over slots -> same answer
    soft = torch.where(masks, 0.6, 0.4).float()
    iou2, dice2 = fg_iou_dice(true_fg.bool(), soft)
    assert iou2.item() == pytest.approx(0.5) and dice2.item() == pytest.approx(2 / 3)
    # a slot exactly on the foreground scores 1
    iou3, dice3 = fg_iou_dice(true_fg, torch.stack([true_fg, 1 - true_fg], 1))
    assert iou3.item() == 1.0 and dice3.item() == 1.0


# ----------------------------------------------------------------------------- config / CLI

@dataclass
class _Cfg:
    """Test config docstring."""
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    compile: bool = False
    amp: bool = True
    resume: Optional[str] = None
    img_size: tuple = (64, 64)
    betas: tuple[float, ...] = (0.9, 0.99)
    mode: Literal["train", "eval"] = "train"
    n_slots: list[int] = field(default_factory=lambda: [4])


def test_common_parse_args_types_and_forms():
    cfg = parse_args(_Cfg(), ["--lr=0.5", "--steps", "200", "--name=x", "--compile",
                              "--amp=false", "--resume", "ckpt.pt", "--img_size=128,96",
                              "--betas", "0.5,0.6", "--mode=eval", "--n-slots=7,8"])
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float)
    assert cfg.steps == 200 and isinstance(cfg.steps, int)
    assert cfg.name == "x" and cfg.compile is True and cfg.amp is False
    assert cfg.resume == "ckpt.pt" and cfg.img_size == (128, 96) and cfg.betas == (0.5, 0.6)
    assert cfg.mode == "eval" and cfg.n_slots == [7, 8]
    cfg = parse_args(_Cfg(), ["--resume=none", "--compile", "0", "--amp", "--steps=1e3"])
    assert cfg.resume is None and cfg.compile is False and cfg.amp is True and cfg.steps == 1000
    assert parse_args(_Cfg(), []) == _Cfg()


def test_common_parse_args_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_Cfg(), ["--lrr=0.1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown flag --lrr")
    assert "did you mean --lr?" in err and "known flags:" in err and "--steps" in err


def test_common_parse_args_bad_value(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_Cfg(), ["--lr", "abc"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --lr expects float, got 'abc'\n"
    for bad in (["--steps=1.5"], ["--compile=maybe"], ["--mode=test"], ["--steps"]):
        with pytest.raises(SystemExit) as e:
            parse_args(_Cfg(), bad)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: --")


def test_common_parse_args_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(_Cfg(), ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Test config docstring." in out
    for f in dataclasses.fields(_Cfg):
        assert f"--{f.name}" in out
    assert "0.001" in out


def test_common_apply_overrides_and_to_dict():
    cfg = common.apply_overrides(_Cfg(), {"lr": 0.1, "steps": "5", "compile": "true"})
    assert cfg.lr == 0.1 and cfg.steps == 5 and cfg.compile is True
    with pytest.raises(common.ConfigError, match="did you mean --steps"):
        common.apply_overrides(cfg, {"stepz": 1})
    d = common.config_to_dict(cfg)
    assert d["steps"] == 5 and d["img_size"] == (64, 64)
    json.dumps(d)


# ----------------------------------------------------------------------------- runtime

def test_common_seed_everything_and_device():
    common.seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    common.seed_everything(123)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())
    assert common.get_device("cpu") == torch.device("cpu")
    assert isinstance(common.get_device(), torch.device)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            common.get_device("cuda")
    with pytest.raises(SystemExit):
        common.get_device("gpu0")


def test_common_ddp_setup_without_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = common.ddp_setup()
    assert (info.enabled, info.rank, info.local_rank, info.world_size, info.is_main) == \
        (False, 0, 0, 1, True)
    assert isinstance(info.device, torch.device)
    assert common.all_reduce_mean(2, info) == 2.0
    t = torch.tensor([1.0, 2.0])
    assert common.all_reduce_mean(t, info) is t
    common.ddp_cleanup()  # no-op without a process group


def test_common_ddp_single_process_gloo(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = common.ddp_setup(backend="gloo")
    try:
        assert info.enabled and info.is_main and info.world_size == 1
        assert torch.distributed.is_initialized()
        assert common.all_reduce_mean(3.0, info) == 3.0
        out = common.all_reduce_mean(torch.tensor([1, 3]), info)
        assert out.dtype.is_floating_point and out.tolist() == [1.0, 3.0]
    finally:
        common.ddp_cleanup()
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------- checkpoints

def test_common_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pt"
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7,
             "config": common.config_to_dict(_Cfg()), "rng": common.get_rng_state()}
    common.save_checkpoint(path, state)
    common.save_checkpoint(path, state)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp files left
    loaded = common.load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["config"]["img_size"] == (64, 64)


def test_common_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        common.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt") as e:
        common.load_checkpoint(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    # truncated write of a real checkpoint
    good = tmp_path / "good.pt"
    common.save_checkpoint(good, {"x": torch.zeros(1000)})
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError):
        common.load_checkpoint(trunc)
    # objects the safe loader refuses get a clear message
    np_ckpt = tmp_path / "np.pt"
    common.save_checkpoint(np_ckpt, {"best": np.float64(1.0)})
    with pytest.raises(CheckpointError, match="weights_only=False"):
        common.load_checkpoint(np_ckpt)
    assert common.load_checkpoint(np_ckpt, weights_only=False)["best"] == 1.0


def test_common_rng_state_roundtrip(tmp_path):
    common.seed_everything(0)
    state = common.get_rng_state()
    # through a checkpoint file, as on resume
    common.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    before = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    random.random(), np.random.rand(5), torch.rand(5)  # advance the streams
    common.set_rng_state(common.load_checkpoint(tmp_path / "rng.pt")["rng"])
    after = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    assert before == after


# ----------------------------------------------------------------------------- logging

def test_common_metrics_log(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    log = MetricsLog(path)
    assert log.read() == []
    log.log(1, loss=torch.tensor(0.5), ari=np.float32(0.25), note="x")
    log.log(2, loss=0.25, per_slot=torch.tensor([1.0, 2.0]))
    # a resumed run appends to the same file, even after a crash left a partial line
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    with pytest.warns(UserWarning):
        MetricsLog(path).log(3, loss=float("nan"))
        rows = MetricsLog(path).read()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == 0.5 and rows[0]["ari"] == 0.25 and rows[0]["note"] == "x"
    assert rows[1]["per_slot"] == [1.0, 2.0] and math.isnan(rows[2]["loss"])
    assert all(isinstance(r["time"], float) for r in rows)


def test_common_progress_and_fail(capsys):
    bar = common.progress(10, initial=3, desc="eval")
    bar.update()
    bar.set_postfix(loss=1.0)
    assert bar.n == 4
    bar.close()
    assert "eval" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.fail("bad thing\nhappened", code=3)
    assert e.value.code == 3
    assert capsys.readouterr().err == "error: bad thing happened\n"


# ----------------------------------------------------------------------------- visualisation

def test_common_palette_and_labels_to_rgb():
    p = common.PALETTE
    assert p.shape == (256, 3) and p.dtype == torch.uint8
    assert p[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in p.tolist()}) == 256
    rgb = common.labels_to_rgb(TRUE_2x4)
    assert rgb.shape == (1, 3, 2, 4) and rgb.dtype == torch.float32
    assert rgb[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(rgb[0, :, 0, 2] * 255, p[1].float())


def test_common_to_uint8_image():
    t = torch.zeros(3, 2, 5)
    t[0] = 2.0   # clamped to 255
    t[1] = 0.5
    img = common.to_uint8_image(t)
    assert img.mode == "RGB" and img.size == (5, 2)
    assert img.getpixel((0, 0)) == (255, 128, 0)


def test_common_save_slot_grid_size(tmp_path):
    B, K, H, W = 3, 2, 16, 20
    image = torch.rand(B, 3, H, W)
    seg = torch.randint(0, 3, (B, H, W))
    slots = torch.rand(B, K, 3, H, W)
    path = tmp_path / "viz" / "grid.png"
    common.save_slot_grid(path, image, image * 0.5, seg, true_seg=seg, slot_recons=slots,
                          max_images=2)
    names = ["input", "recon", "pred seg", "true seg", "slot 0", "slot 1"]
    font = ImageFont.load_default()
    label_w = max(math.ceil(font.getlength(n)) for n in names)
    assert font.getbbox("Ag")[3] <= H  # rows are image-height tall
    pad, n_cols, n_rows = 2, 2, len(names)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (pad + label_w + pad + n_cols * (W + pad), pad + n_rows * (H + pad))
        # the first image cell holds the first input image
        x0, y0 = 2 * pad + label_w, pad
        expect = tuple(int(v) for v in (image[0, :, 0, 0].clamp(0, 1) * 255).round())
        assert img.convert("RGB").getpixel((x0, y0)) == expect


# =============================================================================
# boqsa.py
# =============================================================================
TINY = ["--image_size=16", "--num_slots=4", "--slot_dim=16", "--mlp_dim=16", "--hid_dim=8",
        "--enc_strides=1,1", "--dec_strides=2", "--batch_size=4", "--num_workers=0",
        "--eval_items=8", "--log_interval=1", "--warmup_steps=2"]


def tiny_config(**kw):
    cfg = Config(image_size=16, num_slots=4, slot_dim=16, mlp_dim=16, hid_dim=8, enc_strides=(1, 1),
                 dec_strides=(2,), batch_size=4, num_workers=0, drop_path=0.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def run_script(*args, cwd=HERE, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(HERE, "boqsa.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- slot attention and Alg. 1

def test_boqsa_slot_attention_shapes_and_attention_normalisation():
    torch.manual_seed(0)
    sa = SlotAttention(8, 16, 32, iters=3)
    slots, attn = sa(torch.randn(2, 25, 8), torch.randn(2, 5, 16))
    assert slots.shape == (2, 5, 16) and attn.shape == (2, 5, 25)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 25))           # softmax over slots
    with pytest.raises(ValueError, match="grad"):
        sa(torch.randn(1, 4, 8), torch.randn(1, 2, 16), grad="nope")


def test_boqsa_grad_modes_same_forward_and_ste_gradient():
    """Alg. 1: bo/detach/full give identical slots; bo's init gradient is the gradient w.r.t. the
    last iteration's input (STE); detach gives init no gradient; full matches finite differences."""
    torch.manual_seed(0)
    sa = SlotAttention(6, 8, 16, iters=3).double()
    x = torch.randn(2, 10, 6, dtype=torch.double)
    init0 = torch.randn(2, 3, 8, dtype=torch.double)
    outs = {}
    for mode in ("full", "detach", "bo"):
        init = init0.clone().requires_grad_()
        slots, _ = sa(x, init, grad=mode)
        slots.pow(2).sum().backward()
        outs[mode] = (slots.detach(), init.grad)
    torch.testing.assert_close(outs["full"][0], outs["bo"][0])
    torch.testing.assert_close(outs["detach"][0], outs["bo"][0])
    assert outs["detach"][1] is None
    # STE reference: gradient of the last step w.r.t. its own input, evaluated at the inner solution
    with torch.no_grad():
        k, v = sa.to_k(sa.norm_inputs(x)), sa.to_v(sa.norm_inputs(x))
        s = init0
        for _ in range(2):
            s, _ = sa.step(s, k, v)
    s = s.clone().requires_grad_()
    sa.step(s, k, v)[0].pow(2).sum().backward()
    torch.testing.assert_close(outs["bo"][1], s.grad)
    # full backprop: d/d init by central finite differences on one coordinate
    eps, idx = 1e-6, (1, 2, 5)
    f = lambda i: sa(x, i, grad="full")[0].pow(2).sum().item()
    ip, im = init0.clone(), init0.clone()
    ip[idx] += eps
    im[idx] -= eps
    assert abs((f(ip) - f(im)) / (2 * eps) - outs["full"][1][idx].item()) < 1e-6


def test_boqsa_full_mode_gradcheck():
    torch.manual_seed(0)
    sa = SlotAttention(4, 4, 8, iters=2).double()
    x = torch.randn(1, 6, 4, dtype=torch.double, requires_grad=True)
    init = torch.randn(1, 2, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sa(a, b, grad="full")[0], (x, init))


@pytest.mark.parametrize("init,grad,init_gets_grad", [
    ("gaussian", "full", True), ("gaussian", "detach", False), ("gaussian", "bo", True),
    ("query", "full", True), ("query", "detach", False), ("query", "bo", True)])
def test_boqsa_tab7_variants(init, grad, init_gets_grad):
    """SA, I-SA, BO-SA, QSA, I-QSA, BO-QSA: which initialisation parameters get a gradient."""
    torch.manual_seed(0)
    model = BOQSA(tiny_config(init=init, grad=grad)).train()
    model(torch.rand(2, 3, 16, 16), sigma=0.5)["loss"].backward()
    params = [model.queries.weight] if init == "query" else [model.slots_mu, model.slots_log_sigma]
    for p in params:
        assert (p.grad is not None and p.grad.abs().sum() > 0) == init_gets_grad
    assert model.slot_attention.to_q.weight.grad.abs().sum() > 0


def test_boqsa_sigma_schedule_and_lr_factor():
    assert boqsa.sigma_schedule(0, 100) == 1.0
    assert boqsa.sigma_schedule(50, 100) == pytest.approx(0.5)
    assert boqsa.sigma_schedule(25, 100) == pytest.approx(0.5 + 0.5 * math.cos(math.pi / 4))
    assert boqsa.sigma_schedule(100, 100) == 0.0 and boqsa.sigma_schedule(10 ** 6, 100) == 0.0
    assert boqsa.sigma_schedule(0, 0) == 0.0                          # N_sigma = 0 (Cars, Flowers)
    cfg = Config(warmup_steps=5000, decay_steps=50000)
    assert boqsa.lr_factor(0, cfg) == 0.0
    assert boqsa.lr_factor(2500, cfg) == pytest.approx(0.5 * 0.5 ** 0.05)
    assert boqsa.lr_factor(50000, cfg) == pytest.approx(0.5)


def test_boqsa_query_noise_is_multiplicative_and_off_in_eval():
    torch.manual_seed(0)
    model = BOQSA(tiny_config(num_slots=3))
    mu = model.queries.weight
    torch.manual_seed(1)
    noisy = model.train().initial_slots(20000, sigma=0.5)
    std = (noisy - mu).std(0)
    torch.testing.assert_close(std, 0.5 * mu.detach().abs(), atol=0.02, rtol=0.05)
    torch.testing.assert_close(model.eval().initial_slots(2, sigma=0.5), mu.expand(2, -1, -1))


def test_boqsa_model_outputs():
    torch.manual_seed(0)
    model = BOQSA(tiny_config()).eval()
    x = torch.rand(3, 3, 16, 16)
    out = model(x)
    assert out["recon"].shape == (3, 3, 16, 16) and out["masks"].shape == (3, 4, 16, 16)
    assert out["slots"].shape == (3, 4, 16) and out["rgb"].shape == (3, 4, 3, 16, 16)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(3, 16, 16))
    torch.testing.assert_close(out["recon"], (out["masks"].unsqueeze(2) * out["rgb"]).sum(1))
    torch.testing.assert_close(out["loss"], F.mse_loss(out["recon"] * 2 - 1, x * 2 - 1))
    with pytest.raises(ValueError, match="16x16"):
        model(torch.rand(1, 3, 32, 32))


# ---------------------------------------------------------------- official checkpoints

def _official_state_dict(K=4, D=16, C=8, M=16, enc_hw=16, gen=None):
    """Random weights in the official Lightning layout (REFERENCE.md, BO-QSA key names)."""
    g = gen or torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {}
    for i in range(2):
        sd[f"model.encoder.conv.{i}.0.weight"] = r(C, 3 if i == 0 else C, 5, 5)
        sd[f"model.encoder.conv.{i}.0.bias"] = r(C)
    sd["model.slot_attn.pos_emb.grid"] = boqsa.build_grid(enc_hw, enc_hw)
    sd["model.slot_attn.pos_emb.dense.weight"], sd["model.slot_attn.pos_emb.dense.bias"] = r(C, 4), r(C)
    sd["model.slot_attn.mlp.0.weight"], sd["model.slot_attn.mlp.0.bias"] = 1 + r(C), r(C)
    sd["model.slot_attn.mlp.1.weight"], sd["model.slot_attn.mlp.1.bias"] = r(M, C), r(M)
    sd["model.slot_attn.mlp.3.weight"], sd["model.slot_attn.mlp.3.bias"] = r(D, M), r(D)
    p = "model.slot_attn.slot_attention."
    for n in ("norm_feature", "norm_mlp", "norm_slots"):
        sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(D), r(D)
    for n in ("project_k", "project_v", "project_q"):
        sd[p + n + ".weight"] = r(D, D)
    sd[p + "gru.weight_ih"], sd[p + "gru.weight_hh"] = r(3 * D, D), r(3 * D, D)
    sd[p + "gru.bias_ih"], sd[p + "gru.bias_hh"] = r(3 * D), r(3 * D)
    sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(M, D), r(M)
    sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(D, M), r(D)
    sd["model.slot_attn.slots_init.weight"] = r(K, D)
    sd["model.decoder.pos_emb.grid"] = boqsa.build_grid(8, 8)
    sd["model.decoder.pos_emb.dense.weight"], sd["model.decoder.pos_emb.dense.bias"] = r(D, 4), r(D)
    chans = [D, C, C]
    for i in range(2):
        sd[f"model.decoder.conv.{i}.0.conv.0.weight"] = r(chans[i], chans[i + 1], 5, 5)   # ConvT: [in,out,k,k]
        sd[f"model.decoder.conv.{i}.0.conv.0.bias"] = r(chans[i + 1])
    sd["model.decoder.conv.1.1.weight"], sd["model.decoder.conv.1.1.bias"] = r(C, 4, 3, 3), r(4)
    return {"state_dict": sd, "hyper_parameters": {"lr": 4e-4}}


def _official_forward(sd, x, iters=3, eps=1.0):
    """Independent functional re-statement of the official forward (REFERENCE.md), x in [-1,1]."""
    sd = {k[len("model."):]: v for k, v in sd.items()}
    h = x
    for i in range(2):
        h = F.relu(F.conv2d(h, sd[f"encoder.conv.{i}.0.weight"], sd[f"encoder.conv.{i}.0.bias"], padding=2))
    h = h.permute(0, 2, 3, 1) + F.linear(sd["slot_attn.pos_emb.grid"], sd["slot_attn.pos_emb.dense.weight"],
                                         sd["slot_attn.pos_emb.dense.bias"])
    h = h.flatten(1, 2)
    h = F.layer_norm(h, h.shape[-1:], sd["slot_attn.mlp.0.weight"], sd["slot_attn.mlp.0.bias"])
    h = F.linear(F.relu(F.linear(h, sd["slot_attn.mlp.1.weight"], sd["slot_attn.mlp.1.bias"])),
                 sd["slot_attn.mlp.3.weight"], sd["slot_attn.mlp.3.bias"])
    p = "slot_attn.slot_attention."
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"])
    inp = ln(h, "norm_feature")
    k, v = inp @ sd[p + "project_k.weight"].T, inp @ sd[p + "project_v.weight"].T
    B, D = x.shape[0], k.shape[-1]
    slots = sd["slot_attn.slots_init.weight"].expand(B, -1, -1)
    for _ in range(iters):
        prev = slots
        q = ln(slots, "norm_slots") @ sd[p + "project_q.weight"].T
        attn = torch.softmax(k @ q.transpose(1, 2) * D ** -0.5, dim=-1)          # [B,N,K], over slots
        attn = attn / (attn.sum(dim=1, keepdim=True) + eps)
        upd = attn.transpose(1, 2) @ v
        gi = upd @ sd[p + "gru.weight_ih"].T + sd[p + "gru.bias_ih"]
        gh = prev @ sd[p + "gru.weight_hh"].T + sd[p + "gru.bias_hh"]
        r_, z_, n_ = gi.chunk(3, -1)
        rh, zh, nh = gh.chunk(3, -1)
        r, z = torch.sigmoid(r_ + rh), torch.sigmoid(z_ + zh)
        slots = (1 - z) * torch.tanh(n_ + r * nh) + z * prev
        m = F.relu(F.linear(ln(slots, "norm_mlp"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))
        slots = slots + F.linear(m, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    K = slots.shape[1]
    z = slots.reshape(B * K, 1, 1, D).expand(-1, 8, 8, -1)
    z = z + F.linear(sd["decoder.pos_emb.grid"], sd["decoder.pos_emb.dense.weight"], sd["decoder.pos_emb.dense.bias"])
    z = z.permute(0, 3, 1, 2)
    z = F.relu(F.conv_transpose2d(z, sd["decoder.conv.0.0.conv.0.weight"], sd["decoder.conv.0.0.conv.0.bias"],
                                  stride=2, padding=2, output_padding=1))
    z = F.relu(F.conv_transpose2d(z, sd["decoder.conv.1.0.conv.0.weight"], sd["decoder.conv.1.0.conv.0.bias"],
                                  padding=2))
    z = F.conv_transpose2d(z, sd["decoder.conv.1.1.weight"], sd["decoder.conv.1.1.bias"], padding=1)
    z = z.reshape(B, K, 4, 16, 16)
    masks = z[:, :, 3:].softmax(1)
    return (masks * z[:, :, :3]).sum(1), masks.squeeze(2)


def test_boqsa_official_checkpoint_conversion_and_equivalence(tmp_path):
    """Keys of the official layout map onto BOQSA; same weights -> same recon and masks."""
    ckpt = _official_state_dict()
    # small official-style model: 2 encoder convs and decoder (stride 2, then stride 1, final)
    cfg = tiny_config(enc_strides=(1, 1), dec_strides=(2,))
    ours = convert_official_state_dict(ckpt)
    model = BOQSA(cfg)
    model.load_state_dict(ours, strict=True)                            # every key mapped, none left
    assert "decoder.out.weight" in ours and "encoder.convs.1.bias" in ours
    # our decoder with dec_strides=(2,) has layers 0 (stride 2) and 1 (stride 1): official conv.1.0 and conv.1.1
    # float64 so the comparison is exact up to rounding (random weights amplify float32 rounding)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = model.double().eval()(x)
    ref_recon, ref_masks = _official_forward({k: v.double() for k, v in ckpt["state_dict"].items()}, x * 2 - 1)
    torch.testing.assert_close(out["recon"] * 2 - 1, ref_recon, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["masks"], ref_masks, atol=1e-10, rtol=1e-10)
    with pytest.raises(KeyError, match="no counterpart"):
        convert_official_state_dict({"model.something.else": torch.zeros(1)})
    # --init_from path through the CLI loader
    path = tmp_path / "official.ckpt"
    torch.save(ckpt, path)
    model2 = BOQSA(cfg)
    boqsa.load_official(model2, str(path))
    torch.testing.assert_close(model2.double().eval()(x)["recon"], out["recon"])


# ---------------------------------------------------------------- config and CLI

def test_boqsa_presets_follow_the_paper():
    cfg = boqsa.build_config(["--dataset=shapestacks"])
    assert (cfg.num_slots, cfg.image_size, cfg.enc_strides, cfg.dec_strides, cfg.batch_size) == \
        (8, 128, (2, 1, 1, 1), (2, 2, 2, 2), 128)                      # Tab. 9, 10, 11, 13
    cfg = boqsa.build_config(["--dataset=objectsroom", "--num_slots=6"])
    assert (cfg.num_slots, cfg.image_size, cfg.enc_strides, cfg.dec_strides) == (6, 64, (1, 1, 1, 1), (2, 2, 2, 1))
    assert boqsa.build_config(["--dataset=clevrtex"]).num_slots == 11
    for name in ("shapestacks", "objectsroom", "clevrtex"):                # decoder output = image size
        BOQSA(boqsa.build_config([f"--dataset={name}"]))


def test_boqsa_cli_errors(tmp_path):
    r = run_script("--no_such_flag=1")
    assert r.returncode == 2 and "unknown flag --no_such_flag" in r.stderr
    missing = tmp_path / "nowhere"
    r = run_script("--dataset=shapestacks", f"--data_dir={missing}", f"--out_dir={tmp_path / 'o'}")
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in r.stderr
    r = run_script("--eval_only", f"--out_dir={tmp_path / 'none'}")
    assert r.returncode != 0 and "no checkpoint" in r.stderr


# ---------------------------------------------------------------- training, resume, eval, predict

def test_boqsa_train_resume_eval_predict(tmp_path):
    out = tmp_path / "run"
    r = run_script(*TINY, "--max_steps=3", "--eval_interval=3", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt.pt").exists() and (out / "samples_0000003.png").exists()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    r = run_script(*TINY, "--max_steps=5", "--eval_interval=5", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout + r.stderr
    logs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [l["step"] for l in logs if "loss" in l]
    assert steps == [1, 2, 3, 4, 5]                                  # resumed at 4, nothing repeated
    assert any("test_ari_fg" in l for l in logs)
    # evaluation of the checkpoint on the real CLEVR scene (model settings come from the checkpoint)
    r = run_script("--eval_only", "--dataset=clevr", f"--data_dir={REAL}/clevr_with_masks", f"--out_dir={out}",
                   "--num_workers=0")
    assert r.returncode == 0, r.stderr
    assert "ARI-FG" in r.stdout and "mIoU" in r.stdout and "MSC-FG" in r.stdout
    # the ShapeStacks example has no instance masks: MSE only, and it says so
    r = run_script("--eval_only", "--dataset=shapestacks", f"--data_dir={REAL}/shapestacks_example",
                   f"--out_dir={out}", "--num_workers=0")
    assert r.returncode == 0, r.stderr
    assert "no instance masks" in r.stdout and "MSE" in r.stdout and "ARI-FG" not in r.stdout
    # --predict on a folder of the user's own images
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(imgs / "a.png")
    Image.new("RGB", (30, 30), (10, 200, 10)).save(imgs / "b.jpg")
    r = run_script(f"--predict={imgs}", f"--out_dir={out}", "--num_workers=0")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "predict")) == ["a.png", "b.png"]


def test_boqsa_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, stop, 2 more (same data order, RNG and optimiser state)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--eval_interval=100", "--drop_path=0.2"]
    assert run_script(*common, "--max_steps=4", f"--out_dir={a}").returncode == 0
    assert run_script(*common, "--max_steps=2", f"--out_dir={b}").returncode == 0
    assert run_script(*common, "--max_steps=4", f"--out_dir={b}").returncode == 0
    sa = torch.load(a / "ckpt.pt", weights_only=True)["model"]
    sb = torch.load(b / "ckpt.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_boqsa_ddp_two_processes(tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo) trains and writes one checkpoint."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "boqsa.py"), *TINY, "--max_steps=3", "--eval_interval=3",
                        f"--out_dir={out}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert os.listdir(out).count("ckpt.pt") == 1

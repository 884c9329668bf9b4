"""Benchmarks: training-step time and peak memory, side by side in one run.

    python bench.py                          # all settings (BO-QSA, min-cut OCL, AST-Seg)
    python bench.py --group=boqsa            # BO-QSA at the paper's ShapeStacks and ObjectsRoom settings
    python bench.py --batch_size=32 --steps=5 --device=cuda

Each setting runs in its own subprocess so that its peak memory is its own: on CUDA the
peak of torch.cuda.max_memory_allocated plus the bytes CuPy's memory pool holds (the sparse solver's
factors and solves; the pool keeps what it allocated, so that is its high-water mark), on CPU the peak resident set size of the process
(ru_maxrss, model + activations + the Python/torch runtime). A step is forward + backward +
optimiser step on random images, after `warmup` untimed steps; the table gives the median.

    python bench.py --suite=data                               # data-loader speed, one worker process
    python bench.py --suite=data --data_ref=/tmp/old_data.py   # ... side by side with another data.py

suite=data writes small files in each on-disk format that data.py reads (GZIP TFRecord CLEVR with masks and
ObjectsRoom, ClevrTex PNGs, ShapeStacks PNG + .map, MOVi-A TFDS shards, CUB and Oxford-102 foreground sets;
render-like content: shaded shapes on a gradient with mild noise, so PNG/GZIP sizes are plausible) into a
temporary folder, and reads them with each Dataset's __getitem__ in this process, as one DataLoader worker does
(one torch thread), at the scripts' paper resolutions. It prints items/s per worker (best of --data_repeats
passes in order; GZIP TFRecords also in shuffled order, which resumes from zlib snapshots) and where one pass
spends its time (cProfile, by stage). With --data_ref=PATH (e.g. `git show main:data.py > /tmp/old_data.py`)
the other data.py is imported under another name and timed in the same passes, alternating, its items are
checked to be identical, and the table gives both speeds and their ratio. The format writers here (TFRecord,
tf.train.Example, the folder layouts) are also the ones test_all.py writes its test files with.
"""
import cProfile
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import pstats
import random
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data

from common import get_device, native_bf16, parse_args


@dataclass
class BenchConfig:
    """bench.py flags."""
    batch_size: int = 8          # per step (the paper trains with 128)
    steps: int = 3               # timed steps
    warmup: int = 1              # untimed steps first
    device: str = "auto"         # auto | cpu | cuda
    threads: int = 0             # torch CPU threads (0 = torch's default)
    only: str = ""               # run a single setting by name (used for the subprocesses)
    group: str = ""              # only the settings of one script: boqsa | mincut | ast (empty = all)
    emulated_bf16: bool = False  # train: also run the bfloat16 settings on a device without native bf16 (slow)
    suite: str = "train"         # train: model steps (SETTINGS) | qp: mincut_ocl's STCutQP, dct vs sparse | data: loaders
    qp_rhs: int = 768            # qp: right-hand sides of the main comparison (64 images x 12 cuts)
    qp_side: int = 64            # qp: grid side of the main comparison (the paper's 64x64)
    qp_sweep: str = "16,32,48,64,96,128"   # qp: grid sides of the scaling sweep
    qp_sweep_rhs: int = 48       # qp: right-hand sides per sweep point
    qp_sparse_max: int = 64      # qp: largest side run with the sparse solver (memory grows as P^2)
    data_items: int = 32         # data: items written per format (videos for MOVi-A: 8 of 24 frames)
    data_repeats: int = 3        # data: timed passes over them per loader (the table gives the best)
    data_ref: str = ""           # data: another data.py (a file) timed side by side, e.g. the main branch's
    data_only: str = ""          # data: only the rows whose name contains this (e.g. clevr)
    data_dir: str = ""           # data: write the files here and keep them (empty = a temporary folder)


def adam_step(model, opt, x, grad_clip=0.0, bf16=False, **forward_kwargs):
    """One training step: loss = model(x)["loss"] (under bf16 autocast if `bf16`), backward, optional
    gradient clipping, optimiser step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, **forward_kwargs)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


# The variants of each script's default setting (its bare command: built-in data, its own batch size):
# float32, bf16 autocast, and float32 + --compile (the first, untimed step compiles).
VARIANTS = ("float32", "bfloat16", "float32 compile")


def variant_flags(name):
    """Config flags of a variant name: its dtype (--compile and channels_last are applied by `variant`)."""
    return [f"--dtype={name.split()[0]}", *(["--compile"] if "compile" in name.split() else [])]


def variant(model, cfg, channels_last=False):
    """The model as the variant trains it: torch.compile'd with --compile; channels_last memory format when
    asked (inputs then follow it in `images`)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def images(bc, cfg, device, own_batch, channels_last=False):
    """A random batch [B, 3, S, S] in [0, 1): B = the config's own batch size for a default setting, else
    --batch_size (the papers' batches of 64-128 do not fit a CPU step)."""
    x = torch.rand(cfg.batch_size if own_batch else bc.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def boqsa_settings():
    """BO-QSA at the paper's settings (Tab. 9-13), float32 and --dtype=bfloat16: list of (name, make_step).

    make_step(bc, device) builds model, optimiser and a random batch and returns (step, info): `step()` runs one
    forward + backward + optimiser step; `info` gives the table's image size and slot count."""
    import boqsa

    def maker(cfg, own_batch=False):
        def make_step(bc, device):
            model = variant(boqsa.BOQSA(cfg).to(device), cfg)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            x = images(bc, cfg, device, own_batch)
            step = functools.partial(adam_step, model, opt, x, cfg.grad_clip, cfg.dtype == "bfloat16", sigma=0.5)
            return step, dict(image=cfg.image_size, slots=cfg.num_slots, batch=len(x))
        return make_step

    return ([(f"boqsa default {v}", maker(boqsa.build_config(variant_flags(v)), own_batch=True)) for v in VARIANTS]
            + [(f"boqsa {ds} {dt}", maker(boqsa.build_config([f"--dataset={ds}", f"--dtype={dt}"])))
               for ds in ("shapestacks", "objectsroom") for dt in ("float32", "bfloat16")])


def mincut_settings():
    """Min-cut OCL at the paper's ClevrTex setting (Sec. 6.1, App. D: 128 px, ResNet 100 maps, 64x64 QP grid,
    12 slots), with the dct QP solver and with the paper's sparse solver (factor built in the warmup step)."""
    import mincut_ocl

    def maker(cfg, own_batch=False, channels_last=False):
        def make_step(bc, device):
            model = variant(mincut_ocl.MinCutOCL(cfg).to(device), cfg, channels_last)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            x = images(bc, cfg, device, own_batch, channels_last)
            step = functools.partial(adam_step, model, opt, x, bf16=cfg.dtype == "bfloat16")   # the QP: float32
            return step, dict(image=cfg.image_size, slots=cfg.num_slots, batch=len(x))
        return make_step

    return ([(f"mincut default {v}", maker(mincut_ocl.build_config(variant_flags(v)), True, "channels_last" in v))
             for v in (*VARIANTS, "float32 channels_last", "bfloat16 channels_last")]
            + [(f"mincut clevrtex {solver}", maker(mincut_ocl.build_config(["--dataset=clevrtex",
                                                                             f"--qp_solver={solver}"])))
               for solver in ("dct", "sparse")])


def ast_settings():
    """AST-Seg at the paper's ClevrTex setting (Sec. 5.1, Tab. 6: Segformer mit-b3, 128 px, K = 10, anisotropic):
    a joint-phase step (phase 3 of the curriculum: foreground and AE-NE background trained together)."""
    import ast_seg

    def maker(cfg, own_batch=False):
        def make_step(bc, device):
            model = ast_seg.ASTSeg(cfg).to(device)
            opt = ast_seg.make_optimizer(ast_seg.set_trainable(model, "joint"), cfg, "joint")
            model = variant(model, cfg)
            x = images(bc, cfg, device, own_batch)
            step = functools.partial(adam_step, model, opt, x, bf16=cfg.dtype == "bfloat16")
            return step, dict(image=cfg.image_size, slots=cfg.num_slots, batch=len(x))
        return make_step

    return ([(f"ast default {v}", maker(ast_seg.build_config(variant_flags(v)), own_batch=True)) for v in VARIANTS]
            + [("ast clevrtex b3", maker(ast_seg.build_config(["--dataset=clevrtex"])))])


# One entry per model script; each function returns [(setting name, make_step)]. Add new scripts here.
SETTINGS = {"boqsa": boqsa_settings, "mincut": mincut_settings, "ast": ast_settings}


def cuda_peak_mib():
    """Peak CUDA memory of this process in MiB: torch's caching allocator's peak plus what CuPy's default
    memory pool holds (mincut_ocl's sparse solver allocates there; the pool returns nothing to the device
    unless asked, so its size is its high-water mark). CuPy counts only if it was imported."""
    peak = torch.cuda.max_memory_allocated()
    if "cupy" in sys.modules:
        peak += sys.modules["cupy"].get_default_memory_pool().total_bytes()
    return peak / 2 ** 20


# --- suite=qp: forward + backward of mincut_ocl.STCutQP, dct (full, official edges) vs sparse ---------

def run_qp(solver, side, rhs, bc, edges="full"):
    """Time one forward + backward of STCutQP(side, side, solver, edges=edges) on `rhs` float32 right-hand
    sides (in this process), with peak memory above the process baseline and the max abs error against
    float64 (dct, same edges). Official dct up to qp_sparse_max: also the float64 dct vs sparse difference."""
    import mincut_ocl
    device = get_device(bc.device)
    if bc.threads:
        torch.set_num_threads(bc.threads)
    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    w = (torch.rand(rhs, 6, side, side, device=device) * 2).requires_grad_(True)    # ReLU-like weights
    coef = [torch.randn(rhs, *s, device=device) for s in [(side, side), (), (), (side, side), (side, side),
                                                          (4, side, side)]]
    fields = ("p", "p_s", "p_t", "d_s", "d_t", "d_grid")
    qp = mincut_ocl.STCutQP(side, side, solver=solver, edges=edges)
    setup = 0.0
    if solver == "sparse":                       # factor AA^T once (cached), not part of the step
        t = time.perf_counter()
        mincut_ocl.sparse_factor(side, side, edges)
        setup = time.perf_counter() - t
    if solver == "dct" and edges == "official":  # the Woodbury tables (cached), not part of the step
        t = time.perf_counter()
        mincut_ocl._official_woodbury(side, side, torch.float32, device)
        setup = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = qp(w)
        sum((getattr(out, f) * c).sum() for f, c in zip(fields, coef)).backward()
        return out

    times = []
    for i in range(bc.warmup + bc.steps if solver == "dct" else 1):   # sparse: one run, no warmup (slow)
        w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times = times[bc.warmup:] if solver == "dct" else times
    if device.type == "cuda":
        peak = cuda_peak_mib()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    # accuracy: float64 dct (checked against a dense KKT solve in test_all.py) as the reference
    w64 = w.detach().double().requires_grad_(True)
    ref = mincut_ocl.STCutQP(side, side, solver="dct", edges=edges)(w64)
    sum((getattr(ref, f) * c.double()).sum() for f, c in zip(fields, coef)).backward()
    err = max((getattr(out, f).detach().double() - getattr(ref, f).detach()).abs().max().item() for f in fields)
    gerr = (w.grad.double() - w64.grad).abs().max().item()
    sparse_err = None                            # official float64 dct vs sparse on 8 RHS (the Woodbury path)
    if solver == "dct" and edges == "official" and side <= bc.qp_sparse_max:
        with torch.no_grad():
            sp = mincut_ocl.STCutQP(side, side, solver="sparse", edges=edges)(w64[:8].detach().cpu())
        sparse_err = max((getattr(ref, f)[:8].detach().cpu() - getattr(sp, f)).abs().max().item() for f in fields)
    return dict(solver=solver, side=side, rhs=rhs, device=str(device), step_s=statistics.median(times),
                setup_s=setup, peak_mib=peak, err=err, grad_err=gerr, edges=edges, sparse_err=sparse_err)


def qp_main(bc):
    """suite=qp: every (solver, side, rhs) in its own subprocess; prints two markdown tables."""
    def measure(solver, side, rhs, edges="full"):
        args = [sys.executable, os.path.abspath(__file__), f"--only=qp {solver} {side} {rhs} {edges}",
                f"--steps={bc.steps}", f"--warmup={bc.warmup}", f"--device={bc.device}", f"--threads={bc.threads}",
                f"--qp_sparse_max={bc.qp_sparse_max}"]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"qp {solver} {side} {rhs} {edges}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        print(f"done: qp {solver} {edges} {side}x{side}, {rhs} rhs", file=sys.stderr)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def row(side, rhs, d, s, o):
        """d, s, o: dct, sparse (full edge set) and official-edge-set dct results (None: not run)."""
        P = side * side
        f = lambda v, fmt: "-" if v is None else format(v, fmt)     # noqa: E731
        ratio = f"{s['step_s'] / d['step_s']:.0f}x" if d and s else "-"
        o_ratio = f"{o['step_s'] / d['step_s']:.2f}x" if d and o else "-"
        return (f"| {side}x{side} | {P} | {rhs} | {f(d and d['step_s'], '.3f')} | {f(s and s['step_s'], '.2f')} | "
                f"{ratio} | {f(o and o['step_s'], '.3f')} | {o_ratio} | "
                f"{f(d and 1e9 * d['step_s'] / (rhs * P * math.log2(P)), '.2f')} | "
                f"{f(d and d['peak_mib'], '.0f')} | {f(s and s['peak_mib'], '.0f')} | {f(s and s['setup_s'], '.1f')} | "
                f"{f(d and d['err'], '.1e')} | {f(s and s['err'], '.1e')} | {f(d and d['grad_err'], '.1e')} | "
                f"{f(s and s['grad_err'], '.1e')} | {f(o and o['err'], '.1e')} | {f(o and o['sparse_err'], '.1e')} |")

    header = ("| grid | P | RHS | dct fwd+bwd (s) | sparse fwd+bwd (s) | sparse / dct | dct official fwd+bwd (s) | "
              "official / full dct | dct ns per RHS*P*log2(P) | "
              "dct peak (MiB) | sparse peak (MiB) | sparse factor (s) | dct f32 max err | sparse f32 max err | "
              "dct f32 grad err | sparse f32 grad err | dct official f32 max err | official dct - sparse (f64) |\n|"
              + "---|" * 18)
    main_row = row(bc.qp_side, bc.qp_rhs, measure("dct", bc.qp_side, bc.qp_rhs), measure("sparse", bc.qp_side, bc.qp_rhs),
                   measure("dct", bc.qp_side, bc.qp_rhs, "official"))
    sweep = []
    for side in [int(v) for v in bc.qp_sweep.split(",")]:
        d = measure("dct", side, bc.qp_sweep_rhs)
        s = measure("sparse", side, bc.qp_sweep_rhs) if side <= bc.qp_sparse_max else None
        o = measure("dct", side, bc.qp_sweep_rhs, "official")
        sweep.append(row(side, bc.qp_sweep_rhs, d, s, o))
    print(f"\ntorch {torch.__version__}, {bc.threads or torch.get_num_threads()} threads, float32 input, median of {bc.steps} "
          f"(sparse: 1 run each, no warmup); peak = resident memory above the process baseline (CPU)\n")
    print(header)
    print(main_row)
    print(f"\nScaling sweep ({bc.qp_sweep_rhs} RHS; sparse up to {bc.qp_sparse_max}x{bc.qp_sparse_max}):\n")
    print(header)
    print("\n".join(sweep))


# --- on-disk format writers: the files of suite=data, and of test_all.py's data tests ------------------

def pb_varint(v):
    """Protobuf varint of an int (negatives as 64-bit two's complement, 10 bytes) -> bytes."""
    v &= (1 << 64) - 1
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def pb_ld(num, payload):
    """Length-delimited protobuf field `num` (wire type 2) holding `payload` (bytes) -> bytes."""
    return pb_varint(num << 3 | 2) + pb_varint(len(payload)) + payload


def pb_example(feats):
    """{name: (kind 1 bytes_list / 2 float_list / 3 int64_list, list body bytes)} -> serialized
    tf.train.Example (Example.features = 1, Features.feature = 1 map entries {key = 1, value = 2})."""
    body = b"".join(pb_ld(1, pb_ld(1, k.encode()) + pb_ld(2, pb_ld(kind, lst))) for k, (kind, lst) in feats.items())
    return pb_ld(1, body)


def pb_feature(value):
    """One tf.train.Feature value -> (kind: 1 bytes_list, 2 float_list, 3 int64_list; list body).
    bytes / str / lists of them -> bytes_list; ints -> packed int64_list; floats -> packed
    float_list; a np.uint8 array -> bytes_list of one-byte strings (the DeepMind image/mask layout).
    Raises TypeError for anything else."""
    if isinstance(value, (bytes, bytearray, str)):
        value = [value]
    elif isinstance(value, (bool, int, float, np.generic)):
        value = np.asarray([value])
    if isinstance(value, np.ndarray):
        v = value.ravel()
        if v.dtype == np.uint8:                     # each value as a one-byte string: 0a 01 XX
            body = np.empty((v.size, 3), np.uint8)
            body[:, 0], body[:, 1], body[:, 2] = 0x0A, 0x01, v
            return 1, body.tobytes()
        if v.dtype.kind == "f":
            raw = v.astype("<f4").tobytes()
            return 2, pb_ld(1, raw) if raw else b""
        if v.dtype.kind in "iub":
            raw = b"".join(pb_varint(int(x)) for x in v)
            return 3, pb_ld(1, raw) if raw else b""
        value = list(v)
    if isinstance(value, (list, tuple)):
        if all(isinstance(x, (bytes, bytearray, str)) for x in value):
            return 1, b"".join(pb_ld(1, x.encode() if isinstance(x, str) else bytes(x)) for x in value)
        if all(isinstance(x, (bool, int, np.integer)) for x in value):
            return pb_feature(np.asarray(value, dtype=np.int64))
        if all(isinstance(x, (bool, int, float, np.integer, np.floating)) for x in value):
            return pb_feature(np.asarray(value, dtype=np.float32))
    raise TypeError(f"cannot encode a feature value of type {type(value).__name__}")


def make_example(features):
    """{name: value} -> serialized tf.train.Example (bytes); value kinds as in pb_feature."""
    return pb_example({k: pb_feature(v) for k, v in features.items()})


def write_tfrecord(path, records, compression=None):
    """Write bytes records as a TFRecord file, framed as TensorFlow's writer does: uint64 length,
    masked CRC-32C of the length, data, masked CRC-32C of the data (little-endian). compression:
    None (plain), "GZIP" or "ZLIB" (a zlib stream with header), level 6. Returns the number written."""
    def masked(b):   # TensorFlow's crc32c::Mask, written out here (the reader has its own)
        c = data.crc32c(b)
        return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    frames = []
    for rec in records:
        rec = bytes(rec)
        head = struct.pack("<Q", len(rec))
        frames += [head, masked(head), rec, masked(rec)]
    raw = b"".join(frames)
    out = {None: lambda b: b, "GZIP": lambda b: gzip.compress(b, 6), "ZLIB": lambda b: zlib.compress(b, 6)}[compression](raw)
    with open(path, "wb") as f:
        f.write(out)
    return len(frames) // 4


def save_png(path, arr, mode=None):
    """Save a uint8 array with PIL (format by the extension: .jpg is JPEG at PIL's default quality 75),
    creating the folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def png_bytes(arr, mode=None):
    """The PNG file (bytes) of a uint8 array [H,W] or [H,W,C], as PIL writes it."""
    b = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(b, format="PNG")
    return b.getvalue()


def deepmind_example(image, masks, **extra):
    """A DeepMind multi-object record (ObjectsRoom, CLEVR with masks): image uint8 [H,W,3], masks uint8
    [K,H,W] (0/255), each value a one-byte string; extra features (e.g. visibility) as given -> bytes."""
    return make_example({"image": image, "mask": masks[..., None], **extra})


def movi_example(rgb, seg, **extra):
    """A MOVi TFDS record: rgb uint8 [T,H,W,3] and seg uint8 [T,H,W] as lists of PNG frames ('video',
    'segmentations'), plus metadata/num_frames and extra features -> bytes."""
    return make_example({"video": [png_bytes(f) for f in rgb], "segmentations": [png_bytes(f, "L") for f in seg],
                         "metadata/num_frames": len(rgb), **extra})


def save_kubric_video(video_dir, rgb, seg):
    """A Kubric PNG sequence (MOVi): rgb uint8 [T,H,W,3] -> video_dir/rgba_NNNNN.png (RGBA, alpha 255) and
    seg uint8 [T,H,W] -> segmentation_NNNNN.png (palette PNG of ids: black, red, green, blue, then black)."""
    for t in range(len(rgb)):
        rgba = np.concatenate([rgb[t], np.full(rgb.shape[1:3] + (1,), 255, np.uint8)], -1)
        save_png(os.path.join(video_dir, f"rgba_{t:05d}.png"), rgba, "RGBA")
        p = Image.fromarray(seg[t], "P")
        p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        p.save(os.path.join(video_dir, f"segmentation_{t:05d}.png"))


def save_shapestacks_view(scenario_dir, cam, image, label=None):
    """ShapeStacks camera `cam` of a scenario folder: rgb-...-cam_N-mono-0.png (uint8 [H,W,3]) and, if
    label (int [H,W], 0..8) is given, the iseg .map as matplotlib imsave(vmin=0, vmax=8, cmap='gray')
    writes it: an RGBA PNG with R = G = B = 32 * label (clipped to 255)."""
    save_png(os.path.join(scenario_dir, f"rgb-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.png"), image)
    if label is not None:
        v = (32 * label.astype(int)).clip(0, 255).astype(np.uint8)
        rgba = np.stack([v, v, v, np.full_like(v, 255)], -1)
        Image.fromarray(rgba, "RGBA").save(os.path.join(scenario_dir, f"iseg-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.map"),
                                           format="PNG")


def write_shapestacks_splits(root, splits):
    """{split file name (train / eval / test): [scenario names]} -> root/splits/default/<name>.txt."""
    sp = os.path.join(root, "splits", "default")
    os.makedirs(sp, exist_ok=True)
    for name, scs in splits.items():
        with open(os.path.join(sp, name + ".txt"), "w") as f:
            f.write("".join(s + "\n" for s in scs))


def save_clevrtex_scene(root, variant, i, image, ids, palette):
    """ClevrTex scene i: root/clevrtex_<variant>/<i//1000>/CLEVRTEX_<variant>_NNNNNN.png (uint8 [H,W,4] RGBA as
    released, or [H,W,3] RGB) and ..._flat.png, a palette PNG of object ids (uint8 [H,W]) with `palette` (768 ints)."""
    d = os.path.join(root, f"clevrtex_{variant}", str(i // 1000))
    save_png(os.path.join(d, f"CLEVRTEX_{variant}_{i:06d}.png"), image)
    p = Image.fromarray(ids, "P")
    p.putpalette(list(palette))
    p.save(os.path.join(d, f"CLEVRTEX_{variant}_{i:06d}_flat.png"))


def write_cub(root, scenes):
    """CUB-200-2011 layout: scenes = [(name like '001.Bird/b_1.jpg', image uint8 [H,W,3], soft
    segmentation uint8 [H,W], bounding box (x, y, w, h) floats, split 0/1/2 = train/val/test)] ->
    images/<name> (JPEG), segmentations/<name>.png, images.txt, bounding_boxes.txt, train_val_test_split.txt."""
    lines, boxes, split = [], [], []
    for i, (name, img, seg, box, s) in enumerate(scenes, 1):
        save_png(os.path.join(root, "images", name), img)
        save_png(os.path.join(root, "segmentations", name[:-4] + ".png"), seg)
        lines.append(f"{i} {name}\n")
        boxes.append(f"{i} " + " ".join(f"{float(v):.1f}" for v in box) + "\n")
        split.append(f"{i} {s}\n")
    for fn, rows in (("images.txt", lines), ("bounding_boxes.txt", boxes), ("train_val_test_split.txt", split)):
        with open(os.path.join(root, fn), "w") as f:
            f.write("".join(rows))


# --- suite=data: items/s per DataLoader worker for each on-disk format ------------------------------

def render_scene(rng, h, w, k, noise=3.0):
    """Render-like test content: a vertical two-colour gradient, k flat-coloured shaded discs and boxes (later
    ones on top), Gaussian pixel noise of std `noise` (a path tracer's). -> (uint8 image [H,W,3], int64 owner
    [H,W]: 0 background, 1..k the shape drawn last at the pixel)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    img = top + (bottom - top) * (yy / h)[..., None]
    owner = np.zeros((h, w), np.int64)
    for c in range(1, k + 1):
        r = rng.uniform(0.06, 0.15) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else \
            (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        owner[m] = c
        img[m] = rng.uniform(30, 240, 3) * (1 - 0.4 * (yy[m] - cy + r) / (2 * r))[:, None]   # lit from above
    img += rng.normal(0, noise, img.shape)
    return img.clip(0, 255).astype(np.uint8), owner


def write_data_bench_files(root, n, seed=0):
    """Write every format of suite=data under root, n items each (n // 4 MOVi-A videos).
    Returns [(row name, data.py dataset name, build options, native size text, bytes on disk per item)]."""
    rng = np.random.default_rng(seed)
    rows = []
    j = os.path.join
    os.makedirs(root, exist_ok=True)

    def size(paths):
        return sum(os.path.getsize(p) for p in paths)

    # CLEVR with masks: GZIP TFRecord, 240x320, 11 masks (0 = background), 3-10 objects
    recs = []
    for _ in range(n):
        img, own = render_scene(rng, 240, 320, int(rng.integers(3, 11)))
        masks = (np.arange(11)[:, None, None] == own[None]).astype(np.uint8) * 255
        recs.append(deepmind_example(img, masks, visibility=(masks.reshape(11, -1).max(1) > 0).astype(np.float32)))
    p = j(root, "clevr_with_masks_train.tfrecords")
    write_tfrecord(p, recs, "GZIP")
    opts = dict(root=p, test_size=n, val_size=0)
    rows.append(("clevr (GZIP TFRecord)", "clevr", opts, "240x320 -> crop 192 -> 128", size([p]) / n))
    rows.append(("clevr6 (GZIP TFRecord)", "clevr6", opts, "240x320 -> crop 192 -> 128", size([p]) / n))
    with warnings.catch_warnings():   # the PNG export of `python data.py convert clevr` (train = 80%)
        warnings.simplefilter("ignore")
        data.convert("clevr", p, j(root, "clevr_png"), splits=("test",))
    files = [j(root, "clevr_png", f) for f in os.listdir(j(root, "clevr_png"))]
    rows.append(("clevr (PNG export: image + 11 masks)", "clevr", dict(root=j(root, "clevr_png")),
                 "240x320 -> crop 192 -> 128", size(files) / n))
    # ObjectsRoom: GZIP TFRecord, 64x64, 7 masks (sky, floor, 2 walls, 3 objects)
    recs = []
    for _ in range(n):
        img, own = render_scene(rng, 64, 64, 7)   # shapes 1-3 stand for the room's surfaces
        masks = (np.arange(7)[:, None, None] == own[None]).astype(np.uint8) * 255
        recs.append(deepmind_example(img, masks))
    p = j(root, "objects_room_train.tfrecords")
    write_tfrecord(p, recs, "GZIP")
    rows.append(("objectsroom (GZIP TFRecord)", "objectsroom", dict(root=p, test_size=n, val_size=0), "64x64",
                 size([p]) / n))
    with warnings.catch_warnings():   # BO-QSA's PNG layout, by `python data.py convert objectsroom`
        warnings.simplefilter("ignore")
        data.convert("objectsroom", p, j(root, "objectsroom_png"), splits=("train",))
    files = [j(d, f) for d, _, fs in os.walk(j(root, "objectsroom_png")) for f in fs]
    rows.append(("objectsroom (PNG export)", "objectsroom", dict(root=j(root, "objectsroom_png")), "64x64",
                 size(files) / n))
    # ClevrTex: RGBA PNG 240x320 (textured: more noise) + palette PNG of ids; train = 80% of the scenes
    ctx = j(root, "clevrtex")
    m = n * 5 // 4
    for i in range(m):
        img, own = render_scene(rng, 240, 320, int(rng.integers(3, 11)), noise=12.0)
        rgba = np.concatenate([img, np.full((240, 320, 1), 255, np.uint8)], -1)
        save_clevrtex_scene(ctx, "full", i, rgba, own.astype(np.uint8), rng.integers(0, 256, 768))
    files = [j(d, f) for d, _, fs in os.walk(ctx) for f in fs]
    rows.append(("clevrtex (PNG)", "clevrtex", dict(root=ctx), "240x320 -> crop 192 -> 128", size(files) / m))
    # ShapeStacks: 224x224 rgb PNG + iseg .map, 4 scenarios of n/4 cameras; 7 = unassigned
    ss = j(root, "shapestacks")
    scs = [f"env_ccs-easy-h={h}-vcom=0-vpsf=0-v={h}" for h in range(2, 6)]
    for sc in scs:
        for cam in range(1, n // 4 + 1):
            img, own = render_scene(rng, 224, 224, 6)
            save_shapestacks_view(j(ss, "recordings", sc), cam, img, own)
    write_shapestacks_splits(ss, {"train": scs})
    files = [j(d, f) for d, _, fs in os.walk(j(ss, "recordings")) for f in fs]
    for px, who in ((128, "BO-QSA"), (64, "AST-Seg")):
        rows.append((f"shapestacks (PNG + .map), {who}", "shapestacks", dict(root=ss, image_size=px),
                     f"224x224 -> crop 196 -> {px}", size(files) / len(files) * 2))
    # MOVi-A: plain TFRecord shard (TFDS), 24 frames 128x128 as PNGs (+ 16-bit depth PNGs), a panning camera
    movi = j(root, "movi_a")
    os.makedirs(movi, exist_ok=True)
    recs = []
    for _ in range(max(1, n // 4)):
        img, own = render_scene(rng, 128, 128 + 2 * 24, int(rng.integers(3, 11)))
        rgb = np.stack([img[:, 2 * t:2 * t + 128] for t in range(24)])
        seg = np.stack([own[:, 2 * t:2 * t + 128] for t in range(24)]).astype(np.uint8)
        depth = [png_bytes(1000 + 50 * s.astype(np.uint16)) for s in seg]   # 16-bit grey
        recs.append(movi_example(rgb, seg, depth=depth, **{"metadata/video_name": "bench"}))
    p = j(movi, "movi_a-train.tfrecord-00000-of-00001")
    write_tfrecord(p, recs)
    rows.append(("movi_a (TFRecord of PNGs), 24 frames", "movi_a", dict(root=movi, crop=0.8),
                 "24 x 128x128 -> crop 102 -> 128", size([p]) / len(recs)))
    for v in range(max(1, n // 4)):   # the same kind of videos as Kubric PNG sequences
        img, own = render_scene(rng, 128, 128 + 2 * 24, int(rng.integers(3, 11)))
        save_kubric_video(j(root, "movi_png", "train", f"video_{v:05d}"),
                          np.stack([img[:, 2 * t:2 * t + 128] for t in range(24)]),
                          np.stack([own[:, 2 * t:2 * t + 128] for t in range(24)]).astype(np.uint8))
    files = [j(d, f) for d, _, fs in os.walk(j(root, "movi_png")) for f in fs]
    rows.append(("movi_a (Kubric PNG sequences), 24 frames", "movi_a", dict(root=j(root, "movi_png"), crop=0.8),
                 "24 x 128x128 -> crop 102 -> 128", size(files) / max(1, n // 4)))
    # Birds (CUB-200-2011): JPEG ~500x375, soft PNG segmentation, bounding-box crop
    cub = j(root, "birds")
    scenes = []
    for i in range(n):
        img, own = render_scene(rng, 375, 500, 1, noise=8.0)
        seg = np.where(own > 0, 255, 0).astype(np.uint8)
        ys, xs = np.nonzero(own)
        scenes.append((f"001.Bird/bird_{i}.jpg", img, seg,
                       (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1), 0))
    write_cub(cub, scenes)
    files = [j(d, f) for d, _, fs in os.walk(cub) for f in fs if f.endswith((".jpg", ".png"))]
    rows.append(("birds (CUB: JPEG + PNG)", "birds", dict(root=cub), "375x500 -> bbox crop -> 128",
                 size(files) / n))
    # Flowers (Oxford 102): JPEG ~500x667 and a segmim JPEG painting the background blue (0, 0, 254)
    fl = j(root, "flowers")
    for i in range(1, n + 1):
        img, own = render_scene(rng, 500, 667, 1, noise=8.0)
        seg = np.where(own[..., None] > 0, img, np.array([0, 0, 254], np.uint8))
        save_png(j(fl, "jpg", f"image_{i:05d}.jpg"), img)
        save_png(j(fl, "segmim", f"segmim_{i:05d}.jpg"), seg)
    from scipy.io import savemat
    savemat(j(fl, "setid.mat"), {"trnid": np.arange(1, n + 1)[None], "valid": np.array([[1]]), "tstid": np.array([[1]])})
    files = [j(d, f) for d, _, fs in os.walk(fl) for f in fs if f.endswith(".jpg")]
    rows.append(("flowers (Oxford 102: JPEG + JPEG)", "flowers", dict(root=fl), "500x667 -> 128", size(files) / n))
    return rows


# read: file reads; inflate: zlib (GZIP TFRecords); crc: CRC-32C; parse: tf.train.Example; decode: PNG / JPEG by
# PIL and the array out of it; labels: masks -> label map and the loader's own numpy work; resize: crop and
# PIL resize; tensor: numpy -> torch float / int64; other: the rest (Python glue)
STAGES = ("read", "inflate", "crc", "parse", "decode", "labels", "resize", "tensor", "other")
# data.py functions -> the stage they stand for; the builtins and PIL/numpy/torch functions they call inherit it
_DATA_STAGE = {"read": "read", "ensure": "read", "_inflater_at": "read", "_record_index": "read",
               "crc32c": "crc", "_masked_crc": "crc",
               "parse_example": "parse", "_fields": "parse", "_varint": "parse", "_decode_varints": "parse",
               "_decode_bytes_list": "parse", "_decode_float_list": "parse", "_decode_int64_list": "parse",
               "_open_image": "decode", "_rgb": "decode", "_png_labels": "decode", "_image_hw": "decode",
               "_png_masks": "decode",
               "_labels_from_channels": "labels", "_flowers_foreground": "labels", "__getitem__": "labels",
               "_decode": "labels", "_finish": "labels",
               "_resize_rgb": "resize", "_resize_labels": "resize", "_crop": "resize", "_centre_box": "resize",
               "_item": "tensor"}


def _own_stage(func, data_files, inflater):
    """The stage of a profiled function (file, line, name) by itself, or None (it inherits its caller's).
    data_files: the data.py file names; inflater: the keys of its _Inflater's methods (the GZIP stream)."""
    file, _, name = func
    if "decompress" in name or "zlib" in name:
        return "inflate"
    if "crc32c" in name or "crc32c" in file:
        return "crc"
    if "torch" in name or "torch" in file:
        return "tensor"
    if file == "~" and any(s in name for s in ("'read' of '_io", "io.open", "'seek' of '_io", "posix.stat",
                                               "posix.listdir", "posix.scandir")):
        return "read"
    if func in inflater:
        return "inflate"
    if file in data_files:
        return _DATA_STAGE.get(name, "other")
    if "PIL" in file and name == "resize":
        return "resize"
    if "PIL" in file and name in ("load", "open", "_open"):
        return "decode"
    return None


def profile_stages(fn, data_module):
    """Run fn() under cProfile -> {stage: fraction of the profiled time} (STAGES), for the loaders of
    data_module. Each function's own time goes to its stage (_own_stage), else to its callers' stages in
    proportion to the time it spent for each."""
    data_files = {data_module.__file__}
    inflater = {(f.__code__.co_filename, f.__code__.co_firstlineno, f.__name__)
                for f in vars(data_module._Inflater).values() if hasattr(f, "__code__")}
    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof).stats
    memo = {}

    def stage(f, depth=0):
        if f not in memo:
            s = _own_stage(f, data_files, inflater)
            if s is None:
                callers = stats.get(f, (0, 0, 0, 0, {}))[4]
                top = max(callers, key=lambda c: callers[c][3], default=None)   # the caller with most time in f
                s = "other" if top is None or depth > 50 else stage(top, depth + 1)
            memo[f] = s
        return memo[f]
    out = dict.fromkeys(STAGES, 0.0)
    for f, (cc, nc, tt, ct, callers) in stats.items():
        s = _own_stage(f, data_files, inflater)
        if s is not None or not callers:
            out[s or "other"] += tt
            continue
        tot = sum(c[2] for c in callers.values()) or 1.0
        for c, (_, _, ctt, _) in callers.items():
            out[stage(c)] += tt * (ctt / tot if tot else 1.0 / len(callers))
    total = sum(out.values()) or 1.0
    return {k: v / total for k, v in out.items()}


def load_data_module(path, name="data_ref"):
    """Import the data.py at `path` as module `name` (its own caches and classes, beside data)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _time_pass(ds, order):
    """Seconds to read ds[i] for i in order."""
    t = time.perf_counter()
    for i in order:
        ds[i]
    return time.perf_counter() - t


def data_main(bc):
    """suite=data: write every format, time each loader in this process (one thread, as a DataLoader worker),
    profile one pass; prints two markdown tables (speed; time by stage)."""
    torch.set_num_threads(1)   # what a DataLoader worker runs with
    mods = [("new", data)]
    if bc.data_ref:
        mods.append(("ref", load_data_module(bc.data_ref)))
    root = bc.data_dir or tempfile.mkdtemp(prefix="bench_data_")
    try:
        t = time.perf_counter()
        rows = write_data_bench_files(root, bc.data_items)
        print(f"wrote the files in {time.perf_counter() - t:.1f} s to {root}", file=sys.stderr)
        results = []
        for label, name, opts, native, nbytes in rows:
            if bc.data_only and bc.data_only not in label:
                continue
            split = "test" if "test_size" in opts else "train"
            dss = {}
            for tag, mod in mods:
                with warnings.catch_warnings():            # 'only N records' etc.: expected here
                    warnings.simplefilter("ignore")
                    dss[tag] = mod.build_dataset(name, split, **opts)
                dss[tag][0]                                   # open files, build the record index
            n = len(dss["new"])
            order = list(range(n))
            shuffled = random.Random(0).sample(order, n)
            same = None
            if "ref" in dss:                                  # the same items, bit for bit
                same = all(all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
                           for a, b in ((dss["new"][i], dss["ref"][i]) for i in order))
            r = dict(label=label, native=native, kb=nbytes / 1024, n=n, same=same)
            for tag in dss:                                   # alternate new / ref, best of repeats each
                r[tag] = math.inf
                r[tag + "_shuf"] = math.inf
            for _ in range(bc.data_repeats):
                for tag in dss:
                    r[tag] = min(r[tag], _time_pass(dss[tag], order))
                    if "TFRecord" in label and "GZIP" in label:
                        r[tag + "_shuf"] = min(r[tag + "_shuf"], _time_pass(dss[tag], shuffled))
            for tag, mod in mods:
                r[tag + "_stages"] = profile_stages(lambda: [dss[tag][i] for i in order], mod)
            results.append(r)
            print(f"done: {label}: {n / r['new']:.1f} items/s", file=sys.stderr)
    finally:
        if not bc.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    f = lambda v, n: "-" if v == math.inf else f"{n / v:.1f}"   # noqa: E731
    print(f"\ntorch {torch.__version__}, numpy {np.__version__}, Pillow {Image.__version__}; one process, 1 torch "
          f"thread (a DataLoader worker); best of {bc.data_repeats} passes over {bc.data_items} items (MOVi-A: videos)"
          + (f"; ref = {bc.data_ref}, timed in the same passes" if bc.data_ref else "") + "\n")
    ref = len(mods) > 1
    print("| loader (on-disk format) | native -> item | KiB per item on disk | items/s per worker | ms per item | "
          "items/s shuffled |" + (" ref items/s | ref shuffled | new / ref | identical |" if ref else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|---|" if ref else ""))
    for r in results:
        line = (f"| {r['label']} | {r['native']} | {r['kb']:.0f} | {f(r['new'], r['n'])} | "
                f"{1e3 * r['new'] / r['n']:.2f} | {f(r['new_shuf'], r['n'])} |")
        if ref:
            line += (f" {f(r['ref'], r['n'])} | {f(r['ref_shuf'], r['n'])} | {r['ref'] / r['new']:.2f}x | "
                     f"{'yes' if r['same'] else 'NO'} |")
        print(line)
    for tag, _ in mods:
        print(f"\nWhere one in-order pass spends its time ({'this data.py' if tag == 'new' else 'ref'}; cProfile, "
              f"fractions of the profiled time; the profiler inflates Python-heavy stages):\n")
        print("| loader | " + " | ".join(STAGES) + " |")
        print("|---|" + "---|" * len(STAGES))
        for r in results:
            print(f"| {r['label']} | " + " | ".join(f"{100 * r[tag + '_stages'][s]:.0f}%" for s in STAGES) + " |")


def all_settings():
    return [s for group in SETTINGS.values() for s in group()]


def run_one(name, bc):
    """Time one setting in this process; returns a result dict."""
    device = get_device(bc.device)
    if bc.threads:
        torch.set_num_threads(bc.threads)
    make_step = dict(all_settings())[name]
    torch.manual_seed(0)
    step, info = make_step(bc, device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(bc.warmup + bc.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= bc.warmup:
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = cuda_peak_mib()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # KiB -> MiB (Linux)
    t_step = statistics.median(times)
    flops = None
    if "compile" not in name.split():              # inductor's kernels bypass the counter: main() takes the eager twin's
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _TotalOnly()
        with counter:
            step()
        flops = counter.get_total_flops()
    return dict(name=name, device=str(device), batch=info["batch"], image=info["image"], slots=info["slots"],
                step_s=t_step, img_per_s=info["batch"] / t_step, peak_mib=peak, flops=flops)


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker: only the total is used here, and the tracker's hooks
    raise on BO-QSA's GRU ("Expected gradient function to be set")."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def matmul_peak(device, dtype, bc):
    """The device's peak FLOP/s in `dtype` as this process reaches it: the best of 5 square matmuls, 2 n^3 FLOPs
    each, n doubled from 256 while one takes under 0.2 s (up to 8192: large enough for a GPU; a CPU that only
    emulates bf16 stops early). That is the ceiling the models' convolutions and matmuls can reach (a vendor's
    nominal peak is higher: clock boost and the tensor cores' sparsity are not in it)."""
    if bc.threads:
        torch.set_num_threads(bc.threads)

    def best_of(n, runs):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    n = 256
    while n < 8192 and best_of(n, 2) < 0.2:
        n *= 2
    return 2 * n ** 3 / best_of(n, 5)


def main():
    bc = parse_args(BenchConfig())
    if bc.only.startswith("qp "):
        _, solver, side, rhs, *edges = bc.only.split()              # qp SOLVER SIDE RHS [EDGES]
        print(json.dumps(run_qp(solver, int(side), int(rhs), bc, *edges)))
        return
    if bc.only.startswith("peak "):
        print(json.dumps(matmul_peak(get_device(bc.device), getattr(torch, bc.only.split()[1]), bc)))
        return
    if bc.only:
        print(json.dumps(run_one(bc.only, bc)))
        return
    if bc.suite == "qp":
        return qp_main(bc)
    if bc.suite == "data":
        return data_main(bc)
    names = [n for n, _ in all_settings() if not bc.group or n.split()[0] == bc.group]
    if not bc.emulated_bf16 and not native_bf16(get_device(bc.device)):
        print("no native bf16 on this device: the bfloat16 settings are skipped (--emulated_bf16 runs them)",
              file=sys.stderr)
        names = [n for n in names if "bfloat16" not in n.split()]

    def run(only):
        args = [sys.executable, os.path.abspath(__file__), f"--only={only}", f"--batch_size={bc.batch_size}",
                f"--steps={bc.steps}", f"--warmup={bc.warmup}", f"--device={bc.device}", f"--threads={bc.threads}"]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{only}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        print(f"done: {only}", file=sys.stderr)
        return json.loads(r.stdout.strip().splitlines()[-1])

    bf16_rows = any("bfloat16" in n.split() for n in names)
    peaks = {"float32": run("peak float32"), "bfloat16": run("peak bfloat16") if bf16_rows else None}
    rows = {name: row for name in names if (row := run(name)) is not None}
    gflops = lambda p: "not measured" if p is None else f"{p / 1e9:.0f} GFLOP/s"     # noqa: E731
    print(f"\ntorch {torch.__version__}, {bc.threads or torch.get_num_threads()} threads, median of {bc.steps} steps "
          f"(forward + backward + Adam); default = the bare command's setting at its own batch, else batch "
          f"{bc.batch_size}; FLOPs counted by torch.utils.flop_counter (matmuls and convolutions, forward + "
          f"backward); peak = the best square matmul in that dtype on this device: float32 "
          f"{gflops(peaks['float32'])}, bfloat16 {gflops(peaks['bfloat16'])}\n")
    print("| setting | device | batch | image | slots | step (s) | images/s | speed-up | GFLOP/step | GFLOP/s | "
          "of peak | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        words = name.split()
        base = rows.get(" ".join(words[:2] + ["float32"]) if words[1] == "default" else next(
            n for n in rows if n.split()[:2] == words[:2]))          # default: its float32; preset: its first row
        eager = rows.get(name.replace(" compile", ""), {})
        flops = r["flops"] if r["flops"] is not None else eager.get("flops")
        peak = peaks["bfloat16" if "bfloat16" in words else "float32"]
        achieved = flops / r["step_s"] if flops else None
        f = lambda v, fmt: "-" if v is None else format(v, fmt)     # noqa: E731
        print(f"| {name} | {r['device']} | {r['batch']} | {r['image']} | {r['slots']} | {r['step_s']:.3f} | "
              f"{r['img_per_s']:.1f} | {f(base and base['step_s'] / r['step_s'], '.2f')}x | "
              f"{f(flops and flops / 1e9, '.1f')} | {f(achieved and achieved / 1e9, '.1f')} | "
              f"{f(achieved and peak and 100 * achieved / peak, '.0f')}% | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()

"""Benchmarks: training-step time and peak memory, side by side in one run.

    python bench.py                          # all settings (BO-QSA, min-cut OCL, AST-Seg)
    python bench.py --group=boqsa            # BO-QSA at the paper's ShapeStacks and ObjectsRoom settings
    python bench.py --batch_size=32 --steps=5 --device=cuda

Each setting runs in its own subprocess so that its peak memory is its own: on CUDA the
peak of torch.cuda.max_memory_allocated plus the bytes CuPy's memory pool holds (the sparse solver's
factors and solves; the pool keeps what it allocated, so that is its high-water mark), on CPU the peak resident set size of the process
(ru_maxrss, model + activations + the Python/torch runtime). A step is forward + backward +
optimiser step on random images, after `warmup` untimed steps; the table gives the median.
"""
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import get_device, parse_args


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
    suite: str = "train"         # train: model steps (SETTINGS) | qp: mincut_ocl's STCutQP, dct vs sparse
    qp_rhs: int = 768            # qp: right-hand sides of the main comparison (64 images x 12 cuts)
    qp_side: int = 64            # qp: grid side of the main comparison (the paper's 64x64)
    qp_sweep: str = "16,32,48,64,96,128"   # qp: grid sides of the scaling sweep
    qp_sweep_rhs: int = 48       # qp: right-hand sides per sweep point
    qp_sparse_max: int = 64      # qp: largest side run with the sparse solver (memory grows as P^2)


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
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return dict(name=name, device=str(device), batch=info["batch"], image=info["image"], slots=info["slots"],
                step_s=t_step, img_per_s=info["batch"] / t_step, peak_mib=peak, flops=flops)


def matmul_peak(device, dtype, bc):
    """The device's peak FLOP/s in `dtype` as this process reaches it: the best of 5 square matmuls (n = 2048 on a
    CPU, 8192 on a GPU), 2 n^3 FLOPs each. That is the ceiling the models' convolutions and matmuls can reach
    (a vendor's nominal peak is higher: clock boost and the tensor cores' sparsity are not in it)."""
    if bc.threads:
        torch.set_num_threads(bc.threads)
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):                             # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


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
    names = [n for n, _ in all_settings() if not bc.group or n.split()[0] == bc.group]

    def run(only):
        args = [sys.executable, os.path.abspath(__file__), f"--only={only}", f"--batch_size={bc.batch_size}",
                f"--steps={bc.steps}", f"--warmup={bc.warmup}", f"--device={bc.device}", f"--threads={bc.threads}"]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{only}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return None
        print(f"done: {only}", file=sys.stderr)
        return json.loads(r.stdout.strip().splitlines()[-1])

    peaks = {dt: run(f"peak {dt}") for dt in ("float32", "bfloat16")}
    rows = {name: row for name in names if (row := run(name)) is not None}
    print(f"\ntorch {torch.__version__}, {bc.threads or torch.get_num_threads()} threads, median of {bc.steps} steps "
          f"(forward + backward + Adam); default = the bare command's setting at its own batch, else batch "
          f"{bc.batch_size}; FLOPs counted by torch.utils.flop_counter (matmuls and convolutions, forward + "
          f"backward); peak = the best square matmul in that dtype on this device: float32 "
          f"{(peaks['float32'] or 0) / 1e9:.0f} GFLOP/s, bfloat16 {(peaks['bfloat16'] or 0) / 1e9:.0f} GFLOP/s\n")
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

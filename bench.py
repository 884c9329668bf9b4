"""Benchmarks: training-step time and peak memory, side by side in one run.

    python bench.py                          # BO-QSA at the paper's ShapeStacks and ObjectsRoom settings
    python bench.py --batch_size=32 --steps=5 --device=cuda

Each setting runs in its own subprocess so that its peak memory is its own: on CUDA the
peak of torch.cuda.max_memory_allocated, on CPU the peak resident set size of the process
(ru_maxrss, model + activations + the Python/torch runtime). A step is forward + backward +
optimiser step on random images, after `warmup` untimed steps; the table gives the median.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

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


def boqsa_settings():
    """BO-QSA at the paper's settings (Tab. 9-13): list of (name, make_step).

    make_step(bc, device) builds model, optimiser and a random batch and returns (step, info): `step()` runs one
    forward + backward + optimiser step; `info` gives the table's image size and slot count."""
    import boqsa

    def maker(cfg):
        def make_step(bc, device):
            model = boqsa.BOQSA(cfg).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            x = torch.rand(bc.batch_size, 3, cfg.image_size, cfg.image_size, device=device)

            def step():
                loss = model(x, sigma=0.5)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            return step, dict(image=cfg.image_size, slots=cfg.num_slots)
        return make_step

    return [(f"boqsa {ds}", maker(boqsa.build_config([f"--dataset={ds}"]))) for ds in ("shapestacks", "objectsroom")]


# One entry per model script; each function returns [(setting name, make_step)]. Add new scripts here.
SETTINGS = {"boqsa": boqsa_settings}


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
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # KiB -> MiB (Linux)
    t_step = statistics.median(times)
    return dict(name=name, device=str(device), batch=bc.batch_size, image=info["image"], slots=info["slots"],
                step_s=t_step, img_per_s=bc.batch_size / t_step, peak_mib=peak)


def main():
    bc = parse_args(BenchConfig())
    if bc.only:
        print(json.dumps(run_one(bc.only, bc)))
        return
    names = [n for n, _ in all_settings() if not bc.group or n.split()[0] == bc.group]
    rows = []
    for name in names:
        args = [sys.executable, os.path.abspath(__file__), f"--only={name}", f"--batch_size={bc.batch_size}",
                f"--steps={bc.steps}", f"--warmup={bc.warmup}", f"--device={bc.device}", f"--threads={bc.threads}"]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"done: {name}", file=sys.stderr)
    base = rows[0]["step_s"] if rows else 1.0
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {bc.batch_size}, "
          f"median of {bc.steps} steps (forward + backward + Adam)\n")
    print("| setting | device | image | slots | step (s) | images/s | peak memory (MiB) | time vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['device']} | {r['image']} | {r['slots']} | {r['step_s']:.3f} | "
              f"{r['img_per_s']:.1f} | {r['peak_mib']:.0f} | {r['step_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()

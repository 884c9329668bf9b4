"""Min-cut OCL: Differentiable Mathematical Programming for Object-Centric Representation Learning
(Pervez, Lippe & Gavves, ICLR 2023).

Paper: Pervez et al., ICLR 2023 (section, equation and table numbers below are the paper's).
Official code: GitHub alpz/graph-ocl (slot_cut/model.py, cut/st.py, cut/qp.py).  One file, read top to bottom:

    1. Config          defaults (CPU-sized, built-in data) and per-dataset presets (Sec. 6.1, App. D)
    2. QP layers       2.1 the regularised equality-constrained s-t cut QP (eq. 2, Sec. 3.1) with three
                       solvers of the same QP: "sparse" (the paper's factor-once sparse method, App. B),
                       "dct" (exact O(P log P) node solve, this project) and "dense" (plain KKT, tests);
                       2.2 the matching QP (eq. 7, Sec. 3.2, App. C)
    3. Models          3.1 encoder -> k-partition with a background cut (Alg. 1, Alg. 2, Sec. 4) ->
                       slots -> spatial broadcast decoder, alpha mixture, MSE (Sec. 6.1); 3.2 the two-frame
                       pair model (Sec. 4 "Matching and motion", Alg. 3); 3.3 its Slot Attention baseline
                       (Sec. 6.3, Tab. 2)
    4. Training        Adam 4e-4, lr x 0.8^(step / (0.2 total)) (App. D), resume
    5. Evaluation      ARI, ARI-FG, mIoU, MSC-FG, mBO, MSE on the test split; video: 5.1 slot tracking over
                       the frames, tracked ARI / ARI-FG (Tab. 2), Fig. 6 (App. A)
    6. Cora            the matching QP's validation on Cora citation matching (Sec. 6.2)
    7. Run             run() and main(): --task=image | video | cora; --eval_only / --predict (common.py 4b)

Run:
    python mincut_ocl.py                                   # built-in synthetic data, CPU-sized model (softplus weights)
    python mincut_ocl.py --dataset=clevrtex --data_dir=PATH
    python mincut_ocl.py --eval_only --dataset=clevrtex --data_dir=PATH   # also --ckpt=PATH: writes out_dir/eval_*.json
    python mincut_ocl.py --predict=FOLDER_OF_IMAGES        # writes out/mincut_ocl/predict/*.png
    python mincut_ocl.py --init_from=out/a/ckpt.pt --out_dir=out/b   # start from another run's weights
    torchrun --nproc_per_node=2 mincut_ocl.py              # data-parallel (gloo on CPU, nccl on GPU)
    python mincut_ocl.py --qp_solver=sparse                # the paper's solver (slow on CPU)
    python mincut_ocl.py --task=video                      # Alg. 3 on frame pairs of synthetic_video (Tab. 2)
    python mincut_ocl.py --task=video --dataset=movi_a --data_dir=PATH
    python mincut_ocl.py --model=slot_attention            # Slot Attention baseline, same encoder/decoder/schedule
    python mincut_ocl.py --task=video --model=slot_attention   # Tab. 2 baseline (Hungarian tracking)
    python mincut_ocl.py --task=cora --data_dir=PATH       # Sec. 6.2: cora.content, cora.cites (LINQS)
Training evaluates on --eval_split (val) every eval_interval steps (metrics.jsonl: val_*), then once
on the test split (out_dir/eval_<dataset>.json); every run, and --eval_only, ends with one summary line.
"""
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from scipy.optimize import linear_sum_assignment, linprog

from common import (DTYPES, CheckpointError, MetricsLog, ResumableSampler, all_reduce_mean, ari, check_config,
                    check_finite_step, check_out_dir, clip_gradients, ddp_cleanup, ddp_setup, error_line, fail,
                    get_device, get_rng_state, labels_to_rgb, load_checkpoint, load_resume_checkpoint, mse, nanmean,
                    parse_args, progress, resolve_dtype, save_checkpoint, save_image_grid, save_slot_grid,
                    seed_everything, segmentation_metrics, set_rng_state, train_autocast)

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class Config(common.RunConfig):
    """Min-cut OCL configuration. Every field can be set from the command line as --key=value.

    Defaults are sized for a 2-core CPU on the built-in `synthetic` dataset; `--dataset=NAME`
    first applies that dataset's paper settings (PRESETS, Sec. 6.1 and App. D), then your flags.
    """
    task: str = "image"             # what to train: image (Sec. 6.1) | video (frame pairs, Alg. 3, Sec. 6.3) | cora
                                    # (Sec. 6.2)
    # data
    image_size: int = 32            # side in pixels the images are resized to (Sec. 6.1: 128; 32 here for a 2-core CPU)
    crop: float = 0.0               # movi_a: centre crop, fraction of the side, before resizing (Sec. 6.3: 0.8)
    # model
    encoder: str = "cnn"            # image encoder: cnn (Sec. 6.1: CLEVR) | resnet (4 BasicBlocks, Sec. 6.1: ClevrTex)
    enc_channels: int = 32          # channels of the encoder's feature maps (Sec. 6.1: 64 CNN, 100 ResNet)
    enc_stride: int = 1             # stride of the first encoder layer, the others stride 1 (Sec. 6.1: 2, 128 px
                                    # -> 64x64 maps)
    num_slots: int = 7              # k: k-1 object cuts + 1 foreground cut (App. D: 12)
    slot_dim: int = 64              # size of each slot vector (App. D: 64)
    mlp_dim: int = 128              # hidden width of the slot MLPs (official: 128; input MLP 2x this)
    gamma: float = 0.5              # weight gamma of the (gamma/2)|x|^2 term that makes the s-t cut LP a strictly
                                    # convex QP (Sec. 3.1; Sec. 6.1: 0.5)
    qp_solver: str = "dct"          # how the cut QP is solved: dct (exact, fast) | sparse (the paper's App. B method) |
                                    # dense (tiny grids)
    edges: str = "full"             # QP grid edges: full (Sec. 3.1 text, all in-image) | official (cut/st.py: interior pixels)
    weight_act: str = "relu"        # last activation of the edge-weight nets, weights >= 0: relu (official
                                    # slot_cut/model.py) | softplus (never a dead channel; the synthetic preset)
    obj_temp: float = 0.5           # softmax temperature over the object cuts (Sec. 6.1: 0.5)
    mask_temp: float = 0.1          # softmax temperature of the combined masks (Sec. 6.1: 0.1)
    match_temp: float = 0.1         # task video: matching softmax temperature (Alg. 3 line 4; not given: 0.1)
    model: str = "mincut"           # slot model: mincut (Alg. 1-2; task video: Alg. 3 on frame pairs) | slot_attention
                                    # (baseline between the same encoder and decoder; video: Tab. 2 baseline)
    sa_iters: int = 3               # slot_attention baseline: iterations (Locatello et al. 2020: 3)
    dec_channels: int = 32          # channels of the decoder's feature maps (official: 64)
    dec_init_size: int = 8          # side of the grid each slot is broadcast to before decoding (Sec. 6.1: 8x8)
    dec_strides: tuple = (2, 2, 1, 1)  # stride of every ConvT 5x5, then a ConvT 3x3 to 4 channels; dec_init_size *
                                    # prod = image_size (official slot_cut/model.py SlotCutModel: 2,2,2,2,1,1)
    # optimisation (App. D)
    batch_size: int = 16            # images (task video: frame pairs) per step over all processes, the global batch
                                    # (App. D: 64)
    lr: float = 4e-4                # Adam learning rate (App. D: 4e-4)
    lr_decay: float = 0.8           # lr factor lr_decay ** (step / (decay_fraction * max_steps)) (official)
    decay_fraction: float = 0.2     # the lr is x lr_decay every decay_fraction * max_steps steps (official)
    max_steps: int = 3000           # about 30 min on 2 CPU cores
    grad_clip: float = 0.0          # clip the gradient norm to this value (0 = off, as the official code)
    # run
    out_dir: str = "out/mincut_ocl" # checkpoints, metrics.jsonl, sample images and eval results
    dtype: str = "auto"             # precision of the training forward's CNNs: float32 (the official code) |
                                    # bfloat16 (autocast) | auto: bfloat16 where native, else float32; the cut and
                                    # matching QPs always solve in float32; the paper presets: float32


# Paper settings (Sec. 6.1, App. D; official slot_cut/): 128x128 input, first layer stride 2 -> 64x64 QP grid,
# 12 slots of size 64, Adam 4e-4, batch 64, decoder 8 -> 128 with 64 channels (official SlotCutModel: 4 stride-2
# and 2 stride-1 ConvT 5x5). max_steps: the official 500 epochs of the 40k ClevrTex training images at batch 64
# (the paper gives only "1.5 days", App. D).
_PAPER = dict(image_size=128, enc_stride=2, num_slots=12, slot_dim=64, batch_size=64, dec_channels=64,
              dec_strides=(2, 2, 2, 2, 1, 1), max_steps=312500, num_workers=8, eval_interval=5000, eval_items=0,
              dtype="float32")                                           # float32 as the official code
# The built-in image data (a departure from the paper, for this default only): softplus edge weights. With the
# official ReLU the foreground cut's t-edge channel dies within 50 steps and the model outputs the mean image
# for about 1000 steps (RESULTS.md, "The mean-image phase"; README, Results: ReLU against softplus).
PRESETS = {
    "synthetic": dict(weight_act="softplus"),
    "clevr": dict(_PAPER, encoder="cnn", enc_channels=64),                # Sec. 6.1: CNN, 64 maps
    "clevrtex": dict(_PAPER, encoder="resnet", enc_channels=100),         # Sec. 6.1: ResNet, 4 blocks, 100 maps
}
PRESETS["clevr6"] = dict(PRESETS["clevr"])
for _name in ("clevrtex_ood", "clevrtex_camo"):                          # eval-only sets of Tab. 1
    PRESETS[_name] = dict(PRESETS["clevrtex"])
# --task=video (Sec. 6.3). eval_items and test_items count videos. MOVi-A: 128x128 frames, 8 slots per frame; the
# paper gives no encoder or schedule for it: the CLEVR CNN and the image schedule. Frames are centre-cropped
# to 0.8 x the side, then resized (Sec. 6.3; Fig. 5 shows uncropped frames: --crop=0).
# synthetic_video, CPU-sized: the final evaluation and --eval_only on the first 64 of the 256 test videos
# (about 2.5 min on 2 cores; all 256, --test_items=0, take about 10 min)
PRESETS["synthetic_video"] = dict(eval_items=64, test_items=64, max_steps=1500, out_dir="out/mincut_video")
PRESETS["movi_a"] = dict(PRESETS["clevr"], num_slots=8, crop=0.8, out_dir="out/mincut_movi_a")


def video_dataset(cfg):
    """cfg.dataset, except synthetic_video (moving shapes) for --task=video with the image default synthetic."""
    return "synthetic_video" if cfg.task == "video" and cfg.dataset == "synthetic" else cfg.dataset


MODELS = ("mincut", "slot_attention")
TASKS = ("image", "video", "cora")
WEIGHT_ACTS = {"relu": nn.ReLU, "softplus": nn.Softplus}   # --weight_act: edge weights >= 0 (Alg. 1 line 1)


def build_config(argv=None):
    """Config from the command line: defaults <- PRESETS[--dataset] <- explicit flags. The Slot Attention
    baseline gets its own default out_dir (<the preset's out_dir>_sa). `--help` (after --task /
    --dataset) lists the flags with that preset's values as the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parse_args(Config(), argv, only=("task", "dataset", "model"))   # picks the preset
    dataset = video_dataset(first)
    preset = dict(PRESETS.get(dataset, {}))
    if first.model == "slot_attention":
        preset["out_dir"] = preset.get("out_dir", Config.out_dir) + "_sa"
    cfg = parse_args(Config(**preset), argv, epilog=f"Defaults above: the {dataset} preset; --dataset=NAME --help "
                     "shows another dataset's. --task=cora (Sec. 6.2) has its own flags: --task=cora --help.")
    cfg.dataset = dataset
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Exit with one line naming the flag for a value that would fail later (before any data or step)."""
    if cfg.task not in TASKS:
        fail(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.qp_solver not in STCutQP.SOLVERS:
        fail(f"--qp_solver must be one of {', '.join(STCutQP.SOLVERS)}, got {cfg.qp_solver!r}")
    if cfg.edges not in EDGE_SETS:
        fail(f"--edges must be one of {', '.join(EDGE_SETS)}, got {cfg.edges!r}")
    if cfg.encoder not in ("cnn", "resnet"):
        fail(f"--encoder must be cnn or resnet, got {cfg.encoder!r}")
    if cfg.weight_act not in WEIGHT_ACTS:
        fail(f"--weight_act must be one of {', '.join(WEIGHT_ACTS)}, got {cfg.weight_act!r}")
    if cfg.model not in MODELS:
        fail(f"--model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    check_config(cfg, positive=("image_size", "enc_channels", "enc_stride", "num_slots", "slot_dim", "mlp_dim",
                                "gamma", "obj_temp", "mask_temp", "match_temp", "sa_iters", "dec_channels",
                                "dec_init_size", "dec_strides", "batch_size", "lr", "lr_decay", "log_interval",
                                "eval_interval"),
                 nonnegative=("crop", "num_workers", "max_steps", "grad_clip", "decay_fraction", "eval_items",
                              "test_items"),
                 choices=dict(eval_split=data.SPLITS))
    if cfg.num_slots < 2 and cfg.model != "slot_attention":
        fail(f"--num_slots must be >= 2 (a background slot + object slots, Sec. 4), got {cfg.num_slots}", code=2)
    if cfg.crop > 1:
        fail(f"--crop is a fraction of the frame's side, in (0, 1] (0 = no crop), got {cfg.crop}", code=2)
    try:
        feature_side(cfg)
    except ValueError as e:
        fail(f"{e}; use e.g. --image_size={cfg.image_size // cfg.enc_stride * cfg.enc_stride or cfg.enc_stride}",
             code=2)
    out = cfg.dec_init_size * math.prod(cfg.dec_strides)
    if out != cfg.image_size:
        fix = [f"--image_size={out}"]
        if cfg.image_size % math.prod(cfg.dec_strides) == 0:
            fix.append(f"--dec_init_size={cfg.image_size // math.prod(cfg.dec_strides)}")
        fail(f"--image_size={cfg.image_size} does not match the decoder: --dec_init_size={cfg.dec_init_size} x "
             f"the product of --dec_strides={','.join(map(str, cfg.dec_strides))} = {out}; use "
             f"{' or '.join(fix)} (or other --dec_strides)", code=2)
    side = cfg.image_size // cfg.enc_stride                                # the QP grid
    if cfg.qp_solver == "dense" and side * side > DENSE_MAX_PIXELS:
        fail(f"--qp_solver=dense is for tiny grids: the {side}x{side} QP grid of --image_size={cfg.image_size} "
             f"--enc_stride={cfg.enc_stride} has more than {DENSE_MAX_PIXELS} pixels; use --qp_solver=dct or sparse",
             code=2)
    if cfg.predict and cfg.task != "image":
        fail(f"--predict segments images: it needs --task=image, got --task={cfg.task}")
    if cfg.predict and cfg.eval_only:
        fail("--predict and --eval_only are two separate runs: pass one of them")


# -----------------------------------------------------------------------------
# 2.1 QP layers: the s-t cut QP (Sec. 3.1, eq. 2; App. B)
#
# Variables x = [p_s, p_t, p (P pixels, row-major), d (E edges), slack (E edges)].
# Edges, in this order: the s-edge s -> v of every pixel, the t-edge v -> t of every pixel, then for
# each direction down, right, up, left the edges v -> neighbour of the pixels whose neighbour is in
# the image (edges="full"; edges="official": of the interior pixels only, see STCutQP).
# Row e: d_e - p_tail + p_head - slack_e = 0; last row: p_s - p_t = 10 (no slack).

EDGE_OFFSETS = ((1, 0), (0, 1), (-1, 0), (0, -1))      # down, right, up, left = channels 2..5 of w
SEPARATION = 10.0                                        # p_s - p_t (official "distance of 10")
EDGE_SETS = ("full", "official")                         # grid-edge rows of the QP (STCutQP's `edges`)


def check_edges(edges):
    """ValueError unless `edges` names an edge set of EDGE_SETS."""
    if edges not in EDGE_SETS:
        raise ValueError(f"STCutQP: edges must be one of {', '.join(EDGE_SETS)}, got {edges!r}")


def grid_edge_mask(height, width, edges="full"):
    """Bool numpy array [4,H,W]: True where the grid edge (down, right, up, left) of pixel (i,j) is a row
    of the QP: every in-image edge (edges="full"), or the edges of interior pixels (edges="official")."""
    check_edges(edges)
    m = np.zeros((4, height, width), dtype=bool)
    if edges == "official":                              # official cut/st.py, make_constraints
        m[:, 1:-1, 1:-1] = True
        return m
    m[0, :-1, :] = True
    m[1, :, :-1] = True
    m[2, 1:, :] = True
    m[3, :, 1:] = True
    return m


@functools.lru_cache(maxsize=8)
def cut_structure(height, width, edges="full"):
    """The constraint matrix of the s-t cut QP on an HxW grid (scipy, float64), for the edge set `edges`.

    Returns a dict:
      A        CSR [E+1, 2+P+2E]: the full constraint matrix (columns p_s, p_t, pixels, d, slack)
      A_nodes  CSR [E+1, P+2]: its node columns (the d and slack columns are +I and -I on the edge rows)
      b        [E+1]: zeros and SEPARATION in the last row
      edge_index  int64 [E]: position of edge e's weight in w[b].reshape(6*P) (channel * P + pixel)
      E, P
    """
    P = height * width
    pix = np.arange(P).reshape(height, width)
    tails = [np.zeros(P, np.int64), 2 + pix.ravel()]                 # s -> v, v -> t
    heads = [2 + pix.ravel(), np.ones(P, np.int64)]
    index = [pix.ravel(), P + pix.ravel()]
    for k, (di, dj) in enumerate(EDGE_OFFSETS):
        i, j = np.nonzero(grid_edge_mask(height, width, edges)[k])
        tails.append(2 + pix[i, j])
        heads.append(2 + pix[i + di, j + dj])
        index.append((2 + k) * P + pix[i, j])
    tails, heads, index = np.concatenate(tails), np.concatenate(heads), np.concatenate(index)
    E, n = len(tails), P + 2
    rows = np.arange(E)
    A_nodes = scipy.sparse.csr_matrix(
        (np.r_[-np.ones(E), np.ones(E), 1.0, -1.0], (np.r_[rows, rows, E, E], np.r_[tails, heads, 0, 1])),
        shape=(E + 1, n))
    private = scipy.sparse.csr_matrix(                                 # d_e (+1) and slack_e (-1)
        (np.r_[np.ones(E), -np.ones(E)], (np.r_[rows, rows], np.r_[rows, E + rows])), shape=(E + 1, 2 * E))
    A = scipy.sparse.hstack([A_nodes, private]).tocsr()
    b = np.zeros(E + 1)
    b[E] = SEPARATION
    return dict(A=A, A_nodes=A_nodes, b=b, edge_index=index, E=E, P=P)


# --- "dct": exact O(P log P) solve ---------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _dct_tables(N, dtype, device):
    """Index maps and twiddles of the length-N FFT-based DCT (Makhoul 1980)."""
    order = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2).flip(0)])   # v = x[order]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(N)
    k = torch.arange(N // 2 + 1, dtype=torch.float64)
    scale = torch.full_like(k, math.sqrt(2.0 / N))
    scale[0] = math.sqrt(1.0 / N)
    fwd = torch.polar(scale, -math.pi * k / (2 * N))                       # scale_k exp(-i pi k / 2N)
    inv = torch.polar(1.0 / scale, math.pi * k / (2 * N))
    rev = torch.cat([torch.tensor([0]), torch.arange(N - 1, N - N // 2 - 1, -1)])   # N - k (0 for k = 0)
    ctype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return (order.to(device), inverse.to(device), fwd.to(device, ctype), inv.to(device, ctype), rev.to(device),
            N // 2 + 1)


def _view_dim(t, dim, ndim):
    """Reshape a 1-D table to broadcast along `dim` of an ndim tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


def _take(x, dim, index):
    """x.index_select(dim, index); advanced indexing on the last dim (index_select is slow there on CPU)."""
    return x[..., index] if dim == x.dim() - 1 else x.index_select(dim, index)


def dct_ortho(x, dim=-1):
    """Orthonormal DCT-II along `dim` (= scipy.fft.dct(x, norm="ortho", axis=dim)) by one real FFT.

    Makhoul: v = (x_0, x_2, ..., x_3, x_1), Z_k = s_k exp(-i pi k/2N) rfft(v)_k, X_k = Re Z_k for k <= N/2
    and X_k = -Im Z_{N-k} for k > N/2 (Hermitian symmetry of the FFT of a real sequence).
    """
    dim = dim % x.dim()
    N = x.shape[dim]
    order, _, fwd, _, _, half = _dct_tables(N, x.dtype, x.device)
    z = torch.fft.rfft(_take(x, dim, order), dim=dim) * _view_dim(fwd, dim, x.dim())
    upper = (-z.imag).narrow(dim, 1, (N - 1) // 2).flip(dim)            # k = N/2+1 .. N-1
    return torch.cat([z.real, upper], dim=dim)


def idct_ortho(X, dim=-1):
    """Inverse of dct_ortho (orthonormal DCT-III) along `dim` by one inverse real FFT.

    With Y the unnormalised DCT-II / 2: V_k = exp(i pi k/2N) (Y_k - i Y_{N-k}) (Y_N = 0), v = irfft(V),
    then undo the even/odd reordering.
    """
    dim = dim % X.dim()
    N = X.shape[dim]
    _, inverse, _, inv, rev, half = _dct_tables(N, X.dtype, X.device)
    low = X.narrow(dim, 0, half)
    high = _take(X, dim, rev) * _view_dim((rev > 0).to(X.dtype), dim, X.dim())    # X_{N-k}, 0 at k = 0
    inv_scaled = _view_dim(inv, dim, X.dim())
    # Y_{N-k} / 2 carries the scale of index N-k, which equals the scale of k for 0 < k < N
    V = inv_scaled * torch.complex(low, -high)
    return _take(torch.fft.irfft(V, n=N, dim=dim), dim, inverse)


def dct2(x):
    """Orthonormal 2-D DCT-II over the last two dims."""
    return dct_ortho(dct_ortho(x, -1), -2)


def idct2(x):
    """Inverse of dct2."""
    return idct_ortho(idct_ortho(x, -2), -1)


def dct_cut_solve(c_s, c_t, c_p, c_e, gamma, h, edges="full"):
    """Exact solve of the s-t cut QP (eq. 2 in the official form, see STCutQP) by a node-sized system.

    c_s, c_t [N]: costs on p_s, p_t;  c_p [N,H,W]: costs on the pixel potentials;  c_e [N,6,H,W]: costs
    on the edge variables d (channels as STCutQP; grid edges not in the edge set `edges`, "full" or
    "official", are ignored and their d is 0); slack costs are 0.
    h: right-hand side of the hard row p_s - p_t = h. Returns (p_s [N], p_t [N], p [N,H,W], d [N,6,H,W]).
    Pure torch: differentiable by autograd as well (STCutQP uses the self-adjoint backward instead).

    Derivation: KKT of min c^T x + (gamma/2)|x|^2 s.t. Ax = b: gamma x + c + A^T lam = 0.
    Each edge row e = (u -> v) owns d_e (+1) and slack_e (-1); with N_e p = p_v - p_u its row reads
    d_e - slack_e + N_e p = 0, so d_e = -(c_e + lam_e)/gamma, slack_e = lam_e/gamma and
        lam_e = (gamma N_e p - c_e) / 2,        d_e = -(c_e + gamma N_e p) / (2 gamma).
    The node potentials then solve, with n_e = N_e^T, n_h = e_s - e_t and nu the hard row's multiplier,
        C p + nu n_h = r,   n_h^T p = h,   C = I + (1/2) sum_e n_e n_e^T,   r = (1/(2gamma)) sum_e c_e n_e - c_nodes/gamma.
    Blocks of C on the grid: pixels 2I + L4 (L4 the 4-neighbour Laplacian with Neumann boundary: every
    neighbour pair has two directed edges, each adding 1/2; the s- and t-edge add 1/2 each on the diagonal),
    C_ps = C_pt = -1/2, C_ss = C_tt = 1 + P/2, C_st = 0. With M = 2I + L4 and M^{-1} 1 = 1/2:
        p_pix = M^{-1} r_pix + sigma/4,    sigma = p_s + p_t = (r_s + r_t + sum(r_pix)/2) / (1 + P/4),
        p_s = (sigma + h)/2,  p_t = (sigma - h)/2   (the 3x3 Schur complement in p_s, p_t, nu, solved by hand),
    and M^{-1} = IDCT2 diag(1 / (2 + lam_j + lam_k)) DCT2 with lam_j = 2 - 2cos(pi j/H), lam_k = 2 - 2cos(pi k/W)
    (the orthonormal 2-D DCT-II diagonalises the Neumann Laplacian). Cost: one DCT2 + one IDCT2 + O(P).

    edges="official" (grid edges only out of interior pixels): the neighbour pair (u, v) keeps weight
    ([u interior] + [v interior]) / 2 in L4, so C_pp = M - B D B^T with B the incidence of the m ~ 4(H+W)
    pairs that touch the outer ring and D their weight reductions (1/2 or 1). Woodbury, still exact:
        C_pp^{-1} r = M^{-1} (r + B z),  z = K^{-1} B^T M^{-1} r,  K = D^{-1} - B^T M^{-1} B (m x m, SPD;
    its inverse cached by _ring_tables). The reduced weights keep C_pp 1 = 2, so C_pp^{-1} 1 = 1/2 and the
    Schur complement above is unchanged; absent edges carry no cost in r. B touches only the two outermost
    rows and columns on each side, so M^{-1} r is read there and B z is transformed from there by thin
    DCT-basis matmuls: extra cost O(P) (_ring_correction).
    """
    check_edges(edges)
    N, _, H, W = c_e.shape
    P, k2 = H * W, 1.0 / (2.0 * gamma)
    official = edges == "official"
    if official:                                                         # absent grid edges: no cost
        c_e = c_e * _official_cost_mask(H, W, c_e.dtype, c_e.device)
    cs, ct, c_dn, c_rt, c_up, c_lt = c_e.unbind(1)
    # node right-hand side r = (1/2gamma) sum_e c_e (e_head - e_tail) - c_nodes/gamma; grid edges by slices
    # (in place on fresh tensors, to keep the memory traffic low; autograd still works through it)
    r_p = cs - ct                                                        # s -> v enters, v -> t leaves
    r_p[:, 1:, :] += c_dn[:, :-1, :]                                     # down edge (i-1,j) -> (i,j)
    r_p[:, :-1, :] -= c_dn[:, :-1, :]
    r_p[:, :, 1:] += c_rt[:, :, :-1]                                     # right edge (i,j-1) -> (i,j)
    r_p[:, :, :-1] -= c_rt[:, :, :-1]
    r_p[:, :-1, :] += c_up[:, 1:, :]                                     # up edge (i+1,j) -> (i,j)
    r_p[:, 1:, :] -= c_up[:, 1:, :]
    r_p[:, :, :-1] += c_lt[:, :, 1:]                                     # left edge (i,j+1) -> (i,j)
    r_p[:, :, 1:] -= c_lt[:, :, 1:]
    r_p = r_p * k2 - c_p / gamma
    r_s = -k2 * cs.sum((1, 2)) - c_s / gamma
    r_t = k2 * ct.sum((1, 2)) - c_t / gamma
    # Schur complement in (p_s, p_t, nu)
    sigma = (r_s + r_t + 0.5 * r_p.sum((1, 2))) / (1.0 + P / 4.0)
    p_s, p_t = (sigma + h) / 2, (sigma - h) / 2
    # pixel block (2I + L4)^{-1} by the 2-D DCT
    eig = _dct_eigenvalues(H, W, c_e.dtype, c_e.device)
    Y = dct2(r_p) / eig
    if official:                                                         # Woodbury correction on the rings
        Y = Y + _ring_correction(Y, eig, *_official_woodbury(H, W, c_e.dtype, c_e.device))
    p = idct2(Y) + sigma[:, None, None] / 4
    # edge variables d_e = -c_e/(2 gamma) - (p_head - p_tail)/2
    d = c_e * -k2
    d[:, 0] -= (p - p_s[:, None, None]) / 2
    d[:, 1] -= (p_t[:, None, None] - p) / 2
    dv, dh = (p[:, 1:, :] - p[:, :-1, :]) / 2, (p[:, :, 1:] - p[:, :, :-1]) / 2
    d[:, 2, :-1, :] -= dv
    d[:, 3, :, :-1] -= dh
    d[:, 4, 1:, :] += dv
    d[:, 5, :, 1:] += dh
    d[:, 2, -1, :] = 0                                                   # edges leaving the image
    d[:, 3, :, -1] = 0
    d[:, 4, 0, :] = 0
    d[:, 5, :, 0] = 0
    if official:                                                         # no grid edges out of the outer ring
        d[:, 2:, 0] = 0
        d[:, 2:, -1] = 0
        d[:, 2:, :, 0] = 0
        d[:, 2:, :, -1] = 0
    return p_s, p_t, p, d


@functools.lru_cache(maxsize=32)
def _dct_eigenvalues(H, W, dtype, device):
    """Eigenvalues 2 + lam_j + lam_k of 2I + L4 in the 2-D DCT basis, [H,W]."""
    j = torch.arange(H, dtype=torch.float64)
    k = torch.arange(W, dtype=torch.float64)
    eig = 2 + (2 - 2 * torch.cos(math.pi * j / H))[:, None] + (2 - 2 * torch.cos(math.pi * k / W))[None, :]
    return eig.to(device, dtype)


@functools.lru_cache(maxsize=32)
def _official_cost_mask(H, W, dtype, device):
    """[6,H,W]: 1 on the s- and t-edges and on the grid edges of the official edge set, 0 elsewhere."""
    mask = np.concatenate([np.ones((2, H, W), dtype=bool), grid_edge_mask(H, W, "official")])
    return torch.as_tensor(mask).to(device, dtype)


@functools.lru_cache(maxsize=8)
def _ring_tables(H, W):
    """The Woodbury terms of the official edge set (dct_cut_solve), float64 on the CPU, cached.

    The m neighbour pairs (u, v) whose weight is below 1 (they touch the outer ring) have both ends on
    the rows a = {0, 1, H-2, H-1} or the columns b = {0, 1, W-2, W-1}. Ring coordinates: those pixels as
    [rows a (all columns), then columns b of every row (rows a unused)]. Returns iu, iv int64 [m] (the
    pairs' ends in ring coordinates), K^{-1} [m,m] with K = D^{-1} - B^T M^{-1} B, and the DCT-II basis
    columns phi_a = Phi_H[:, a] [H,|a|], phi_b = Phi_W[:, b] [W,|b|] (dct_ortho(x) = Phi x).
    """
    pix = np.arange(H * W).reshape(H, W)
    interior = np.zeros((H, W))
    interior[1:-1, 1:-1] = 1
    u = np.r_[pix[:-1, :].ravel(), pix[:, :-1].ravel()]                  # vertical, then horizontal pairs
    v = np.r_[pix[1:, :].ravel(), pix[:, 1:].ravel()]
    reduction = 1 - (interior.ravel()[u] + interior.ravel()[v]) / 2       # 1 - weight of the pair
    keep = reduction > 0
    u, v, reduction = torch.as_tensor(u[keep]), torch.as_tensor(v[keep]), torch.as_tensor(reduction[keep])
    a = sorted({0, 1, H - 2, H - 1} & set(range(H)))
    b = sorted({0, 1, W - 2, W - 1} & set(range(W)))
    pos = torch.full((H, W), -1, dtype=torch.int64)                      # pixel -> ring coordinate
    pos[a] = torch.arange(len(a) * W).reshape(len(a), W)
    others = torch.tensor([i for i in range(H) if i not in a], dtype=torch.int64)
    pos[others[:, None], torch.tensor(b)] = len(a) * W + torch.arange(H * len(b)).reshape(H, len(b))[others]
    iu, iv = pos.reshape(-1)[u], pos.reshape(-1)[v]
    assert (iu >= 0).all() and (iv >= 0).all()
    phi_a = dct_ortho(torch.eye(H, dtype=torch.float64), 0)[:, a]
    phi_b = dct_ortho(torch.eye(W, dtype=torch.float64), 0)[:, b]
    eig = _dct_eigenvalues(H, W, torch.float64, torch.device("cpu"))
    m, n_ring = len(iu), len(a) * W + H * len(b)
    BtMB = torch.empty(m, m, dtype=torch.float64)
    for i in range(0, m, 32):                                            # B^T M^{-1} B, 32 columns at a time
        j = torch.arange(i, min(i + 32, m))
        x = torch.zeros(len(j), n_ring, dtype=torch.float64)             # columns of B in ring coordinates
        x[torch.arange(len(j)), iu[j]] = 1.0
        x[torch.arange(len(j)), iv[j]] = -1.0
        y = _ring_idct(_ring_dct(x, H, W, phi_a, phi_b) / eig, phi_a, phi_b)
        BtMB[j] = y[:, iu] - y[:, iv]
    K = torch.diag(1 / reduction) - (BtMB + BtMB.T) / 2
    return iu, iv, torch.cholesky_inverse(torch.linalg.cholesky(K)), phi_a, phi_b


@functools.lru_cache(maxsize=32)
def _official_woodbury(H, W, dtype, device):
    """_ring_tables(H, W) on `device` in `dtype` (cached)."""
    iu, iv, K_inv, phi_a, phi_b = _ring_tables(H, W)
    return iu.to(device), iv.to(device), K_inv.to(device, dtype), phi_a.to(device, dtype), phi_b.to(device, dtype)


def _ring_idct(X, phi_a, phi_b):
    """idct2(X) [N,H,W] on the ring coordinates only (see _ring_tables) -> [N, n_ring]:
    rows a = idct_W(phi_a^T X), columns b = idct_H(X phi_b); two thin matmuls, O(4 P (|a| + |b|)) per item."""
    N = X.shape[0]
    return torch.cat([idct_ortho(phi_a.T @ X, -1).reshape(N, -1), idct_ortho(X @ phi_b, -2).reshape(N, -1)], dim=1)


def _ring_dct(x, H, W, phi_a, phi_b):
    """dct2 [N,H,W] of the image that is x [N, n_ring] on the ring coordinates and 0 elsewhere (its
    column block must be 0 on the rows a): phi_a dct_W(rows) + dct_H(columns) phi_b^T."""
    N, na, nb = x.shape[0], phi_a.shape[1], phi_b.shape[1]
    rows, cols = x[:, :na * W].reshape(N, na, W), x[:, na * W:].reshape(N, H, nb)
    return phi_a @ dct_ortho(rows, -1) + dct_ortho(cols, -2) @ phi_b.T


def _ring_correction(Y, eig, iu, iv, K_inv, phi_a, phi_b):
    """The Woodbury term of dct_cut_solve's official edge set in the DCT domain: dct2(B z) / eig with
    z = K^{-1} B^T M^{-1} r, Y = dct2(r) / eig (so M^{-1} r = idct2(Y)); B touches ring coordinates only."""
    y = _ring_idct(Y, phi_a, phi_b)                                      # M^{-1} r on the ring coordinates
    z = (y[:, iu] - y[:, iv]) @ K_inv                                    # K^{-1} B^T M^{-1} r (K symmetric)
    x = y.new_zeros(y.shape).index_add(1, iu, z).index_add(1, iv, -z)   # B z
    return _ring_dct(x, *Y.shape[1:], phi_a, phi_b) / eig

# --- "sparse": the paper's method (Sec. 3.1, App. B) ------------------------------------------------

_SPARSE_FACTORS = {}   # (H, W, edges) -> SuperLU of AA^T (CPU, float64); (H, W, edges, dtype, device) -> CuPy


def sparse_factor(height, width, edges="full"):
    """Factor AA^T once per grid size and edge set (cached): SuperLU, symmetric fill-reducing ordering.

    CHOLMOD (the official `cholesky_AAt(A, ordering_method='nesdis')`) is not a SciPy dependency, so
    this uses SciPy's SuperLU in symmetric mode: minimum-degree ordering of A+A^T applied to rows and
    columns alike and no pivoting (AA^T is symmetric positive definite), i.e. Pr AA^T Pc = L U with
    Pr = Pc^T and U = D L^T. The s and t columns couple every pixel row, so nnz(L) grows as about P^2
    (36M at 64x64, 27 s to factor on 2 CPU cores): see README, Benchmark.
    """
    key = (height, width, edges)
    if key not in _SPARSE_FACTORS:
        st = cut_structure(height, width, edges)
        E = st["E"]
        AAt = st["A_nodes"] @ st["A_nodes"].T + scipy.sparse.diags(np.r_[np.full(E, 2.0), 0.0])  # + d, slack
        _SPARSE_FACTORS[key] = scipy.sparse.linalg.splu(
            AAt.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
    return _SPARSE_FACTORS[key]


def triangular_solve(factors, r, spsolve_triangular):
    """(AA^T)^{-1} r with the factors of Pr AA^T Pc = L U by two sparse triangular solves.

    factors: dict L (CSR, unit lower), U (CSR, upper), inv_perm_r, perm_c (index arrays), all in r's dtype;
    r [m, N] float32 or float64. Returns [m, N] in r's dtype.
    `spsolve_triangular` is scipy's or cupyx's (same signature), so the GPU path is tested on the CPU. CuPy's
    returns float64 for float32 input ("for compatibility with SciPy") and its cuSPARSE SpSM (CUDA 12+) raises
    TypeError('dtype mismatch') when the matrix and the right-hand side differ: each result is cast back.
    """
    dtype = r.dtype
    z = r[factors["inv_perm_r"]]                                       # Pr r
    z = spsolve_triangular(factors["L"], z, lower=True, unit_diagonal=True).astype(dtype, copy=False)
    z = spsolve_triangular(factors["U"], z, lower=False).astype(dtype, copy=False)
    return z[factors["perm_c"]]                                        # Pc z


def triangular_factors(lu, xp=np, sparse_module=scipy.sparse, dtype=np.float64):
    """SuperLU factors as (L, U, permutations) for `triangular_solve`, on the array module `xp`."""
    inv = np.empty_like(lu.perm_r)
    inv[lu.perm_r] = np.arange(len(inv))
    return dict(L=sparse_module.csr_matrix(lu.L.tocsr().astype(dtype)),
                U=sparse_module.csr_matrix(lu.U.tocsr().astype(dtype)),
                inv_perm_r=xp.asarray(inv), perm_c=xp.asarray(lu.perm_c))


CUPY_INSTALL = "pip install cupy-cuda12x (CUDA 12 builds of torch) or cupy-cuda13x (CUDA 13)"


def _import_cupy():
    try:
        import cupy
        import cupyx.scipy.sparse
        import cupyx.scipy.sparse.linalg
    except ImportError as e:
        raise RuntimeError(f"STCutQP(solver='sparse') got a CUDA tensor but CuPy is not installed: {CUPY_INSTALL} "
                           f"(or use solver='dct', or move the input to the CPU)") from e
    return cupy, cupyx


def cupy_backend(device):
    """(cupy, cupyx, stream) for the CuPy branch of sparse_cut_solve on a CUDA `device`, else None (SciPy).

    stream: the raw pointer of torch's current CUDA stream on `device`, on which CuPy then uploads the
    factors and runs the solves (so they order with torch's kernels). Tests replace this function to run
    the CuPy branch's own code on the CPU with a stand-in module that behaves as CuPy does.
    Raises RuntimeError (one line) when the device is CUDA and CuPy is not installed.
    """
    if device.type != "cuda":
        return None
    cupy, cupyx = _import_cupy()
    return cupy, cupyx, torch.cuda.current_stream(device).cuda_stream


def _cupy_cut_solve(backend, st, key, c_nodes, c_d, gamma, h, device):
    """The CuPy half of sparse_cut_solve: x_nodes [P+2, N], x_d [E, N] as torch tensors in c_d's dtype.
    Factors are cast to the input dtype (as the official code) and cached per (H, W, edges, dtype, device)."""
    cupy, cupyx, stream = backend
    E, dtype = st["E"], c_d.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    with cupy.cuda.Device(device.index or 0), cupy.cuda.ExternalStream(stream):   # torch's stream, both
        if key not in _SPARSE_FACTORS:
            fac = triangular_factors(sparse_factor(*key[:3]), cupy, cupyx.scipy.sparse, np_dtype)
            fac["A_nodes"] = cupyx.scipy.sparse.csr_matrix(st["A_nodes"].astype(np_dtype))
            _SPARSE_FACTORS[key] = fac
        fac = _SPARSE_FACTORS[key]
        cn, cd = cupy.from_dlpack(c_nodes.contiguous()), cupy.from_dlpack(c_d.contiguous())
        r = fac["A_nodes"] @ cn                                         # A c
        r[:E] += cd
        r[E] += gamma * h                                               # + gamma b
        y = triangular_solve(fac, r, cupyx.scipy.sparse.linalg.spsolve_triangular)
        x_nodes = -(cn - fac["A_nodes"].T @ y) / gamma
        x_d = -(cd - y[:E]) / gamma
        return torch.from_dlpack(x_nodes).to(dtype), torch.from_dlpack(x_d).to(dtype)


def sparse_cut_solve(c_s, c_t, c_p, c_e, gamma, h, edges="full"):
    """The same QP as dct_cut_solve (same `edges`) by the paper's closed form (eq. 6) with the cached sparse factor:

        x = -(1/gamma) (c - A^T (AA^T)^{-1} (A c + gamma b)),   b = [0, ..., 0, h]
          = -(1/gamma) (c - A^T (AA^T)^{-1} A c) + A^T (AA^T)^{-1} b.
    A c and A^T y use the block structure A = [A_nodes, I, -I] (d and slack columns). CPU tensors: SciPy,
    always in float64 (results cast back to the input dtype). CUDA tensors: CuPy/cuSPARSE triangular
    solves on factors cast to the input dtype (as the official code), zero-copy via DLPack.
    No autograd here: STCutQP wraps it in the self-adjoint Function.
    """
    N, _, H, W = c_e.shape
    st = cut_structure(H, W, edges)
    E, dtype, device = st["E"], c_e.dtype, c_e.device
    idx = torch.as_tensor(st["edge_index"], device=device)
    c_nodes = torch.cat([c_s[:, None], c_t[:, None], c_p.reshape(N, -1)], dim=1).T     # [P+2, N]
    c_d = c_e.reshape(N, -1)[:, idx].T                                                  # [E, N]
    backend = cupy_backend(device)
    if backend is not None:                                             # CUDA: CuPy/cuSPARSE
        x_nodes, x_d = _cupy_cut_solve(backend, st, (H, W, edges, dtype, device), c_nodes, c_d, gamma, h, device)
    else:
        A_nodes = st["A_nodes"]
        cn, cd = c_nodes.detach().double().numpy(), c_d.detach().double().numpy()
        r = A_nodes @ cn                                                # A c
        r[:E] += cd
        r[E] += gamma * h                                               # + gamma b
        y = sparse_factor(H, W, edges).solve(r)                         # (AA^T)^{-1}: two triangular solves
        x_nodes = torch.from_numpy(-(cn - A_nodes.T @ y) / gamma).to(dtype)
        x_d = torch.from_numpy(-(cd - y[:E]) / gamma).to(dtype)
    d = torch.zeros(N, 6 * H * W, dtype=dtype, device=device)
    d[:, idx] = x_d.T
    return x_nodes[0], x_nodes[1], x_nodes[2:].T.reshape(N, H, W), d.reshape(N, 6, H, W)


CPU_CHUNK = 64   # right-hand sides per solve call on CPU (cache-sized; 0 or less is not allowed)


class _SelfAdjointCut(torch.autograd.Function):
    """x = solve(c) for the cut QP with a custom backward (Amos & Kolter 2017; Sec. 3.1):

    the map c -> x is affine, x = K c + x0 with K = -(1/gamma)(I - A^T (AA^T)^{-1} A) symmetric, so
    dL/dc = K g = -(1/gamma)(g - A^T (AA^T)^{-1} A g) = solve(cost=g, h=0): the same solver, nothing saved.
    Supports double backward (the backward is this Function again).
    """

    @staticmethod
    def forward(ctx, solve, gamma, h, c_s, c_t, c_p, c_e):
        ctx.solve, ctx.gamma = solve, gamma
        N, chunk = c_e.shape[0], CPU_CHUNK
        if c_e.device.type != "cpu" or N <= chunk:
            return solve(c_s, c_t, c_p, c_e, gamma, h)
        # CPU: solve CPU_CHUNK right-hand sides at a time into preallocated outputs, so that the FFT
        # intermediates of a chunk stay in cache (faster than one batched solve of all N; see bench.py)
        out = (c_e.new_empty(N), c_e.new_empty(N), c_e.new_empty(c_p.shape), c_e.new_empty(c_e.shape))
        for i in range(0, N, chunk):
            j = slice(i, i + chunk)
            for dst, src in zip(out, solve(c_s[j], c_t[j], c_p[j], c_e[j], gamma, h)):
                dst[j] = src
        return out

    @staticmethod
    def backward(ctx, g_s, g_t, g_p, g_e):
        return (None, None, None) + _SelfAdjointCut.apply(ctx.solve, ctx.gamma, 0.0, g_s, g_t, g_p, g_e)


# --- "dense": plain KKT, for tests ---------------------------------------------------------------------

DENSE_MAX_PIXELS = 1024


def dense_cut_solve(c_s, c_t, c_p, c_e, gamma, h, edges="full"):
    """The same QP (same `edges`) from the KKT system (eq. 5) solved densely with torch.linalg (eq. 6:
    Cholesky of AA^T). Differentiable by plain autograd (an independent check of the custom backward).
    Small grids only.
    """
    N, _, H, W = c_e.shape
    st = cut_structure(H, W, edges)
    E, P, n = st["E"], st["P"], st["A"].shape[1]
    A = torch.as_tensor(st["A"].toarray(), dtype=c_e.dtype, device=c_e.device)
    b = torch.as_tensor(st["b"], dtype=c_e.dtype, device=c_e.device) * (h / SEPARATION)
    idx = torch.as_tensor(st["edge_index"], device=c_e.device)
    c = torch.cat([c_s[:, None], c_t[:, None], c_p.reshape(N, P), c_e.reshape(N, -1)[:, idx],
                   c_e.new_zeros(N, n - P - 2 - E)], dim=1)              # [N, n], slack cost 0
    L = torch.linalg.cholesky(A @ A.T)
    y = torch.cholesky_solve((c @ A.T + gamma * b).T, L)                 # (AA^T)^{-1} (A c + gamma b)
    x = -(c - (A.T @ y).T) / gamma                                      # [N, n]
    d = torch.zeros(N, 6 * P, dtype=c_e.dtype, device=c_e.device).index_copy(1, idx, x[:, P + 2:P + 2 + E])
    return x[:, 0], x[:, 1], x[:, 2:P + 2].reshape(N, H, W), d.reshape(N, 6, H, W)


@dataclass
class CutSolution:
    """Output of STCutQP: potentials p [B,H,W], p_s [B], p_t [B]; edge variables d_s (s -> pixel) [B,H,W],
    d_t (pixel -> t) [B,H,W], d_grid [B,4,H,W] (down, right, up, left; 0 where the edge leaves the image,
    and with edges="official" on every edge out of the outer pixel ring)."""
    p: torch.Tensor
    p_s: torch.Tensor
    p_t: torch.Tensor
    d_s: torch.Tensor
    d_t: torch.Tensor
    d_grid: torch.Tensor


class STCutQP(nn.Module):
    """Regularised equality-constrained QP proxy of the minimum s-t cut LP (eq. 1 -> eq. 2, Sec. 3.1).

    STCutQP(height, width, gamma=0.5, solver="dct"|"sparse"|"dense", edges="full"|"official")
    forward(w [B,6,H,W] float32/float64, any device) -> CutSolution (fields as w's dtype and device).
    w: edge weights (the CNN output; >= 0 in the model, any real value accepted), channels: s-edge into
    the pixel, t-edge out of the pixel, grid edges out of pixel (i,j) to (i+1,j) down, (i,j+1) right,
    (i-1,j) up, (i,j-1) left. Weights of grid edges not in the edge set are ignored (zero gradient, d = 0).

    The QP (this is what all three solvers compute, to round-off):
        minimise  c^T x + (gamma/2) |x|^2     subject to  A x = b
    x = [p_s, p_t, p_v for every pixel, d_uv for every edge, slack_uv for every edge], c = w on the d's and
    0 elsewhere. Edges: s -> v and v -> t for every pixel, and the grid edges of `edges`. Rows:
    d_uv - p_u + p_v - slack_uv = 0 for every edge (d_uv >= p_u - p_v of eq. 1 with the slack of eq. 2), and
    p_s - p_t = 10 with no slack. Eq. (2) of the paper writes gamma (d^2 + s^2 + p^2) and p_s - p_t - s_st = 1;
    we follow the official code (cut/st.py, cut/qp.py): (gamma/2)|x|^2 and a hard separation of 10 (with a
    slack the separation collapses).
    Edge sets: "full" follows the paper's text (Sec. 3.1, "each vertex is connected with 4 neighbouring
    vertices and s and t"): every in-image directed grid edge, so the pixel block is exactly 2I + L4;
    "official" follows the official code (cut/st.py, make_constraints): only the 4 outgoing edges of interior
    pixels (1 <= i <= H-2, 1 <= j <= W-2). The solutions differ on the outer pixel rings only. Use "official"
    to reproduce or compare with the official code or to load its checkpoints faithfully, "full" otherwise.

    Solvers:
      "dct"     exact node-sized solve by the 2-D DCT, O(P log P) per right-hand side, batched, CPU and GPU
                (dct_cut_solve). Backward: the same solve with cost = the incoming gradient and b = 0
                (_SelfAdjointCut); measured 1.3x faster than autograd through the FFTs at 64x64 on CPU.
                "official" adds an exact Woodbury correction on the outer rings (O(P) more).
      "sparse"  the paper's method: AA^T factored once per (H, W, edges) and cached (sparse_factor), per batch two
                sparse triangular solves (SciPy on CPU, CuPy/cuSPARSE on CUDA; CuPy is imported lazily and
                a CUDA input without it raises RuntimeError). Same self-adjoint backward (Amos & Kolter).
      "dense"   dense KKT with torch.linalg, autograd backward; raises ValueError above 1024 pixels.
    Raises ValueError for an unknown solver or edge set or a w of the wrong shape/dtype.
    """

    # Solver names; solver X is the function X_cut_solve, looked up by name only when X is chosen
    # (solve_function), so a copy of STCutQP with only the dct solver's code works without the other two.
    SOLVERS = ("dct", "sparse", "dense")

    @staticmethod
    def solve_function(solver):
        """The function <solver>_cut_solve (dct_cut_solve, sparse_cut_solve or dense_cut_solve)."""
        solve = globals().get(f"{solver}_cut_solve")
        if solve is None:
            raise ValueError(f"STCutQP: solver={solver!r} needs {solver}_cut_solve, which is not defined here")
        return solve

    def __init__(self, height, width, gamma=0.5, solver="dct", edges="full"):
        super().__init__()
        if solver not in self.SOLVERS:
            raise ValueError(f"STCutQP: solver must be one of {', '.join(self.SOLVERS)}, got {solver!r}")
        self.solve_function(solver)                                       # defined: fail here, not in forward
        check_edges(edges)
        if solver == "dense" and height * width > DENSE_MAX_PIXELS:
            raise ValueError(f"STCutQP(solver='dense') is for tests on small grids: {height}x{width} = "
                             f"{height * width} pixels > {DENSE_MAX_PIXELS}; use solver='dct' or 'sparse'")
        if gamma <= 0:
            raise ValueError(f"STCutQP: gamma must be > 0, got {gamma}")
        self.height, self.width, self.gamma, self.solver = height, width, float(gamma), solver
        self.edges = edges

    @torch.compiler.disable                 # --compile: the solver runs eagerly (its own autograd Function)
    def forward(self, w):
        if w.dim() != 4 or tuple(w.shape[1:]) != (6, self.height, self.width):
            raise ValueError(f"STCutQP: expected w of shape [B, 6, {self.height}, {self.width}], got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"STCutQP: w must be float32 or float64, got {w.dtype}")
        zero_n = w.new_zeros(w.shape[0])
        zero_p = w.new_zeros(w.shape[0], self.height, self.width)          # no cost on the potentials
        solve = self.solve_function(self.solver)
        if self.solver == "dense":                                           # plain autograd
            p_s, p_t, p, d = solve(zero_n, zero_n, zero_p, w, self.gamma, SEPARATION, self.edges)
        else:
            solve = functools.partial(solve, edges=self.edges)
            p_s, p_t, p, d = _SelfAdjointCut.apply(solve, self.gamma, SEPARATION, zero_n, zero_n, zero_p, w)
        return CutSolution(p=p, p_s=p_s, p_t=p_t, d_s=d[:, 0], d_t=d[:, 1], d_grid=d[:, 2:])

    def extra_repr(self):
        return f"{self.height}x{self.width}, gamma={self.gamma}, solver={self.solver!r}, edges={self.edges!r}"


# -----------------------------------------------------------------------------
# 2.2 QP layers: the matching QP (Sec. 3.2, eq. 7; App. C)
#
# Bipartite graph between a first set U (k slots of frame 1, index i) and a second set V (k slots of
# frame 2, index j), every pair (i, j) an edge. Eq. (7), variables z = [d, p, s]:
#     d_ij  (k*k, row-major)  edge variables ("how much i is matched to j")
#     p_u   (2k: U then V)    node variables (the unmatched part of node u in the LP (4))
#     s_u   (2k: U then V)    the extra slack of App. C
# rows (2k):  p_u + sum_{v ~ u} d_uv + s_u = 1   for every node u of U and of V.
# Eq. (4)/(7) print the constraint per edge, "p_u + d_uv = 1, {u,v} in E"; read literally it forces
# every d_uv to the same value (no matching at all), so we read it as the standard matching LP:
# the sum runs over the edges at u (p_u >= 0 is then the slack of sum_v d_uv <= 1).
# Objective: c^T z + (gamma/2)||z||^2, i.e. G = gamma I in eq. (3) (the same convention as the cut
# QP and as Wilder et al.'s Q = gamma I); eq. (7) writes gamma * sum(z^2), which is G = 2 gamma I.
# A A^T = [[(k+2) I, 1 1^T], [1 1^T, (k+2) I]] = 2 I + N N^T is positive definite (smallest
# eigenvalue 2: the p and s columns are the identity twice), so a plain dense Cholesky works and
# no row is redundant: no pseudo-inverse needed.

_MATCHING_FACTORS = {}  # (k, dtype, device) -> (A [2k, n], L [2k, 2k], x0 [n]), n = k*k + 4k


def matching_constraints(k):
    """Equality constraints A z = b of eq. (7) for the complete k x k bipartite graph.

    Args:
        k: number of nodes on each side (k >= 1).
    Returns:
        A: float64 `[2k, k*k + 4k]`, columns ordered [d (row-major d_ij), p (U, V), s (U, V)];
        b: float64 `[2k]`, all ones.
    """
    if k < 1:
        raise ValueError(f"matching needs k >= 1 nodes per side, got {k}")
    n_d = k * k
    A = torch.zeros(2 * k, n_d + 4 * k, dtype=torch.float64)
    for i in range(k):
        A[i, i * k:(i + 1) * k] = 1.0        # node i of U: sum_j d_ij
        A[k + i, i:n_d:k] = 1.0              # node j = i of V: sum_i d_ij
    A[:, n_d:n_d + 2 * k] = torch.eye(2 * k, dtype=torch.float64)   # + p_u
    A[:, n_d + 2 * k:] = torch.eye(2 * k, dtype=torch.float64)      # + s_u (App. C extra slack)
    return A, torch.ones(2 * k, dtype=torch.float64)


def _matching_factor(k, dtype, device):
    """Cached (A, L, x0) with L L^T = A A^T (dense Cholesky, eq. 6) and x0 = A^T (AA^T)^-1 b.

    Factored once in float64 on the CPU, then cast to `dtype` and moved to `device`.
    """
    key = (k, dtype, str(device))
    if key not in _MATCHING_FACTORS:
        with torch.inference_mode(False):      # cache normal tensors even if first called in inference mode
            _MATCHING_FACTORS[key] = _build_matching_factor(k, dtype, device)
    return _MATCHING_FACTORS[key]


def _build_matching_factor(k, dtype, device):
    with torch.no_grad():
        A, b = matching_constraints(k)
        L = torch.linalg.cholesky(A @ A.T)                                   # AA^T = L L^T (Sec. 3.1)
        x0 = A.T @ torch.cholesky_solve(b[:, None], L)[:, 0]                 # E b of eq. (6)
        return tuple(t.to(device=device, dtype=dtype) for t in (A, L, x0))


def _range_projection(v, A, L):
    """A^T (AA^T)^-1 A v for a batch of vectors v `[B, n]` -> `[B, n]` (two triangular solves)."""
    lam = torch.cholesky_solve((v @ A.T).T, L)       # (AA^T)^-1 A v, [2k, B]
    return (A.T @ lam).T


class _MatchingQPFunction(torch.autograd.Function):
    """z(c) = -(1/gamma)(c - A^T (AA^T)^-1 A c) + A^T (AA^T)^-1 b  (eq. 5-6 with G = gamma I).

    Backward (Amos & Kolter; Sec. 3.1 "grad_c l = -C grad_z l"):
        dc = -(1/gamma)(g - A^T (AA^T)^-1 A g), reusing the Cholesky factor.
    """

    @staticmethod
    def forward(ctx, c, A, L, x0, gamma):
        ctx.save_for_backward(A, L)
        ctx.gamma = gamma
        return -(c - _range_projection(c, A, L)) / gamma + x0

    @staticmethod
    def backward(ctx, g):
        A, L = ctx.saved_tensors
        dc = -(g - _range_projection(g, A, L)) / ctx.gamma
        return dc, None, None, None, None


@dataclass
class MatchingSolution:
    """Solution of eq. (7) for a batch: d `[B, k, k]`, p `[B, 2k]`, s `[B, 2k]` (U nodes first, then V)."""
    d: torch.Tensor
    p: torch.Tensor
    s: torch.Tensor


class MatchingQP(nn.Module):
    """Differentiable soft matching of two sets of k slots (Sec. 3.2, App. C eq. (7), Alg. 3 lines 3-4).

    Solves, for every cost matrix in the batch, the regularised equality-constrained QP
        min_z  sum_ij c_ij d_ij + (gamma/2) (||d||^2 + ||p||^2 + ||s||^2)
        s.t.   p_i + sum_j d_ij + s_i = 1   (each slot i of the first set)
               p_j + sum_i d_ij + s_j = 1   (each slot j of the second set)
    exactly with the closed form of eq. (6) and a dense Cholesky factor of A A^T cached per
    (k, dtype, device); the backward pass is the same linear map (custom autograd). The edge
    variables are then normalised over the second set with softmax(d / temperature, dim=-1)
    (App. C; Alg. 3 line 4). Rows of the output sum to 1; several rows may still pick the same
    column (App. C: "this does not give a perfect matching").

    Args:
        k: slots per set.
        gamma: regulariser (G = gamma I). The paper sets gamma = 0.5 for its QPs (Sec. 6.1) and
            gamma = 0.1 for the Cora matching (Sec. 6.2).
        temperature: softmax temperature of Alg. 3 line 4. The paper gives no value for the matching;
            we use its fixed slot-softmax temperature 0.1 (Sec. 6.1).
    Forward:
        cost `[..., k, k]` float32/float64 on any device (c_ij, e.g. -<s_i, t_j>, Alg. 3 line 2)
        -> soft matching M `[..., k, k]`, same dtype/device, rows sum to 1.
    Raises:
        ValueError if the last two dimensions are not (k, k).
    """

    def __init__(self, k, gamma=0.5, temperature=0.1):
        super().__init__()
        if gamma <= 0 or temperature <= 0:
            raise ValueError(f"gamma and temperature must be > 0, got {gamma}, {temperature}")
        self.k, self.gamma, self.temperature = k, float(gamma), float(temperature)

    @torch.compiler.disable                 # --compile: the solver runs eagerly (its own autograd Function)
    def solve(self, cost):
        """QP of eq. (7) without the softmax: cost `[..., k, k]` -> MatchingSolution with
        d `[..., k, k]`, p and s `[..., 2k]` (p, s of the first set's nodes, then the second's)."""
        k = self.k
        if cost.dim() < 2 or tuple(cost.shape[-2:]) != (k, k):
            raise ValueError(f"MatchingQP(k={k}) expects costs [..., {k}, {k}], got {tuple(cost.shape)}")
        lead = cost.shape[:-2]
        A, L, x0 = _matching_factor(k, cost.dtype, cost.device)
        c = cost.reshape(-1, k * k)
        c = torch.cat([c, c.new_zeros(c.shape[0], 4 * k)], dim=1)   # cost only on the edges d (eq. 7)
        z = _MatchingQPFunction.apply(c, A, L, x0, self.gamma)
        return MatchingSolution(d=z[:, :k * k].reshape(*lead, k, k),
                                p=z[:, k * k:k * k + 2 * k].reshape(*lead, 2 * k),
                                s=z[:, k * k + 2 * k:].reshape(*lead, 2 * k))

    def forward(self, cost):
        return torch.softmax(self.solve(cost).d / self.temperature, dim=-1)   # App. C; Alg. 3 line 4


def lp_matching(cost):
    """Exact LP of eq. (4) with scipy linprog (HiGHS): the evaluation of Sec. 6.2.

        min  sum_ij c_ij d_ij   s.t.  p_i + sum_j d_ij = 1,  p_j + sum_i d_ij = 1,  d >= 0, p >= 0
    (p_u >= 0 is the slack of "node u matched at most once"; without it the LP is unbounded.)
    Bipartite matching LPs are integral, so d is a 0/1 matching (up to solver tolerance).

    Args:
        cost: `[k, k]` array-like (numpy or tensor), finite.
    Returns:
        float64 numpy `[k, k]` optimal d.
    Raises:
        ValueError for a non-square cost; RuntimeError when linprog fails.
    """
    c = np.asarray(torch.as_tensor(cost).detach().cpu().double().numpy())
    k = c.shape[0]
    if c.shape != (k, k):
        raise ValueError(f"lp_matching expects a square cost matrix, got {c.shape}")
    A = matching_constraints(k)[0].numpy()[:, :k * k + 2 * k]           # eq. (4): [d, p], no extra slack
    obj = np.concatenate([c.reshape(-1), np.zeros(2 * k)])
    res = linprog(obj, A_eq=A, b_eq=np.ones(2 * k), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"linprog failed on the matching LP (eq. 4): {res.message}")
    return res.x[:k * k].reshape(k, k)


# -----------------------------------------------------------------------------
# 3.1 Model: k-partition with a background cut (Sec. 4, Sec. 6.1; Alg. 1, Alg. 2)


def build_grid(height, width):
    """Position grid [1,H,W,4] with channels [y, x, 1-y, 1-x], each in [0,1] (linspace per axis)."""
    ys = torch.linspace(0.0, 1.0, height)
    xs = torch.linspace(0.0, 1.0, width)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([y, x], dim=-1)
    return torch.cat([grid, 1.0 - grid], dim=-1).unsqueeze(0)


class SoftPositionEmbed(nn.Module):
    """Adds Linear(4 -> C) of the [y, x, 1-y, 1-x] grid to channels-first features [B,C,H,W]."""

    def __init__(self, channels, height, width):
        super().__init__()
        self.dense = nn.Linear(4, channels)
        self.register_buffer("grid", build_grid(height, width), persistent=False)

    def forward(self, x):
        return x + self.dense(self.grid).permute(0, 3, 1, 2)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv + BN, identity or 1x1 projection shortcut)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def feature_side(cfg):
    """The side of the encoder's feature map, the QP grid: image_size / enc_stride (Sec. 6.1: 64 at 128 px).
    Raises ValueError (naming both flags) when enc_stride does not divide image_size."""
    if cfg.image_size % cfg.enc_stride:
        raise ValueError(f"--image_size={cfg.image_size} must be divisible by --enc_stride={cfg.enc_stride}")
    return cfg.image_size // cfg.enc_stride


class Encoder(nn.Module):
    """Image encoder (Sec. 6.1): images [B,3,H,W] in [-1,1] -> features [B,C,H/s,W/s], s = enc_stride.

    cnn:    4 conv 5x5 + ReLU with C maps, the first with stride s (CLEVR; Slot Attention's CNN).
    resnet: conv 5x5 stride s (3 -> 64) + BN + ReLU, then 4 BasicBlocks with C maps (ClevrTex; official).
    Raises ValueError for another encoder name.
    """

    def __init__(self, cfg):
        super().__init__()
        C, s = cfg.enc_channels, cfg.enc_stride
        if cfg.encoder == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(3, C, 5, stride=s, padding=2), nn.ReLU(),
                *[m for _ in range(3) for m in (nn.Conv2d(C, C, 5, padding=2), nn.ReLU())])
        elif cfg.encoder == "resnet":
            self.net = nn.Sequential(
                nn.Conv2d(3, 64, 5, stride=s, padding=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                BasicBlock(64, C), BasicBlock(C, C), BasicBlock(C, C), BasicBlock(C, C))
        else:
            raise ValueError(f"--encoder must be cnn|resnet, got {cfg.encoder!r}")

    def forward(self, images):
        return self.net(images)


def full_precision(t):
    """t in float32 unless it is float32 or float64 already (--dtype=bfloat16: the QP layers solve in float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class KPartition(nn.Module):
    """k-partition with a background partition (Alg. 1, Alg. 2, Sec. 4 "Background slot").

    forward(features [B,C,h,w]) -> dict
        slots      [B,K,D] slot vectors
        cut_masks  [B,K,h,w] partition masks (softmax over K: sum to 1 per pixel); slot 0 = background
        fg         [B,h,w] foreground mask sigmoid(d_s - d_t) of the foreground cut, in (0,1)
        cuts       CutSolution of the K QPs per image (batch B*K: K-1 object cuts, then the fg cut)
    """

    def __init__(self, cfg, height, width):
        super().__init__()
        C, K, D = cfg.enc_channels, cfg.num_slots, cfg.slot_dim
        if K < 2:
            raise ValueError(f"--num_slots must be >= 2 (background + objects), got {K}")
        self.K, self.obj_temp, self.mask_temp = K, cfg.obj_temp, cfg.mask_temp
        self.pos = SoftPositionEmbed(C, height, width)                     # Alg. 2 line 1

        act = WEIGHT_ACTS[cfg.weight_act]                                 # ReLU as the official code

        def weight_net(cuts):                                              # Alg. 1 line 1: y_i = f_y(x), >= 0
            return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.LeakyReLU(),
                                 nn.Conv2d(C, 6 * cuts, 3, padding=1), act())
        self.weights_obj = weight_net(K - 1)                               # k-1 object cuts
        self.weights_fg = weight_net(1)                                    # 1 foreground cut
        self.qp = STCutQP(height, width, cfg.gamma, cfg.qp_solver, cfg.edges)
        self.norm = nn.LayerNorm(C)                                        # official norm_inputs
        # Three slot branches (official SlotCut): input MLPs f_x (Alg. 1 line 2; official k_net2, k_net2_2,
        # k_net2_3, each Linear(C, 2 mlp_dim)-ReLU-Linear(2 mlp_dim, D)) and output MLPs f (Alg. 2 line 4;
        # official mlp, mlp2, mlp3, each Linear(D, mlp_dim)-ReLU-Linear(mlp_dim, D)).
        self.mlp_in = nn.ModuleList(
            nn.Sequential(nn.Linear(C, 2 * cfg.mlp_dim), nn.ReLU(), nn.Linear(2 * cfg.mlp_dim, D)) for _ in range(3))
        self.mlp_out = nn.ModuleList(
            nn.Sequential(nn.Linear(D, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, D)) for _ in range(3))

    def pool_slots(self, x, masks):
        """Slots from position-embedded features x [B,C,h,w] and partition masks [B,K,h,w] -> [B,K,D].

        Official SlotCut: f_j = mlp_in[j](LayerNorm(x)), s_j = mean over pixels of masks * f_j (Alg. 1 line 5,
        Alg. 2 line 3; all three branches use the same K masks), slots = s1 + mlp(s1) + mlp2(s2) + mlp3(s3)
        (Alg. 2 line 4). The mean is over all h*w pixels (Sec. 4: "average ... across the spatial dimensions"),
        not over each mask's area as Slot Attention's weighted mean."""
        h, w = x.shape[-2:]
        xn = self.norm(x.permute(0, 2, 3, 1))                              # [B,h,w,C]
        s = [torch.einsum("bkhw,bhwd->bkd", masks, f_x(xn)) / (h * w) for f_x in self.mlp_in]
        return s[0] + sum(f(s_j) for f, s_j in zip(self.mlp_out, s))     # s1 + mlp(s1) + mlp2(s2) + mlp3(s3)

    def forward(self, feats):
        B, C, h, w = feats.shape
        K = self.K
        x = self.pos(feats)                                                # Alg. 2 line 1
        w_obj = self.weights_obj(x).reshape(B, K - 1, 6, h, w)            # Alg. 1 line 1
        w_fg = self.weights_fg(x).reshape(B, 1, 6, h, w)
        with torch.autocast(x.device.type, enabled=False):              # --dtype=bfloat16: the QP stays float32
            cuts = self.qp(full_precision(torch.cat([w_obj, w_fg], dim=1).reshape(B * K, 6, h, w)))   # Alg. 1 l. 3
        p = cuts.p.reshape(B, K, h, w)
        objects = (p[:, :K - 1] / self.obj_temp).softmax(dim=1)           # Alg. 1 line 4, temperature 0.5
        fg = torch.sigmoid(cuts.d_s - cuts.d_t).reshape(B, K, h, w)[:, K - 1]   # foreground cut (official)
        masks = torch.cat([1 - fg[:, None], fg[:, None] * objects], dim=1)      # Sec. 4: background slot
        masks = (masks / self.mask_temp).softmax(dim=1)                   # Sec. 6.1: temperature 0.1
        slots = self.pool_slots(x, masks)                                 # Alg. 1 lines 2, 5; Alg. 2 lines 3-4
        return dict(slots=slots, cut_masks=masks, fg=fg, cuts=cuts)


class Decoder(nn.Module):
    """Spatial broadcast decoder (Sec. 6.1; official): slots [B,K,D] -> rgb [B,K,3,H,W] in [-1,1] (tanh),
    alpha logits [B,K,1,H,W]. Broadcast to dec_init_size^2 + position embedding, one ConvT 5x5 + LeakyReLU
    per dec_strides entry (the stride-1 ones included: official slot_cut/model.py is 2,2,2,2,1,1), then
    ConvT 3x3 -> 4 channels. Raises ValueError when dec_init_size * prod(dec_strides) != image_size."""

    def __init__(self, cfg):
        super().__init__()
        s0, C = cfg.dec_init_size, cfg.dec_channels
        if s0 * math.prod(cfg.dec_strides) != cfg.image_size:
            raise ValueError(f"decoder output {s0}*prod({cfg.dec_strides}) != image_size {cfg.image_size}: "
                             f"set --dec_strides or --dec_init_size")
        self.init_size = s0
        self.pos = SoftPositionEmbed(cfg.slot_dim, s0, s0)
        layers, cin = [], cfg.slot_dim
        for s in cfg.dec_strides:
            layers += [nn.ConvTranspose2d(cin, C, 5, stride=s, padding=2, output_padding=s - 1), nn.LeakyReLU()]
            cin = C
        layers.append(nn.ConvTranspose2d(cin, 4, 3, padding=1))            # RGB + alpha logit
        self.net = nn.Sequential(*layers)

    def forward(self, slots):
        B, K, D = slots.shape
        s0 = self.init_size
        x = self.pos(slots.reshape(B * K, D, 1, 1).expand(B * K, D, s0, s0))   # spatial broadcast
        x = self.net(x)
        x = x.reshape(B, K, 4, *x.shape[-2:])
        return torch.tanh(x[:, :, :3]), x[:, :, 3:]


class MinCutOCL(nn.Module):
    """Object discovery with min-cut k-partition (Sec. 6.1): encoder -> KPartition -> decoder.

    forward(images [B,3,H,W] float in [0,1]) -> dict
        loss       scalar, MSE between reconstruction and input, both in [-1,1] (official)
        recon      [B,3,H,W] reconstruction in [0,1]
        masks      [B,K,H,W] decoder alpha masks, softmax over slots (sum to 1 per pixel; used for metrics)
        slots      [B,K,D]
        rgb        [B,K,3,H,W] per-slot RGB in [0,1]
        cut_masks  [B,K,h,w] partition masks at feature resolution (slot 0 = background partition)
        fg         [B,h,w] foreground mask of the foreground cut
        cuts       CutSolution of the B*K cut QPs
    Raises ValueError if the image size differs from cfg.image_size.
    """

    def __init__(self, cfg):
        super().__init__()
        side = feature_side(cfg)                                           # Sec. 6.1: 64x64 QP grid at 128 px
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.partition = KPartition(cfg, side, side)
        self.decoder = Decoder(cfg)

    def forward(self, images):
        H, W = images.shape[-2:]
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        x = images * 2.0 - 1.0                                             # [0,1] -> [-1,1]
        part = self.partition(self.encoder(x))
        rgb, logits = (t.to(x.dtype) for t in self.decoder(part["slots"]))   # compositing and loss in x's dtype
        masks = logits.softmax(dim=1)                                      # alpha mixture over slots
        recon = (masks * rgb).sum(dim=1)
        loss = F.mse_loss(recon, x)
        return dict(loss=loss, recon=(recon + 1) / 2, masks=masks.squeeze(2), slots=part["slots"],
                    rgb=(rgb + 1) / 2, cut_masks=part["cut_masks"], fg=part["fg"], cuts=part["cuts"])


# -----------------------------------------------------------------------------
# 3.2 Moving objects: the two-frame model (Alg. 3; Sec. 4 "Matching and motion"; Sec. 6.3)
#
# Slots S, T of two frames (Alg. 2 via the MinCutOCL partition) -> c_ij = -<s_i, t_j> -> MatchingQP ->
# softmax with temperature -> paired slots r_i = M_i,: T -> MLP on the pair -> one set of slots that
# reconstructs both frames, loss = MSE(frame 1) + MSE(frame 2). The paper does not say how the pair
# (s_i, r_i) becomes one slot nor how one slot decodes two frames: we use MLP([s_i; r_i]) -> D (the new
# slot) and one MLP head per frame before the shared decoder (Sec. 4: "transform the new slots by MLP
# transformations").


def sample_adjacent_pairs(video, generator=None):
    """Sec. 6.3: train on pairs of adjacent frames. video `[B, T, 3, H, W]` (T >= 2) -> (x1, x2), each
    `[B, 3, H, W]`: frames t and t+1 with t drawn uniformly per video (torch `generator` for resume)."""
    B, T = video.shape[:2]
    if T < 2:
        raise ValueError(f"need videos of at least 2 frames, got T={T}")
    t = torch.randint(0, T - 1, (B,), generator=generator).to(video.device)
    idx = torch.arange(B, device=video.device)
    return video[idx, t], video[idx, t + 1]


def slot_costs(s, t):
    """Alg. 3 line 2: c_ij = -<s_i, t_j>. s `[..., K, D]`, t `[..., K, D]` -> `[..., K, K]`."""
    return -torch.einsum("...id,...jd->...ij", s, t)


class MinCutPairModel(nn.Module):
    """Two-frame min-cut model with slot matching (Alg. 3, Sec. 4 "Matching and motion", Sec. 6.3).

    Args:
        base: a MinCutOCL; its encoder, partition (Alg. 1-2) and decoder are reused (attributes
            base.encoder, base.partition, base.decoder, base.cfg.num_slots / slot_dim / mlp_dim / image_size).
        gamma, temperature: MatchingQP regulariser and softmax temperature (Alg. 3 lines 3-4).
    forward(frames1, frames2: `[B, 3, H, W]` float in [0, 1]) -> dict
        loss       scalar: MSE(frame 1) + MSE(frame 2), images in [-1, 1] (Sec. 4: summed loss)
        recon      `[B, 2, 3, H, W]` reconstructions of both frames in [0, 1]
        masks      `[B, 2, K, H, W]` decoder alpha masks per frame (softmax over the K slots)
        rgb        `[B, 2, K, 3, H, W]` per-slot RGB in [0, 1]
        slots      `[B, K, D]` the matched slot set (one per pair); slots1, slots2 `[B, K, D]` S and T
        matching   `[B, K, K]` soft matching M (rows: slots of frame 1, rows sum to 1); paired `[B, K, D]` r_i
        cut_masks  `[B, 2, K, h, w]` partition masks of each frame at feature resolution
    Raises ValueError if the frames differ in shape or from base.cfg.image_size.
    """

    def __init__(self, base, gamma=0.5, temperature=0.1):
        super().__init__()
        cfg = base.cfg
        K, D, hidden = cfg.num_slots, cfg.slot_dim, cfg.mlp_dim
        self.base, self.image_size = base, cfg.image_size
        self.matching = MatchingQP(K, gamma=gamma, temperature=temperature)
        self.pair_mlp = nn.Sequential(nn.Linear(2 * D, hidden), nn.ReLU(), nn.Linear(hidden, D))  # (s_i, r_i) -> slot
        self.frame_heads = nn.ModuleList(
            [nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, D)) for _ in range(2)])

    def frame_slots(self, frames):
        """Alg. 2 for every frame: frames `[N, 3, H, W]` in [0, 1] -> (slots `[N, K, D]`, cut masks `[N, K, h, w]`)."""
        H, W = frames.shape[-2:]
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"expected frames of {self.image_size}x{self.image_size}, got {H}x{W}")
        part = self.base.partition(self.base.encoder(frames * 2.0 - 1.0))
        return part["slots"], part["cut_masks"]

    def forward(self, frames1, frames2):
        if frames1.shape != frames2.shape:
            raise ValueError(f"frame shapes differ: {tuple(frames1.shape)} vs {tuple(frames2.shape)}")
        B = frames1.shape[0]
        slots, cut_masks = self.frame_slots(torch.cat([frames1, frames2]))   # one pass for both frames
        S, T = slots[:B], slots[B:]                                      # Alg. 3 line 1
        with torch.autocast(S.device.type, enabled=False):              # --dtype=bfloat16: the QP stays float32
            S, T = full_precision(S), full_precision(T)
            M = self.matching(slot_costs(S, T))                          # lines 2-4: c_ij = -<s_i, t_j>
        R = M @ T                                                        # line 5: r_i = M_i,: T
        joint = self.pair_mlp(torch.cat([S, R], dim=-1))                 # line 6 pairs -> new slots (Sec. 4)
        per_frame = torch.stack([head(joint) for head in self.frame_heads], dim=1)   # [B, 2, K, D]
        rgb, logits = (t.to(frames1.dtype) for t in self.base.decoder(per_frame.flatten(0, 1)))   # [2B,K,3|1,H,W]
        masks = logits.softmax(dim=1)                                    # alpha mixture over slots
        recon = (masks * rgb).sum(dim=1).unflatten(0, (B, 2))            # [B, 2, 3, H, W] in [-1, 1]
        target = torch.stack([frames1, frames2], dim=1) * 2.0 - 1.0
        loss = F.mse_loss(recon[:, 0], target[:, 0]) + F.mse_loss(recon[:, 1], target[:, 1])  # summed loss
        return dict(loss=loss, recon=(recon + 1) / 2, masks=masks.squeeze(2).unflatten(0, (B, 2)),
                    rgb=((rgb + 1) / 2).unflatten(0, (B, 2)), slots=joint, slots1=S, slots2=T, matching=M,
                    paired=R, cut_masks=torch.stack([cut_masks[:B], cut_masks[B:]], dim=1))

    @torch.no_grad()
    def encode_frames(self, frames):
        """Per-frame slots and masks for evaluate_video_tracking: frames `[T, 3, H, W]` in [0, 1] ->
        (slots `[T, K, D]`, partition masks `[T, K, h, w]`); the video's frames are matched with self.matching."""
        return self.frame_slots(frames)


# -----------------------------------------------------------------------------
# 3.3 The Slot Attention baseline of Tab. 2 (Sec. 6.3): "we train slot attention on individual frames.
# Next, during evaluation, we match sets of slots for consecutive frames using the Hungarian algorithm, using
# inter slot inner product as the similarity score." Slot Attention as in Locatello et al. (2020), Alg. 1,
# with the same encoder and decoder as the min-cut model, so only the grouping module differs.


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al. 2020, Alg. 1): iterative attention with a softmax over slots.

    Args:
        num_slots: K; dim: slot size D; in_dim: input feature size C; iters: iterations (3);
        hidden: slot MLP width; eps: added to the attention before its per-slot normalisation (1e-8).
    forward(inputs `[B, N, C]` float, slots_init `[B, K, D]` or None) -> (slots `[B, K, D]`,
        attn `[B, K, N]` of the last iteration: softmax over the K slots, so it sums to 1 over K at
        every input). Without slots_init the slots are drawn from N(mu, sigma^2) (learned mu, sigma),
        also at test time, so their order is arbitrary per image: videos need slot tracking.
    """

    def __init__(self, num_slots, dim, in_dim, iters=3, hidden=128, eps=1e-8):
        super().__init__()
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, dim)))
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(in_dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(in_dim, dim, bias=False)
        self.to_v = nn.Linear(in_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, inputs, slots_init=None):
        B, N, _ = inputs.shape
        K, D = self.num_slots, self.dim
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)                           # [B, N, D]
        if slots_init is None:
            slots_init = self.mu + self.log_sigma.exp() * torch.randn(B, K, D, device=inputs.device,
                                                                       dtype=inputs.dtype)
        slots = slots_init
        for _ in range(self.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots))
            attn = torch.einsum("bkd,bnd->bkn", q, k).mul(D ** -0.5).softmax(dim=1)   # softmax over slots
            weights = (attn + self.eps) / (attn + self.eps).sum(dim=2, keepdim=True)  # weighted mean
            updates = torch.einsum("bkn,bnd->bkd", weights, v)
            slots = self.gru(updates.reshape(B * K, D), prev.reshape(B * K, D)).reshape(B, K, D)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class SlotAttentionModel(nn.Module):
    """Slot Attention baseline (--model=slot_attention): encoder -> Slot Attention -> spatial broadcast decoder,
    trained with MinCutOCL's loss and schedule on images (task image) or single frames (task video, Tab. 2).

    The encoder and decoder are the min-cut model's (Encoder, Decoder of cfg); the features get the
    position embedding, a LayerNorm and a 2-layer MLP (Locatello et al. 2020) before Slot Attention.
    forward(images `[B, 3, H, W]` float in [0, 1]) -> dict
        loss   scalar MSE between reconstruction and input, both in [-1, 1] (as MinCutOCL)
        recon  `[B, 3, H, W]` in [0, 1];  masks `[B, K, H, W]` decoder alpha masks (softmax over slots)
        slots  `[B, K, D]`;  rgb `[B, K, 3, H, W]` in [0, 1];  attn `[B, K, h, w]` last attention
    Raises ValueError if the image size differs from cfg.image_size.
    """

    def __init__(self, cfg):
        super().__init__()
        C, side = cfg.enc_channels, feature_side(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.pos = SoftPositionEmbed(C, side, side)
        self.mlp = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C))
        self.slot_attention = SlotAttention(cfg.num_slots, cfg.slot_dim, C, cfg.sa_iters, cfg.mlp_dim)
        self.decoder = Decoder(cfg)

    def forward(self, images):
        H, W = images.shape[-2:]
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        x = images * 2.0 - 1.0
        feats = self.pos(self.encoder(x))                                    # [B, C, h, w]
        h, w = feats.shape[-2:]
        slots, attn = self.slot_attention(self.mlp(feats.flatten(2).transpose(1, 2)))
        rgb, logits = (t.to(x.dtype) for t in self.decoder(slots))           # compositing and loss in x's dtype
        masks = logits.softmax(dim=1)                                        # alpha mixture over slots
        recon = (masks * rgb).sum(dim=1)
        return dict(loss=F.mse_loss(recon, x), recon=(recon + 1) / 2, masks=masks.squeeze(2), slots=slots,
                    rgb=(rgb + 1) / 2, attn=attn.reshape(*attn.shape[:2], h, w))


# -----------------------------------------------------------------------------
# 4. Training


def lr_factor(step, cfg):
    """Official schedule: lr x lr_decay ** (step / (decay_fraction * max_steps)), no warmup (App. D)."""
    return cfg.lr_decay ** (step / max(1.0, cfg.decay_fraction * cfg.max_steps))


def load_dataset(cfg, split):
    """data.build_dataset(cfg.dataset, split) at cfg.image_size; exits with the loader's one-line message."""
    options = {"crop": cfg.crop} if cfg.crop else {}                   # movi_a only (Sec. 6.3)
    try:
        return data.build_dataset(cfg.dataset, split, root=cfg.data_dir or None, image_size=cfg.image_size, **options)
    except data.DatasetError as e:
        fail(str(e) + (common.VAL_SPLIT_HINT if split == "val" else ""))   # val: read for --eval_split
    except TypeError as e:                                                # an option the dataset does not have
        fail(f"--dataset={cfg.dataset}: {e}")


def build_model(cfg):
    """MinCutOCL (task image), or the two-frame MinCutPairModel around it (task video, Alg. 3), or the
    Slot Attention baseline with --model=slot_attention (both tasks; on videos the Tab. 2 baseline, Sec. 6.3)."""
    if cfg.model == "slot_attention":
        return SlotAttentionModel(cfg)
    model = MinCutOCL(cfg)
    if cfg.task == "video":                         # matching gamma not given (Sec. 6.3): the cut QP's gamma
        model = MinCutPairModel(model, gamma=cfg.gamma, temperature=cfg.match_temp)
    return model


def batch_loss(model, batch, device, task="image"):
    """Training loss of one loader batch: images `[B, 3, H, W]` (task image) or videos `[B, T, 3, H, W]`,
    of which one pair of adjacent frames per video is drawn from torch's global RNG (task video)."""
    if task == "video":
        x1, x2 = sample_adjacent_pairs(batch["video"])                    # Sec. 6.3: adjacent frames
        if isinstance(getattr(model, "module", model), SlotAttentionModel):   # baseline (DDP: .module): 2B frames
            return model(torch.cat([x1, x2]).to(device, non_blocking=True))["loss"]
        return model(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True))["loss"]
    return model(batch["image"].to(device, non_blocking=True))["loss"]


def train_loader(cfg, ddp, start_step):
    """Endless shuffled loader of global batch cfg.batch_size, resuming at `start_step`; under DDP this
    rank's slice of cfg.batch_size // world_size of every global batch. Pinned memory on CUDA (so the
    non_blocking copies overlap)."""
    ds = load_dataset(cfg, "train")
    sampler = ResumableSampler(len(ds), cfg.batch_size, seed=cfg.seed, start_step=start_step, rank=ddp.rank,
                               world_size=ddp.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // ddp.world_size, sampler=sampler,
                                       num_workers=cfg.num_workers, drop_last=True,
                                       worker_init_fn=common.worker_ignores_stop_signals,
                                       persistent_workers=cfg.num_workers > 0,
                                       pin_memory=ddp.device.type == "cuda")


# The Config fields that shape the model: resume refuses another value; --eval_only / --predict copy them.
# (Not here: qp_solver, the three solvers compute the same QP to round-off; dtype, autocast of training only.)
MODEL_KEYS = ("task", "model", "sa_iters", "image_size", "encoder", "enc_channels", "enc_stride", "num_slots",
              "slot_dim", "mlp_dim", "gamma", "edges", "obj_temp", "mask_temp", "match_temp", "dec_channels",
              "dec_init_size", "dec_strides", "weight_act")

def load_weights(model, path, ckpt=None):
    """The weights of checkpoint file `path` (one of ours) into `model` (resume, --init_from, --eval_only,
    --predict). `ckpt`: the file's dict when it is already read (resume). Exits with one line when the file
    is missing, truncated, or does not fit."""
    state = ckpt if ckpt is not None else load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        fail(f"{path} is not a mincut_ocl.py checkpoint (no 'model' weights); pass a ckpt.pt written by this script")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1 if len(str(e).strip().splitlines()) > 1 else 0].strip()
        fail(f"{path} does not fit this model ({first[:160]}); it was written with other model settings or by "
             f"another script: pass the flags it was trained with, or another checkpoint")


def train(cfg, stop=None):
    """The training loop: resumes from out_dir/ckpt.pt (or starts from --init_from's weights), logs to
    out_dir/metrics.jsonl, saves PNGs. Under torchrun: DDP, each rank a slice of every global batch, only
    rank 0 logs, evaluates and saves. `stop`: common.training_run's StopSignals (SIGTERM / SIGINT save a
    checkpoint after the current step and exit, common.stop_on_signal).
    Task image: MinCutOCL on images (Sec. 6.1); task video: MinCutPairModel on adjacent frames (Alg. 3).
    Every eval_interval steps (and at the last one) a checkpoint and an evaluation of eval_items images
    (videos) of cfg.eval_split (default val), logged as <split>_<metric>. After the last step, rank 0
    evaluates on the test split (common.finish_training: the whole split up to 1024 items, else
    eval_items; --test_items sets it), writes out_dir/eval_<dataset>.json and prints the summary line
    (steps, wall time since this call, test metrics, out_dir); a run resumed after that evaluation prints
    its summary line again."""
    start_time = time.time()
    check_out_dir(cfg.out_dir)
    ddp = ddp_setup(device=cfg.device)
    device = ddp.device
    if cfg.qp_solver == "sparse" and device.type == "cuda":
        try:
            _import_cupy()                                # at start, not at the first step
        except RuntimeError:
            fail(f"--qp_solver=sparse on {device} needs CuPy, which does not import: {CUPY_INSTALL}; "
                 f"or use --qp_solver=dct")
    if cfg.batch_size % ddp.world_size:
        fail(f"--batch_size={cfg.batch_size} (the global batch) must be divisible by the number of processes "
             f"{ddp.world_size}")
    seed_everything(cfg.seed + ddp.rank)
    torch.set_flush_denormal(True)      # denormal floats make CPU steps several times slower
    dtype = resolve_dtype(device, cfg.dtype, announce="the CNNs train" if ddp.is_main else "")
    raw_model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg.lr)      # App. D: Adam, lr 4e-4
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step = 0
    ckpt = load_resume_checkpoint(ckpt_path) if cfg.resume else None     # falls back to ckpt_prev.pt
    resumed_at = ckpt["step"] if ckpt is not None else None
    if ckpt is not None:
        common.check_same_model(ckpt.get("config"), cfg, ckpt_path,
                                MODEL_KEYS[:1] + common.RUN_KEYS + MODEL_KEYS[1:])   # --task first
        load_weights(raw_model, ckpt_path, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if ddp.is_main:
            print(f"resuming from {ckpt_path} at step {step}" + (f" (--init_from={cfg.init_from} is ignored)"
                                                                   if cfg.init_from else ""))
    elif cfg.init_from:
        load_weights(raw_model, cfg.init_from)                       # weights only: fresh optimiser
        if ddp.is_main:
            print(f"starting from the weights of {cfg.init_from}")
    model = torch.compile(raw_model) if cfg.compile else raw_model      # the QPs stay eager (compiler.disable)
    model = nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    data_iter = iter(train_loader(cfg, ddp, step))  # the sampler skips the batches seen
    if ddp.is_main:
        load_dataset(cfg, cfg.eval_split)                 # the periodic evaluations' split: its errors before any step
    if ckpt is not None:
        set_rng_state(ckpt["rng"])                        # after iter(): it draws a seed from torch's RNG
        if ddp.rank:                                      # rank 0's RNG was saved: the others draw their own
            seed_everything(cfg.seed + ddp.rank + 1_000_003 * step)
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl")) if ddp.is_main else None
    if ckpt is not None and log is not None:
        log.truncate(step)                                # lines logged after the checkpoint would repeat

    def save():
        save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                        step=step, rng=get_rng_state(), config=asdict(cfg)))

    def save_and_evaluate():
        rng = get_rng_state()                             # evaluation must not move the training RNG
        save()
        evaluate_fn = evaluate_video if cfg.task == "video" else evaluate
        metrics = evaluate_fn(raw_model, cfg, device, cfg.eval_items,
                              os.path.join(cfg.out_dir, f"samples_{step:07d}.png"), split=cfg.eval_split)
        log.log(step, **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()})
        bar.write(f"step {step} ({cfg.eval_split}): {format_metrics(metrics)}  (saved {ckpt_path})")
        set_rng_state(rng)

    bar = progress(cfg.max_steps, initial=step, desc="train", disable=not ddp.is_main)
    model.train()
    t0 = time.time()
    try:
        while step < cfg.max_steps:
            batch = next(data_iter)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)                # exponential decay (App. D)
            with train_autocast(device, dtype):                            # --dtype (the QPs: float32)
                loss = batch_loss(model, batch, device, cfg.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)  # DDP: of the all-reduced gradients
            loss_value = all_reduce_mean(loss.item(), ddp)                 # the global batch's: same on every rank
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                bar.close()                                                # before check_finite_step's error line
            check_finite_step(step + 1, loss_value, grad_norm, ckpt_path, cfg.lr)   # all ranks stop together
            optimizer.step()
            step += 1
            bar.update()
            if step % cfg.log_interval == 0 and ddp.is_main:
                dt, t0 = time.time() - t0, time.time()
                img_s = cfg.log_interval * cfg.batch_size / dt             # task video: frame pairs / s
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:.0f}")
                log.log(step, loss=loss_value, lr=optimizer.param_groups[0]["lr"], img_per_s=img_s)
            if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and ddp.is_main:
                save_and_evaluate()
            common.stop_on_signal(stop, ddp, step, ckpt_path, save)      # SIGTERM / SIGINT: save, exit
    finally:
        bar.close()                                       # an error line (divergence, data) then has its own line
    if stop is not None:
        stop.restore()                                    # a signal now acts as usual
    del model                                             # DDP's reducer goes while its process group lives
    ddp_cleanup()
    if ddp.is_main and step and step == cfg.max_steps:   # the final evaluation, on the test split
        common.finish_training(cfg, raw_model, device, evaluate_video if cfg.task == "video" else evaluate,
                               format_metrics, load_dataset, script="mincut_ocl.py", step=step, start_time=start_time,
                               checkpoint=ckpt_path, resumed_at=resumed_at,
                               unit="video" if cfg.task == "video" else "image")
    return raw_model


# -----------------------------------------------------------------------------
# 5. Evaluation (Sec. 6.1 image metrics; Sec. 6.3, Tab. 2 video)


@torch.no_grad()
def evaluate(model, cfg, device, num_items=0, image_path=None, split="test"):
    """Metrics on the first `num_items` images (0 = all) of `split` (train | val | test): dict of means (ARI,
    ARI-FG, mIoU, MSC-FG, mBO, MSE).

    Segments = argmax of the decoder alpha masks (as the official evaluation). MSE is the per-image sum
    of squared errors over C,H,W with images in [0,1] (ClevrTex convention, Tab. 1). A diagnostic beside them,
    not a paper metric: ARI-FG and mIoU of the encoder-side masks (min-cut: the k-partition `cut_masks`;
    --model=slot_attention: the last attention map), argmax per feature pixel, each repeated over its
    enc_stride x enc_stride image pixels ("ari_fg_cut", "miou_cut").
    """
    model.eval()
    ds = load_dataset(cfg, split)
    if num_items and num_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(num_items))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 2),
                                         worker_init_fn=common.worker_ignores_stop_signals)
    sums, first = {}, None
    for batch in loader:
        images = batch["image"].to(device)
        out = model(images)
        pred = out["masks"].argmax(dim=1).cpu() + 1                        # slot index + 1 per pixel
        m = {"mse": mse(images.cpu(), out["recon"].cpu())}
        if "mask" in batch:
            m.update(segmentation_metrics(batch["mask"], pred))
            inner = out["cut_masks"] if "cut_masks" in out else out["attn"]    # [B,K,h,w]
            r = images.shape[-1] // inner.shape[-1]                          # enc_stride
            inner_pred = inner.argmax(dim=1).repeat_interleave(r, 1).repeat_interleave(r, 2).cpu() + 1
            m.update(ari_fg_cut=ari(batch["mask"], inner_pred, foreground_only=True),
                     miou_cut=common.miou(batch["mask"], inner_pred))
        for k, v in m.items():
            sums.setdefault(k, []).append(v.double())
        if first is None:
            first = (images.cpu(), out, pred, batch.get("mask"))
    model.train()
    if image_path and first is not None:
        images, out, pred, true = first
        save_slot_grid(image_path, images, out["recon"].cpu().clamp(0, 1), pred, true,
                       (out["masks"].unsqueeze(2) * out["rgb"]).cpu().clamp(0, 1))
    return {k: nanmean(torch.cat(v)) for k, v in sums.items()}


# -----------------------------------------------------------------------------
# 5.1 Slot tracking over a video (Sec. 6.3, Tab. 2; App. A, Fig. 6)
#
# Slots of consecutive frames are matched (ours: MatchingQP on c_ij = -<s_i, t_j>, Alg. 3 lines 2-4,
# hard assignment = argmax over j; Slot Attention baseline: Hungarian algorithm on the inner products,
# Sec. 6.3), the matchings are chained into video-level track ids, each frame's slot masks are relabelled
# by track id, and ARI / ARI-FG are computed over all pixels of all frames jointly.


@torch.no_grad()
def qp_slot_matching(s, t, qp):
    """Match slots of two frames with the QP (Alg. 3 lines 2-4).

    Args:
        s, t: slots `[B, K, D]` of frames 1 and 2; qp: MatchingQP(K).
    Returns:
        soft matching M `[B, K, K]` (rows sum to 1). Its hard version is M.argmax(-1) (slot i of
        frame 1 -> slot of frame 2), which need not be a permutation (App. C).
    """
    return qp(slot_costs(s, t))


@torch.no_grad()
def hungarian_slot_matching(s, t):
    """Slot Attention baseline of Sec. 6.3: Hungarian algorithm maximising sum_i <s_i, t_pi(i)>.

    Args:
        s, t: slots `[B, K, D]`.
    Returns:
        permutation matrices `[B, K, K]` (float, same dtype/device as s): entry (i, j) = 1 iff i -> j.
    """
    cost = slot_costs(s, t).detach().cpu().double().numpy()
    out = torch.zeros(s.shape[0], s.shape[1], t.shape[1], dtype=s.dtype, device=s.device)
    for b in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[b])                 # min -<s,t> = max inner product
        out[b, torch.as_tensor(rows), torch.as_tensor(cols)] = 1
    return out


def chain_matchings(matchings):
    """Chain frame-to-frame matchings into video-level track ids.

    Frame 0's slot i starts track i. Slot i of frame t is assigned to slot a_i = argmax_j M_t[i, j] of
    frame t+1; slot j of frame t+1 inherits the track of the slot i assigned to it (when several are,
    the one with the largest M_t[i, j]); a slot that no slot is assigned to starts a new track
    (ids K, K+1, ...).

    Args:
        matchings: `[T-1, K, K]` soft (MatchingQP) or 0/1 (Hungarian) matrices between frames t, t+1.
    Returns:
        int64 `[T, K]`: track id of every slot of every frame.
    """
    M = torch.as_tensor(matchings).detach().cpu().double()
    T1, K = M.shape[0], M.shape[1]
    tracks = torch.empty(T1 + 1, K, dtype=torch.long)
    tracks[0] = torch.arange(K)
    next_id = K
    for t in range(T1):
        assign = M[t].argmax(dim=1)                                   # slot i -> slot assign[i]
        for j in range(K):
            cand = torch.nonzero(assign == j).flatten()
            if len(cand):
                tracks[t + 1, j] = tracks[t, cand[M[t, cand, j].argmax()]]
            else:
                tracks[t + 1, j] = next_id
                next_id += 1
    return tracks


def relabel_video(masks, tracks):
    """Label map of a video with slot labels made consistent over time.

    Args:
        masks: `[T, K, H, W]` per-frame slot masks (soft or one-hot, any float/int dtype).
        tracks: int `[T, K]` from chain_matchings.
    Returns:
        int64 `[T, H, W]`: track id of the argmax slot at every pixel.
    """
    slot = torch.as_tensor(masks).detach().cpu().argmax(dim=1)            # [T, H, W]
    tr = torch.as_tensor(tracks).cpu().long()
    return torch.gather(tr, 1, slot.flatten(1)).view_as(slot)


def video_ari(true, pred):
    """Video ARI and ARI-FG (Tab. 2): common.ari over all pixels of all frames jointly.

    Args:
        true: int `[T, H, W]` (0 = background); pred: int `[T, H, W]`, e.g. relabel_video(...).
    Returns:
        dict of floats "ari", "ari_fg" (1.0 when the video has no foreground pixel, as sklearn).
    """
    true, pred = torch.as_tensor(true).long(), torch.as_tensor(pred).long()
    T, H, W = true.shape
    t, p = true.reshape(1, T * H, W), pred.reshape(1, T * H, W)
    return {"ari": float(ari(t, p)[0]), "ari_fg": float(ari(t, p, foreground_only=True)[0])}


def track_and_score(true, masks, slots, method="qp", qp=None):
    """Tab. 2 evaluation of one video: match slots of consecutive frames, chain, relabel, score.

    Args:
        true: int `[T, H, W]` true segmentation (0 = background).
        masks: `[T, K, H, W]` slot masks of every frame; slots: `[T, K, D]` slot vectors.
        method: "qp" (ours: MatchingQP) or "hungarian" (Slot Attention baseline of Sec. 6.3).
        qp: MatchingQP(K) for method "qp".
    Returns:
        dict "ari", "ari_fg" (floats) and "tracks" (int64 `[T, K]`).
    """
    if method == "qp":
        if qp is None:
            raise ValueError("track_and_score(method='qp') needs a MatchingQP")
        M = qp_slot_matching(slots[:-1], slots[1:], qp)
    elif method == "hungarian":
        M = hungarian_slot_matching(slots[:-1], slots[1:])
    else:
        raise ValueError(f"method must be 'qp' or 'hungarian', got {method!r}")
    tracks = chain_matchings(M)
    return {**video_ari(true, relabel_video(masks, tracks)), "tracks": tracks}


@torch.no_grad()
def evaluate_video_tracking(encode, videos, qp=None, methods=("qp", "hungarian"), num_videos=0):
    """Tab. 2: video ARI and ARI-FG with slots tracked over each whole video.

    Args:
        encode: callable, frames `[T, 3, H, W]` float in [0, 1] -> (slots `[T, K, D]`, masks `[T, K, h, w]`),
            the per-frame slots of a model (masks are resized bilinearly to the true masks' size).
        videos: a dataset of dicts with "video" `[T, 3, H, W]` and "mask" int `[T, H, W]` (0 = background),
            e.g. data.build_dataset("movi_a", "test") or "synthetic_video".
        qp: MatchingQP(K), needed for method "qp".
        methods: any of "qp" (ours, Alg. 3 matching) and "hungarian" (Slot Attention baseline, Sec. 6.3).
        num_videos: evaluate only the first num_videos videos (0 = all).
    Returns:
        {method: {"ari": mean over videos, "ari_fg": mean over videos}} (floats).
    """
    scores = {m: {"ari": [], "ari_fg": []} for m in methods}
    n = len(videos) if not num_videos else min(num_videos, len(videos))
    for v in range(n):
        item = videos[v]
        true = torch.as_tensor(item["mask"]).long()
        slots, masks = encode(item["video"])
        masks = masks.float().cpu()
        if masks.shape[-2:] != true.shape[-2:]:
            masks = F.interpolate(masks, size=true.shape[-2:], mode="bilinear", align_corners=False)
        for m in methods:
            out = track_and_score(true, masks, slots.cpu(), method=m, qp=qp)
            scores[m]["ari"].append(out["ari"])
            scores[m]["ari_fg"].append(out["ari_fg"])
    return {m: {key: nanmean(torch.tensor(vals, dtype=torch.float64)) for key, vals in s.items()}
            for m, s in scores.items()}


def save_matching_figure(path, frame_a, frame_b, masks_a, masks_b, matching, slot_images_a=None,
                         slot_images_b=None, names=("frame 5", "frame 20")):
    """App. A, Fig. 6: matched slots across two far-apart frames, one PNG.

    Row 1: frame a, its segmentation (colour = slot i), then slot i of frame a for i = 0..K-1.
    Row 2: frame b, its segmentation coloured by the matched slot of frame a, then the slot of frame b
    matched to slot i (argmax_j M_ij) in the same column, so matched slots line up vertically.

    Args:
        path: output .png.
        frame_a, frame_b: `[3, H, W]` in [0, 1].
        masks_a, masks_b: `[K, H, W]` slot masks.
        matching: `[K, K]` soft or 0/1 matching from frame a's slots (rows) to frame b's (columns).
        slot_images_a, slot_images_b: optional `[K, 3, H, W]` in [0, 1] per-slot reconstructions
            (mask * rgb); default: the frame times each slot mask.
        names: row labels (the paper uses frames 5 and 20).
    Returns:
        the Path written.
    """
    masks_a, masks_b = masks_a.detach().float().cpu(), masks_b.detach().float().cpu()
    frame_a, frame_b = frame_a.detach().float().cpu(), frame_b.detach().float().cpu()
    if slot_images_a is None:
        slot_images_a = masks_a[:, None] * frame_a
    if slot_images_b is None:
        slot_images_b = masks_b[:, None] * frame_b
    K = masks_a.shape[0]
    M = torch.as_tensor(matching).detach().cpu().double()
    assign = M.argmax(dim=1)                                               # slot i of a -> slot of b
    tracks = chain_matchings(M[None])                                      # [2, K] colours of b follow a
    seg_a = labels_to_rgb(relabel_video(masks_a[None], tracks[:1]) + 1)    # +1: label 0 is black
    seg_b = labels_to_rgb(relabel_video(masks_b[None], tracks[1:]) + 1)
    row_a = torch.cat([frame_a[None], seg_a, slot_images_a.detach().float().cpu()])
    row_b = torch.cat([frame_b[None], seg_b, slot_images_b.detach().float().cpu()[assign]])
    return save_image_grid(path, [(names[0], row_a), (names[1], row_b)], max_images=K + 2)


@torch.no_grad()
def save_pair_figure(path, model, video, a=5, b=20):
    """App. A, Fig. 6: reconstruct frames a and b of one video as a pair (Alg. 3) and save, per matched
    slot, its reconstruction in both frames. video `[T, 3, H, W]` in [0, 1]; a, b are clamped to T-1.
    Returns the Path written."""
    T = video.shape[0]
    a, b = min(a, T - 1), min(b, T - 1)
    out = model(video[a:a + 1], video[b:b + 1])
    slot_images = out["masks"][0, :, :, None] * out["rgb"][0]          # [2, K, 3, H, W]
    K = slot_images.shape[1]
    eye = torch.eye(K)                                                  # decoded slots share index i in both frames
    return save_matching_figure(path, video[a], video[b], out["masks"][0, 0], out["masks"][0, 1], eye,
                                slot_images[0], slot_images[1], names=(f"frame {a}", f"frame {b}"))


@torch.no_grad()
def evaluate_video(model, cfg, device, num_items=0, image_path=None, videos=None, split="test"):
    """Tab. 2 on whole videos of `split` (default test): video ARI and ARI-FG with the slots tracked over each video by the
    matching QP (ours, Alg. 3 lines 2-4) and by the Hungarian algorithm on slot inner products (Slot
    Attention baseline, Sec. 6.3), side by side; segments = argmax of each frame's partition masks.

    Every adjacent pair (t, t+1) is run through the model (Alg. 3, cfg.batch_size pairs at a time);
    its per-frame slots S, T give the slots of every frame. MSE: per-frame sum of squared errors over
    C, H, W (images in [0, 1], as `evaluate`), mean over the 2(T-1) frames reconstructed as pairs (baseline:
    the T frames).

    Args:
        model: MinCutPairModel, or SlotAttentionModel (the Sec. 6.3 baseline: each frame is encoded alone,
            segments = argmax of its decoder masks, its random slot initialisation seeded with cfg.seed;
            its "qp" columns use a parameter-free MatchingQP(gamma, match_temp));
        num_items: first N videos (0 = all);
        image_path: if set, Fig. 6 pictures of the first video: the pair reconstruction of frames 5 and
            20 (clamped to T-1) at image_path, the QP matching of their slots at <image_path>_matching.png;
        videos: dataset of {"video" `[T, 3, H, W]` in [0, 1], "mask" `[T, H, W]`} (default: `split`);
        split: train | val | test, read when `videos` is None.
    Returns:
        dict of floats ari_qp, ari_fg_qp, ari_hungarian, ari_fg_hungarian, mse.
    """
    model.eval()
    videos = load_dataset(cfg, split) if videos is None else videos
    baseline = isinstance(model, SlotAttentionModel)
    errors = []

    def encode_pairs(video):                                              # one video `[T, 3, H, W]`
        video, slots, masks = video.to(device), [], []
        for i in range(0, len(video) - 1, cfg.batch_size):
            j = min(i + cfg.batch_size, len(video) - 1)
            x1, x2 = video[i:j], video[i + 1:j + 1]                       # pairs (t, t+1), t = i..j-1
            out = model(x1, x2)
            errors.append(mse(torch.cat([x1, x2]), torch.cat([out["recon"][:, 0], out["recon"][:, 1]])))
            slots.append(out["slots1"])                                   # Alg. 3 line 1: S of frames i..j-1
            masks.append(out["cut_masks"][:, 0])
        return torch.cat(slots + [out["slots2"][-1:]]), torch.cat(masks + [out["cut_masks"][-1:, 1]])

    def encode_frames(video):                                             # baseline: each frame on its own
        video, slots, masks = video.to(device), [], []
        for i in range(0, len(video), cfg.batch_size):
            out = model(video[i:i + cfg.batch_size])
            errors.append(mse(video[i:i + cfg.batch_size], out["recon"]))
            slots.append(out["slots"])
            masks.append(out["masks"])                                    # segments: decoder masks
        return torch.cat(slots), torch.cat(masks)

    if baseline:                                                          # the baseline's matcher is parameter-free
        torch.manual_seed(cfg.seed)                                       # its random slot init: seeded metrics
        qp, encode = MatchingQP(cfg.num_slots, gamma=cfg.gamma, temperature=cfg.match_temp), encode_frames
    else:
        qp, encode = model.matching, encode_pairs
    res = evaluate_video_tracking(encode, videos, qp=qp, num_videos=num_items)
    metrics = {f"{key}_{method}": v for method, r in res.items() for key, v in r.items()}   # ari_qp, ...
    metrics["mse"] = nanmean(torch.cat(errors))
    if image_path:
        video = torch.as_tensor(videos[0]["video"]).to(device)
        a, b = min(5, len(video) - 1), min(20, len(video) - 1)
        root, ext = os.path.splitext(image_path)
        names = (f"frame {a}", f"frame {b}")
        if baseline:                                                      # every frame of video 0, its slots
            out = model(video)
            slot_images = (out["masks"].unsqueeze(2) * out["rgb"]).clamp(0, 1)
            save_slot_grid(image_path, video.cpu(), out["recon"].cpu().clamp(0, 1), out["masks"].argmax(1).cpu() + 1,
                           torch.as_tensor(videos[0]["mask"]), slot_images.cpu())
            save_matching_figure(f"{root}_matching{ext}", video[a], video[b], out["masks"][a], out["masks"][b],
                                 hungarian_slot_matching(out["slots"][a:a + 1], out["slots"][b:b + 1])[0],
                                 slot_images[a], slot_images[b], names=names)
        else:
            save_pair_figure(image_path, model, video)                    # App. A, Fig. 6: frames 5 and 20
            slots, masks = model.encode_frames(video[[a, b]])
            masks = F.interpolate(masks, size=video.shape[-2:], mode="bilinear", align_corners=False)
            save_matching_figure(f"{root}_matching{ext}", video[a], video[b], masks[0], masks[1],
                                 model.matching(slot_costs(slots[:1], slots[1:]))[0], names=names)
    model.train()
    return metrics


def format_metrics(m):
    names = {"ari_fg": "ARI-FG", "msc_fg": "MSC-FG", "mbo": "mBO", "miou": "mIoU", "ari": "ARI", "mse": "MSE",
             "ari_qp": "ARI(QP)", "ari_fg_qp": "ARI-FG(QP)", "ari_hungarian": "ARI(Hungarian)",
             "ari_fg_hungarian": "ARI-FG(Hungarian)", "ari_fg_cut": "ARI-FG(cut)", "miou_cut": "mIoU(cut)"}
    return "  ".join(f"{names.get(k, k)} {v:.4f}" for k, v in m.items())


# -----------------------------------------------------------------------------
# 6. Cora validation (Sec. 6.2, after Wilder et al. 2018, "Melding the data-decisions pipeline")
#
# Data: the LINQS Cora release, two tab-separated text files in --data_dir:
#   cora.content   one paper per line: <paper_id> <1433 binary word indicators> <class_label>
#   cora.cites     one citation per line: <cited_paper_id> <citing_paper_id>
# Pipeline (Wilder et al.'s setup and code, github.com/bwilder0/aaai_melding_code `matching.py`, which Sec. 6.2
# follows):
#   * the citation graph (undirected) is cut into 27 instances of 100 papers; each instance is split
#     into two sides of 50 so that as many citations as possible cross the sides;
#   * the task is to predict, from the two papers' word features only, whether a citation links them;
#     the predicted weights w = sigmoid(MLP([x_u; x_v])) are the negated costs c = -w of the matching LP,
#     and the decision quality is the number of true citations that the LP's matching selects;
#   * run_cora trains the same MLP three ways on the same random 80/20 splits of the 27 instances
#     (30 trials) and evaluates each with the exact LP (eq. 4, linprog) on its costs:
#       ours       decision-focused through MatchingQP, the equality QP of eq. (7), gamma = 0.1 (Sec. 6.2);
#       wilder_qp  decision-focused through Wilder et al.'s QP: the matching LP with x >= 0 and
#                  (gamma/2)||x||^2, gamma 0.1 decayed by 0.8 per epoch (matching.py; WilderMatchingQP);
#       two_stage  BCE on the 0/1 links, 2 epochs, Adam 1e-3, minibatches of 100 pairs (matching.py);
#     beside them random weights and the optimum (the LP on the true links), as matching.py reports.
#     Metric: sum_ij P_ij d_ij averaged over a split's test instances, mean +- std over splits.
#     Paper: ours 7.01 +- 1.15 against 6.15 +- 0.38 reported by Wilder et al. for their QP.
# Assumed where Wilder et al.'s data script is not public (matching.py loads ready-made tensors of
# pair features and links): METIS (pymetis, default options) into 27 parts, each cut or filled up to
# 100 papers (blocks_from_parts); the sides of 50 by a swap local search for the maximum crossing cut
# (split_max_crossing); a pair's features are the concatenation of the two papers' 1433 word indicators.
# --partitioner=greedy swaps METIS for greedy graph growing (grow_partition), another instance set.

CORA_FILES = ("cora.content", "cora.cites")


def load_cora(root):
    """Read the LINQS Cora files from `root`.

    Args:
        root: folder holding `cora.content` and `cora.cites` (format above).
    Returns:
        features: float32 numpy `[N, F]` (0/1 word indicators; F = 1433 for Cora), rows in file order;
        adj: scipy CSR `[N, N]` float64, symmetric 0/1 citation graph without self-loops.
    Raises:
        FileNotFoundError (one line, naming the missing file) when a file is absent;
        ValueError naming file and line for a malformed line or a citation of an unknown paper id.
    """
    paths = [os.path.join(str(root), name) for name in CORA_FILES]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Cora file {path} not found: put the LINQS Cora release files "
                                    f"cora.content and cora.cites in --data_dir")
    ids, rows = {}, []
    with open(paths[0]) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3 or (rows and len(parts) - 2 != len(rows[0])):
                raise ValueError(f"{paths[0]}:{n}: expected '<paper_id> <word indicators...> <class>', "
                                 f"got {len(parts)} fields")
            try:
                rows.append([float(v) for v in parts[1:-1]])
            except ValueError:
                raise ValueError(f"{paths[0]}:{n}: word indicators must be numbers") from None
            if parts[0] in ids:
                raise ValueError(f"{paths[0]}:{n}: duplicate paper id {parts[0]}")
            ids[parts[0]] = len(ids)
    if not rows:
        raise ValueError(f"{paths[0]}: no papers found")
    src, dst = [], []
    with open(paths[1]) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{paths[1]}:{n}: expected '<cited_id> <citing_id>', got {len(parts)} fields")
            for p in parts:
                if p not in ids:
                    raise ValueError(f"{paths[1]}:{n}: paper id {p} is not in {CORA_FILES[0]}")
            if parts[0] != parts[1]:
                src.append(ids[parts[0]])
                dst.append(ids[parts[1]])
    N = len(ids)
    adj = scipy.sparse.coo_matrix((np.ones(len(src)), (src, dst)), shape=(N, N)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64).tocsr()                 # undirected, 0/1
    return np.asarray(rows, dtype=np.float32), adj


def split_max_crossing(adj, rng, max_swaps=10000):
    """Split a graph's nodes into two equal halves with many crossing edges (local search for max cut).

    Start from a random balanced split; repeatedly apply the swap (u in left, v in right) that most
    increases the number of crossing edges (gain = g_u + g_v + 2 A_uv, g = edges to own side - edges
    to the other side) until no swap helps.

    Args:
        adj: dense symmetric 0/1 numpy `[n, n]`, n even.
        rng: numpy Generator.
    Returns:
        (left, right): int64 numpy index arrays `[n/2]` each.
    """
    n = adj.shape[0]
    if n % 2:
        raise ValueError(f"split_max_crossing needs an even node count, got {n}")
    side = np.zeros(n, dtype=bool)
    side[rng.permutation(n)[:n // 2]] = True                 # True = left
    for _ in range(max_swaps):
        left, right = np.flatnonzero(side), np.flatnonzero(~side)
        same = np.where(side[:, None] == side[None, :], adj, 0).sum(1)
        gain = same - (adj.sum(1) - same)                     # change in crossing edges if moved alone
        swap = gain[left][:, None] + gain[right][None, :] + 2 * adj[np.ix_(left, right)]
        a, b = np.unravel_index(np.argmax(swap), swap.shape)
        if swap[a, b] <= 0:
            break
        side[left[a]], side[right[b]] = False, True
    return np.flatnonzero(side), np.flatnonzero(~side)


def grow_partition(adj, n_parts, part_size):
    """Cut a graph into `n_parts` disjoint blocks of `part_size` densely linked nodes: the fallback of
    cora_blocks when pymetis is not installed (a METIS stand-in, not METIS).

    Greedy graph growing (the initial partitioning of METIS): start a block at the unassigned node with
    the fewest unassigned neighbours, then repeatedly add the unassigned node with the most edges into
    the block (ties: lowest index; a block whose frontier is empty continues at any unassigned node).

    Args:
        adj: scipy sparse `[N, N]` symmetric 0/1; n_parts * part_size <= N.
    Returns:
        int64 numpy `[n_parts, part_size]` node indices (left-over nodes are unused).
    """
    adj = scipy.sparse.csr_matrix(adj)
    free = np.ones(adj.shape[0], dtype=bool)
    parts = []
    for _ in range(n_parts):
        free_deg = adj @ free.astype(np.float64)
        node = int(np.flatnonzero(free)[np.argmin(free_deg[free])])
        block, into = [], np.zeros(adj.shape[0])
        for _ in range(part_size):
            block.append(node)
            free[node] = False
            into += adj[node].toarray()[0]                   # edges from every node into the block
            if len(block) < part_size:
                node = int(np.flatnonzero(free)[np.argmax(into[free])])
        parts.append(block)
    return np.asarray(parts, dtype=np.int64)


def metis_partition(adj, n_parts):
    """METIS k-way partition (pymetis.part_graph, METIS' default seed: deterministic) of a graph.

    Args:
        adj: scipy sparse `[N, N]` symmetric; its diagonal is ignored.
    Returns:
        int64 numpy `[N]` part id in [0, n_parts) per node (parts have about N / n_parts nodes).
    Raises:
        ImportError when pymetis is not installed (pip install pymetis).
    """
    try:
        import pymetis
    except ImportError:
        raise ImportError("the METIS partition needs pymetis: pip install pymetis") from None
    adj = scipy.sparse.csr_matrix(adj, copy=True)
    adj.setdiag(0)
    adj.eliminate_zeros()
    if n_parts == 1:
        return np.zeros(adj.shape[0], dtype=np.int64)
    neighbours = [adj.indices[adj.indptr[i]:adj.indptr[i + 1]].tolist() for i in range(adj.shape[0])]
    _, membership = pymetis.part_graph(n_parts, adjacency=neighbours)
    return np.asarray(membership, dtype=np.int64)


def blocks_from_parts(adj, membership, n_parts, part_size):
    """Exact-size blocks from a partition, as Wilder et al.'s data script does with its 27 METIS parts.

    Each part larger than part_size gives up its nodes of lowest degree inside the part (stable order),
    which go, part by part, into a pool; then each part smaller than part_size, in part order, is filled up
    from the front of the pool. Needs n_parts * part_size <= N (then the pool is large enough).

    Args:
        adj: scipy sparse `[N, N]` symmetric 0/1; membership: int `[N]` part ids in [0, n_parts).
    Returns:
        int64 numpy `[n_parts, part_size]` node indices (disjoint; left-over pool nodes are unused).
    """
    adj = scipy.sparse.csr_matrix(adj)
    membership = np.asarray(membership)
    parts, pool = [], []
    for i in range(n_parts):
        nodes = np.flatnonzero(membership == i)
        degree = np.asarray(adj[nodes][:, nodes].sum(axis=1)).ravel()  # degree inside the part
        order = np.argsort(degree, kind="stable")                        # lowest degree first
        n_drop = max(0, len(nodes) - part_size)
        pool.extend(nodes[order[:n_drop]].tolist())
        parts.append(nodes[np.sort(order[n_drop:])].tolist())
    for part in parts:
        need = part_size - len(part)
        part.extend(pool[:need])
        pool = pool[need:]
    return np.asarray(parts, dtype=np.int64)


def cora_blocks(adj, n_parts, part_size, partitioner="auto"):
    """Sec. 6.2 / Wilder et al.: `n_parts` disjoint blocks of `part_size` densely linked papers.

    partitioner: "metis" (pymetis.part_graph into n_parts, then blocks_from_parts), "greedy"
    (grow_partition) or "auto" (METIS when pymetis imports, else the greedy fallback with a one-line notice).
    Returns (blocks int64 `[n_parts, part_size]`, name of the partitioner used: "metis" | "greedy").
    Raises ImportError for "metis" without pymetis, ValueError for another name.
    """
    if partitioner not in ("auto", "metis", "greedy"):
        raise ValueError(f"partitioner must be auto|metis|greedy, got {partitioner!r}")
    if partitioner == "auto":
        try:
            import pymetis  # noqa: F401
            partitioner = "metis"
        except ImportError:                                             # explicit fallback: greedy growing
            print("cora: pymetis is not installed, using the greedy partition instead of METIS "
                  "(pip install pymetis)", flush=True)
            partitioner = "greedy"
    if partitioner == "greedy":
        return grow_partition(adj, n_parts, part_size), "greedy"
    return blocks_from_parts(adj, metis_partition(adj, n_parts), n_parts, part_size), "metis"


def make_cora_instances(features, adj, n_instances=27, instance_size=100, seed=0, partitioner="auto"):
    """Cut the citation graph into bipartite matching instances (Sec. 6.2 / Wilder et al.).

    Args:
        features: `[N, F]` node features; adj: scipy sparse `[N, N]` symmetric 0/1.
        n_instances, instance_size: Wilder et al. use 27 instances of 100 papers (50 per side).
        seed: seed of the side split.
        partitioner: "auto" | "metis" | "greedy", see cora_blocks (auto: METIS if pymetis imports).
    Returns:
        dict of tensors: "x_left", "x_right" float32 `[n_instances, instance_size/2, F]`,
        "links" float32 `[n_instances, k, k]` (P_ij = 1 when paper i of the left side and paper j of
        the right side are linked by a citation), "nodes_left", "nodes_right" int64 `[n_instances, k]`;
        and "partitioner", the name of the partitioner used ("metis" | "greedy").
    Raises:
        ValueError when the graph has fewer than n_instances * instance_size nodes or the size is odd.
    """
    N = adj.shape[0]
    if instance_size % 2 or n_instances * instance_size > N:
        raise ValueError(f"need an even instance_size and n_instances * instance_size <= {N} papers, got "
                         f"{n_instances} x {instance_size}")
    # METIS into n_instances parts, each cut or filled up to instance_size nodes as Wilder et al. do
    blocks, used = cora_blocks(adj, n_instances, instance_size, partitioner)
    rng = np.random.default_rng(seed)
    lefts, rights = [], []
    for block in blocks:
        sub = adj[block][:, block].toarray()
        left, right = split_max_crossing(sub, rng)                       # sides of 50, max crossing links
        lefts.append(block[left])
        rights.append(block[right])
    nl, nr = np.stack(lefts), np.stack(rights)
    links = np.stack([adj[l][:, r].toarray() for l, r in zip(nl, nr)])
    return {"x_left": torch.from_numpy(features[nl]), "x_right": torch.from_numpy(features[nr]),
            "links": torch.from_numpy(links).float(), "nodes_left": torch.from_numpy(nl),
            "nodes_right": torch.from_numpy(nr), "partitioner": used}


class EdgeWeightNet(nn.Module):
    """Wilder et al.'s edge model: MLP on the concatenated features [x_u; x_v] of a candidate edge,
    Linear(2F, hidden) - ReLU - ... - Linear(hidden, 1) - sigmoid, a weight in (0, 1) per pair.

    The first layer on the concatenation equals W_u x_u + W_v x_v + b, computed per node and broadcast
    over pairs, so no `[k*k, 2F]` edge-feature tensor is built.
    Forward: x_left `[B, k, F]`, x_right `[B, k, F]` -> weights `[B, k, k]` in (0, 1) (sigmoid of logits()).
    logits(x_left, x_right): the same before the sigmoid, `[B, k, k]` real (the two-stage model's BCE input).
    """

    def __init__(self, n_features, hidden=500, layers=2):
        super().__init__()
        width = hidden if layers > 1 else 1                       # layers = 1: Linear(2F, 1) + sigmoid
        self.first_u = nn.Linear(n_features, width)
        self.first_v = nn.Linear(n_features, width, bias=False)
        rest = []
        for i in range(layers - 1):
            rest += [nn.ReLU(), nn.Linear(hidden, hidden if i < layers - 2 else 1)]
        self.rest = nn.Sequential(*rest)

    def logits(self, x_left, x_right):
        h = self.first_u(x_left)[:, :, None] + self.first_v(x_right)[:, None]   # Linear([x_u; x_v]), [B,k,k,w]
        return self.rest(h)[..., 0]

    def forward(self, x_left, x_right):
        return torch.sigmoid(self.logits(x_left, x_right))     # Wilder et al.'s weights: sigmoid(net(x))


_WILDER_LAYERS = {}     # k -> (cvxpylayers layer, solver arguments): built once per size


class WilderMatchingQP:
    """Wilder et al.'s relaxed matching QP (their `matching.py`: qpth's QPFunction with Q = gamma I,
    G = [A; -I], h = [1; 0], i.e. the matching LP with x >= 0 kept and a quadratic term added):

        min_x  sum_ij c_ij x_ij + (gamma/2) sum_ij x_ij^2
        s.t.   sum_j x_ij <= 1 (each left node i),  sum_i x_ij <= 1 (each right node j),  x >= 0.

    (qpth's objective is (1/2) x^T Q x + p^T x, so Q = gamma I is (gamma/2) ||x||^2.) Solved and
    differentiated with cvxpylayers (diffcp's implicit differentiation of the cone program, Clarabel
    interior point with tolerances 1e-10) as min (c/gamma)^T x + (1/2) ||x||^2, which has the same
    minimiser, so one compiled layer serves every gamma. (matching.py solves the forward pass with Gurobi
    and differentiates qpth's KKT system at that solution.) Unlike MatchingQP (eq. 7) the constraints are
    inequalities with x >= 0: there is no closed form, each solve is an interior-point run.

    Args:
        k: nodes per side (k * k edge variables).
    Call:
        qp(cost, gamma): cost `[k, k]` or `[B, k, k]` float32/float64 (CPU; the costs c, e.g. -sigmoid(net)),
        gamma > 0 -> x of the same shape and dtype, differentiable in cost.
    Raises:
        ImportError (one line: pip install cvxpylayers) when cvxpylayers is not installed;
        ValueError for a cost that is not `[..., k, k]` or gamma <= 0; RuntimeError when the solver
        returns a non-finite solution.
    """

    def __init__(self, k):
        self.k = int(k)
        if self.k not in _WILDER_LAYERS:
            import warnings
            try:
                import cvxpy as cp
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from cvxpylayers.torch import CvxpyLayer
            except ImportError:
                raise ImportError("Wilder et al.'s QP (--method=wilder_qp) needs cvxpylayers: "
                                  "pip install cvxpylayers") from None
            k = self.k
            rows = np.concatenate([np.repeat(np.arange(k), k), k + np.tile(np.arange(k), k)])
            A = scipy.sparse.csr_matrix((np.ones(2 * k * k), (rows, np.tile(np.arange(k * k), 2))),
                                        shape=(2 * k, k * k))       # row sums (left nodes), column sums (right)
            x, q = cp.Variable(k * k), cp.Parameter(k * k)
            problem = cp.Problem(cp.Minimize(q @ x + 0.5 * cp.sum_squares(x)), [A @ x <= 1, x >= 0])
            args = {"solve_method": "Clarabel", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                         # torch sparse-CSR notice
                _WILDER_LAYERS[k] = (CvxpyLayer(problem, parameters=[q], variables=[x]), args)
        self.layer, self.solver_args = _WILDER_LAYERS[self.k]

    def __call__(self, cost, gamma):
        import warnings
        k = self.k
        if cost.dim() not in (2, 3) or tuple(cost.shape[-2:]) != (k, k):
            raise ValueError(f"WilderMatchingQP(k={k}) expects costs [{k}, {k}] or [B, {k}, {k}], "
                             f"got {tuple(cost.shape)}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        q = cost.reshape(*cost.shape[:-2], k * k).double().cpu() / gamma    # (c/gamma): same minimiser
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                                 # torch sparse-CSR notice
            (x,) = self.layer(q, solver_args=self.solver_args)
        if not torch.isfinite(x).all():
            raise RuntimeError("Wilder et al.'s QP: the solver returned a non-finite solution")
        return x.reshape(cost.shape).to(dtype=cost.dtype, device=cost.device)


CORA_METHODS = ("ours", "wilder_qp", "two_stage", "random", "optimum")
CORA_LABELS = {"ours": "ours: MatchingQP (eq. 7, gamma 0.1), Sec. 6.2",
               "wilder_qp": "Wilder et al.'s QP (x >= 0, gamma 0.1 x 0.8/epoch)",
               "two_stage": "two-stage: BCE on the links, then the LP",
               "random": "random weights, then the LP",
               "optimum": "optimum: the LP on the true links"}


@dataclass
class CoraConfig:
    """Sec. 6.2 Cora matching experiment. Defaults: Wilder et al.'s setup with the paper's gamma.
    `python mincut_ocl.py --task=cora --key=value ...` sets these fields."""
    task: str = "cora"            # cora: this experiment, the citation matching of Sec. 6.2 (image, video: the
                                  # flags of --task=image --help)
    data_dir: str = ""            # folder with cora.content and cora.cites (LINQS Cora release)
    out_dir: str = "out/mincut_cora"   # folder of cora_results.json, every number of the run
    method: str = "all"           # all | ours | wilder_qp | two_stage (random and optimum are always reported)
    n_instances: int = 27         # Wilder et al.: 27 METIS parts of the citation graph
    instance_size: int = 100      # papers per instance, 50 per side
    partitioner: str = "auto"     # metis (pymetis) | greedy (grow_partition) | auto: metis if installed, else greedy
    hidden: int = 500             # Wilder et al.'s MLP width (matching.py: intermediate_size = 500)
    layers: int = 2               # Wilder et al.'s default depth (matching.py: --layers=2)
    gamma: float = 0.1            # Sec. 6.2: regularised equality-constrained QP with gamma = 0.1 (also Wilder's start)
    gamma_decay: float = 1.0      # ours: per-epoch factor on gamma (the paper states a fixed 0.1)
    wilder_gamma_decay: float = 0.8   # Wilder et al.'s QP: gamma *= 0.8 after every epoch (matching.py)
    lr: float = 1e-4              # Adam for ours and Wilder's QP (matching.py's decision-focused setting)
    epochs: int = 12              # ours and Wilder's QP: 12 epochs, one instance per step (matching.py)
    wilder_trials: int = 0        # trials of wilder_qp (the first splits of the same list); 0: all n_trials
    two_stage_lr: float = 1e-3    # learning rate of the two-stage model's Adam (matching.py: 1e-3)
    two_stage_epochs: int = 2     # two-stage: 2 epochs over the training instances (matching.py)
    two_stage_batch: int = 100    # two-stage: minibatches of 100 pairs of an instance (matching.py: batch_size)
    test_frac: float = 0.2        # 80/20 split of the instances (matching.py: int(0.2 * n) test instances)
    n_trials: int = 30            # random splits; the paper reports mean +- std (matching.py: num_iters = 30)
    seed: int = 0                 # seed of the partition, the splits and the networks
    device: str = "cpu"           # where the edge net trains: cpu | cuda | auto (one small instance per step: the
                                  # CPU is fast enough)


def validate_cora_config(cfg):
    """CoraConfig's values, checked before the graph is read (one line naming the flag)."""
    check_config(cfg, positive=("n_instances", "instance_size", "hidden", "layers", "gamma", "lr", "n_trials",
                                "two_stage_lr", "two_stage_batch"),
                 nonnegative=("epochs", "gamma_decay", "wilder_gamma_decay", "wilder_trials", "two_stage_epochs"),
                 choices={"partitioner": ("auto", "metis", "greedy"),
                          "method": ("all", "ours", "wilder_qp", "two_stage")})
    if cfg.instance_size % 2:
        fail(f"--instance_size={cfg.instance_size} must be even: each instance is split into two equal sides",
             code=2)
    if not 0 < cfg.test_frac < 1:
        fail(f"--test_frac is the fraction of instances held out for testing, in (0, 1), got {cfg.test_frac}",
             code=2)


def matching_value(links, cost):
    """Decision quality of Sec. 6.2 for one instance: true links covered by the LP matching on `cost`.

    Args:
        links: `[k, k]` 0/1 true links P; cost: `[k, k]` learned costs c (minimised).
    Returns:
        float sum_ij P_ij d_ij with d = lp_matching(cost).
    """
    return float((np.asarray(torch.as_tensor(links).double()) * lp_matching(cost)).sum())


def train_edge_net(net, x_left, x_right, links, train, cfg, rng, method="ours"):
    """Decision-focused training of Sec. 6.2 (Wilder et al.'s loop, matching.py) through a relaxed QP.

    For cfg.epochs epochs, one Adam step (lr cfg.lr) per training instance in random order on
    loss = -sum_ij P_ij d_ij, d the relaxed QP's solution for costs c = -w, w = net(...) in (0, 1):
        method "ours": MatchingQP(k, gamma).solve(c).d, the equality QP of eq. (7); gamma starts at
            cfg.gamma and is multiplied by cfg.gamma_decay after every epoch (default 1: fixed, Sec. 6.2);
        method "wilder_qp": WilderMatchingQP(k)(c, gamma), Wilder et al.'s inequality QP; gamma starts at
            cfg.gamma and is multiplied by cfg.wilder_gamma_decay (0.8, matching.py) after every epoch.

    Args:
        net: EdgeWeightNet; x_left, x_right `[n, k, F]`; links `[n, k, k]` 0/1 (same device as net);
        train: indices of the training instances; cfg: CoraConfig; rng: numpy Generator (order);
        method: "ours" | "wilder_qp".
    Returns:
        the mean training loss of the last epoch (float).
    Raises:
        ValueError for another method; ImportError (wilder_qp) without cvxpylayers.
    """
    if method not in ("ours", "wilder_qp"):
        raise ValueError(f"train_edge_net: method must be ours|wilder_qp, got {method!r}")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gamma, k = cfg.gamma, links.shape[-1]
    decay = cfg.gamma_decay if method == "ours" else cfg.wilder_gamma_decay
    wilder = WilderMatchingQP(k) if method == "wilder_qp" else None
    losses = []
    for epoch in range(cfg.epochs):
        qp, losses = MatchingQP(k, gamma=gamma), []
        for i in rng.permutation(train):
            cost = -net(x_left[i:i + 1], x_right[i:i + 1])         # c = -w: the LP minimises (eq. 4)
            if method == "ours":
                d = qp.solve(cost).d                               # relaxed QP of eq. (7), gamma = 0.1
            else:
                d = wilder(cost.cpu(), gamma).to(cost.device)      # Wilder et al.'s QP (matching.py)
            loss = -(links[i:i + 1] * d).sum()                     # decision-focused: maximise sum P d
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        gamma *= decay
    return float(np.mean(losses)) if losses else float("nan")


def train_two_stage(net, x_left, x_right, links, train, cfg, rng):
    """Two-stage model of Wilder et al.'s matching.py: fit the links, ignore the decision.

    For cfg.two_stage_epochs epochs, over the training instances in random order: the k*k pairs of
    the instance in random order, cut into floor(k*k / cfg.two_stage_batch) minibatches (at least one;
    matching.py drops the remainder), one Adam step (lr cfg.two_stage_lr) per minibatch on the binary
    cross-entropy of the pairs' logits against their 0/1 links (mean over the minibatch, as
    nn.BCEWithLogitsLoss). The LP is then solved on c = -sigmoid(logits) (lp_value).

    Args:
        net: EdgeWeightNet; x_left, x_right `[n, k, F]`; links `[n, k, k]` 0/1 (same device as net);
        train: indices of the training instances; cfg: CoraConfig; rng: numpy Generator (orders).
    Returns:
        the mean BCE of the last epoch's minibatches (float; nan when nothing was trained).
    """
    opt = torch.optim.Adam(net.parameters(), lr=cfg.two_stage_lr)
    pairs = links.shape[-1] * links.shape[-2]
    n_batches = max(1, pairs // cfg.two_stage_batch)
    losses = []
    for epoch in range(cfg.two_stage_epochs):
        losses = []
        for i in rng.permutation(train):
            order = torch.from_numpy(rng.permutation(pairs)).to(links.device)
            target = links[i].reshape(-1)
            for b in range(n_batches):
                batch = order[b * cfg.two_stage_batch:(b + 1) * cfg.two_stage_batch]
                logit = net.logits(x_left[i:i + 1], x_right[i:i + 1]).reshape(-1)[batch]
                loss = F.binary_cross_entropy_with_logits(logit, target[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def lp_value(net, x_left, x_right, links, idx):
    """Mean over instances `idx` of sum_ij P_ij d_ij, d the exact LP matching (eq. 4) on the net's costs."""
    costs = -net(x_left[idx], x_right[idx]).cpu()
    return float(np.mean([matching_value(links[i].cpu(), c) for i, c in zip(idx, costs)]))


def cora_splits(n, n_trials, test_frac, seed):
    """The random train/test splits shared by every method: a list of n_trials (test, train) int64 index
    arrays, round(test_frac * n) (at least 1) test instances each, from numpy default_rng(seed)."""
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_frac * n)))
    splits = []
    for _ in range(n_trials):
        perm = rng.permutation(n)
        splits.append((np.sort(perm[:n_test]), np.sort(perm[n_test:])))
    return splits


def cora_trial(method, trial, inst, split, cfg, device):
    """One method on one split: the mean over the test instances of the true links matched by the LP.

    The network (same initial weights for ours, wilder_qp and two_stage in a trial), the training order
    and the random weights are seeded by (cfg.seed, trial) only, so a method run alone (--method) gives
    the numbers of the full table.

    Args:
        method: one of CORA_METHODS; trial: index of the split; inst: make_cora_instances' dict on device;
        split: (test, train) index arrays; cfg: CoraConfig; device: torch device.
    Returns:
        float, mean over test instances of sum_ij P_ij d_ij (d: the LP of eq. 4 on the method's costs).
    """
    test, train = split
    xl, xr, links = inst["x_left"], inst["x_right"], inst["links"]
    if method == "optimum":
        return float(np.mean([matching_value(links[i].cpu(), -links[i].cpu()) for i in test]))
    if method == "random":                                   # matching.py: c = -rand
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + trial)
        k = links.shape[-1]
        return float(np.mean([matching_value(links[i].cpu(), -torch.rand(k, k, generator=gen)) for i in test]))
    seed_everything(cfg.seed * 100003 + trial)
    rng = np.random.default_rng([cfg.seed, trial])
    net = EdgeWeightNet(xl.shape[-1], cfg.hidden, cfg.layers).to(device)
    if method == "two_stage":
        train_two_stage(net, xl, xr, links, train, cfg, rng)
    else:
        train_edge_net(net, xl, xr, links, train, cfg, rng, method=method)
    return lp_value(net, xl, xr, links, test)


def _mean_std(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n_trials": len(values),
            "per_trial": [float(v) for v in values]}


def run_cora(cfg):
    """Sec. 6.2 as the paper compares it: on the same instances and the same random train/test splits,
    the same edge MLP trained through (ours) MatchingQP (eq. 7, gamma = cfg.gamma), (wilder_qp) Wilder
    et al.'s inequality QP, (two_stage) BCE on the links; beside them random weights and the optimum.
    Every method is evaluated by the exact LP of eq. (4) on its costs; the metric is the number of true
    links matched, averaged over the test instances of a split, then mean +- std over splits.

    cfg.method picks one trained method ("all": the three); random and optimum are always computed.
    Wilder's QP runs on the first cfg.wilder_trials splits (0: all).

    Args:
        cfg: CoraConfig.
    Returns:
        dict (also written to cfg.out_dir/cora_results.json):
        "methods": {name: {"mean", "std", "n_trials", "per_trial", "seconds", "label"}} for the methods run;
        "paired": {"ours_minus_wilder_qp": {"mean", "std", "n_trials"}} on the splits both ran (when both did);
        "partitioner", "n_instances", "instance_size", "true_links_per_instance" (mean number of citations
        between the two sides of an instance), "optimum_all_instances" (mean LP optimum over all instances),
        "splits" (each split's test instances), "config"; and, as before, "qp_mean", "qp_std", "per_trial"
        (ours, when run), "optimum" and "random" (their means).
    Exits with a one-line error (common.fail) when the Cora files are missing or malformed, or when a
    method needs a package that is not installed.
    """
    methods = [m for m in CORA_METHODS if cfg.method in ("all", m) or m in ("random", "optimum")]
    if "wilder_qp" in methods:
        try:
            WilderMatchingQP(2)                                  # cvxpylayers present? fail before the data
        except ImportError as e:
            fail(f"--method={cfg.method} runs Wilder et al.'s QP: {e}")
    try:
        features, adj = load_cora(cfg.data_dir)
        inst = make_cora_instances(features, adj, cfg.n_instances, cfg.instance_size, cfg.seed, cfg.partitioner)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e))
    print(f"cora: partitioner {'METIS (pymetis)' if inst['partitioner'] == 'metis' else 'greedy (grow_partition)'}, "
          f"{cfg.n_instances} instances of {cfg.instance_size} papers", flush=True)
    device = get_device(cfg.device)
    inst = {key: inst[key].to(device) for key in ("x_left", "x_right", "links")} | {"partitioner": inst["partitioner"]}
    links = inst["links"]
    n = links.shape[0]
    true_links = float(links.sum().item() / n)
    optimum_all = float(np.mean([matching_value(l.cpu(), -l.cpu()) for l in links]))
    print(f"cora: {true_links:.2f} true links per instance between its two sides; "
          f"LP optimum {optimum_all:.2f} per instance", flush=True)
    splits = cora_splits(n, cfg.n_trials, cfg.test_frac, cfg.seed)
    result_methods = {}
    for method in methods:
        n_trials = min(cfg.wilder_trials or cfg.n_trials, cfg.n_trials) if method == "wilder_qp" else cfg.n_trials
        start, values = time.time(), []
        for trial in range(n_trials):
            values.append(cora_trial(method, trial, inst, splits[trial], cfg, device))
            if method not in ("random", "optimum"):
                print(f"cora {method} trial {trial + 1}/{n_trials}: test matched links {values[-1]:.2f} "
                      f"({time.time() - start:.0f} s)", flush=True)
        result_methods[method] = _mean_std(values) | {"seconds": round(time.time() - start, 1),
                                                      "label": CORA_LABELS[method]}
    result = {"methods": result_methods, "partitioner": inst["partitioner"], "n_instances": int(n),
              "instance_size": cfg.instance_size, "true_links_per_instance": true_links,
              "optimum_all_instances": optimum_all, "splits": [s[0].tolist() for s in splits]}
    if "ours" in result_methods and "wilder_qp" in result_methods:
        m = result_methods["wilder_qp"]["n_trials"]
        diff = np.subtract(result_methods["ours"]["per_trial"][:m], result_methods["wilder_qp"]["per_trial"])
        result["paired"] = {"ours_minus_wilder_qp": {"mean": float(diff.mean()), "std": float(diff.std()),
                                                     "n_trials": int(m)}}
    if "ours" in result_methods:                                 # the keys of the single-method output
        result |= {"qp_mean": result_methods["ours"]["mean"], "qp_std": result_methods["ours"]["std"],
                   "per_trial": result_methods["ours"]["per_trial"]}
    result |= {"optimum": result_methods["optimum"]["mean"], "random": result_methods["random"]["mean"],
               "config": asdict(cfg)}
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "cora_results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(format_cora_table(result))
    return result


def format_cora_table(result):
    """The Markdown table of run_cora's result: method, trials, test matched links mean +- std, seconds."""
    lines = [f"cora ({result['partitioner']}, {result['n_instances']} instances of {result['instance_size']} papers, "
             f"{result['true_links_per_instance']:.2f} true links per instance; paper: ours 7.01 +- 1.15, "
             f"Wilder et al. 6.15 +- 0.38)",
             "| method | trials | matched links (test) | seconds |", "|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {m['label']} | {m['n_trials']} | {m['mean']:.2f} +- {m['std']:.2f} | {m['seconds']:.0f} |")
    if "paired" in result:
        p = result["paired"]["ours_minus_wilder_qp"]
        lines.append(f"paired difference ours - Wilder's QP on the same {p['n_trials']} splits: "
                     f"{p['mean']:.2f} +- {p['std']:.2f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 7. Run


def run(cfg):
    """--predict, --eval_only (results also in <out_dir>/eval_<dataset>.json) or training. --eval_only and
    --predict take the model settings (MODEL_KEYS) from the checkpoint: common.checkpoint_config."""
    if cfg.eval_only or cfg.predict:
        cfg = common.checkpoint_config(cfg, MODEL_KEYS)  # also the task it was trained for
        cfg.dataset = video_dataset(cfg)
        if cfg.predict and cfg.task != "image":
            fail(f"--predict segments images: {common.inference_checkpoint(cfg)} is a --task={cfg.task} checkpoint")
    info = data.DATASETS.get(cfg.dataset.lower())
    if info is not None and info.video != (cfg.task == "video") and not cfg.predict:
        videos = ", ".join(name for name, i in data.DATASETS.items() if i.video)
        fail(f"--task={cfg.task} needs {'a video' if cfg.task == 'video' else 'an image'} dataset, got "
             f"--dataset={cfg.dataset} (video datasets: {videos})")
    if not (cfg.eval_only or cfg.predict):
        with common.training_run(cfg.out_dir) as stop:   # one run per --out_dir; SIGTERM / SIGINT save
            return train(cfg, stop)
    check_out_dir(cfg.out_dir)                            # may differ from the checkpoint's (read-only) folder
    device = get_device(cfg.device)
    path = common.inference_checkpoint(cfg)
    model = common.load_for_inference(cfg, device, build_model,
                                      load_weights, "mincut_ocl.py")
    if cfg.predict:                                       # the image model; slot 0, the background cut, is black
        return common.predict_images(cfg, model, device)
    evaluate_fn = evaluate_video if cfg.task == "video" else evaluate
    return common.evaluate_checkpoint(cfg, model, device, evaluate_fn, format_metrics, checkpoint=path,
                                      script="mincut_ocl.py", load_dataset=load_dataset,
                                      unit="video" if cfg.task == "video" else "image")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if parse_args(Config(), argv, only=("task",)).task == "cora":      # Sec. 6.2: the flags of CoraConfig
        cfg = parse_args(CoraConfig(), argv, epilog="The image and video flags: --task=image --help.")
        validate_cora_config(cfg)
        check_out_dir(cfg.out_dir)                                      # before the trials, not after them
        return run_cora(cfg)
    cfg = build_config(argv)
    try:
        return run(cfg)
    except (data.DatasetError, CheckpointError) as e:                  # also when re-raised by a DataLoader worker
        fail(error_line(e))


if __name__ == "__main__":
    main()

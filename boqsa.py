"""BO-QSA: Bi-level Optimised Query Slot Attention (Jia et al., ICLR 2023), mixture and transformer decoders.

Paper: Jia et al., ICLR 2023 (section, equation and table numbers below are the paper's).
Official code: GitHub YuLiu-LY/BO-QSA.  One file, read top to bottom:

    1. Config          defaults (CPU-sized, built-in data) and per-dataset presets (Tab. 9-13)
    2. Model           CNN encoder (Tab. 9) -> SlotAttention with learned queries (Sec. 3.1)
                       and the bi-level STE update (Alg. 1) -> mixture decoder (Tab. 10, App. A.1)
                       or dVAE + autoregressive transformer decoder (SLATE; App. A.1, A.3.3, Tab. 12)
    3. Official ckpt   key conversion from the official Lightning checkpoints
    4. Training        Adam, warmup + exponential decay, grad clipping (official train script), DDP, resume
    5. Evaluation      ARI-FG, MSC-FG, mBO, mIoU, MSE (synthetic); foreground IoU / Dice (Birds, Dogs, Cars,
                       Flowers; Tab. 5); AP / PQ / precision / recall (YCB, ScanNet, COCO; Tab. 4);
                       zero-shot transfer (Tab. 8, 15); query attention maps (Sec. 5.4); --predict

Run:
    python boqsa.py                                   # built-in synthetic data, CPU-sized model
    python boqsa.py --dataset=shapestacks --data_dir=PATH
    python boqsa.py --eval_only --dataset=clevr --data_dir=PATH
    python boqsa.py --predict=FOLDER_OF_IMAGES
    python boqsa.py --decoder=transformer             # SLATE decoder, CPU-sized
    python boqsa.py --decoder=transformer --dataset=birds --data_dir=PATH
    python boqsa.py --eval_only --dataset=cars --data_dir=PATH --init_from=out/dogs/ckpt.pt   # Dogs -> Cars
    python boqsa.py --eval_only --iters=1 --concept_maps   # Fig. 2: other test-time iterations; Fig. 4 maps
    torchrun --nproc_per_node=2 boqsa.py --max_steps=20
Training evaluates on --eval_split (val) every eval_interval steps (metrics.jsonl: val_*), then once
on the test split (out_dir/eval_<dataset>.json); every run, and --eval_only, ends with one summary line.
The ablations of Tab. 7 are flags:  --init=gaussian|query  x  --grad=full|detach|bo
    SA = gaussian/full   I-SA = gaussian/detach   BO-SA = gaussian/bo
    QSA = query/full     I-QSA = query/detach     BO-QSA = query/bo (default)
"""
import math
import os
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import (DTYPES, CheckpointError, ObjectSegMetrics, ResumableSampler, MetricsLog, check_config,
                    check_finite_step, check_out_dir, clip_gradients, ddp_cleanup, ddp_setup, error_line, fail,
                    fg_iou_dice, get_device, get_rng_state, labels_to_rgb, load_checkpoint, load_resume_checkpoint,
                    mse, nanmean, parse_args, progress, resolve_dtype, save_checkpoint, save_image_grid,
                    save_slot_grid, seed_everything, segmentation_metrics, set_rng_state, train_autocast)

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class Config(common.RunConfig):
    """BO-QSA configuration. Every field can be set from the command line as --key=value.

    Defaults are sized for a 2-core CPU on the built-in `synthetic` dataset; `--dataset=NAME`
    first applies that dataset's paper settings (PRESETS, Tab. 9-13), then your flags.
    """
    # data
    image_size: int = 32            # side in pixels the images are resized to (Tab. 13: 128 or 64; 32 here for a 2-core
                                    # CPU)
    # model
    decoder: str = "mixture"        # decoder that redraws the image from the slots: mixture (Sec. 3.3, Tab. 10) |
                                    # transformer (SLATE, App. A.1, A.3.3, Tab. 12)
    num_slots: int = 7              # number of slots K, the most objects (background included) a scene is split into
                                    # (Tab. 13)
    slot_dim: int = 64              # size of each slot vector (Tab. 11 "Slot Dim")
    mlp_dim: int = 128              # hidden width of the slot MLP (Tab. 11 "MLP Hidden Dim")
    enc_channels: int = 32          # channels of the 4 encoder convs (Tab. 9: 64; official --encoder_channels
                                    # 64 64 64 64)
    dec_channels: int = 32          # channels of the mixture decoder's ConvT 5x5 layers (Tab. 10: 64; official
                                    # --decoder_channels 64 64 64 64)
    enc_kernel: int = 5             # kernel size of the encoder convolutions (Tab. 9: 5x5)
    dec_kernel: int = 5             # kernel size of the decoder's ConvTranspose layers (Tab. 10: 5x5; the output layer
                                    # stays 3x3)
    enc_stride: int = 1             # stride of the first of the 4 encoder convs, the others stride 1 (Tab. 9: 2 at
                                    # 128 px on ShapeStacks/ClevrTex, 1 at 64 px; official --encoder_strides 2 1 1 1)
    dec_strides: tuple = (2, 2, 1, 1, 1)  # stride of every ConvT 5x5 of the mixture decoder, then a ConvT 3x3 to 4
                                    # channels; dec_init_size * prod = image_size (Tab. 10: 2,2,2,2,1 at 128 px,
                                    # 2,2,2,1,1 at 64 px; official --decoder_strides 2 2 2 2 + the stride-1 ConvT
                                    # of models/mixture_decoder.py)
    dec_init_size: int = 8          # side of the grid each slot is broadcast to before decoding (App. A.3.2, spatial
                                    # broadcast of Locatello et al.)
    iters: int = 3                  # slot-attention iterations, the last one after the STE (Tab. 12)
    init: str = "query"             # how the slots start: query (learned queries, QSA, Sec. 3.1) | gaussian (samples of
                                    # a learned mu/sigma, SA)
    grad: str = "bo"                # gradient through the slot-attention iterations: bo (Alg. 1, detach + STE) | detach
                                    # (I-SA) | full (plain backprop)
    drop_path: float = 0.2          # DropPath on the slot MLP residual (official code)
    sigma_steps: int = 2000         # N_sigma: cosine annealing of the query noise 1 -> 0 (App. A.3.1: 30k)
    # transformer decoder, used with --decoder=transformer (App. A.3.3, Tab. 12; CPU-sized here)
    vocab_size: int = 256           # number of dVAE tokens the transformer decoder predicts (Tab. 12: 1024)
    dvae_hid: int = 64              # channels of the dVAE's convolutions (official code: 64)
    d_model: int = 128              # hidden size of the transformer decoder (Tab. 12: 256)
    dec_layers: int = 4             # layers of the transformer decoder (Tab. 12: 4)
    dec_heads: int = 4              # attention heads of the transformer decoder (Tab. 12: 4)
    dec_dropout: float = 0.1        # dropout in the transformer decoder (Tab. 12: 0.1)
    tau_start: float = 1.0          # Gumbel-softmax temperature, cosine 1.0 -> 0.1 (Tab. 12)
    tau_final: float = 0.1          # final Gumbel-softmax temperature (Tab. 12: 0.1)
    tau_steps: int = 2000           # steps of the cosine anneal of the Gumbel-softmax temperature (Tab. 12: 30k)
    lr_dvae: float = 3e-4           # Tab. 12: dVAE lr, no warmup (the rest uses --lr with warmup)
    recon_items: int = 32           # test images reconstructed autoregressively (one pass per token; slow)
    # optimisation (Tab. 11)
    batch_size: int = 16            # images per step over all processes, the global batch (Tab. 11: 128)
    lr: float = 4e-4                # Adam learning rate after the warmup (Tab. 11: 4e-4)
    warmup_steps: int = 300         # steps of linear learning-rate warmup (Tab. 11: 5k)
    decay_steps: int = 20000        # learning-rate half-life in steps: factor 0.5 ** (step / decay_steps) (Tab. 11:
                                    # 50k)
    max_steps: int = 6000           # 30 min on 2 CPU cores with native bf16, 90 min in float32 (Tab. 11: 250k)
    grad_clip: float = 1.0          # clip the gradient norm to this value (official train_mixture_dec.py: 1.0; 0 = off)
    # run
    out_dir: str = "out/boqsa"      # checkpoints, metrics.jsonl, sample images and eval results
    concept_maps: bool = False      # with --eval_only: save each query's attention map (Sec. 5.4, Fig. 4)
    dtype: str = "auto"             # float32 | bfloat16 (autocast of the training forward) | auto: bfloat16 where
                                    # the CPU/GPU runs it natively, else float32; the paper presets: float32


# Paper settings per dataset: slots and image size (Tab. 13), encoder channels and first stride (Tab. 9), decoder
# channels and strides (Tab. 10; the last stride-1 ConvT written out, official models/mixture_decoder.py), batch
# 128 and the full schedule (Tab. 11). ClevrTex: 11 slots (App. A.3.4).
# Precision: float32, as the official Trainer (bf16 autocast stays a speed option: --dtype=bfloat16).
_PAPER = dict(batch_size=128, warmup_steps=5000, decay_steps=50000, max_steps=250000, sigma_steps=30000,
              enc_channels=64, dec_channels=64, num_workers=8, eval_interval=5000, eval_items=0, dtype="float32")
PRESETS = {
    "synthetic": {},
    # official scripts/train/mix_dec_*.sh: --encoder_strides 2 1 1 1 --decoder_strides 2 2 2 2 at 128 px
    "shapestacks": dict(_PAPER, num_slots=8, image_size=128, enc_stride=2, dec_strides=(2, 2, 2, 2, 1)),
    "objectsroom": dict(_PAPER, num_slots=5, image_size=64, enc_stride=1, dec_strides=(2, 2, 2, 1, 1)),
    "clevrtex": dict(_PAPER, num_slots=11, image_size=128, enc_stride=2, dec_strides=(2, 2, 2, 2, 1)),
}
# the ClevrTex settings also serve CLEVR and the ClevrTex test variants (same 128 px, 11 slots)
for _name in ("clevrtex_ood", "clevrtex_camo", "clevr", "clevr6"):
    PRESETS[_name] = dict(PRESETS["clevrtex"])
PRESETS["clevr6"]["num_slots"] = 7
# real images (Tab. 13, 128 px, encoder stride 1 (Tab. 9)); N_sigma = 0 on Cars and Flowers (App. A.3.1).
# YCB / ScanNet / COCO: 6 slots (App. A.3.4); the paper runs them with the transformer decoder only.
_REAL = dict(_PAPER, image_size=128, enc_stride=1, dec_strides=(2, 2, 2, 2, 1))
for _name, _k in (("birds", 3), ("dogs", 2), ("cars", 2), ("flowers", 2), ("ycb", 6), ("scannet", 6), ("coco", 6)):
    PRESETS[_name] = dict(_REAL, num_slots=_k, sigma_steps=0 if _name in ("cars", "flowers") else 30000)

# --decoder=transformer: Tab. 12 on top of the dataset's preset. Slots: Tab. 13 (BO-QSA+Transformer).
# Official code: encoder strides 1 everywhere (attention maps at full resolution), slot and MLP size 256.
_SLATE = dict(slot_dim=256, mlp_dim=256, vocab_size=1024, d_model=256, dec_layers=4, dec_heads=4, dec_dropout=0.1,
              lr=1e-4, lr_dvae=3e-4, warmup_steps=10000, decay_steps=50000, max_steps=250000, tau_steps=30000,
              batch_size=128, enc_stride=1, recon_items=64, dtype="float32")
SLATE_PRESETS = {
    # CPU-sized: a faster schedule for a 30-minute run on 2 cores (bf16, 8000 steps); the paper's 64
    # channels (Tab. 9) with 3x3 encoder kernels, which keep the paper's receptive field relative to the
    # image at 32 px (9/32 px, as 17/64 at 64 px; 5x5 sees 17/32) and are faster; 8 slots: the background
    # takes about 2, and more spare slots split objects (README, Results)
    "synthetic": dict(lr=3e-4, warmup_steps=300, tau_steps=5500, max_steps=8000, num_slots=8, enc_channels=64,
                      enc_kernel=3),
    "shapestacks": dict(_SLATE, num_slots=12),
    "objectsroom": dict(_SLATE, num_slots=6),
}


def build_config(argv=None):
    """Config from the command line: defaults <- PRESETS[--dataset] (<- SLATE_PRESETS for
    --decoder=transformer) <- explicit flags. Exits with one line for an unknown --decoder. `--help` (after
    --dataset / --decoder) lists the flags with that preset's values as the defaults."""
    first = parse_args(Config(), argv, only=("dataset", "decoder", "dtype"))   # picks the preset
    if first.decoder not in ("mixture", "transformer"):
        fail(f"--decoder must be mixture or transformer, got {first.decoder!r}")
    if first.dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}, got {first.dtype!r}")
    preset = dict(PRESETS.get(first.dataset, {}))
    if first.decoder == "transformer":
        preset.update(SLATE_PRESETS.get(first.dataset, _SLATE))
    cfg = parse_args(Config(**preset), argv, epilog=f"Defaults above: the {first.dataset} preset"
                     f"{' with --decoder=transformer' if first.decoder == 'transformer' else ''}; "
                     "--dataset=NAME --help shows another dataset's.")
    check_config(cfg, positive=("image_size", "num_slots", "slot_dim", "mlp_dim", "enc_channels", "dec_channels",
                                "enc_stride", "dec_strides", "dec_init_size", "iters", "vocab_size", "dvae_hid",
                                "d_model", "dec_layers", "dec_heads", "batch_size", "lr", "lr_dvae", "decay_steps",
                                "log_interval", "eval_interval", "tau_start", "tau_final"),
                 nonnegative=("num_workers", "sigma_steps", "tau_steps", "warmup_steps", "max_steps", "grad_clip",
                              "drop_path", "dec_dropout", "recon_items", "eval_items", "test_items"),
                 choices=dict(init=("query", "gaussian"), grad=SlotAttention.GRADS, eval_split=data.SPLITS))
    for name in ("enc_kernel", "dec_kernel"):
        k = getattr(cfg, name)
        if k < 1 or k % 2 == 0:                                     # 'same' padding needs an odd kernel
            fail(f"--{name} must be an odd kernel size (3, 5, ...), got {k}")
    if cfg.image_size % cfg.enc_stride:
        fail(f"--image_size={cfg.image_size} is not divisible by --enc_stride={cfg.enc_stride}", code=2)
    if cfg.decoder == "mixture" and cfg.dec_init_size * math.prod(cfg.dec_strides) != cfg.image_size:
        fail(f"--image_size={cfg.image_size} does not match the decoder: --dec_init_size={cfg.dec_init_size} "
             f"x prod(--dec_strides={','.join(map(str, cfg.dec_strides))}) = "
             f"{cfg.dec_init_size * math.prod(cfg.dec_strides)}; set --dec_strides or --dec_init_size", code=2)
    if cfg.decoder == "transformer" and (cfg.image_size % 4 or cfg.d_model % cfg.dec_heads):
        fail(f"--decoder=transformer needs --image_size divisible by 4 (dVAE patches) and --d_model divisible "
             f"by --dec_heads; got {cfg.image_size}, {cfg.d_model}, {cfg.dec_heads}", code=2)
    return cfg


# -----------------------------------------------------------------------------
# 2. Model


def build_grid(height, width):
    """Position grid [1,H,W,4] with channels [y, x, 1-y, 1-x], each in [0,1] (linspace per axis)."""
    ys = torch.linspace(0.0, 1.0, height)
    xs = torch.linspace(0.0, 1.0, width)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([y, x], dim=-1)
    return torch.cat([grid, 1.0 - grid], dim=-1).unsqueeze(0)


class SoftPositionEmbed(nn.Module):
    """Adds Linear(4 -> C) of the [y, x, 1-y, 1-x] grid to channels-last features [B,H,W,C]."""

    def __init__(self, channels, height, width):
        super().__init__()
        self.dense = nn.Linear(4, channels)
        self.register_buffer("grid", build_grid(height, width), persistent=False)

    def forward(self, x):
        return x + self.dense(self.grid)


ENC_LAYERS = 4      # Tab. 9: 4 conv 5x5 layers (official --encoder_channels 64 64 64 64)


class Encoder(nn.Module):
    """CNN encoder (Tab. 9) + soft position embedding + per-pixel MLP.

    images [B,3,H,W] in [-1,1] -> features [B, N=H'*W', slot_dim], H' = H / enc_stride.
    ENC_LAYERS conv layers with enc_channels maps, the first with stride enc_stride, the others 1.
    """

    def __init__(self, cfg):
        super().__init__()
        chans = [3] + [cfg.enc_channels] * ENC_LAYERS
        strides = [cfg.enc_stride] + [1] * (ENC_LAYERS - 1)                # official --encoder_strides 2 1 1 1
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, cfg.enc_kernel, stride=s, padding=cfg.enc_kernel // 2)  # Tab. 9: 5x5, pad 2, ReLU
            for cin, cout, s in zip(chans[:-1], chans[1:], strides))
        size = cfg.image_size // cfg.enc_stride
        self.pos = SoftPositionEmbed(cfg.enc_channels, size, size)
        self.mlp = nn.Sequential(                                          # LN -> Linear -> ReLU -> Linear
            nn.LayerNorm(cfg.enc_channels), nn.Linear(cfg.enc_channels, cfg.mlp_dim), nn.ReLU(),
            nn.Linear(cfg.mlp_dim, cfg.slot_dim))

    def forward(self, images):
        x = images
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.pos(x.permute(0, 2, 3, 1))                                # [B,H',W',C]
        return self.mlp(x.flatten(1, 2))                                   # [B,N,D]


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al. 2020; eq. (1) of BO-QSA) with the bi-level STE of Alg. 1.

    Self-contained (torch only): copy it into another project as it is.

    forward(inputs [B,N,D_in] float, init [B,K,D] float, grad="bo") -> (slots [B,K,D], attn [B,K,N])
      `attn` is the last iteration's attention, softmax over slots (sums to 1 over K per pixel).
      grad="full":   backprop through all `iters` iterations (SA / QSA).
      grad="detach": the first iters-1 iterations run without gradient (I-SA, Chang et al. 2022);
                     `init` then receives no gradient at all.
      grad="bo":     as detach, then `slots = SG(slots) + init - SG(init)` before the last iteration
                     (Alg. 1 line 5): a straight-through estimator that gives `init` the gradient
                     of the last iteration's input.
    With iters = 3 this is Alg. 1 with T = 2 inner steps plus the final step (official models/slot_attn.py: the STE
    comes before the last of the 3 iterations). Raises ValueError for an unknown `grad`.
    """

    GRADS = ("bo", "detach", "full")     # the gradient through the iterations (--grad, Tab. 7)

    def __init__(self, in_dim, slot_dim, mlp_dim, iters=3, eps=1.0, drop_path=0.0):
        super().__init__()
        # eps: attn / (attn.sum + eps), 1.0 as the official models/slot_attn.py
        self.iters, self.eps, self.drop_path, self.scale = iters, eps, drop_path, slot_dim ** -0.5
        self.norm_inputs = nn.LayerNorm(in_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(in_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(in_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, slot_dim))
        # Initialisation as the official code (models/slot_attn.py with methods/utils.py `linear`, `gru_cell`);
        # the encoder, position embeddings, pre-slot MLP and decoder keep PyTorch's defaults there too.
        for lin in (self.to_q, self.to_k, self.to_v):
            nn.init.xavier_uniform_(lin.weight)                            # linear(..., bias=False)
        nn.init.xavier_uniform_(self.gru.weight_ih)                        # gru_cell
        nn.init.orthogonal_(self.gru.weight_hh)
        nn.init.zeros_(self.gru.bias_ih)
        nn.init.zeros_(self.gru.bias_hh)
        nn.init.kaiming_uniform_(self.mlp[0].weight, nonlinearity="relu")  # linear(..., weight_init='kaiming')
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.xavier_uniform_(self.mlp[2].weight)                        # linear(...)
        nn.init.zeros_(self.mlp[2].bias)

    @staticmethod
    def drop_residual(x, p, training):
        """DropPath (stochastic depth) per sample: zero the whole residual branch of a sample with prob p."""
        if p == 0.0 or not training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
        return x * keep / (1.0 - p)

    def step(self, slots, k, v):
        """One refinement s <- h(s, f_attn(s, x)) (eq. 1, eq. 5). Returns (slots, attn [B,K,N])."""
        B, K, D = slots.shape
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bkd,bnd->bkn", q, k) * self.scale          # k(x) q(s)^T / sqrt(D)
        attn = logits.softmax(dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))  # over SLOTS
        weights = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)       # weighted mean over pixels
        updates = torch.einsum("bkn,bnd->bkd", weights, v)
        slots = self.gru(updates.reshape(-1, D), slots.reshape(-1, D)).reshape(B, K, D)
        slots = slots + self.drop_residual(self.mlp(self.norm_mlp(slots)), self.drop_path, self.training)
        return slots, attn

    def forward(self, inputs, init, grad="bo"):
        if grad not in self.GRADS:
            raise ValueError(f"grad must be one of {'|'.join(self.GRADS)}, got {grad!r}")
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        slots = init                                                       # Alg. 1 line 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad == "full"):
            for _ in range(self.iters - 1):                                # Alg. 1 lines 3-4
                slots, _ = self.step(slots, k, v)
        if grad == "bo":
            slots = slots.detach() + init - init.detach()                  # Alg. 1 line 5 (STE)
        elif grad == "detach":
            slots = slots.detach()                                         # I-SA: first-order only
        return self.step(slots, k, v)                                      # Alg. 1 line 6


class MixtureDecoder(nn.Module):
    """Spatial broadcast mixture decoder (Tab. 10; Watters et al. 2019; App. A.1).

    slots [B,K,D] -> rgb [B,K,3,H,W] (no activation), mask logits [B,K,1,H,W].
    Each slot is broadcast to dec_init_size^2, gets a position embedding, then one ConvTranspose 5x5
    (dec_kernel) + ReLU layer with dec_channels maps per dec_strides entry (the paper's (2,2,2,2,1): Tab. 10,
    official models/mixture_decoder.py: one block per --decoder_strides entry + one stride-1 block) and a
    final ConvTranspose 3x3 to 4 channels.
    """

    def __init__(self, cfg):
        super().__init__()
        s0 = cfg.dec_init_size
        self.init_size = s0
        self.pos = SoftPositionEmbed(cfg.slot_dim, s0, s0)
        chans = [cfg.slot_dim] + [cfg.dec_channels] * len(cfg.dec_strides)
        self.layers = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, cfg.dec_kernel, stride=s, padding=cfg.dec_kernel // 2,  # Tab. 10: 5x5
                               output_padding=1 if s == 2 else 0)
            for cin, cout, s in zip(chans[:-1], chans[1:], cfg.dec_strides))
        self.out = nn.ConvTranspose2d(chans[-1], 4, 3, stride=1, padding=1)    # RGB + mask logit
        if s0 * math.prod(cfg.dec_strides) != cfg.image_size:
            raise ValueError(f"decoder output {s0}*prod({cfg.dec_strides}) != image_size {cfg.image_size}: "
                             f"set --dec_strides or --dec_init_size")

    def forward(self, slots):
        B, K, D = slots.shape
        s0 = self.init_size
        x = slots.reshape(B * K, 1, 1, D).expand(B * K, s0, s0, D)         # spatial broadcast
        x = self.pos(x).permute(0, 3, 1, 2)
        for layer in self.layers:
            x = F.relu(layer(x))
        x = self.out(x)
        x = x.reshape(B, K, 4, *x.shape[-2:])
        return x[:, :, :3], x[:, :, 3:]


def sigma_schedule(step, total, start=1.0, final=0.0):
    """Cosine annealing of the query noise scale, start -> final over `total` steps (App. A.3.1)."""
    if total <= 0 or step >= total:
        return final
    return 0.5 * (start - final) * math.cos(math.pi * step / total) + 0.5 * (start + final)


def tau_schedule(step, total, start=1.0, final=0.1):
    """Gumbel-softmax temperature, cosine start -> final over `total` steps (Tab. 12: 1.0 -> 0.1, 30k)."""
    return sigma_schedule(step, total, start, final)


# --- transformer decoder: dVAE tokens + autoregressive transformer (SLATE; App. A.1, A.3.3, Tab. 12)


class ConvBlock(nn.Module):
    """Conv2d (no bias, kaiming) -> GroupNorm(1 group) -> ReLU: the SLATE / official dVAE block."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        nn.init.kaiming_uniform_(self.conv.weight, nonlinearity="relu")
        self.norm = nn.GroupNorm(1, cout)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class DVAE(nn.Module):
    """Discrete VAE of SLATE (Singh et al. 2021) with the kernel-3 encoder of BO-QSA (App. A.3.3).

    encode(images [B,3,H,W] in [0,1]) -> log-probabilities [B,V,H/4,W/4] over the vocabulary
        (a 4x4 stride-4 patch conv, 6 convs of kernel `kernel`, a 1x1 conv to V; official code).
    decode(z [B,V,h,w], one-hot or relaxed) -> images [B,3,4h,4w] (no activation, not clamped).
    H and W must be multiples of 4.
    """

    def __init__(self, vocab_size, hid=64, kernel=3):
        super().__init__()
        self.encoder = nn.Sequential(
            ConvBlock(3, hid, 4, 4),
            *[ConvBlock(hid, hid, kernel, 1, kernel // 2) for _ in range(6)],
            nn.Conv2d(hid, vocab_size, 1))
        self.decoder = nn.Sequential(
            ConvBlock(vocab_size, hid, 1), ConvBlock(hid, hid, 3, 1, 1), ConvBlock(hid, hid, 3, 1, 1),
            ConvBlock(hid, hid, 1), ConvBlock(hid, hid * 4, 1), nn.PixelShuffle(2),
            ConvBlock(hid, hid, 3, 1, 1), ConvBlock(hid, hid, 1), ConvBlock(hid, hid, 1),
            ConvBlock(hid, hid * 4, 1), nn.PixelShuffle(2), nn.Conv2d(hid, 3, 1))

    def encode(self, images):
        return F.log_softmax(self.encoder(images), dim=1)

    def decode(self, z):
        return self.decoder(z)


class Attention(nn.Module):
    """Multi-head attention without biases (official SLATE code); dropout on weights and output.

    forward(x [B,T,d], context [B,S,d], causal) -> [B,T,d]. causal=True: position t sees 0..t only.
    """

    def __init__(self, d, heads, dropout, gain=1.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        for lin in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.xavier_uniform_(self.o.weight, gain)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, context, causal=False):
        B, T, d = x.shape
        split = lambda t: t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)       # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.o(out.transpose(1, 2).reshape(B, T, d)))


class DecoderBlock(nn.Module):
    """Pre-LN transformer decoder block: causal self-attention, cross-attention to the slots, FFN (4d).

    As in the official code the first block normalises its input in place (x = LN(x)) before the
    residual self-attention; the others add to the un-normalised stream.
    """

    def __init__(self, d, heads, dropout, gain, first):
        super().__init__()
        self.first = first
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, heads, dropout, gain)
        self.cross_attn = Attention(d, heads, dropout, gain)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        nn.init.kaiming_uniform_(self.ffn[0].weight, nonlinearity="relu")
        nn.init.xavier_uniform_(self.ffn[2].weight, gain)
        nn.init.zeros_(self.ffn[0].bias)
        nn.init.zeros_(self.ffn[2].bias)

    def forward(self, x, slots):
        if self.first:
            x = self.norm1(x)
            x = x + self.self_attn(x, x, causal=True)
        else:
            h = self.norm1(x)
            x = x + self.self_attn(h, h, causal=True)
        x = x + self.cross_attn(self.norm2(x), slots)
        return x + self.ffn(self.norm3(x))


class TransformerDecoder(nn.Module):
    """Autoregressive transformer over dVAE tokens conditioned on slots (App. A.1: o_l = g(s; z_<l)).

    forward(tokens [B,L] int64 in [0,V), slots [B,K,slot_dim]) -> logits [B,L,V], where logits[:, l]
    depends on tokens[:, :l] only (teacher forcing: input = [BOS, z_1..z_{L-1}]; BOS = index 0 of
    the embedding table, token t = index t+1). Learned positional embedding (L+1 positions).
    generate(slots, L) -> tokens [B,L] decoded greedily (argmax) one token at a time, as SLATE does.
    """

    def __init__(self, cfg, num_tokens):
        super().__init__()
        d, n = cfg.d_model, cfg.dec_layers
        self.dictionary = nn.Embedding(cfg.vocab_size + 1, d)                 # + BOS
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, num_tokens + 1, d)))
        self.drop = nn.Dropout(cfg.dec_dropout)
        self.slot_proj = nn.Linear(cfg.slot_dim, d, bias=False)
        nn.init.xavier_uniform_(self.slot_proj.weight)
        gain = (3 * n) ** -0.5                                                   # official init
        self.blocks = nn.ModuleList(DecoderBlock(d, cfg.dec_heads, cfg.dec_dropout, gain, i == 0) for i in range(n))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.vocab_size, bias=False)
        nn.init.xavier_uniform_(self.out.weight)

    def logits(self, inputs, slots):
        """inputs [B,T] embedding indices (0 = BOS) -> logits [B,T,V] for the next token."""
        x = self.drop(self.dictionary(inputs) + self.pos[:, :inputs.shape[1]])
        s = self.slot_proj(slots)
        for block in self.blocks:
            x = block(x, s)
        return self.out(self.norm(x))

    def forward(self, tokens, slots):
        bos = tokens.new_zeros(tokens.shape[0], 1)
        return self.logits(torch.cat([bos, tokens[:, :-1] + 1], dim=1), slots)

    @torch.no_grad()
    def generate(self, slots, num_tokens):
        inputs = torch.zeros(slots.shape[0], 1, dtype=torch.long, device=slots.device)
        for _ in range(num_tokens):
            nxt = self.logits(inputs, slots)[:, -1].argmax(-1, keepdim=True)
            inputs = torch.cat([inputs, nxt + 1], dim=1)
        return inputs[:, 1:] - 1


class BOQSA(nn.Module):
    """BO-QSA with the mixture decoder (Sec. 3.3, App. A.3.2) or the transformer decoder (App. A.1, A.3.3).

    forward(images [B,3,H,W] float in [0,1], sigma=0.0, tau=None) -> dict
        loss   scalar. mixture: MSE between reconstruction and input, both in [-1,1] (official
               convention). transformer: L_dVAE + L_CE (App. A.1), each summed over pixels / tokens
               and divided by B (official code).
        recon  [B,3,H,W] in [0,1] (not clamped): the mixture reconstruction, or the dVAE's
               reconstruction of its own tokens (the slots' reconstruction is `reconstruct()`)
        masks  [B,K,H,W] softmax over slots (sum to 1 per pixel): the decoder alpha masks
               (mixture), or the last slot-attention map resized to H x W (transformer, App. A.1)
        slots  [B,K,D] final slots
        attn   [B,K,N] last slot-attention map over the N encoder positions
        rgb    [B,K,3,H,W] per-slot RGB in [0,1] (mixture only)
        loss_dvae, loss_ce, tokens [B,L] (transformer only)
    `sigma` is the multiplicative noise of the queries (App. A.3.1), used in training mode only.
    `tau` is the Gumbel-softmax temperature (transformer; default tau_final). In eval mode the
    tokens are the dVAE's argmax (no Gumbel noise) so that evaluation is deterministic.
    Raises ValueError if the image size differs from config.image_size, or for bad settings.
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.init not in ("query", "gaussian"):
            raise ValueError(f"--init must be query|gaussian, got {cfg.init!r}")
        if cfg.decoder not in ("mixture", "transformer"):
            raise ValueError(f"--decoder must be mixture|transformer, got {cfg.decoder!r}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if cfg.init == "query":                                            # learned queries s0 = phi_init
            self.queries = nn.Embedding(cfg.num_slots, cfg.slot_dim)
            nn.init.xavier_uniform_(self.queries.weight)
        else:                                                              # SA: s0 ~ N(mu, diag(sigma))
            self.slots_mu = nn.Parameter(torch.empty(1, 1, cfg.slot_dim))
            self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, cfg.slot_dim))
            nn.init.xavier_uniform_(self.slots_mu)
            nn.init.xavier_uniform_(self.slots_log_sigma)
        self.slot_attention = SlotAttention(cfg.slot_dim, cfg.slot_dim, cfg.mlp_dim, cfg.iters, drop_path=cfg.drop_path)
        if cfg.decoder == "mixture":
            self.decoder = MixtureDecoder(cfg)
        else:
            if cfg.image_size % 4:
                raise ValueError(f"--decoder=transformer needs --image_size divisible by 4 (dVAE patches), "
                                 f"got {cfg.image_size}")
            self.num_tokens = (cfg.image_size // 4) ** 2                   # L tokens of 4x4 patches
            self.dvae = DVAE(cfg.vocab_size, cfg.dvae_hid)                 # encoder kernel 3 (App. A.3.3)
            self.decoder = TransformerDecoder(cfg, self.num_tokens)

    def initial_slots(self, batch, sigma=0.0):
        """Slot initialisation [B,K,D]: queries (+ multiplicative noise in training) or Gaussian."""
        K, D = self.cfg.num_slots, self.cfg.slot_dim
        if self.cfg.init == "gaussian":
            mu = self.slots_mu.expand(batch, K, D)
            return mu + self.slots_log_sigma.exp() * torch.randn_like(mu)
        mu = self.queries.weight.unsqueeze(0).expand(batch, K, D)
        if self.training and sigma > 0:
            mu = mu + sigma * mu.detach() * torch.randn_like(mu)           # official slot_attn.py: std sigma*|mu|
        return mu

    def _inputs(self, images):
        H, W = images.shape[-2:]
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        # official methods/method_*.py: inputs in [-1,1] for the mixture model, [0,1] for the transformer model
        return images * 2.0 - 1.0 if self.cfg.decoder == "mixture" else images

    def _attn_masks(self, attn):
        """[B,K,N] attention over encoder positions -> [B,K,H,W] (bilinear if the encoder strides)."""
        h = int(math.isqrt(attn.shape[-1]))
        m = attn.reshape(*attn.shape[:2], h, h)
        if h != self.cfg.image_size:
            m = F.interpolate(m, size=(self.cfg.image_size,) * 2, mode="bilinear", align_corners=False)
        return m

    def forward(self, images, sigma=0.0, tau=None):
        x = self._inputs(images)
        feats = self.encoder(x)
        init = self.initial_slots(x.shape[0], sigma)
        slots, attn = self.slot_attention(feats, init, self.cfg.grad)
        if self.cfg.decoder == "transformer":
            return self._transformer(x, slots, attn, self.cfg.tau_final if tau is None else tau)
        rgb, logits = (t.to(x.dtype) for t in self.decoder(slots))         # bf16 autocast: composite in x's dtype
        masks = logits.softmax(dim=1)                                      # m_i, softmax over slots
        recon = (masks * rgb).sum(dim=1)                                   # I_hat = sum_i m_i I_i
        loss = F.mse_loss(recon, x)
        return dict(loss=loss, recon=(recon + 1) / 2, masks=masks.squeeze(2), slots=slots,
                    attn=attn, rgb=(rgb + 1) / 2)

    def _transformer(self, x, slots, attn, tau):
        """App. A.1: z = f_dVAE(I); o_l = g(s; z_<l); L = ||g_dVAE(z) - I||^2 + sum_l CE(z_l, o_l)."""
        B = x.shape[0]
        log_probs = self.dvae.encode(x)                                    # [B,V,h,w]
        if self.training:                                                  # relaxed sample for the dVAE
            z_soft = F.gumbel_softmax(log_probs, tau=tau, hard=False, dim=1)
            # the transformer's targets are a second, hard sample, detached (official code)
            tokens = F.gumbel_softmax(log_probs, tau=tau, hard=True, dim=1).detach().argmax(1)
        else:                                                              # deterministic evaluation
            z_soft = (log_probs / tau).softmax(dim=1)
            tokens = log_probs.argmax(1)
        recon = self.dvae.decode(z_soft)
        loss_dvae = (recon - x).pow(2).sum() / B                           # L_dVAE (sum / B, official)
        tokens = tokens.flatten(1)                                         # [B,L], row-major patches
        logits = self.decoder(tokens, slots)                               # [B,L,V]
        loss_ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum") / B  # L_CE
        return dict(loss=loss_dvae + loss_ce, loss_dvae=loss_dvae, loss_ce=loss_ce, recon=recon, tokens=tokens,
                    masks=self._attn_masks(attn), slots=slots, attn=attn)

    @torch.no_grad()
    def reconstruct(self, slots):
        """Image from slots [B,K,D] (transformer): tokens decoded autoregressively (greedy), then the
        dVAE decoder. Returns [B,3,H,W] in [0,1] (clamped). One transformer pass per token."""
        h = self.cfg.image_size // 4
        tokens = self.decoder.generate(slots, self.num_tokens)
        z = F.one_hot(tokens, self.cfg.vocab_size).float().transpose(1, 2).reshape(-1, self.cfg.vocab_size, h, h)
        return self.dvae.decode(z).clamp(0, 1)

    @torch.no_grad()
    def query_attention(self, images):
        """Attention of the learned initial queries (no iteration, no noise) over the image, softmax
        over slots: [B,K,H,W] in [0,1]. The concept-binding maps of Sec. 5.4 / Fig. 4."""
        x = self._inputs(images)
        inputs = self.slot_attention.norm_inputs(self.encoder(x))
        k = self.slot_attention.to_k(inputs)
        q = self.slot_attention.to_q(self.slot_attention.norm_slots(self.initial_slots(x.shape[0])))
        attn = (torch.einsum("bkd,bnd->bkn", q, k) * self.slot_attention.scale).softmax(dim=1)
        return self._attn_masks(attn)


# -----------------------------------------------------------------------------
# 3. Official checkpoints (official test/*.py: Lightning, prefix "model.")

_OFFICIAL_RENAMES = [  # (official prefix, our prefix), first match wins
    ("slot_attn.slot_attention.norm_feature.", "slot_attention.norm_inputs."),
    ("slot_attn.slot_attention.project_k.", "slot_attention.to_k."),
    ("slot_attn.slot_attention.project_v.", "slot_attention.to_v."),
    ("slot_attn.slot_attention.project_q.", "slot_attention.to_q."),
    ("slot_attn.slot_attention.", "slot_attention."),        # norm_slots, norm_mlp, gru, mlp.{0,2}
    ("slot_attn.pos_emb.dense.", "encoder.pos.dense."),
    ("slot_attn.mlp.", "encoder.mlp."),                       # LN, Linear, ReLU, Linear: same indices
    ("slot_attn.slots_init.", "queries."),
    ("decoder.pos_emb.dense.", "decoder.pos.dense."),
]


def convert_official_state_dict(state_dict):
    """Official BO-QSA mixture-model state dict -> BOQSA state dict.

    Accepts a Lightning checkpoint dict (with "state_dict") or a bare state dict, keys with or
    without the "model." prefix. Position grids (`*.pos_emb.grid`) are dropped: ours are
    recomputed buffers with the same values. Raises KeyError naming any key it cannot map.
    """
    sd = state_dict.get("state_dict", state_dict)
    out = {}
    for key, value in sd.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k.endswith("pos_emb.grid"):
            continue
        new = None
        if k.startswith("encoder.conv."):                                  # encoder.conv.{i}.0.*
            i, _, rest = k[len("encoder.conv."):].split(".", 2)
            new = f"encoder.convs.{i}.{rest}"
        elif k.startswith("decoder.conv.") and ".0.conv.0." in k:          # decoder.conv.{i}.0.conv.0.*
            i = k[len("decoder.conv."):].split(".", 1)[0]
            new = f"decoder.layers.{i}.{k.split('.0.conv.0.', 1)[1]}"
        elif k.startswith("decoder.conv.") and k.split(".")[3] == "1":      # decoder.conv.4.1.*: final ConvT
            new = "decoder.out." + k.split(".", 4)[4]
        else:
            for old, ours in _OFFICIAL_RENAMES:
                if k.startswith(old):
                    new = ours + k[len(old):]
                    break
        if new is None:
            raise KeyError(f"official checkpoint key {key!r} has no counterpart in BOQSA")
        out[new] = value
    return out


def official_settings(hparams):
    """Our Config fields from an official checkpoint's hyper-parameters (the flags of the official
    train/train_mixture_dec.py; absent ones are skipped): --encoder_channels (equal widths) -> enc_channels,
    --decoder_channels (equal widths) -> dec_channels, --encoder_strides (2 1 1 1) -> enc_stride = its first
    entry, --decoder_strides (2 2 2 2) -> dec_strides with the stride-1 ConvT that the official Decoder
    (models/mixture_decoder.py) adds after them: (2, 2, 2, 2, 1).
    hparams: a dict or an argparse Namespace (Lightning's "hyper_parameters"); anything else counts as {}.
    Returns a dict {field: value}. Raises ValueError (one line) for a setting BOQSA cannot build: another
    number of encoder layers than ENC_LAYERS, an encoder stride other than 1 after the first, unequal widths."""
    hp = hparams if isinstance(hparams, dict) else getattr(hparams, "__dict__", {})
    out = {}
    strides = hp.get("encoder_strides")
    if strides is not None:
        strides = [int(s) for s in strides]
        if len(strides) != ENC_LAYERS or any(s != 1 for s in strides[1:]):
            raise ValueError(f"official --encoder_strides {' '.join(map(str, strides))}: BOQSA has {ENC_LAYERS} "
                             f"encoder convs, only the first with a stride other than 1 (--enc_stride)")
        out["enc_stride"] = strides[0]
    for name, ours in (("encoder_channels", "enc_channels"), ("decoder_channels", "dec_channels")):
        chans = hp.get(name)
        if chans is not None:
            if len(set(int(c) for c in chans)) != 1:
                raise ValueError(f"official --{name} {' '.join(map(str, chans))}: BOQSA has one width for all "
                                 f"these layers (--{ours})")
            out[ours] = int(chans[0])
    if hp.get("decoder_strides") is not None:
        out["dec_strides"] = tuple(int(s) for s in hp["decoder_strides"]) + (1,)
    return out


def load_official(model, path):
    """Load an official BO-QSA checkpoint into `model` (strict). Exits with one line on a mismatch, naming
    the flag when the checkpoint's hyper-parameters (official_settings) differ from model.cfg."""
    ckpt = load_checkpoint(path, weights_only=False)                  # Lightning pickles hparams
    try:
        sd = convert_official_state_dict(ckpt)
    except KeyError as e:
        fail(f"{path}: {e.args[0]}; only official mixture-decoder checkpoints can be converted")
    try:
        settings = official_settings(ckpt.get("hyper_parameters"))
    except ValueError as e:
        fail(f"{path}: {e}")
    for key, value in settings.items():
        if not common.same_setting(value, getattr(model.cfg, key)):
            fail(f"{path} was trained with --{key}={common.flag_value(value)}, not "
                 f"{common.flag_value(getattr(model.cfg, key))}; pass --{key}={common.flag_value(value)}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        fail(f"{path}: does not match this config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
             f"set --dataset/--num_slots/--image_size to the checkpoint's settings")


# -----------------------------------------------------------------------------
# 4. Training


def lr_factor(step, cfg):
    """Tab. 11: linear warmup over warmup_steps, then x0.5 every decay_steps (continuous)."""
    return min(1.0, step / max(1, cfg.warmup_steps)) * 0.5 ** (step / cfg.decay_steps)


def load_dataset(cfg, split):
    """data.build_dataset(cfg.dataset, split) at cfg.image_size; exits with the loader's one-line message."""
    # official data/clevrtex_dataset.py: the official BO-QSA code resizes the whole 320x240 ClevrTex frame, no centre crop
    options = {"crop": None} if cfg.dataset.startswith("clevrtex") else {}
    try:
        return data.build_dataset(cfg.dataset, split, root=cfg.data_dir or None, image_size=cfg.image_size, **options)
    except data.DatasetError as e:
        fail(str(e) + (common.VAL_SPLIT_HINT if split == "val" else ""))   # val: read for --eval_split


def train_loader(cfg, ddp, start_step):
    """Endless shuffled loader of global batch cfg.batch_size, resuming at `start_step`; pinned memory on
    CUDA (so the non_blocking copies overlap)."""
    ds = load_dataset(cfg, "train")
    sampler = ResumableSampler(len(ds), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                               rank=ddp.rank, world_size=ddp.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // ddp.world_size, sampler=sampler,
                                       num_workers=cfg.num_workers, drop_last=True,
                                       worker_init_fn=common.worker_ignores_stop_signals,
                                       persistent_workers=cfg.num_workers > 0,
                                       pin_memory=ddp.device.type == "cuda")


FOREGROUND = ("birds", "dogs", "cars", "flowers")       # Tab. 5: foreground IoU / Dice
REAL_OBJECTS = ("ycb", "scannet", "coco")               # Tab. 4: AP / PQ / precision / recall (Yang & Yang 2022)


def batch_metrics(dataset, true, masks):
    """Per-image metrics of one batch: dict of float64 tensors [B].

    true [B,H,W] int (0 = background), masks [B,K,H,W] slot masks (softmax over slots).
    Foreground datasets (Tab. 5): "iou", "dice" of the slot mask (one-hot argmax over slots)
    that best matches the true foreground (common.fg_iou_dice: the best slot is taken separately
    for IoU and Dice, as the official code does; the paper words it as the slot with the largest
    intersection, Sec. 5.2). Other datasets: common.segmentation_metrics on argmax + 1.
    """
    if dataset in FOREGROUND:
        iou, dice = fg_iou_dice(true, masks)
        return {"iou": iou, "dice": dice}
    return segmentation_metrics(true, masks.argmax(dim=1).cpu() + 1)


@torch.no_grad()
def evaluate(model, cfg, device, num_items=0, image_path=None, split="test"):
    """Metrics on the first `num_items` images (0 = all) of `split` (train | val | test): dict of means.

    Synthetic sets: ARI, ARI-FG, MSC-FG, mBO, mIoU. Birds / Dogs / Cars / Flowers: IoU and Dice
    (batch_metrics). YCB / ScanNet / COCO: AP, PQ, precision, recall over the whole split
    (common.ObjectSegMetrics; confidence = the max slot probability per pixel, official code).
    MSE is the per-image sum of squared errors over C,H,W with images in [0,1] (ClevrTex
    convention); `mse_paper` is BO-QSA's F.mse_loss * H * W in [-1,1] (official `test_step`).
    Transformer decoder: MSE of the slots' autoregressive reconstruction on the first
    cfg.recon_items images, and `mse_dvae` of the dVAE's own reconstruction on all of them.
    Datasets without instance masks report MSE only. Writes the PNG grid to `image_path`.
    """
    model.eval()
    ds = load_dataset(cfg, split)
    has_masks = getattr(ds, "has_masks", True)
    if num_items and num_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(num_items))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 2),
                                         worker_init_fn=common.worker_ignores_stop_signals)
    sums, first, n_recon = {}, None, 0
    objects = ObjectSegMetrics() if cfg.dataset in REAL_OBJECTS else None
    transformer = cfg.decoder == "transformer"
    if not has_masks:
        print(f"{cfg.dataset}: no instance masks present in {cfg.data_dir or 'the dataset'}; reporting MSE only")
    for batch in loader:
        images = batch["image"].to(device)
        out = model(images)
        recon, m = out["recon"], {}
        if transformer:
            m["mse_dvae"] = mse(images.cpu(), recon.cpu())
            n = max(0, min(images.shape[0], cfg.recon_items - n_recon))    # autoregressive: a pass per token
            recon = model.reconstruct(out["slots"][:n]) if n > 0 else None
            images_r, n_recon = images[:n], n_recon + n
            out["ar_recon"] = recon
        else:
            images_r = images
        if recon is not None and recon.shape[0]:
            m["mse"] = mse(images_r.cpu(), recon.cpu())
            m["mse_paper"] = ((recon - images_r) * 2).pow(2).mean(dim=(1, 2, 3)).cpu() * images.shape[-1] * images.shape[-2]
        if "mask" in batch:
            if objects is not None:
                masks = out["masks"].cpu()
                objects.update(batch["mask"], masks.argmax(1), masks.max(1).values)
            else:
                m.update(batch_metrics(cfg.dataset, batch["mask"], out["masks"].cpu()))
        for k, v in m.items():
            sums.setdefault(k, []).append(v.double())
        if first is None:
            first = (images.cpu(), out, out["masks"].argmax(dim=1).cpu() + 1, batch.get("mask"))
    model.train()
    if image_path and first is not None:
        save_samples(image_path, cfg, *first)
    metrics = {k: nanmean(torch.cat(v)) for k, v in sums.items()}
    if objects is not None and has_masks:
        metrics.update(objects.compute())
    return metrics


def save_samples(path, cfg, images, out, pred, true=None):
    """PNG grid: input, reconstruction(s), predicted / true segmentation, one row per slot."""
    if cfg.decoder == "mixture":
        return save_slot_grid(path, images, out["recon"].cpu().clamp(0, 1), pred, true,
                              (out["masks"].unsqueeze(2) * out["rgb"]).cpu().clamp(0, 1))
    rows = [("input", images), ("dVAE recon", out["recon"].cpu().clamp(0, 1))]
    if out.get("ar_recon") is not None and out["ar_recon"].shape[0]:
        rows.append(("recon", out["ar_recon"].cpu()))                         # tokens sampled from slots
    rows.append(("pred seg", labels_to_rgb(pred if true is None else common.match_to_truth(pred, true))))
    if true is not None:
        rows.append(("true seg", labels_to_rgb(true)))
    m = out["masks"].cpu().unsqueeze(2)
    rows += [(f"slot {k}", (m[:, k] * images + 1 - m[:, k]).clamp(0, 1)) for k in range(m.shape[1])]  # official
    return save_image_grid(path, rows)


def save_concept_maps(model, cfg, device, path, num_images=8):
    """Sec. 5.4 / Fig. 4: each learned query's attention over `num_images` test images, one row per
    query (white = attended), as a PNG grid. Returns the maps [B,K,H,W]."""
    ds = load_dataset(cfg, "test")
    ds = torch.utils.data.Subset(ds, range(min(num_images, len(ds))))
    images = next(iter(torch.utils.data.DataLoader(ds, batch_size=num_images)))["image"].to(device)
    maps = model.eval().query_attention(images).cpu()
    rows = [("input", images.cpu())] + [(f"query {k}", maps[:, k:k + 1]) for k in range(maps.shape[1])]
    save_image_grid(path, rows, max_images=num_images)
    return maps


def format_metrics(m):
    names = {"ari_fg": "ARI-FG", "msc_fg": "MSC-FG", "mbo": "mBO", "miou": "mIoU", "ari": "ARI", "mse": "MSE", "mse_paper": "MSE(paper)",
             "mse_dvae": "MSE(dVAE)", "iou": "IoU", "dice": "Dice", "ap": "AP", "pq": "PQ", "precision": "Pre",
             "recall": "Rec"}
    return "  ".join(f"{names.get(k, k)} {v:.4f}" for k, v in m.items())


def param_groups(model, cfg):
    """Adam parameter groups (Tab. 12): "dvae" at lr_dvae without warmup, "main" (the rest) at lr."""
    dvae = [p for n, p in model.named_parameters() if n.startswith("dvae.")]
    main = [p for n, p in model.named_parameters() if not n.startswith("dvae.")]
    return ([dict(params=dvae, lr=cfg.lr_dvae, name="dvae")] if dvae else []) + [dict(params=main, lr=cfg.lr, name="main")]


def group_lr(name, step, cfg):
    """Learning rate of a parameter group: dVAE lr_dvae * 0.5 ** (step / decay_steps) (no warmup,
    official code); main lr * lr_factor (warmup + decay, Tab. 11 / 12)."""
    if name == "dvae":
        return cfg.lr_dvae * 0.5 ** (step / cfg.decay_steps)
    return cfg.lr * lr_factor(step, cfg)


# The Config fields that shape the model: resume refuses another value; --eval_only / --predict copy them.
MODEL_KEYS = ("decoder", "num_slots", "slot_dim", "mlp_dim", "enc_channels", "dec_channels", "enc_stride",
              "dec_strides", "dec_init_size", "init", "iters", "image_size", "vocab_size", "dvae_hid", "d_model",
              "dec_layers", "dec_heads", "tau_final", "enc_kernel", "dec_kernel")

def train(cfg, stop=None):
    """The training loop: resumes from out_dir/ckpt.pt, logs to out_dir/metrics.jsonl, saves PNGs.
    `stop`: common.training_run's StopSignals (SIGTERM / SIGINT save a checkpoint after the current step
    and exit, common.stop_on_signal).

    Every eval_interval steps (and at the last one) a checkpoint and an evaluation of eval_items images of
    cfg.eval_split (default val), logged as <split>_<metric>. After the last step, rank 0 evaluates on the
    test split (common.finish_training: the whole split up to 1024 images, else eval_items; --test_items
    sets it), writes out_dir/eval_<dataset>.json and prints the summary line (steps, wall time since this
    call, test metrics, out_dir); a run resumed after that evaluation prints its summary line again."""
    start_time = time.time()
    ddp = ddp_setup(device=cfg.device)
    device = ddp.device
    seed_everything(cfg.seed + ddp.rank)
    torch.set_flush_denormal(True)      # denormal floats made CPU training steps up to 6x slower
    if cfg.batch_size % ddp.world_size:
        fail(f"--batch_size={cfg.batch_size} must be divisible by the number of processes {ddp.world_size}")

    dtype = resolve_dtype(device, cfg.dtype, announce="training" if ddp.is_main else "")
    if ddp.is_main:
        check_out_dir(cfg.out_dir)
    model = BOQSA(cfg).to(device)
    optimizer = torch.optim.Adam(param_groups(model, cfg))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, ckpt = 0, None
    if cfg.resume:
        ckpt = load_resume_checkpoint(ckpt_path)                           # ckpt.pt, else ckpt_prev.pt, else None
    if ckpt is not None:
        common.check_same_model(ckpt.get("config"), cfg, ckpt_path, common.RUN_KEYS + MODEL_KEYS)
        load_weights(model, ckpt_path, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if ddp.is_main:
            print(f"resuming from {ckpt_path} at step {step}")
    elif cfg.init_from:
        load_weights(model, cfg.init_from)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        # I-SA / I-QSA leave the initialisation without gradient: tell DDP not to wait for it
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.grad == "detach")
    data_iter = iter(train_loader(cfg, ddp, step))       # the sampler skips the batches already seen
    if ddp.is_main:
        load_dataset(cfg, cfg.eval_split)                 # the periodic evaluations' split: its errors before any step
    if ckpt is not None:
        set_rng_state(ckpt["rng"])                        # after iter(): it draws a seed from torch's RNG
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl")) if ddp.is_main else None
    if log is not None:
        log.truncate(step)                                # lines past the checkpoint's step would repeat

    def save():
        save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                        step=step, rng=get_rng_state(), config=asdict(cfg)))

    def save_and_evaluate():
        rng = get_rng_state()                             # evaluation must not move the training RNG
        save()
        metrics = evaluate(raw_model, cfg, device, cfg.eval_items, os.path.join(cfg.out_dir, f"samples_{step:07d}.png"),
                           split=cfg.eval_split)
        log.log(step, **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()})
        bar.write(f"step {step} ({cfg.eval_split}): {format_metrics(metrics)}  (saved {ckpt_path})")
        set_rng_state(rng)

    bar = progress(cfg.max_steps, initial=step, desc="train", disable=not ddp.is_main)
    model.train()
    t0 = time.time()
    while step < cfg.max_steps:
        images = next(data_iter)["image"].to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = group_lr(group.get("name", "main"), step, cfg)  # Tab. 11 / 12 schedules
        sigma = sigma_schedule(step, cfg.sigma_steps)                      # App. A.3.1
        tau = tau_schedule(step, cfg.tau_steps, cfg.tau_start, cfg.tau_final)  # Tab. 12 (transformer)
        with train_autocast(device, dtype):                                # --dtype (float32 in the presets)
            out = model(images, sigma=sigma, tau=tau)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)      # official gradient_clip_val=1.0 (0 = off)
        check_finite_step(step, loss.item(), grad_norm, ckpt_path, cfg.lr)  # a diverged run stops here
        optimizer.step()
        step += 1
        bar.update()
        if step % cfg.log_interval == 0 and ddp.is_main:
            dt, t0 = time.time() - t0, time.time()
            img_s = cfg.log_interval * cfg.batch_size / dt
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}", sigma=f"{sigma:.2f}")
            parts = {k: out[k].item() for k in ("loss_dvae", "loss_ce") if k in out}
            if parts:
                parts["tau"] = tau
            log.log(step, loss=loss.item(), lr=optimizer.param_groups[-1]["lr"], sigma=sigma, img_per_s=img_s, **parts)
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and ddp.is_main:
            save_and_evaluate()
        common.stop_on_signal(stop, ddp, step, ckpt_path, save)           # SIGTERM / SIGINT: save, exit
    bar.close()
    if stop is not None:
        stop.restore()                                    # a signal now acts as usual
    del model                                             # DDP's reducer goes while its process group lives
    ddp_cleanup()
    if ddp.is_main and step and step == cfg.max_steps:   # the final evaluation, on the test split
        common.finish_training(cfg, raw_model, device, evaluate, format_metrics, load_dataset, script="boqsa.py",
                               step=step, start_time=start_time, checkpoint=ckpt_path,
                               resumed_at=ckpt["step"] if ckpt is not None else None, extra=dict(iters=cfg.iters),
                               note=f"{cfg.iters} slot-attention iterations")


# -----------------------------------------------------------------------------
# 5. Evaluation and prediction


def load_weights(model, path, ckpt=None):
    """The weights of checkpoint file `path` into `model` (resume, --init_from, --eval_only, --predict): one of
    our checkpoints (its "model"), or an official one (converted). `ckpt`: the file's dict when it is already
    read (resume). Exits with one line when the file is missing, truncated, or was made for another model or
    config."""
    sd = ckpt if ckpt is not None else load_checkpoint(path, weights_only=False)   # a file the user chose to trust
    if "model" in sd and "config" in sd:                                   # one of ours
        try:
            model.load_state_dict(sd["model"])
        except RuntimeError as e:
            fail(f"{path} was trained with another model or config ({error_line(e)[:160]}); pass its flags "
                 f"(e.g. --dataset, --decoder, --num_slots, --image_size) or use --eval_only, which reads them")
    else:
        load_official(model, path)


def checkpoint_config(cfg, explicit=()):
    """common.checkpoint_config with MODEL_KEYS, so --eval_only needs no flags. The dataset may differ
    from the training one (zero-shot transfer, Tab. 8, 15). Of the keys in `explicit` (given on the
    command line) only --iters keeps the command line's value (Fig. 2: test-time iterations); the
    others are model shape. Ours load with the safe unpickler; an official --init_from file pickles
    its hparams. Returns cfg;
    exits with one line when the file is corrupt."""
    official = bool(cfg.init_from) and common.inference_checkpoint(cfg) == cfg.init_from
    return common.checkpoint_config(cfg, MODEL_KEYS, keep={"iters"} & set(explicit), weights_only=not official)


def run(cfg, argv=None):
    """--predict, --eval_only (results also in <out_dir>/eval_<dataset>.json) or training."""
    if cfg.eval_only or cfg.predict:
        cfg = checkpoint_config(cfg, common.explicit_fields(Config(), argv))
        check_out_dir(cfg.out_dir)                        # may differ from the checkpoint's (read-only) folder
        device = get_device(cfg.device)
        model = common.load_for_inference(cfg, device, BOQSA, load_weights, "boqsa.py")
        if cfg.predict:                                   # label_offset 1: every slot coloured (no background)
            return common.predict_images(cfg, model, device, label_offset=1)
        if cfg.concept_maps:
            path = os.path.join(cfg.out_dir, f"concept_maps_{cfg.dataset}.png")
            save_concept_maps(model, cfg, device, path)
            print(f"wrote the queries' attention maps to {path}")
        return common.evaluate_checkpoint(cfg, model, device, evaluate, format_metrics, extra=dict(iters=cfg.iters),
                                          note=f"{cfg.iters} slot-attention iterations", script="boqsa.py",
                                          load_dataset=load_dataset)
    with common.training_run(cfg.out_dir) as stop:       # one run per --out_dir; SIGTERM / SIGINT save
        train(cfg, stop)


def main(argv=None):
    cfg = build_config(argv)
    try:
        return run(cfg, argv)
    except (data.DatasetError, CheckpointError) as e:  # also when re-raised by a DataLoader worker
        fail(error_line(e))


if __name__ == "__main__":
    main()

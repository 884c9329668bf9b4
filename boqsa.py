"""BO-QSA: Bi-level Optimised Query Slot Attention (Jia et al., ICLR 2023), mixture decoder.

Paper: ../shared/papers/boqsa_jia2023.md.  Facts from the official code (YuLiu-LY/BO-QSA):
../shared/REFERENCE.md, section BO-QSA.  One file, read top to bottom:

    1. Config          defaults (CPU-sized, built-in data) and per-dataset presets (Tab. 9-13)
    2. Model           CNN encoder (Tab. 9) -> SlotAttention with learned queries (Sec. 3.1)
                       and the bi-level STE update (Alg. 1) -> mixture decoder (Tab. 10, App. A.1)
    3. Official ckpt   key conversion from the official Lightning checkpoints
    4. Training        Adam, warmup + exponential decay, grad clipping (Tab. 11), DDP, resume
    5. Evaluation      ARI-FG, MSC-FG, mIoU, MSE on the test split; --predict on a folder

Run:
    python boqsa.py                                   # built-in synthetic data, CPU-sized model
    python boqsa.py --dataset=shapestacks --data_dir=PATH
    python boqsa.py --eval_only --dataset=clevr --data_dir=PATH
    python boqsa.py --predict=FOLDER_OF_IMAGES
    torchrun --nproc_per_node=2 boqsa.py --max_steps=20
The ablations of Tab. 7 are flags:  --init=gaussian|query  x  --grad=full|detach|bo
    SA = gaussian/full   I-SA = gaussian/detach   BO-SA = gaussian/bo
    QSA = query/full     I-QSA = query/detach     BO-QSA = query/bo (default)
"""
import math
import os
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
from common import (ResumableSampler, MetricsLog, ddp_cleanup, ddp_setup, fail, get_device, get_rng_state,
                    labels_to_rgb, load_checkpoint, mse, nanmean, parse_args, progress, save_checkpoint,
                    save_image_grid, save_slot_grid, seed_everything, segmentation_metrics, set_rng_state)

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class Config:
    """BO-QSA configuration. Every field can be set from the command line as --key=value.

    Defaults are sized for a 2-core CPU on the built-in `synthetic` dataset; `--dataset=NAME`
    first applies that dataset's paper settings (PRESETS, Tab. 9-13), then your flags.
    """
    # data
    dataset: str = "synthetic"      # synthetic | shapestacks | objectsroom | clevr | clevr6 | clevrtex | ...
    data_dir: str = ""              # root of the dataset on disk (not needed for synthetic)
    image_size: int = 32            # input resolution (Tab. 13: 128 or 64; 32 here for a 2-core CPU)
    num_workers: int = 1            # DataLoader workers
    # model
    num_slots: int = 7              # K (Tab. 13)
    slot_dim: int = 64              # Tab. 11 "Slot Dim"
    mlp_dim: int = 128              # Tab. 11 "MLP Hidden Dim"
    hid_dim: int = 32               # encoder / decoder channels (Tab. 9, 10: 64)
    enc_strides: tuple = (1, 1, 1, 1)   # Tab. 9: first stride 2 at 128 px (ShapeStacks, ClevrTex), 1 at 64 px
    dec_strides: tuple = (2, 2, 1, 1)   # Tab. 10: (2,2,2,2) at 128 px, (2,2,2,1) at 64 px; 8 * prod = image_size
    dec_init_size: int = 8          # spatial broadcast resolution (App. A.3.2, Locatello et al.)
    iters: int = 3                  # slot-attention iterations, the last one after the STE (Tab. 12)
    init: str = "query"             # query (QSA, Sec. 3.1) | gaussian (SA, learned mu/sigma)
    grad: str = "bo"                # bo (Alg. 1, detach + STE) | detach (I-SA) | full (plain backprop)
    attn_eps: float = 1.0           # eps in attn / (attn.sum + eps) (official choice, REFERENCE.md)
    drop_path: float = 0.2          # DropPath on the slot MLP residual (official code)
    sigma_steps: int = 2000         # N_sigma: cosine annealing of the query noise 1 -> 0 (App. A.3.1: 30k)
    # optimisation (Tab. 11)
    batch_size: int = 16            # global batch (Tab. 11: 128)
    lr: float = 4e-4
    warmup_steps: int = 300         # Tab. 11: 5k
    decay_steps: int = 20000        # lr factor 0.5 ** (step / decay_steps) (Tab. 11: 50k)
    max_steps: int = 3600           # about 30 min on 2 CPU cores (Tab. 11: 250k)
    grad_clip: float = 1.0
    # run
    out_dir: str = "out/boqsa"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | mps
    log_interval: int = 10
    eval_interval: int = 500        # evaluate, save images and checkpoint every N steps
    eval_items: int = 256           # test images used for the periodic evaluation (0 = whole split)
    resume: bool = True             # continue from out_dir/ckpt.pt when it exists
    init_from: str = ""             # official BO-QSA checkpoint (.ckpt/.pt) to start from
    eval_only: bool = False         # evaluate out_dir/ckpt.pt (or init_from) on the test split and exit
    predict: str = ""               # folder of images to segment with the checkpoint, writes PNGs
    compile: bool = False           # torch.compile the model


# Paper settings per dataset: slots and image size (Tab. 13), encoder strides (Tab. 9), decoder
# strides (Tab. 10), batch 128 and the full schedule (Tab. 11). ClevrTex: 11 slots (App. A.3.4).
_PAPER = dict(batch_size=128, warmup_steps=5000, decay_steps=50000, max_steps=250000, sigma_steps=30000,
              hid_dim=64, num_workers=8, eval_interval=5000, eval_items=0)
PRESETS = {
    "synthetic": {},
    "shapestacks": dict(_PAPER, num_slots=8, image_size=128, enc_strides=(2, 1, 1, 1), dec_strides=(2, 2, 2, 2)),
    "objectsroom": dict(_PAPER, num_slots=5, image_size=64, enc_strides=(1, 1, 1, 1), dec_strides=(2, 2, 2, 1)),
    "clevrtex": dict(_PAPER, num_slots=11, image_size=128, enc_strides=(2, 1, 1, 1), dec_strides=(2, 2, 2, 2)),
}
# the ClevrTex settings also serve CLEVR and the ClevrTex test variants (same 128 px, 11 slots)
for _name in ("clevrtex_ood", "clevrtex_camo", "clevr", "clevr6"):
    PRESETS[_name] = dict(PRESETS["clevrtex"])
PRESETS["clevr6"]["num_slots"] = 7


def build_config(argv=None):
    """Config from the command line: defaults <- PRESETS[--dataset] <- explicit flags."""
    first = parse_args(Config(), argv)          # validates every flag, gives us --dataset
    cfg = Config(**PRESETS.get(first.dataset, {}))
    return parse_args(cfg, argv)


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


class Encoder(nn.Module):
    """CNN encoder (Tab. 9) + soft position embedding + per-pixel MLP.

    images [B,3,H,W] in [-1,1] -> features [B, N=H'*W', slot_dim], H' = H / prod(strides).
    """

    def __init__(self, cfg):
        super().__init__()
        chans = [3] + [cfg.hid_dim] * len(cfg.enc_strides)
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 5, stride=s, padding=2)                  # Tab. 9: 5x5, pad 2, ReLU
            for cin, cout, s in zip(chans[:-1], chans[1:], cfg.enc_strides))
        size = cfg.image_size // math.prod(cfg.enc_strides)
        self.pos = SoftPositionEmbed(cfg.hid_dim, size, size)
        self.mlp = nn.Sequential(                                          # LN -> Linear -> ReLU -> Linear
            nn.LayerNorm(cfg.hid_dim), nn.Linear(cfg.hid_dim, cfg.mlp_dim), nn.ReLU(),
            nn.Linear(cfg.mlp_dim, cfg.slot_dim))

    def forward(self, images):
        x = images
        for conv in self.convs:
            x = F.relu(conv(x))
        x = self.pos(x.permute(0, 2, 3, 1))                                # [B,H',W',C]
        return self.mlp(x.flatten(1, 2))                                   # [B,N,D]


def drop_path(x, p, training):
    """Stochastic depth per sample: zero the whole residual branch of a sample with prob p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


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
    With iters = 3 this is Alg. 1 with T = 2 inner steps plus the final step (REFERENCE.md: the STE
    comes before the last of the 3 iterations). Raises ValueError for an unknown `grad`.
    """

    def __init__(self, in_dim, slot_dim, mlp_dim, iters=3, eps=1.0, drop_path=0.0):
        super().__init__()
        self.iters, self.eps, self.drop_path, self.scale = iters, eps, drop_path, slot_dim ** -0.5
        self.norm_inputs = nn.LayerNorm(in_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(in_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(in_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, slot_dim))

    def step(self, slots, k, v):
        """One refinement s <- h(s, f_attn(s, x)) (eq. 1, eq. 5). Returns (slots, attn [B,K,N])."""
        B, K, D = slots.shape
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bkd,bnd->bkn", q, k) * self.scale          # k(x) q(s)^T / sqrt(D)
        attn = logits.softmax(dim=1)                                       # softmax over SLOTS
        weights = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)       # weighted mean over pixels
        updates = torch.einsum("bkn,bnd->bkd", weights, v)
        slots = self.gru(updates.reshape(-1, D), slots.reshape(-1, D)).reshape(B, K, D)
        slots = slots + drop_path(self.mlp(self.norm_mlp(slots)), self.drop_path, self.training)
        return slots, attn

    def forward(self, inputs, init, grad="bo"):
        if grad not in ("full", "detach", "bo"):
            raise ValueError(f"grad must be full|detach|bo, got {grad!r}")
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
    Each slot is broadcast to dec_init_size^2, gets a position embedding, then 5 ConvTranspose
    5x5 + ReLU layers (strides dec_strides then 1) and a final ConvTranspose 3x3 to 4 channels.
    """

    def __init__(self, cfg):
        super().__init__()
        s0 = cfg.dec_init_size
        self.init_size = s0
        self.pos = SoftPositionEmbed(cfg.slot_dim, s0, s0)
        chans = [cfg.slot_dim] + [cfg.hid_dim] * (len(cfg.dec_strides) + 1)
        strides = list(cfg.dec_strides) + [1]
        self.layers = nn.ModuleList(
            nn.ConvTranspose2d(cin, cout, 5, stride=s, padding=2, output_padding=1 if s == 2 else 0)
            for cin, cout, s in zip(chans[:-1], chans[1:], strides))
        self.out = nn.ConvTranspose2d(cfg.hid_dim, 4, 3, stride=1, padding=1)   # RGB + mask logit
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


class BOQSA(nn.Module):
    """BO-QSA with the mixture decoder (Sec. 3.3, App. A.3.2).

    forward(images [B,3,H,W] float in [0,1], sigma=0.0) -> dict
        loss   scalar, MSE between reconstruction and input, both in [-1,1] (official convention)
        recon  [B,3,H,W] reconstruction mapped back to [0,1] (not clamped)
        masks  [B,K,H,W] decoder alpha masks, softmax over slots (sum to 1 per pixel)
        slots  [B,K,D] final slots
        attn   [B,K,N] last slot-attention map over the N encoder positions
        rgb    [B,K,3,H,W] per-slot RGB in [0,1] (not clamped)
    `sigma` is the multiplicative noise of the queries (App. A.3.1), used in training mode only.
    Raises ValueError if the image size differs from config.image_size.
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.init not in ("query", "gaussian"):
            raise ValueError(f"--init must be query|gaussian, got {cfg.init!r}")
        if cfg.grad not in ("full", "detach", "bo"):
            raise ValueError(f"--grad must be full|detach|bo, got {cfg.grad!r}")
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
        self.slot_attention = SlotAttention(cfg.slot_dim, cfg.slot_dim, cfg.mlp_dim, cfg.iters,
                                            cfg.attn_eps, cfg.drop_path)
        self.decoder = MixtureDecoder(cfg)

    def initial_slots(self, batch, sigma=0.0):
        """Slot initialisation [B,K,D]: queries (+ multiplicative noise in training) or Gaussian."""
        K, D = self.cfg.num_slots, self.cfg.slot_dim
        if self.cfg.init == "gaussian":
            mu = self.slots_mu.expand(batch, K, D)
            return mu + self.slots_log_sigma.exp() * torch.randn_like(mu)
        mu = self.queries.weight.unsqueeze(0).expand(batch, K, D)
        if self.training and sigma > 0:
            mu = mu + sigma * mu.detach() * torch.randn_like(mu)           # REFERENCE.md: std sigma*|mu|
        return mu

    def forward(self, images, sigma=0.0):
        H, W = images.shape[-2:]
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        x = images * 2.0 - 1.0                                             # [0,1] -> [-1,1]
        feats = self.encoder(x)
        init = self.initial_slots(x.shape[0], sigma)
        slots, attn = self.slot_attention(feats, init, self.cfg.grad)
        rgb, logits = self.decoder(slots)
        masks = logits.softmax(dim=1)                                      # m_i, softmax over slots
        recon = (masks * rgb).sum(dim=1)                                   # I_hat = sum_i m_i I_i
        loss = F.mse_loss(recon, x)
        return dict(loss=loss, recon=(recon + 1) / 2, masks=masks.squeeze(2), slots=slots,
                    attn=attn, rgb=(rgb + 1) / 2)


# -----------------------------------------------------------------------------
# 3. Official checkpoints (REFERENCE.md: Lightning, prefix "model.")

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


def load_official(model, path):
    """Load an official BO-QSA checkpoint into `model` (strict). Exits with a message on mismatch."""
    sd = convert_official_state_dict(load_checkpoint(path, weights_only=False))  # Lightning pickles hparams
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
    # REFERENCE.md: the official BO-QSA code resizes the whole 320x240 ClevrTex frame, no centre crop
    options = {"crop": None} if cfg.dataset.startswith("clevrtex") else {}
    try:
        return data.build_dataset(cfg.dataset, split, root=cfg.data_dir or None, image_size=cfg.image_size, **options)
    except data.DatasetError as e:
        fail(str(e))


def train_loader(cfg, ddp, start_step):
    """Endless shuffled loader of global batch cfg.batch_size, resuming at `start_step`."""
    ds = load_dataset(cfg, "train")
    sampler = ResumableSampler(len(ds), cfg.batch_size, seed=cfg.seed, start_step=start_step,
                               rank=ddp.rank, world_size=ddp.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size // ddp.world_size, sampler=sampler,
                                       num_workers=cfg.num_workers, drop_last=True,
                                       persistent_workers=cfg.num_workers > 0)


@torch.no_grad()
def evaluate(model, cfg, device, num_items=0, image_path=None):
    """Metrics on the test split: dict of means (ARI, ARI-FG, MSC-FG, mIoU, MSE).

    MSE is the per-image sum of squared errors over C,H,W with images in [0,1] (ClevrTex
    convention); `mse_paper` is BO-QSA's F.mse_loss * H * W in [-1,1] (REFERENCE.md, Metrics).
    Datasets without instance masks report MSE only.
    """
    model.eval()
    ds = load_dataset(cfg, "test")
    has_masks = getattr(ds, "has_masks", True)
    if num_items and num_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(num_items))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 2))
    sums, first = {}, None
    if not has_masks:
        print(f"{cfg.dataset}: no instance masks present in {cfg.data_dir or 'the dataset'}; reporting MSE only")
    for batch in loader:
        images = batch["image"].to(device)
        out = model(images)
        pred = out["masks"].argmax(dim=1).cpu() + 1                        # slot index + 1 per pixel
        m = {"mse": mse(images.cpu(), out["recon"].cpu()),
             "mse_paper": ((out["recon"] - images) * 2).pow(2).mean(dim=(1, 2, 3)).cpu() * images.shape[-1] * images.shape[-2]}
        if "mask" in batch:
            m.update(segmentation_metrics(batch["mask"], pred))
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


def format_metrics(m):
    names = {"ari_fg": "ARI-FG", "msc_fg": "MSC-FG", "miou": "mIoU", "ari": "ARI", "mse": "MSE", "mse_paper": "MSE(paper)"}
    return "  ".join(f"{names.get(k, k)} {v:.4f}" for k, v in m.items())


def train(cfg):
    """The training loop: resumes from out_dir/ckpt.pt, logs to out_dir/metrics.jsonl, saves PNGs."""
    ddp = ddp_setup(device=cfg.device)
    device = ddp.device
    seed_everything(cfg.seed + ddp.rank)
    torch.set_flush_denormal(True)      # denormal floats made CPU training steps up to 6x slower
    if cfg.batch_size % ddp.world_size:
        fail(f"--batch_size={cfg.batch_size} must be divisible by the number of processes {ddp.world_size}")

    model = BOQSA(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step, ckpt = 0, None
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        for key in ("num_slots", "slot_dim", "image_size", "init", "hid_dim"):
            if ckpt["config"][key] != getattr(cfg, key):
                fail(f"{ckpt_path} was trained with --{key}={ckpt['config'][key]}, not {getattr(cfg, key)}; "
                     f"use another --out_dir or --resume=false")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if ddp.is_main:
            print(f"resuming from {ckpt_path} at step {step}")
    elif cfg.init_from:
        load_official(model, cfg.init_from)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        # I-SA / I-QSA leave the initialisation without gradient: tell DDP not to wait for it
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.grad == "detach")
    data_iter = iter(train_loader(cfg, ddp, step))       # the sampler skips the batches already seen
    if ckpt is not None:
        set_rng_state(ckpt["rng"])                        # after iter(): it draws a seed from torch's RNG
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl")) if ddp.is_main else None

    def save_and_evaluate():
        rng = get_rng_state()                             # evaluation must not move the training RNG
        save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                                        step=step, rng=rng, config=asdict(cfg)))
        metrics = evaluate(raw_model, cfg, device, cfg.eval_items, os.path.join(cfg.out_dir, f"samples_{step:07d}.png"))
        log.log(step, **{f"test_{k}": v for k, v in metrics.items()})
        bar.write(f"step {step}: {format_metrics(metrics)}  (saved {ckpt_path})")
        set_rng_state(rng)

    bar = progress(cfg.max_steps, initial=step, desc="train", disable=not ddp.is_main)
    model.train()
    t0 = time.time()
    while step < cfg.max_steps:
        images = next(data_iter)["image"].to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)                    # Tab. 11 schedule
        sigma = sigma_schedule(step, cfg.sigma_steps)                      # App. A.3.1
        loss = model(images, sigma=sigma)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # Tab. 11: clip at 1.0
        optimizer.step()
        step += 1
        bar.update()
        if step % cfg.log_interval == 0 and ddp.is_main:
            dt, t0 = time.time() - t0, time.time()
            img_s = cfg.log_interval * cfg.batch_size / dt
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}", sigma=f"{sigma:.2f}")
            log.log(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"], sigma=sigma, img_per_s=img_s)
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and ddp.is_main:
            save_and_evaluate()
    bar.close()
    ddp_cleanup()


# -----------------------------------------------------------------------------
# 5. Evaluation and prediction


def load_for_inference(cfg, device):
    """Model from --init_from (ours or official), else from out_dir/ckpt.pt; exits if neither."""
    model = BOQSA(cfg).to(device)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from:
        sd = load_checkpoint(cfg.init_from, weights_only=False)  # a file the user chose to trust
        if "model" in sd and "config" in sd:                               # one of ours
            model.load_state_dict(sd["model"])
        else:
            load_official(model, cfg.init_from)
        print(f"loaded {cfg.init_from}")
    elif os.path.exists(ckpt_path):
        model.load_state_dict(load_checkpoint(ckpt_path)["model"])
        print(f"loaded {ckpt_path}")
    else:
        fail(f"no checkpoint at {ckpt_path}: train first (python boqsa.py) or pass --init_from=PATH")
    return model.eval()


def checkpoint_config(cfg):
    """Copy the model settings saved in the checkpoint into cfg so --eval_only needs no flags."""
    path = cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.exists(path):
        saved = load_checkpoint(path, weights_only=not cfg.init_from).get("config")
        if saved:
            for key in ("num_slots", "slot_dim", "mlp_dim", "hid_dim", "enc_strides", "dec_strides",
                        "dec_init_size", "init", "iters", "attn_eps", "image_size"):
                setattr(cfg, key, type(getattr(cfg, key))(saved[key]))
    return cfg


@torch.no_grad()
def predict(cfg, device):
    """Segment every image in --predict=FOLDER; writes <out_dir>/predict/<name>.png (input | recon | seg)."""
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    if not os.path.isdir(cfg.predict):
        fail(f"--predict={cfg.predict}: folder does not exist")
    files = sorted(f for f in os.listdir(cfg.predict) if f.lower().endswith(exts))
    if not files:
        fail(f"--predict={cfg.predict}: no images ({', '.join(exts)}) found")
    model = load_for_inference(cfg, device)
    out_dir = os.path.join(cfg.out_dir, "predict")
    os.makedirs(out_dir, exist_ok=True)
    for name in files:
        path = os.path.join(cfg.predict, name)
        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decode error is reported the same way
            fail(f"{path}: cannot read image ({e})")
        side = min(img.size)                                               # centre crop to a square
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((cfg.image_size,) * 2, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].to(device)
        out = model(x)
        seg = out["masks"].argmax(1).cpu() + 1
        save_image_grid(os.path.join(out_dir, os.path.splitext(name)[0] + ".png"),
                        [("input", x.cpu()), ("recon", out["recon"].cpu().clamp(0, 1)), ("segments", labels_to_rgb(seg))])
    print(f"wrote {len(files)} segmentations to {out_dir}")


def main(argv=None):
    cfg = build_config(argv)
    if cfg.eval_only or cfg.predict:
        cfg = checkpoint_config(cfg)
        device = get_device(cfg.device)
        if cfg.predict:
            return predict(cfg, device)
        model = load_for_inference(cfg, device)
        metrics = evaluate(model, cfg, device, 0, os.path.join(cfg.out_dir, "eval_samples.png"))
        print(f"{cfg.dataset} test: {format_metrics(metrics)}")
        return metrics
    train(cfg)


if __name__ == "__main__":
    main()

"""AST-Seg: unsupervised multi-object segmentation with attention and soft-argmax (Sauvalle &
de La Fortelle, WACV 2023).

Paper: Sauvalle & de La Fortelle, WACV 2023 (section, equation and table numbers below are the paper's).
Official code: GitHub BrunoSauvalle/AST (files named MF_*.py), background model BrunoSauvalle/AE-NE.  One file, read top
to bottom:

    1. Config          defaults (CPU-sized, built-in data) and per-dataset presets (Tab. 6, Sec. 5.1)
    2. Model           feature/attention map generator (Segformer or U-Net, Tab. 8) -> softmax attention,
                       soft-argmax and attention pooling (eq. 11-16) -> transformer refinement -> latents
                       (Alg. 1) -> glimpse generator (Tab. 7) + STN + compositing (eq. 17-18, Alg. 2);
                       background autoencoder (AE-NE, ref. [38]) and its robust loss; losses (eq. 19-22)
    3. Official ckpt   key conversion from the official checkpoints (incl. transformers 4.x <-> 5.x Segformer keys)
    4. Training        scenarios of Sec. 4.2.2: curriculum (3 phases), baseline, frozen background; resume
    5. Evaluation      mIoU, ARI-FG, MSC-FG, mBO, MSE on the test split; --predict on a folder

Run:
    python ast_seg.py                                  # built-in synthetic data: U-Net, frozen background (CPU-sized)
    python ast_seg.py --feature_net=segformer --transformer_layers=6 --scenario=curriculum   # the paper's model
    python ast_seg.py --dataset=clevrtex --data_dir=PATH --pretrained=nvidia/mit-b3
    python ast_seg.py --phase=background               # phase 1 only (background autoencoder)
    python ast_seg.py --scenario=baseline              # everything from scratch together (BT)
    python ast_seg.py --eval_only                      # evaluate out_dir/ckpt.pt
    python ast_seg.py --init_from=official.pth --eval_only --dataset=clevrtex --data_dir=PATH
Training evaluates on --eval_split (val) every eval_interval steps (metrics.jsonl: val_*), then once
on the test split (out_dir/eval_<dataset>.json); every run, and --eval_only, ends with one summary line.
Ablations (Tab. 4): --transformer_layers=0, --feature_net=unet, --pixel_weight=0, --scenario=frozen,
--scaling=isotropic|anisotropic, --num_slots.
"""
import math
import os
import re
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import (DTYPES, CheckpointError, ResumableSampler, MetricsLog, check_config, check_finite_step,
                    check_out_dir, clip_gradients, ddp_cleanup, ddp_setup, error_line, fail, get_device,
                    get_rng_state, load_checkpoint, load_resume_checkpoint, mse, nanmean, parse_args,
                    progress, resolve_dtype, save_checkpoint, save_slot_grid, seed_everything,
                    segmentation_metrics, segments_per_image, set_rng_state, train_autocast)

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class Config(common.RunConfig):
    """AST-Seg configuration. Every field can be set from the command line as --key=value.

    Defaults are sized for a 2-core CPU on the built-in `synthetic` dataset, whose preset (`_CPU`) also swaps
    the paper's Segformer + transformer + curriculum for a U-Net that learns from scratch; `--dataset=NAME`
    first applies that dataset's paper settings (PRESETS: Tab. 6, Sec. 5.1), then your flags.
    """
    # data
    image_size: int = 32            # side in pixels the images are resized to (Sec. 5.1: 128 CLEVR/ClevrTex, 64
                                    # ShapeStacks/ObjectsRoom)
    # foreground model (Sec. 4.1, Tab. 6)
    num_slots: int = 6              # K = maximum number of objects (Sec. 5.1; synthetic: 2-6 objects)
    scaling: str = "anisotropic"    # how a glimpse is scaled: anisotropic (s_x, s_y) | isotropic (one s) (Sec. 4.1,
                                    # Sec. 5.1)
    feature_net: str = "segformer"  # network that produces the attention maps: segformer (Sec. 5.1) | unet (Tab. 8,
                                    # ablation)
    segformer: str = "mit-b0"       # Segformer size: mit-b0 .. mit-b5 (Sec. 5.1: b3)
    segformer_sizes: tuple = ()     # override the variant's hidden sizes (4 ints), e.g. for tiny CPU models
    segformer_depths: tuple = ()    # override the variant's depths (4 ints)
    decoder_hidden_size: int = 0    # override the variant's MLP-decoder width (0 = the variant's)
    pretrained: str = ""            # backbone weights: local folder (config.json + weights) or hub id (paper:
                                    # nvidia/mit-b3, needs network or the hub cache); one that cannot load stops
    z_what_dim: int = 32            # size of each object's appearance vector z_what (Tab. 6)
    transformer_dim: int = 256      # width d_T of the transformer that refines the detections (Tab. 6)
    transformer_heads: int = 8      # attention heads of that transformer (Tab. 6)
    transformer_ff: int = 512       # feed-forward width of that transformer (Tab. 6)
    transformer_layers: int = 6     # Tab. 6; 0 = no transformer encoder (ablation, Tab. 4)
    transformer_dropout: float = 0.1  # dropout in that transformer (torch default, official MF_models_encoder.py)
    s_min: float = 1.3              # smallest inverse scale of a glimpse: larger s, smaller object (Tab. 6)
    s_max: float = 6.0              # largest inverse scale of a glimpse (Tab. 6: 24 at 128 px; 6 = 24 x 32/128
                                    # here, else the first glimpses, at s ~ (s_min + s_max)/2, are 2 px and never
                                    # learn)
    bg_logit_init: float = 11.0     # log alpha_0 before training (Tab. 6: alpha_0 = e^11; synthetic preset: 5)
    glimpse_size: int = 0           # side in pixels of each generated glimpse (0 = image_size // 2; Tab. 7: 32 for 64
                                    # px, 64 for 128 px)
    official_activation_bug: bool = False  # read alpha from latent index 4 as the official renderer
                                    # (MF_models_renderer.py); switched on when an isotropic official checkpoint loads
    # background model (AE-NE, ref. [38])
    bg_complex: bool = False        # AE-NE "complex background" channel schedule (official: all but CLEVR)
    bg_norm: str = "batch"          # AE-NE normalisation: group (official) | batch (built-in data; see Background)
    # losses (Sec. 4.2.1, Tab. 6)
    pixel_weight: float = 1e-2      # weight lambda_pixel of the pixel entropy loss (eq. 22)
    pixel_warmup: int = 300         # N_pixel, quadratic warmup of lambda_pixel (Tab. 6: 10k)
    # training scenario (Sec. 4.2.2, Sec. 5.1)
    scenario: str = "curriculum"    # training schedule: curriculum (CT) | baseline (BT) | frozen (background frozen
                                    # throughout)
    phase: str = "all"              # which phases to train: all | background (train phase 1 only, then stop)
    bg_steps: int = 600             # steps of phase 1, the background autoencoder alone (Sec. 5.1: 500k, CLEVR 2500)
    bg_batch_size: int = 32         # images per background step (Tab. 6: 128)
    bg_lr: float = 2e-3             # AdamW learning rate of the background autoencoder (Tab. 6; x0.1 at 80%, AE-NE)
    freeze_steps: int = 600         # phase 2 length: foreground with frozen background (Sec. 5.1: 30k)
    max_steps: int = 1800           # foreground steps only (phases 2 + 3; baseline: all steps), so a curriculum
                                    # runs bg_steps + max_steps steps in all (Sec. 5.1: 125k); the plan is printed
    batch_size: int = 32            # images per foreground step over all processes, the global batch (Tab. 6: 64)
    lr: float = 2e-4                # Adam learning rate of the foreground model (Tab. 6: 4e-5, x0.1 at 90% of
                                    # max_steps; synthetic preset: 3e-4)
    warmup_steps: int = 300         # steps of quadratic learning-rate warmup (Tab. 6: 5000)
    betas: tuple = (0.9, 0.98)      # Adam betas of the foreground model (Tab. 6)
    adam_eps: float = 1e-9          # Adam epsilon of the foreground model (Tab. 6)
    # run
    out_dir: str = "out/ast_seg"    # checkpoints, metrics.jsonl, sample images and eval results
    stop_at: int = 0                # stop (with a checkpoint) at this global step; 0 = run to the end


# Tab. 6 and Sec. 5.1: batch 64, lr 4e-5, 125k steps (30k of them with the background frozen),
# 5k lr warmup, N_pixel 10k, background pretraining 500k steps (CLEVR 2.5k) at batch 128, Segformer B3.
_PAPER = dict(segformer="mit-b3", batch_size=64, lr=4e-5, max_steps=125000, freeze_steps=30000,
              warmup_steps=5000, pixel_warmup=10000, bg_steps=500000, bg_batch_size=128, bg_complex=True,
              bg_norm="group", s_max=24.0, num_workers=8, eval_interval=5000, eval_items=0, log_interval=50,
              dtype="float32")                    # float32 as the official code
# The built-in data on a 2-core CPU (a departure from the paper, for this default only): a Segformer from random
# weights never localises the objects here (Sec. 5.3: the pretrained one is necessary; README, Results), so the
# default is the U-Net feature net (Tab. 8, "on par" in Sec. 5.3) without the transformer refinement (Tab. 4
# ablation) and with the background frozen after phase 1, bf16 where native, and log alpha_0 = 5 in place of
# Tab. 6's 11: with 11 a slot whose activation logit starts near 0 never wins a pixel and dies (seed 1: two of
# six slots in use, test ARI-FG 0.61); with 5 every seed uses its slots (README, Results: 3 seeds each). lr 3e-4
# in place of 2e-4 (Tab. 6: 4e-5 at batch 64): the slots leave the background sooner, validation ARI-FG 0.817 /
# 0.823 against 0.825 / 0.778 for seeds 0 / 2 (RESULTS.md, AST-Seg).
_CPU = dict(feature_net="unet", transformer_layers=0, scenario="frozen", max_steps=2000, dtype="auto",
            bg_logit_init=5.0, lr=3e-4)
PRESETS = {
    "synthetic": _CPU,
    "clevrtex": dict(_PAPER, num_slots=10, scaling="anisotropic", image_size=128),
    "clevr": dict(_PAPER, num_slots=10, scaling="isotropic", image_size=128, bg_steps=2500, bg_complex=False),
    "shapestacks": dict(_PAPER, num_slots=6, scaling="isotropic", image_size=64),
    "objectsroom": dict(_PAPER, num_slots=3, scaling="anisotropic", image_size=64),
}
# the ClevrTex model is evaluated on the OOD and CAMO test sets (Tab. 3); CLEVR6 as CLEVR
for _name in ("clevrtex_ood", "clevrtex_camo"):
    PRESETS[_name] = dict(PRESETS["clevrtex"])
PRESETS["clevr6"] = dict(PRESETS["clevr"])

_CHOICES = dict(scaling=("anisotropic", "isotropic"), feature_net=("segformer", "unet"),
                scenario=("curriculum", "baseline", "frozen"), phase=("all", "background"), bg_norm=("group", "batch"),
                dtype=DTYPES, eval_split=data.SPLITS)


def build_config(argv=None):
    """Config from the command line: defaults <- PRESETS[--dataset] <- explicit flags.

    Exits (code 2, one line) for an unknown choice of scaling/feature_net/scenario/phase/segformer.
    `--help` (after --dataset) lists the flags with that preset's values as the defaults."""
    first = parse_args(Config(), argv, only=("dataset",))   # picks the preset
    cfg = parse_args(Config(**PRESETS.get(first.dataset, {})), argv,
                     epilog=f"Defaults above: the {first.dataset} preset; "
                            "--dataset=NAME --help shows another dataset's.")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(f"--{key}={getattr(cfg, key)}: choose one of {', '.join(choices)}", code=2)
    try:
        cfg.segformer_sizes, cfg.segformer_depths = (tuple(int(v) for v in t) for t in (cfg.segformer_sizes, cfg.segformer_depths))
        cfg.betas = tuple(float(v) for v in cfg.betas)
    except ValueError as e:
        fail(f"--segformer_sizes/--segformer_depths/--betas: expected comma-separated numbers ({e})", code=2)
    if cfg.segformer not in SEGFORMER_VARIANTS:
        fail(f"--segformer={cfg.segformer}: choose one of {', '.join(SEGFORMER_VARIANTS)}", code=2)
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Exit (code 2, one line naming the flag) for a value that would fail later, before any data is loaded."""
    check_config(cfg, positive=("image_size", "num_slots", "z_what_dim", "transformer_dim", "transformer_heads",
                                "transformer_ff", "s_min", "s_max", "bg_batch_size", "bg_lr", "batch_size", "lr",
                                "adam_eps", "log_interval", "eval_interval", "segformer_sizes", "segformer_depths"),
                 nonnegative=("num_workers", "decoder_hidden_size", "transformer_layers", "transformer_dropout",
                              "glimpse_size", "pixel_weight", "pixel_warmup", "bg_steps", "freeze_steps", "max_steps",
                              "warmup_steps", "eval_items", "test_items", "stop_at"))
    for key in ("segformer_sizes", "segformer_depths"):
        if getattr(cfg, key) and len(getattr(cfg, key)) != 4:
            fail(f"--{key}={','.join(map(str, getattr(cfg, key)))}: give 4 comma-separated numbers, one per stage", code=2)
    if cfg.s_max <= cfg.s_min:
        fail(f"--s_max={cfg.s_max} must be larger than --s_min={cfg.s_min}", code=2)
    if cfg.transformer_layers and cfg.transformer_dim % cfg.transformer_heads:
        fail(f"--transformer_dim={cfg.transformer_dim} must be divisible by --transformer_heads={cfg.transformer_heads}",
             code=2)
    # AE-NE needs 5-7 blocks down to 1x1; the glimpses (image_size // 2 by default) a power of 2 >= 4
    blocks = len(_ae_ne_geometry(cfg.image_size, cfg.image_size)[0])
    g = cfg.glimpse_size or cfg.image_size // 2
    if blocks not in Background.ENC or g < 4 or g & (g - 1):
        ok = [s for s in (32, 64, 128) if len(_ae_ne_geometry(s, s)[0]) in Background.ENC]
        why = (f"the AE-NE background model needs 5-7 blocks, {cfg.image_size} px gives {blocks}" if blocks not in
               Background.ENC else f"the glimpse size {g} must be a power of 2 >= 4 (--glimpse_size, 0 = image_size // 2)")
        fail(f"--image_size={cfg.image_size} with --glimpse_size={cfg.glimpse_size}: {why}; "
             f"use e.g. --image_size={'/'.join(map(str, ok))} with --glimpse_size=0", code=2)


# -----------------------------------------------------------------------------
# 2. Model
# 2a. Feature and attention map generator (Sec. 4.1): Segformer (Sec. 5.1) or U-Net (Tab. 8)

# MiT encoder sizes of the Segformer paper (Xie et al. 2021, Tab. 6) = the nvidia/mit-b* hub configs
SEGFORMER_VARIANTS = {
    "mit-b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256),
    "mit-b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=256),
    "mit-b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "mit-b3": dict(depths=[3, 4, 18, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "mit-b4": dict(depths=[3, 8, 27, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "mit-b5": dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
}


def latent_dim(cfg):
    """d_phi = scaling dims (1 or 2) + activation (1) + z_what (Sec. 4.1); the pooled vector adds x, y."""
    return (1 if cfg.scaling == "isotropic" else 2) + 1 + cfg.z_what_dim


def build_segformer(cfg, out_channels):
    """HF SegformerForSemanticSegmentation with num_labels = out_channels (= K + d_phi).

    The backbone comes from `cfg.pretrained` (local folder or hub id, via SegformerModel.from_pretrained,
    as the official code) when given (exits with one line if it cannot be loaded); without it the variant
    `cfg.segformer` is built from SegformerConfig with random weights. The decode head is always
    randomly initialised (Sec. 5.1). Its logits are at 1/4 of the input resolution (not upsampled).
    """
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel
    if cfg.pretrained:
        try:
            backbone = SegformerModel.from_pretrained(cfg.pretrained)
            config = backbone.config
            config.num_labels = out_channels
            net = SegformerForSemanticSegmentation(config)
            net.segformer = backbone
            return net
        except Exception as e:  # noqa: BLE001 - offline, missing folder, bad files: all stop alike
            # the paper needs the pretrained backbone (Sec. 5.1): random weights would silently learn little
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
            if cfg.pretrained.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(cfg.pretrained)):
                first = "no such folder"                    # not a hub id either: say so, not the hub's complaint
            fail(f"--pretrained={cfg.pretrained}: cannot load ({first}); give a local folder with config.json and "
                 f"the weights (model.safetensors or pytorch_model.bin, e.g. from save_pretrained), or a hub id "
                 f"such as nvidia/mit-b3 with network access (or in the hub cache); leave --pretrained out to "
                 f"start from random weights")
    v = dict(SEGFORMER_VARIANTS[cfg.segformer])
    if cfg.segformer_sizes:
        v["hidden_sizes"] = list(cfg.segformer_sizes)
    if cfg.segformer_depths:
        v["depths"] = list(cfg.segformer_depths)
    if cfg.decoder_hidden_size:
        v["decoder_hidden_size"] = cfg.decoder_hidden_size
    heads = [1, 2, 5, 8] if not cfg.segformer_sizes else [1] * 4
    config = SegformerConfig(num_labels=out_channels, num_attention_heads=heads, **v)
    return SegformerForSemanticSegmentation(config)


class Segformer(nn.Module):
    """Segformer feature and attention map generator: images [B,3,H,W] in [0,1] (no ImageNet
    normalisation, official MF_models_encoder.py) -> maps [B, K + d_phi, H/4, W/4]."""

    def __init__(self, cfg, out_channels):
        super().__init__()
        self.complete_model = build_segformer(cfg, out_channels)

    def forward(self, x):
        return self.complete_model(pixel_values=x).logits


def _conv_bn(cin, cout, k, s, p, transpose=False, output_padding=0):
    conv = (nn.ConvTranspose2d(cin, cout, k, s, p, output_padding=output_padding, bias=False) if transpose
            else nn.Conv2d(cin, cout, k, s, p, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.CELU())


class DownBlock(nn.Module):
    """Tab. 8 downsample block: conv 4x4 stride 2 + BN + CELU, then residual conv 3x3 + BN + CELU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bloc1, self.bloc2 = _conv_bn(cin, cout, 4, 2, 1), _conv_bn(cout, cout, 3, 1, 1)

    def forward(self, x):
        x = self.bloc1(x)
        return self.bloc2(x) + x


class UpBlock(nn.Module):
    """Tab. 8 upsample block: residual conv 3x3 + BN + CELU, then transposed conv 4x4 stride 2 + BN + CELU."""

    def __init__(self, cin, cout, output_padding):
        super().__init__()
        self.bloc1 = _conv_bn(cin, cin, 3, 1, 1)
        self.bloc2 = _conv_bn(cin, cout, 4, 2, 1, transpose=True, output_padding=output_padding)

    def forward(self, x):
        x = self.bloc1(x) + x
        return self.bloc2(x)


class UNet(nn.Module):
    """U-Net feature and attention map generator (Tab. 8, ablation): [B,3,H,W] -> [B, C, H, W].

    Full resolution output (as the official code). Channels 80,128,192,256,256,256 with 5
    downsample blocks (images under 200 px). Module names follow the official code."""

    def __init__(self, image_size, out_channels):
        super().__init__()
        nch, n = [80, 128, 192, 256, 256, 256], 5
        pads, size = [], image_size
        for _ in range(n):                       # output padding that restores odd sizes
            pads.append((size + 2 - 4) % 2)
            size = 1 + (size + 2 - 4) // 2
        self.first_feature_map = _conv_bn(3, nch[0], 3, 1, 1)
        self.downsample_blocks = nn.ModuleList(DownBlock(nch[i], nch[i + 1]) for i in range(n))
        self.center_block = _conv_bn(nch[n], nch[n], 3, 1, 1)
        self.upsample_blocks = nn.ModuleList(UpBlock(2 * nch[i + 1], nch[i], pads[i]) for i in range(n))
        self.last_skip_layer = _conv_bn(2 * nch[0], out_channels, 3, 1, 1)
        self.last_residual_layer = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.conv1x1 = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x):
        x = self.first_feature_map(x)
        skips = [x]
        for block in self.downsample_blocks:
            x = block(x)
            skips.append(x)
        x = self.center_block(x)
        for i in reversed(range(len(self.upsample_blocks))):
            x = self.upsample_blocks[i](torch.cat([x, skips[i + 1]], dim=1))
        x = self.last_skip_layer(torch.cat([x, skips[0]], dim=1))
        x = self.last_residual_layer(x) + x
        return self.conv1x1(x)


# 2b. Attention, soft-argmax and pooling (eq. 11-16)


def position_map(h, w):
    """Pixel coordinates [2,h,w] normalised to [-1,1] (eq. 12-13): channel 0 = x (column), 1 = y (row);
    corner cells at exactly +-1 (official MF_models_encoder.py). A size of 1 gives 0."""
    xs = torch.linspace(-1.0, 1.0, w) if w > 1 else torch.zeros(1)
    ys = torch.linspace(-1.0, 1.0, h) if h > 1 else torch.zeros(1)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])


def soft_argmax_pool(logits, features):
    """Attention softmax, soft-argmax and attention pooling (eq. 11, 14-16).

    logits [B,K,h,w] (attention logit maps A_k), features [B,D,h,w] (feature map Phi)
    -> (attention [B,K,h,w] summing to 1 over pixels, positions [B,K,2] as (x, y) in [-1,1],
        pooled features [B,K,D]).
    Translation equivariant (Sec. 2): shifting a logit map by (u, v) pixels shifts (x, y) by
    (2u/(w-1), 2v/(h-1)) as long as the attention mass stays inside the map.
    """
    B, K, h, w = logits.shape
    attn = logits.flatten(2).softmax(dim=-1)                               # eq. (11)
    pos = position_map(h, w).to(logits).flatten(1)                         # [2,N], eq. (12-13)
    positions = torch.einsum("bkn,cn->bkc", attn, pos)                     # eq. (14-15)
    pooled = torch.einsum("bkn,bdn->bkd", attn, features.flatten(2))       # eq. (16)
    return attn.reshape(B, K, h, w), positions, pooled


class Encoder(nn.Module):
    """Alg. 1: images [B,3,H,W] in [0,1] -> dict of object latents and intermediate maps.

    Returns dict:
        attention [B,K,h,w]   normalised attention maps (eq. 11)
        positions0 [B,K,2]    soft-argmax (x0, y0) before refinement (eq. 14-15)
        latents [B,K,2+d_phi] refined (x, y, s..., alpha logit, z_what), before clamping/squashing
    The transformer (Linear -> nn.TransformerEncoder, post-LN, no positional encoding -> Linear)
    sees the K triplets (x0, y0, phi0) as an unordered set; transformer_layers=0 skips it (Tab. 4).
    """

    def __init__(self, cfg):
        super().__init__()
        self.K = cfg.num_slots
        d = 2 + latent_dim(cfg)                                            # x, y, s, alpha, z_what
        out = cfg.num_slots + latent_dim(cfg)                              # K attention maps + Phi
        self.feature_and_attention_map_generator = (
            Segformer(cfg, out) if cfg.feature_net == "segformer" else UNet(cfg.image_size, out))
        self.use_transformer = cfg.transformer_layers > 0
        if self.use_transformer:
            self.feature_vector_embedding = nn.Linear(d, cfg.transformer_dim)        # d_phi + 2 -> d_T
            layer = nn.TransformerEncoderLayer(cfg.transformer_dim, cfg.transformer_heads, cfg.transformer_ff,
                                               dropout=cfg.transformer_dropout, batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, cfg.transformer_layers, enable_nested_tensor=False)
            self.latents_projection = nn.Linear(cfg.transformer_dim, d)              # d_T -> d_phi + 2

    def forward(self, images):
        maps = self.feature_and_attention_map_generator(images)           # [B, K + d_phi, h, w]
        attn, pos0, phi0 = soft_argmax_pool(maps[:, :self.K], maps[:, self.K:])
        latents = torch.cat([pos0, phi0], dim=-1)                         # (x0, y0, phi0) per object
        if self.use_transformer:                                          # Alg. 1 transformer refinement
            latents = self.latents_projection(self.transformer(self.feature_vector_embedding(latents)))
        return dict(attention=attn, positions0=pos0, latents=latents)


def split_latents(latents, cfg):
    """Alg. 1 "latent computations": latents [B,K,2+d_phi] -> dict
        positions [B,K,2] (x, y) clamped to [-1,1]
        scales [B,K,2] inverse scales (s_x, s_y) in [s_min, s_max] (s_y = s_x when isotropic)
        activations [B,K] alpha = exp(logit) > 0;  activation_logits [B,K]
        z_what [B,K,z_what_dim]
    Layout (official): x, y, s (1 or 2), alpha logit, z_what. With official_activation_bug the
    logit is read at index 4 as in the official renderer, which under isotropic scaling is
    z_what[0] (official MF_models_renderer.py); by default it is read from its own channel 2 + n_scale.
    """
    ns = 1 if cfg.scaling == "isotropic" else 2
    positions = latents[..., 0:2].clamp(-1.0, 1.0)
    s = cfg.s_min + (cfg.s_max - cfg.s_min) * torch.sigmoid(latents[..., 2:2 + ns])
    scales = s.expand(*s.shape[:-1], 2) if ns == 1 else s
    logit = latents[..., 4 if cfg.official_activation_bug else 2 + ns]
    return dict(positions=positions, scales=scales, activation_logits=logit, activations=logit.exp(),
                z_what=latents[..., 3 + ns:])


# 2c. Rendering (Alg. 2): glimpse generator (Tab. 7), STN, compositing (eq. 17-18)


def glimpse_generator(z_what_dim, glimpse_size):
    """Tab. 7: ConvT 2x2 (1 -> 2 px) then ConvT 4x4 stride 2 doublings with GroupNorm + CELU, the last
    with bias and a sigmoid; 4 output channels (RGB + mask). Channels halve from 2 * glimpse_size
    (Tab. 7: 64.. for 32 px glimpses, 128.. for 64 px), GroupNorm groups = channels // 16 (at least 1).
    Input [N, z_what_dim, 1, 1] -> [N, 4, g, g] in (0, 1). Raises ValueError unless g is a power of 2 >= 4.
    """
    n = int(round(math.log2(glimpse_size))) if glimpse_size > 0 else 0
    if glimpse_size < 4 or 2 ** n != glimpse_size:
        raise ValueError(f"glimpse_size must be a power of 2 >= 4, got {glimpse_size}")
    chans = [2 * glimpse_size // 2 ** i for i in range(n - 1)]           # e.g. 64, 32, 16, 8 for g = 32
    layers = [nn.ConvTranspose2d(z_what_dim, chans[0], 2, 1, 0, bias=False)]  # 1x1 -> 2x2
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.GroupNorm(max(1, cin // 16), cin), nn.CELU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)]
    layers += [nn.GroupNorm(max(1, chans[-1] // 16), chans[-1]), nn.CELU(),
               nn.ConvTranspose2d(chans[-1], 4, 4, 2, 1, bias=True), nn.Sigmoid()]
    return nn.Sequential(*layers)


def stn_place(glimpses, positions, scales, height, width):
    """Spatial transformer placement (Alg. 2): glimpses [N,C,g,g] -> layers [N,C,H,W].

    theta = [[s_x, 0, -x s_x], [0, s_y, -y s_y]] (official MF_models_renderer.py): the glimpse centre lands at (x, y)
    (normalised coordinates, x along the width) and its side covers 2 / s of the image side.
    affine_grid / grid_sample with align_corners=False, bilinear, zero padding outside the glimpse.
    positions [N,2], scales [N,2].
    """
    N = glimpses.shape[0]
    theta = glimpses.new_zeros(N, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scales[:, 0], scales[:, 1]
    theta[:, :, 2] = -positions * scales
    grid = F.affine_grid(theta, [N, glimpses.shape[1], height, width], align_corners=False)
    return F.grid_sample(glimpses, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def composite(layers, masks, activations, background, bg_logit):
    """Compositing (eq. 17-18).

    layers [B,K,3,H,W] object images L_k, masks [B,K,H,W] M_k in [0,1], activations [B,K] alpha_k > 0,
    background [B,3,H,W] L_0 (its mask M_0 = 1), bg_logit: scalar tensor log alpha_0.
    Returns (recon [B,3,H,W], weights [B,K+1,H,W] summing to 1 over K+1, index 0 = background).
    """
    B, K, H, W = masks.shape
    alpha = torch.cat([bg_logit.exp().reshape(1, 1).expand(B, 1), activations], dim=1)    # [B,K+1]
    m = torch.cat([masks.new_ones(B, 1, H, W), masks], dim=1)                            # M_0 = 1
    weighted = alpha[:, :, None, None] * m
    weights = weighted / weighted.sum(dim=1, keepdim=True)                                # eq. (17)
    all_layers = torch.cat([background.unsqueeze(1), layers], dim=1)                      # [B,K+1,3,H,W]
    recon = (weights.unsqueeze(2) * all_layers).sum(dim=1)                                # eq. (18)
    return recon, weights


class Renderer(nn.Module):
    """Alg. 2: object latents + background -> reconstruction and per-pixel layer weights.

    Holds the glimpse generator and the learnable background activation logit log alpha_0
    (initialised to bg_logit_init, Tab. 6)."""

    def __init__(self, cfg):
        super().__init__()
        self.glimpse_generator = glimpse_generator(cfg.z_what_dim, cfg.glimpse_size or cfg.image_size // 2)
        self.background_activation_logit = nn.Parameter(torch.full((1, 1), float(cfg.bg_logit_init)))

    def forward(self, z, background):
        B, K, _ = z["z_what"].shape
        H, W = background.shape[-2:]
        g = self.glimpse_generator(z["z_what"].reshape(B * K, -1, 1, 1))          # o_k, m_k
        placed = stn_place(g, z["positions"].reshape(B * K, 2), z["scales"].reshape(B * K, 2), H, W)
        placed = placed.reshape(B, K, 4, H, W)
        layers, masks = placed[:, :, :3], placed[:, :, 3]                         # L_k, M_k
        recon, weights = composite(layers, masks, z["activations"], background, self.background_activation_logit)
        return dict(recon=recon, weights=weights, layers=layers, glimpses=g.reshape(B, K, *g.shape[1:]))


# 2d. Background model: AE-NE autoencoder (Sauvalle & de La Fortelle 2021, ref. [38]; official AE-NE background/models.py)


def _ae_ne_positions(h, w):
    """AE-NE frozen positional channels [1,2,h,w]: row i/(h-1) - 0.5 and column j/(w-1) - 0.5 (1 if size 1)."""
    ys = torch.arange(h) / (h - 1) - 0.5 if h > 1 else torch.ones(1)
    xs = torch.arange(w) / (w - 1) - 0.5 if w > 1 else torch.ones(1)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([y, x]).unsqueeze(0).float()


class PosBlock(nn.Module):
    """(Transposed) convolution with the 2 positional channels concatenated to its input, then
    GroupNorm (AE-NE; groups of 16 channels) or BatchNorm (`norm="batch"`) + CELU unless final.
    Input [B,Cin,h,w] (h, w = `in_shape`)."""

    def __init__(self, in_shape, cin, cout, kernel, stride, padding, transpose=False, output_padding=(0, 0),
                 final=False, norm="group"):
        super().__init__()
        conv = (nn.ConvTranspose2d(cin + 2, cout, kernel, stride, padding, output_padding=output_padding, bias=False)
                if transpose else nn.Conv2d(cin + 2, cout, kernel, stride, padding, bias=False))
        normalization = nn.GroupNorm(max(1, cout // 16), cout) if norm == "group" else nn.BatchNorm2d(cout)
        mods = [conv] if final else [conv, normalization, nn.CELU()]
        self.layers = nn.Sequential(*mods)
        self.register_buffer("pos", _ae_ne_positions(*in_shape), persistent=False)

    def forward(self, x):
        return self.layers(torch.cat([x, self.pos.expand(x.shape[0], -1, -1, -1)], dim=1))


def _ae_ne_geometry(h, w):
    """Per-block (kernel, stride, padding, output_padding) down to 1x1 and the shapes, AE-NE rule:
    side > 5: k5 s2 p2 (k5 s3 p2 for images of 200 px or more); side 4-5 (small images): k4 s2 p1;
    else a kernel of the whole side."""
    small = max(h, w) < 200
    shapes, geo = [(h, w)], []
    while h > 1 or w > 1:
        per_axis = []
        for side in (h, w):
            if side > 5:
                k, s, p = (5, 2, 2) if small else (5, 3, 2)
            elif side > 3 and small:
                k, s, p = 4, 2, 1
            else:
                k, s, p = side, 1, 0
            per_axis.append((k, s, p, 1 + (side + 2 * p - k) // s, (side + 2 * p - k) % s))
        (kh, sh, ph, h, oph), (kw, sw, pw, w, opw) = per_axis
        geo.append(((kh, kw), (sh, sw), (ph, pw), (oph, opw)))
        shapes.append((h, w))
    return geo, shapes


class Background(nn.Module):
    """AE-NE background autoencoder: images [B,3,H,W] in [0,1] -> [B,4,H,W] in (0,1)
    (RGB background + noise estimate). Encoder to a 1x1 code of nz = 16, mirrored transposed-conv
    generator, GroupNorm + CELU, positional channels at every block, sigmoid output (official background/models.py).
    AE-NE was made for the fixed scene of a video; on the built-in set every image has its own plain
    background colour, and per-image GroupNorm (over 16 channels x all pixels) all but removes that
    colour: fed 255 * image (official) the bias-free code is invariant to brightness, and even at
    `input_scale=1` the background stays the dataset's mean colour after 1000 steps. `norm="batch"`
    (BatchNorm, the default for the built-in data; the paper presets use "group") keeps the
    per-image differences and learns the colours within ~100 steps. Raises ValueError for sizes needing other than 5-7 blocks
    (AE-NE supports e.g. 32, 64, 128 px)."""

    ENC = {5: ([3, 64, 160, 160, 32, 16], [3, 64, 160, 160, 16, 16]),
           6: ([3, 64, 160, 320, 160, 32, 16], [3, 64, 160, 320, 160, 16, 16]),
           7: ([3, 64, 160, 320, 160, 160, 32, 16], [3, 64, 320, 640, 640, 320, 16, 16])}
    GEN = {5: ([4, 144, 256, 256, 32, 16], [4, 144, 640, 640, 16, 16]),
           6: ([4, 144, 256, 512, 256, 32, 16], [4, 144, 640, 1280, 640, 16, 16]),
           7: ([4, 144, 256, 512, 256, 256, 32, 16], [4, 144, 640, 1280, 640, 320, 16, 16])}

    def __init__(self, image_size, complex_background=False, input_scale=255.0, norm="group"):
        super().__init__()
        self.input_scale = input_scale
        geo, shapes = _ae_ne_geometry(image_size, image_size)
        n = len(geo)
        if n not in self.ENC:
            raise ValueError(f"AE-NE background model: {image_size} px needs {n} blocks, only 5-7 implemented")
        enc, gen = self.ENC[n][complex_background], self.GEN[n][complex_background]
        self.encoder = nn.Sequential(*[PosBlock(shapes[i], enc[i], enc[i + 1], *geo[i][:3], norm=norm)
                                       for i in range(n)])
        self.generator = nn.Sequential(*[
            PosBlock(shapes[i + 1], gen[i + 1], gen[i], *geo[i][:3], transpose=True, output_padding=geo[i][3],
                     final=i == 0, norm=norm) for i in reversed(range(n))])

    def forward(self, images):
        code = self.encoder(images * self.input_scale)                     # [B,16,1,1]
        return torch.sigmoid(self.generator(code))


def background_loss(images, out, tau=0.25, beta=6.0, r=75):
    """AE-NE robust loss (ref. [38]; official AE-NE background/train.py). images [B,3,H,W] in [0,1], out [B,4,H,W] in [0,1].

    e = sum_c SmoothL1_beta=3(255 x, 255 b) / 255 per pixel; weights exp(-beta * avgpool(tanh(e / tau)))
    (no gradient, window 2 (W // r) + 1) down-weight pixels the background cannot explain (objects);
    the 4th channel learns to predict e / 3 (SmoothL1 with beta 3/255). Returns a scalar.
    """
    B, _, H, W = images.shape
    e = F.smooth_l1_loss(images * 255, out[:, :3] * 255, reduction="none", beta=3.0).sum(1) / 255.0
    noise_err = F.smooth_l1_loss(out[:, 3], e.detach() / 3.0, reduction="none", beta=3.0 / 255)
    with torch.no_grad():
        soft = torch.tanh(e / tau)
        k = W // r
        logit = -beta * F.avg_pool2d(soft.unsqueeze(1), 2 * k + 1, stride=1, padding=k, count_include_pad=False)
        weights = torch.exp(logit.squeeze(1)) / (B * H * W)
    return ((e + noise_err) * weights).sum()


# 2e. Losses (Sec. 4.2.1) and the full model


def reconstruction_loss(recon, images):
    """eq. (19-20): mean over pixels (and batch) of the squared per-pixel L1 error summed over channels."""
    return (recon - images).abs().sum(dim=1).pow(2).mean()


def pixel_entropy_loss(weights, eps=1e-20):
    """eq. (21): mean over pixels of (sum_k w_k log(w_k + eps))^2, background included. weights [B,K+1,H,W]."""
    return (weights * torch.log(weights + eps)).sum(dim=1).pow(2).mean()


def pixel_weight_at(fg_step, cfg):
    """eq. (22): lambda_pixel * min(1, step / N_pixel)^2."""
    return cfg.pixel_weight * min(1.0, fg_step / max(1, cfg.pixel_warmup)) ** 2


class ASTSeg(nn.Module):
    """AST-Seg (Fig. 1): foreground encoder + renderer, and the AE-NE background model.

    forward(images [B,3,H,W] float in [0,1], pixel_weight=None) -> dict
        loss        scalar, eq. (22) with the given entropy weight (default lambda_pixel, no warmup)
        rec_loss, pixel_loss   the two terms (eq. 20, 21)
        recon       [B,3,H,W] reconstruction (eq. 18), in [0,1]
        masks       [B,K+1,H,W] layer weights w_k (eq. 17), sum to 1 per pixel, index 0 = background;
                    segmentation = masks.argmax(1) (Sec. 4.1)
        background  [B,3,H,W] L_0;  layers [B,K,3,H,W] L_k
        positions [B,K,2] (x,y) in [-1,1], scales [B,K,2] in [s_min,s_max], activations [B,K] > 0, z_what [B,K,z]
        attention   [B,K,h,w] attention maps (eq. 11)
    Raises ValueError if the image size differs from cfg.image_size.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.renderer = Renderer(cfg)
        self.background = Background(cfg.image_size, cfg.bg_complex, norm=cfg.bg_norm)   # input_scale 255 (official)

    background_frozen = False   # set by set_trainable: phase 2 of the curriculum (Sec. 4.2.2)

    def foreground_parameters(self):
        return list(self.encoder.parameters()) + list(self.renderer.parameters())

    def train(self, mode=True):
        """nn.Module.train, except that a frozen background stays in eval mode (fixed BatchNorm statistics)."""
        super().train(mode)
        if mode and self.background_frozen:
            self.background.eval()
        return self

    def forward(self, images, pixel_weight=None):
        H, W = images.shape[-2:]
        if (H, W) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images of {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        background = self.background(images)[:, :3]                      # L_0
        enc = self.encoder(images)
        z = split_latents(enc["latents"], self.cfg)
        r = self.renderer(z, background)
        rec = reconstruction_loss(r["recon"], images)
        pix = pixel_entropy_loss(r["weights"])
        lam = self.cfg.pixel_weight if pixel_weight is None else pixel_weight
        return dict(loss=rec + lam * pix, rec_loss=rec, pixel_loss=pix, recon=r["recon"], masks=r["weights"],
                    background=background, layers=r["layers"], attention=enc["attention"],
                    positions=z["positions"], scales=z["scales"], activations=z["activations"], z_what=z["z_what"])


# -----------------------------------------------------------------------------
# 3. Official checkpoints (official MF_train.py: encoder / generator / background encoder / generator dicts)

# Segformer parameter names, transformers 4.x <-> 5.x (transformers/conversion_mapping.py, "SegformerModel"
# and "SegformerForSemanticSegmentation"): (4.x regex, 5.x replacement), (5.x regex, 4.x replacement)
_SEGFORMER_RENAMES = [
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings.", r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks.", r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm.", r"stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"attention\.self\.query\.", "attention.q_proj.", r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.self\.key\.", "attention.k_proj.", r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.self\.value\.", "attention.v_proj.", r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction.",
     r"attention\.sequence_reduction\.sequence_reduction\.", "attention.self.sr."),
    (r"attention\.self\.layer_norm\.", "attention.sequence_reduction.layer_norm.",
     r"attention\.sequence_reduction\.layer_norm\.", "attention.self.layer_norm."),
    (r"attention\.output\.dense\.", "attention.o_proj.", r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.dense1\.", "mlp.fc1.", r"mlp\.fc1\.", "mlp.dense1."),
    (r"mlp\.dense2\.", "mlp.fc2.", r"mlp\.fc2\.", "mlp.dense2."),
    (r"layer_norm_1\.", "layernorm_before.", r"layernorm_before\.", "layer_norm_1."),
    (r"layer_norm_2\.", "layernorm_after.", r"layernorm_after\.", "layer_norm_2."),
    (r"decode_head\.linear_c\.", "decode_head.linear_projections.", r"decode_head\.linear_projections\.", "decode_head.linear_c."),
]


def convert_segformer_key(key, to_v5=True):
    """Rename one SegformerForSemanticSegmentation key between the transformers 4.x layout
    (segformer.encoder.block.i.j.attention.self.query...) and the 5.x one (segformer.stages.i.blocks.j.
    attention.q_proj...). Keys already in the target layout come back unchanged."""
    for old4, new5, old5, new4 in _SEGFORMER_RENAMES:
        key = re.sub(old4, new5, key) if to_v5 else re.sub(old5, new4, key)
    return key


def convert_official_state_dict(ckpt, segformer_v5=True):
    """Official AST-Seg checkpoint -> ASTSeg state dict.

    `ckpt`: the official dict with "encoder_state_dict", "generator_state_dict" and optionally
    "background_encoder_state_dict", "background_generator_state_dict" (MF_train.py), or the
    background model's own {"encoder_state_dict", "generator_state_dict"} with background keys.
    Segformer keys are renamed to the layout of the installed transformers (`segformer_v5`).
    Frozen constants (position maps, AE-NE positional encodings, background mask) are dropped: ours
    are recomputed buffers with the same values. Raises KeyError naming any key it cannot map.
    """
    out = {}

    def put(new, value):
        out[new] = value

    for key, value in ckpt.get("encoder_state_dict", {}).items():
        if key == "position_map":
            continue
        if key.startswith("feature_and_attention_map_generator.complete_model."):
            put("encoder." + convert_segformer_key(key, segformer_v5), value)
        elif key.startswith(("feature_and_attention_map_generator.", "feature_vector_embedding.", "transformer.",
                             "latents_projection.")):
            put("encoder." + key, value)
        elif key.startswith("background_encoder."):
            put("background.encoder." + key.split(".", 1)[1].replace("downsample.", "layers."), value)
        else:
            raise KeyError(f"official encoder key {key!r} has no counterpart in ASTSeg")
    for key, value in ckpt.get("generator_state_dict", {}).items():
        if key in ("background_mask", "background_mask_logit") or key.endswith("positional_encoding"):
            continue
        if key.startswith(("glimpse_generator.", "background_activation_logit")):
            put("renderer." + key, value)
        elif key.startswith("background_generator."):
            put("background.generator." + key.split(".", 1)[1].replace("upsample.", "layers."), value)
        else:
            raise KeyError(f"official generator key {key!r} has no counterpart in ASTSeg"
                           + (" (variable background activation is not implemented)" if "local_background" in key else ""))
    for part, ours, inner in (("background_encoder_state_dict", "background.encoder.", "downsample."),
                              ("background_generator_state_dict", "background.generator.", "upsample.")):
        for key, value in ckpt.get(part, {}).items():
            if key.endswith("positional_encoding"):
                continue
            name = key.split(".", 1)[1] if key.startswith(("background_encoder.", "background_generator.")) else key
            if inner not in name:
                raise KeyError(f"official {part} key {key!r} has no counterpart in ASTSeg")
            put(ours + name.replace(inner, "layers."), value)
    return out


def _installed_segformer_is_v5():
    from transformers import SegformerConfig, SegformerModel
    tiny = SegformerModel(SegformerConfig(depths=[1] * 4, hidden_sizes=[4] * 4, num_attention_heads=[1] * 4))
    return any(".stages." in "." + k for k in tiny.state_dict())


def load_official(model, path):
    """Load an official AST-Seg checkpoint (MF_train.py format) into `model`. Exits with a message on
    mismatch. A checkpoint without background weights (the frozen-background scenario) keeps ours."""
    ckpt = load_checkpoint(path, weights_only=False)    # a file the user chose to trust
    if "encoder_state_dict" not in ckpt:
        fail(f"{path}: not an official AST-Seg checkpoint (no 'encoder_state_dict'); ours load with --init_from too")
    sd = convert_official_state_dict(ckpt, _installed_segformer_is_v5())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k.startswith("background.") and "background_encoder_state_dict" not in ckpt)]
    if missing or unexpected:
        fail(f"{path}: does not match this config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
             f"set --dataset/--num_slots/--image_size/--scaling/--segformer to the checkpoint's settings")
    # The official renderer reads alpha's logit at latent index 4; with isotropic scaling that is z_what[0],
    # not the logit's own channel 3. Its weights were trained that way, so render them that way.
    if model.cfg.scaling == "isotropic" and not model.cfg.official_activation_bug:
        model.cfg.official_activation_bug = True
        print(f"{path}: official isotropic checkpoint, rendering as the official code "
              f"(--official_activation_bug switched on: alpha's logit read at latent index 4)")


# -----------------------------------------------------------------------------
# 4. Training


def phases(cfg):
    """The schedule as [(name, first global step, last global step + 1)] (Sec. 4.2.2, Sec. 5.1).

    curriculum: background (bg_steps) -> foreground, background frozen (freeze_steps) -> joint
    baseline:   joint (max_steps);  frozen: background -> foreground (max_steps)
    --phase=background keeps only the background phase. Foreground steps count from the end of phase 1.
    """
    b = 0 if cfg.scenario == "baseline" else cfg.bg_steps
    if cfg.scenario == "baseline":
        out = [("joint", 0, cfg.max_steps)]
    elif cfg.scenario == "frozen":
        out = [("background", 0, b), ("foreground", b, b + cfg.max_steps)]
    else:
        f = min(cfg.freeze_steps, cfg.max_steps)
        out = [("background", 0, b), ("foreground", b, b + f), ("joint", b + f, b + cfg.max_steps)]
    if cfg.phase == "background":
        out = out[:1] if out[0][0] == "background" else []
    return [p for p in out if p[2] > p[1]]


def fg_start(cfg):
    return 0 if cfg.scenario == "baseline" else cfg.bg_steps


def lr_at(step, cfg, phase):
    """Learning rate at global `step` (0-based, before the update).

    background: AE-NE, bg_lr then x0.1 from 80% of bg_steps.
    foreground/joint (Sec. 5.1): quadratic warmup lr * min(1, (t / warmup)^2) with t = fg step + 1
    (official), then x0.1 from 90% of max_steps.
    """
    if phase == "background":
        return cfg.bg_lr * (0.1 if step >= (4 * cfg.bg_steps) // 5 else 1.0)
    t = step - fg_start(cfg) + 1
    return cfg.lr * min(1.0, (t / max(1, cfg.warmup_steps)) ** 2) * (0.1 if t > 0.9 * cfg.max_steps else 1.0)


def set_trainable(model, phase):
    """Freeze / unfreeze for a phase and return the parameters to optimise (Sec. 4.2.2):
    background: AE-NE only; foreground: encoder + renderer (AE-NE frozen); joint: everything.
    A frozen AE-NE also stays in eval mode (ASTSeg.train), so --bg_norm=batch uses its running statistics."""
    model.background_frozen = phase == "foreground"
    fg = {id(p) for p in model.foreground_parameters()}
    for p in model.parameters():
        is_fg = id(p) in fg
        p.requires_grad_(phase == "joint" or (phase == "foreground") == is_fg)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg, phase):
    """AdamW (AE-NE, betas 0.9/0.999) for the background phase; Adam (Tab. 6: betas 0.9/0.98, eps 1e-9)
    otherwise. A new optimiser starts each phase (official)."""
    if phase == "background":
        return torch.optim.AdamW(params, lr=cfg.bg_lr, betas=(0.9, 0.999), weight_decay=0.0)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


def load_dataset(cfg, split):
    """data.build_dataset(cfg.dataset, split) at cfg.image_size; exits with the loader's one-line message."""
    try:
        return data.build_dataset(cfg.dataset, split, root=cfg.data_dir or None, image_size=cfg.image_size)
    except data.DatasetError as e:
        fail(str(e) + (common.VAL_SPLIT_HINT if split == "val" else ""))   # val: read for --eval_split


def train_loader(cfg, ddp, batch_size, start_step, seed):
    """Endless shuffled loader of global batch `batch_size`, resuming at `start_step` of its phase; pinned
    memory on CUDA (so the non_blocking copies overlap)."""
    ds = load_dataset(cfg, "train")
    if batch_size % ddp.world_size:
        fail(f"batch size {batch_size} must be divisible by the number of processes {ddp.world_size}")
    sampler = ResumableSampler(len(ds), batch_size, seed=seed, start_step=start_step,
                               rank=ddp.rank, world_size=ddp.world_size)
    # its own generator: iter() would otherwise draw a seed from torch's RNG, so a run resumed at a phase
    # boundary would continue from another RNG state than the uninterrupted run
    return torch.utils.data.DataLoader(ds, batch_size=batch_size // ddp.world_size, sampler=sampler,
                                       num_workers=cfg.num_workers, drop_last=True,
                                       worker_init_fn=common.worker_ignores_stop_signals,
                                       persistent_workers=cfg.num_workers > 0,
                                       pin_memory=ddp.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model, cfg, device, num_items=0, image_path=None, split="test"):
    """Metrics on the first `num_items` images (0 = all) of `split` (train | val | test): dict of means (ARI,
    ARI-FG, mIoU, MSC-FG, mBO, MSE, and "slots": the foreground segments per image, a dead-slot diagnostic,
    common.segments_per_image).

    Segmentation = argmax of the layer weights (0 = background, Sec. 4.1). MSE is the per-image sum
    of squared errors over C,H,W with images in [0,1] (ClevrTex convention, as the paper's tables).
    Datasets without instance masks report MSE only.
    """
    was_training = model.training
    model.eval()
    ds = load_dataset(cfg, split)
    has_masks = getattr(ds, "has_masks", True)
    if num_items and num_items < len(ds):
        ds = torch.utils.data.Subset(ds, range(num_items))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 2),
                                         worker_init_fn=common.worker_ignores_stop_signals)
    sums, first = {}, None
    if not has_masks:
        print(f"{cfg.dataset}: no instance masks present in {cfg.data_dir or 'the dataset'}; reporting MSE only")
    for batch in loader:
        images = batch["image"].to(device)
        out = model(images)
        pred = out["masks"].argmax(dim=1).cpu()
        m = {"mse": mse(images.cpu(), out["recon"].cpu())}
        if "mask" in batch:
            m.update(segmentation_metrics(batch["mask"], pred))
        m["slots"] = segments_per_image(pred)          # slots that win >= 4 pixels: few = dead slots
        for k, v in m.items():
            sums.setdefault(k, []).append(v.double())
        if first is None:
            first = (images.cpu(), out, pred, batch.get("mask"))
    model.train(was_training)
    if image_path and first is not None:
        images, out, pred, true = first
        layers = torch.cat([out["background"].unsqueeze(1), out["layers"]], dim=1)
        save_slot_grid(image_path, images, out["recon"].cpu().clamp(0, 1), pred, true,
                       (out["masks"].unsqueeze(2) * layers).cpu().clamp(0, 1))
    return {k: nanmean(torch.cat(v)) for k, v in sums.items()}


def format_metrics(m):
    names = {"ari_fg": "ARI-FG", "msc_fg": "MSC-FG", "mbo": "mBO", "miou": "mIoU", "ari": "ARI", "mse": "MSE"}
    return "  ".join(f"{names.get(k, k)} {v:.4f}" for k, v in m.items())


# The Config fields that shape the model: resume refuses another value; --eval_only / --predict copy them.
# (Not here: pretrained and bg_logit_init, initial values overwritten by the checkpoint; losses' weights; schedule.)
MODEL_KEYS = ("image_size", "num_slots", "scaling", "feature_net", "segformer", "segformer_sizes", "segformer_depths",
              "decoder_hidden_size", "z_what_dim", "transformer_dim", "transformer_heads", "transformer_ff",
              "transformer_layers", "transformer_dropout", "s_min", "s_max", "glimpse_size",
              "official_activation_bug", "bg_complex", "bg_norm")


def load_weights(model, path, ckpt=None):
    """The weights of checkpoint file `path` into `model` (resume, --init_from, --eval_only, --predict): one of
    our checkpoints (its "model") or an official one (converted). `ckpt`: the file's dict when it is already
    read (resume). Exits with one line naming the file when it is missing, truncated, or of another model /
    config."""
    if ckpt is not None:
        sd = ckpt
    else:
        try:
            sd = load_checkpoint(path, weights_only=False)  # a file the user chose to trust
        except CheckpointError as e:
            fail(f"{e} (--init_from / --ckpt: give one of our ckpt.pt files or an official AST-Seg .pth)")
    if "model" in sd and "config" in sd:                                 # one of ours
        try:
            model.load_state_dict(sd["model"])
        except (RuntimeError, KeyError, TypeError) as e:
            fail(f"{path}: its weights do not fit this model ({error_line(e)[:200]}); pass the settings it was "
                 f"trained with (--eval_only and --predict read them from the checkpoint) or choose another file")
    else:
        try:
            load_official(model, path)
        except (KeyError, RuntimeError) as e:
            fail(f"{path}: does not fit this model ({error_line(e)[:200]}); set --dataset/--num_slots/"
                 f"--image_size/--scaling/--segformer to the checkpoint's settings")


def phase_plan(cfg):
    """One line: the steps of each phase and their global step ranges (printed at the start of training)."""
    names = dict(background="background", foreground="foreground (background frozen)", joint="joint")
    parts = [f"{names[p]} {b - a} steps [{a}, {b})" for p, a, b in phases(cfg)]
    total = phases(cfg)[-1][2] if phases(cfg) else 0
    return (f"plan ({cfg.scenario}{', --phase=background' if cfg.phase == 'background' else ''}): "
            f"{', '.join(parts) or 'nothing to train'}; {total} steps in all (--max_steps={cfg.max_steps} "
            f"counts the foreground steps" + (f", --bg_steps={cfg.bg_steps} the background ones)"
                                              if cfg.scenario != "baseline" else ")"))


def train(cfg, stop=None):
    """The training loop over the scenario's phases: resumes from out_dir/ckpt.pt (phase included),
    logs to out_dir/metrics.jsonl, saves PNGs and an atomic checkpoint every eval_interval steps.
    `stop`: common.training_run's StopSignals (SIGTERM / SIGINT save a checkpoint after the current step
    and exit, common.stop_on_signal).

    Every eval_interval steps (and at the end of each phase) an evaluation of eval_items images of
    cfg.eval_split (default val), logged as <split>_<metric>. At the end of the schedule, rank 0 evaluates
    on the test split (common.finish_training: the whole split up to 1024 images, else eval_items;
    --test_items sets it), writes out_dir/eval_<dataset>.json and prints the summary line (steps, wall
    time since this call, test metrics, out_dir); a run resumed after that evaluation prints its summary
    line again. A run stopped by --stop_at ends with the summary line of its last eval_split evaluation."""
    start_time = time.time()
    check_out_dir(cfg.out_dir)
    ddp = ddp_setup(device=cfg.device)
    device = ddp.device
    seed_everything(cfg.seed + ddp.rank)
    torch.set_flush_denormal(True)      # denormal floats made CPU training steps up to 6x slower
    model = ASTSeg(cfg).to(device)
    schedule = phases(cfg)
    total = schedule[-1][2] if schedule else 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step = 0
    ckpt = load_resume_checkpoint(ckpt_path) if cfg.resume else None    # falls back to ckpt_prev.pt
    resumed_at = ckpt["step"] if ckpt is not None else None
    if ckpt is not None:
        saved = ckpt.get("config") or {}
        if saved.get("official_activation_bug") and cfg.init_from:   # switched on by loading an official checkpoint
            cfg.official_activation_bug = True
        common.check_same_model(saved, cfg, ckpt_path, common.RUN_KEYS + MODEL_KEYS)
        load_weights(model, ckpt_path, ckpt)
        step = ckpt["step"]
        if ddp.is_main:
            print(f"resuming from {ckpt_path} at step {step} (phase {ckpt['phase']})")
    elif cfg.init_from:
        load_weights(model, cfg.init_from)
        print(f"loaded {cfg.init_from}")
    elif cfg.feature_net == "segformer" and not cfg.pretrained and ddp.is_main:
        print("no --pretrained: the Segformer backbone starts from random weights (the paper starts from "
              "ImageNet weights and needs them, e.g. --pretrained=nvidia/mit-b3)")
    if ddp.is_main:                                       # the periodic evaluations' split: its errors before any step
        load_dataset(cfg, "train")                        # (first train's: a missing dataset is not a missing split)
        n_eval = len(load_dataset(cfg, cfg.eval_split))
        n_eval = min(cfg.eval_items, n_eval) if cfg.eval_items else n_eval
        print(phase_plan(cfg))
        resolve_dtype(device, cfg.dtype, announce="the foreground trains")
    end = min(total, cfg.stop_at) if cfg.stop_at else total
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl")) if ddp.is_main else None
    if log is not None:
        log.truncate(step)                                # a resumed run logs its later steps again
    bar = progress(total, initial=step, desc="train", disable=not ddp.is_main)
    state = dict(phase=None, optimizer=None, metrics=None)

    def save(phase):
        save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizer=state["optimizer"].state_dict(),
                                        step=step, phase=phase, rng=get_rng_state(), config=asdict(cfg)))

    def save_and_evaluate(phase):
        rng = get_rng_state()                             # evaluation must not move the training RNG
        save(phase)
        metrics = evaluate(model, cfg, device, cfg.eval_items, os.path.join(cfg.out_dir, f"samples_{step:07d}.png"),
                           split=cfg.eval_split)
        log.log(step, phase=phase, **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()})
        bar.write(f"step {step} ({phase}, {cfg.eval_split}): {format_metrics(metrics)}  (saved {ckpt_path})")
        state["metrics"] = metrics
        set_rng_state(rng)

    for index, (phase, first, last) in enumerate(schedule):
        if step >= last or step >= end:
            continue
        params = set_trainable(model, phase)
        optimizer = make_optimizer(params, cfg, phase)
        if ckpt is not None and ckpt["phase"] == phase and ckpt["step"] > first:
            optimizer.load_state_dict(ckpt["optimizer"])
        state.update(phase=phase, optimizer=optimizer)
        # DDP wraps what this phase trains, so its forward (and the gradient all-reduce) is used: the
        # background phase calls only the AE-NE; the frozen parts hold no trainable parameters for DDP
        trained = model.background if phase == "background" else model
        trained = torch.compile(trained) if cfg.compile else trained
        net = nn.parallel.DistributedDataParallel(trained) if ddp.enabled else trained
        batch = cfg.bg_batch_size if phase == "background" else cfg.batch_size
        data_iter = iter(train_loader(cfg, ddp, batch, step - first, cfg.seed + index))
        if ckpt is not None:
            set_rng_state(ckpt["rng"])
            ckpt = None
        model.train()
        t0 = time.time()
        while step < min(last, end):
            images = next(data_iter)["image"].to(device, non_blocking=True)
            lr = lr_at(step, cfg, phase)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if phase == "background":
                loss = background_loss(images, net(images))
                extra = {}
            else:
                lam = pixel_weight_at(step - fg_start(cfg), cfg)                  # eq. (22) warmup
                with train_autocast(device, cfg.dtype):                       # --dtype
                    out = net(images, pixel_weight=lam)
                loss = out["loss"]
                extra = dict(rec_loss=out["rec_loss"].item(), pixel_loss=out["pixel_loss"].item(), pixel_weight=lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # no clipping in AST-Seg (0); the norm is of all-reduced gradients, so all DDP ranks stop together
            grad_norm = clip_gradients(params, 0)
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                bar.close()                               # the error line then starts a line of its own
            check_finite_step(step, loss.item(), grad_norm, ckpt_path, lr)
            optimizer.step()
            step += 1
            bar.update()
            if step % cfg.log_interval == 0 and ddp.is_main:
                dt, t0 = time.time() - t0, time.time()
                img_s = cfg.log_interval * batch / dt
                bar.set_postfix(phase=phase, loss=f"{loss.item():.4f}", img_s=f"{img_s:.0f}")
                log.log(step, phase=phase, loss=loss.item(), lr=lr, img_per_s=img_s, **extra)
            if (step % cfg.eval_interval == 0 or step in (last, end)) and ddp.is_main:
                save_and_evaluate(phase)
            common.stop_on_signal(stop, ddp, step, ckpt_path, lambda: save(phase))   # SIGTERM / SIGINT: save, exit
    bar.close()
    if stop is not None:
        stop.restore()                                    # a signal now acts as usual
    net = None                                            # DDP's reducer goes while its process group lives
    ddp_cleanup()
    if ddp.is_main and total and step == total:         # the end of the schedule: the final evaluation, on test
        common.finish_training(cfg, model, device, evaluate, format_metrics, load_dataset, script="ast_seg.py",
                               step=step, start_time=start_time, checkpoint=ckpt_path, resumed_at=resumed_at)
    elif ddp.is_main and state["metrics"] is not None:   # stopped by --stop_at: its last evaluation
        print(common.summary_line("ast_seg.py", cfg.dataset, cfg.eval_split, n_eval, state["metrics"], steps=step,
                                  wall_s=time.time() - start_time, out_dir=cfg.out_dir, resumed_at=resumed_at,
                                  total_steps=total, fmt=format_metrics))


# -----------------------------------------------------------------------------
# 5. Evaluation and prediction


def main(argv=None):
    """Train, --eval_only or --predict. Errors of the data or of a checkpoint, also those re-raised from a
    DataLoader worker, end as one line naming the file."""
    try:
        return _main(argv)
    except (data.DatasetError, CheckpointError) as e:
        fail(error_line(e))


def _main(argv):
    cfg = build_config(argv)
    torch.set_flush_denormal(True)      # denormal floats made CPU steps up to 6x slower
    if cfg.eval_only or cfg.predict:
        # our checkpoints and official ones (--init_from / --ckpt): files the user chose to trust
        cfg = common.checkpoint_config(cfg, MODEL_KEYS, weights_only=False)
        check_out_dir(cfg.out_dir)                        # may differ from the checkpoint's (read-only) folder
        device = get_device(cfg.device)
        model = common.load_for_inference(cfg, device, ASTSeg, load_weights, "ast_seg.py")
        if cfg.predict:                                   # label_offset 0: slot 0, the background, is black
            return common.predict_images(cfg, model, device)
        return common.evaluate_checkpoint(cfg, model, device, evaluate, format_metrics, script="ast_seg.py",
                                          load_dataset=load_dataset)
    with common.training_run(cfg.out_dir) as stop:       # one run per --out_dir; SIGTERM / SIGINT save
        train(cfg, stop)


if __name__ == "__main__":
    main()

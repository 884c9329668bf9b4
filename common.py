"""Shared utilities for the object-centric learning reference implementations.

Plain, dependency-light helpers used by every model script (torch, numpy, scipy,
scikit-learn, Pillow and tqdm only). Metric conventions: the README's "Metric conventions"
table; each metric equals an official evaluator (sklearn `adjusted_rand_score`, ClevrTex
`clevrtex_eval.py`, GENESIS `average_segcover`, BO-QSA `methods/utils.py` and
`methods/seg_metrics.py`), named in its docstring.

Contents
--------
1. Metrics (per image, computed on CPU with numpy / sklearn / scipy)
   ari, miou, msc, mbo, mse, fg_iou_dice, segmentation_metrics, segments_per_image, nanmean,
   ObjectSegMetrics (AP/PQ/Pre/Rec)
2. Config / CLI (argparse built from a dataclass: `--key=value` flags, help from the field comments)
   RunConfig (the fields every script shares), parse_args, parse_config, explicit_fields, build_parser,
   apply_overrides, config_to_dict, ConfigError
3. Runtime
   seed_everything, get_device, DDPInfo, ddp_setup, ddp_cleanup, all_reduce_mean
4. Checkpoints (atomic writes, the previous one kept, RNG state)
   save_checkpoint, load_checkpoint, load_resume_checkpoint, prev_checkpoint_path, non_finite_tensors,
   CheckpointError, get_rng_state, set_rng_state
4a. Long runs on a shared machine: one training process per --out_dir (an OS file lock), SIGTERM / SIGINT
   finish the step and save, another --seed or --dataset never resumes a run
   training_run, StopSignals, stop_on_signal, worker_ignores_stop_signals, RUN_KEYS
4b. Inference from a checkpoint (--eval_only / --predict of every script)
   inference_checkpoint, checkpoint_config, check_same_model, same_setting, saved_setting, flag_value,
   load_for_inference, predict_images, evaluate_checkpoint, finish_training (the final test evaluation),
   summary_line (the one-line end of every run), test_eval_items, format_duration, checkpoint_step
5. Logging / progress / training-loop checks
   MetricsLog, progress, fail, error_line, ResumableSampler,
   clip_gradients, check_finite_step, check_config, check_out_dir
6. Visualisation (Pillow)
   PALETTE, labels_to_rgb, match_to_truth, to_uint8_image, save_image_grid, save_slot_grid
7. Prediction on the user's own images (--predict of every script)
   predict_folder, load_rgb, PREDICT_EXTS

Label maps everywhere are integer tensors `[B, H, W]` where 0 is background and the
other labels need not be contiguous (e.g. {0, 3, 7}).
"""

from __future__ import annotations

import argparse
import atexit
import colorsys
import contextlib
import dataclasses
import errno
import difflib
import inspect
import io
import json
import math
import multiprocessing.util  # registers multiprocessing's exit handler now
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import tokenize
import types
import typing
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score
from tqdm import tqdm

__all__ = [
    # metrics
    "ari", "miou", "msc", "mbo", "mse", "fg_iou_dice", "segmentation_metrics", "nanmean",
    # config
    "RunConfig", "parse_args", "parse_config", "explicit_fields", "build_parser", "apply_overrides", "config_to_dict",
    "ConfigError",
    # runtime
    "seed_everything", "get_device", "DTYPES", "native_bf16", "resolve_dtype", "train_autocast", "DDPInfo",
    "ddp_setup", "ddp_cleanup", "all_reduce_mean",
    # checkpoints
    "save_checkpoint", "load_checkpoint", "load_resume_checkpoint", "prev_checkpoint_path", "non_finite_tensors",
    "CheckpointError", "get_rng_state", "set_rng_state",
    # long runs
    "training_run", "StopSignals", "stop_on_signal", "worker_ignores_stop_signals", "RUN_KEYS",
    # inference from a checkpoint
    "inference_checkpoint", "checkpoint_config", "check_same_model", "same_setting", "saved_setting", "flag_value",
    "load_for_inference", "predict_images", "evaluate_checkpoint", "finish_training", "summary_line",
    "test_eval_items", "format_duration", "format_metric_values", "checkpoint_step", "FINAL_EVAL_MAX_ITEMS",
    # logging
    "MetricsLog", "progress", "fail", "error_line", "ResumableSampler",
    # training-loop checks
    "clip_gradients", "check_finite_step", "check_config", "check_out_dir",
    # visualisation
    "PALETTE", "labels_to_rgb", "match_to_truth", "to_uint8_image", "save_image_grid", "save_slot_grid",
    # prediction
    "predict_folder", "load_rgb", "PREDICT_EXTS",
]


# =============================================================================
# 1. Metrics
# =============================================================================

def _label_maps(true, pred) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label maps and return them as int64 numpy arrays `[B, H*W]`.

    Accepts `[B, H, W]` or GENESIS-style `[B, 1, H, W]` integer tensors / arrays.
    Raises TypeError for floating-point inputs (usually soft masks passed by mistake)
    and ValueError for mismatched or wrongly-ranked shapes.
    """
    arrays = []
    for name, x in (("true", true), ("pred", pred)):
        x = torch.as_tensor(x).detach().cpu()
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer label map, got dtype {x.dtype}")
        if x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [B, H, W], got {tuple(x.shape)}")
        arrays.append(x.reshape(x.shape[0], -1).numpy().astype(np.int64, copy=False))
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(f"true and pred shapes differ: {tuple(torch.as_tensor(true).shape)} "
                         f"vs {tuple(torch.as_tensor(pred).shape)}")
    return arrays[0], arrays[1]


def _iou_table(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every true and every predicted segment of one flattened image.

    Returns (true_labels [Kt], pred_labels [Kp], iou [Kt, Kp] float64). Only labels that
    occur in the image are segments, so no segment here is empty.
    """
    t_labels, t_idx = np.unique(t, return_inverse=True)
    p_labels, p_idx = np.unique(p, return_inverse=True)
    kt, kp = len(t_labels), len(p_labels)
    inter = np.bincount(t_idx * kp + p_idx, minlength=kt * kp).reshape(kt, kp).astype(np.float64)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    return t_labels, p_labels, inter / union  # union >= 1: every segment is non-empty


def ari(true, pred, foreground_only: bool = False) -> torch.Tensor:
    """Adjusted Rand Index per image (sklearn `adjusted_rand_score`).

    Equals the official evaluators: BO-QSA `methods/utils.py` `average_ari`, ClevrTex
    `clevrtex_eval.py` `CLEVRTEX_Evaluator.ari` (skip_0 = ARI-FG), both per image with sklearn.

    Args:
        true: int label map `[B, H, W]` (0 = background; `[B, 1, H, W]` also accepted).
        pred: int label map of the same shape (e.g. argmax over slot masks).
        foreground_only: ARI-FG, i.e. only the pixels whose true label is > 0.
    Returns:
        float64 tensor `[B]` on CPU, values in [-1, 1] (1 = identical partitions); never NaN.
    Edge cases:
        * sklearn convention: when both partitions are constant (a single segment each,
          e.g. an image that is all background and predicted as one slot) the score is
          1.0. DeepMind's TF implementation returns NaN there.
        * foreground_only and the image has no foreground pixel: 1.0, as sklearn's
          `adjusted_rand_score([], [])` and every official evaluator (BO-QSA, ClevrTex,
          AST); the image counts in the mean like any other.
    Raises:
        TypeError for floating-point inputs, ValueError for mismatched shapes.
    """
    t, p = _label_maps(true, pred)
    out = torch.empty(t.shape[0], dtype=torch.float64)
    for b in range(t.shape[0]):
        tb, pb = t[b], p[b]
        if foreground_only:
            keep = tb > 0
            tb, pb = tb[keep], pb[keep]                  # may be empty: sklearn gives 1.0
        out[b] = adjusted_rand_score(tb, pb)
    return out


def miou(true, pred) -> torch.Tensor:
    """Mean IoU of the Hungarian matching, ClevrTex benchmark convention.

    True and predicted segments (the labels occurring in each map, background INCLUDED)
    are matched one-to-one maximising the total IoU (`scipy.optimize.linear_sum_assignment`).
    The IoU matrix is padded with empty segments to a square K x K, K = max(Kt, Kp), so
    every segment is matched: a true segment matched to a padded (empty) predicted segment
    counts with IoU 0, and so does a surplus predicted segment matched to a padded true one.
    The score is the sum of matched IoUs divided by the number of matched pairs where the
    true or the predicted segment is non-empty (ClevrTex `clevrtex_eval.py`, `num_pairs`), which here is
    max(Kt, Kp): extra slots that claim pixels and missed objects are both penalised.

    Args:
        true, pred: int label maps `[B, H, W]` (0 = background, labels need not be contiguous).
    Returns:
        float64 tensor `[B]` on CPU, values in [0, 1].
    Raises:
        TypeError for floating-point inputs, ValueError for mismatched shapes.
    """
    t, p = _label_maps(true, pred)
    out = torch.empty(t.shape[0], dtype=torch.float64)
    for b in range(t.shape[0]):
        t_labels, p_labels, iou = _iou_table(t[b], p[b])
        kt, kp = iou.shape
        k = max(kt, kp)
        padded = np.zeros((k, k))  # rows >= kt / columns >= kp are empty segments
        padded[:kt, :kp] = iou
        rows, cols = linear_sum_assignment(padded, maximize=True)
        nonempty = (rows < kt) | (cols < kp)
        out[b] = padded[rows, cols][nonempty].sum() / nonempty.sum() if nonempty.any() else float("nan")
    return out


def msc(true, pred, foreground_only: bool = True) -> torch.Tensor:
    """Mean segmentation covering, GENESIS `average_segcover` (unweighted mean).

    For each true segment (only labels > 0 when `foreground_only`, i.e. MSC-FG with
    GENESIS ignore_background=True) take the max IoU with any predicted segment (predicted
    background included, IoU over all pixels), then average over true segments without
    weighting by size.

    Args:
        true, pred: int label maps `[B, H, W]` (0 = background, labels need not be contiguous).
        foreground_only: skip the true background segment (label 0, and any negative label).
    Returns:
        float64 tensor `[B]` on CPU, values in [0, 1]. An image without (foreground)
        segments contributes 0.0, as in GENESIS (`mean_scores / max(N, 1)`).
    Raises:
        TypeError for floating-point inputs, ValueError for mismatched shapes.
    """
    t, p = _label_maps(true, pred)
    out = torch.empty(t.shape[0], dtype=torch.float64)
    for b in range(t.shape[0]):
        t_labels, _, iou = _iou_table(t[b], p[b])
        best = iou.max(1)
        if foreground_only:
            best = best[t_labels > 0]
        out[b] = best.mean() if best.size else 0.0
    return out


def mbo(true, pred) -> torch.Tensor:
    """Mean best overlap (mBO), as in OCLF, VideoSAUR and SPOT.

    For each true object (labels > 0; the background label 0 is excluded) take its best IoU
    over all predicted segments (the one covering the background included), then the
    unweighted mean over the image's objects. The same per-object quantity as MSC-FG; only
    the image without objects differs (NaN here, 0.0 in MSC-FG).

    Args:
        true, pred: int label maps `[B, H, W]` (0 = background, labels need not be contiguous).
    Returns:
        float64 tensor `[B]` on CPU, values in [0, 1]; NaN for an image without any object,
        which `nanmean` skips.
    Raises:
        TypeError for floating-point inputs, ValueError for mismatched shapes.
    """
    t, _ = _label_maps(true, pred)
    out = msc(true, pred, foreground_only=True)          # the same per-object best IoU, mean over objects
    out[torch.from_numpy(~(t > 0).any(axis=1))] = float("nan")   # no object: undefined, not 0
    return out


def mse(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared errors (ClevrTex convention).

    Args:
        target, recon: images `[B, C, H, W]` with values in [0, 1] (any float dtype/device).
    Returns:
        float64 tensor `[B]` on CPU: sum over C, H, W of (target - recon)^2.
        Note BO-QSA reports F.mse_loss * H * W on [-1, 1] images, which is 4/3 of this
        value for 3 channels (BO-QSA `methods/method_mixture_dec.py` test_step): convert
        before comparing. This value equals ClevrTex `clevrtex_eval.py` ('MSE').
    Raises:
        ValueError when shapes differ or are not 4-D.
    """
    if target.shape != recon.shape or target.dim() != 4:
        raise ValueError(f"mse expects two [B, C, H, W] tensors of equal shape, got "
                         f"{tuple(target.shape)} and {tuple(recon.shape)}")
    diff = target.detach().cpu().double() - recon.detach().cpu().double()
    return diff.pow(2).sum(dim=(1, 2, 3))


def _binary_slot_masks(slot_masks: torch.Tensor) -> torch.Tensor:
    """Slot masks `[B, K, H, W]` -> bool. Floats (soft masks) become the one-hot argmax
    over slots, so every pixel belongs to exactly one slot (the usual hard assignment);
    bool/int masks are used as given (`!= 0`)."""
    if slot_masks.is_floating_point():
        hard = slot_masks.argmax(dim=1, keepdim=True)
        return torch.zeros_like(slot_masks, dtype=torch.bool).scatter_(1, hard, True)
    return slot_masks != 0


def fg_iou_dice(true_fg, slot_masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground IoU and Dice (Birds / Dogs / Cars / Flowers protocol).

    Each slot mask is compared with the true foreground; for each image the best slot is
    taken, separately for IoU and for Dice, with the official formula (BO-QSA
    `methods/utils.py` `iou_and_dice`, eps = 1e-8, here in float64):
    IoU = (inter + eps) / (union + eps), Dice = (2 inter + eps) / (|slot| + |fg| + eps).

    Args:
        true_fg: bool or int tensor `[B, H, W]`; foreground = value > 0.
        slot_masks: `[B, K, H, W]`, bool/int (non-zero = in the slot) or float soft masks
            (probabilities), which are binarised as the one-hot argmax over slots (the
            official code's one-hot argmax).
    Returns:
        (iou, dice): two float64 tensors `[B]` on CPU, values in [0, 1].
    Edge cases (per slot, before the max over slots):
        * empty slot and empty foreground: IoU = Dice = eps / eps = 1.
        * disjoint slot and foreground (inter = 0, union = n > 0): IoU = eps / (n + eps)
          and Dice = eps / (n + eps), about 1e-8 / n, i.e. 0 up to 1e-8.
        * otherwise inter / union and 2 inter / (|slot| + |fg|) up to a relative 1e-8.
    Raises:
        ValueError when the shapes do not match.
    """
    true_fg = torch.as_tensor(true_fg).detach().cpu()
    slot_masks = torch.as_tensor(slot_masks).detach().cpu()
    if slot_masks.dim() != 4 or true_fg.shape != (slot_masks.shape[0], *slot_masks.shape[2:]):
        raise ValueError(f"expected true_fg [B, H, W] and slot_masks [B, K, H, W], got "
                         f"{tuple(true_fg.shape)} and {tuple(slot_masks.shape)}")
    fg = (true_fg > 0).flatten(1).unsqueeze(1).double()        # [B, 1, HW]
    slots = _binary_slot_masks(slot_masks).flatten(2).double()  # [B, K, HW]
    inter = (fg * slots).sum(-1)
    fg_area, slot_area = fg.sum(-1), slots.sum(-1)
    union = fg_area + slot_area - inter
    eps = 1e-8                                                  # official: "to prevent NaN"
    iou = (inter + eps) / (union + eps)
    dice = (2 * inter + eps) / (fg_area + slot_area + eps)
    return iou.max(1).values, dice.max(1).values


def _iou_f32(inter, union) -> np.float32:
    """IoU of two pixel counts as BO-QSA `methods/seg_metrics.py` computes it: float32
    inter / (union + 1e-6). Decides ties: exactly 0.5 stays 0.5 only for union >= 32."""
    return np.float32(inter) / (np.float32(union) + np.float32(1e-6))


class ObjectSegMetrics:
    """Unsupervised multi-object segmentation metrics of Yang & Yang (2022): AP@0.5, PQ, precision,
    recall (BO-QSA Tab. 4, 8, 14; the official BO-QSA `Segmentation_Metrics_Calculator`).

    Dataset-level: call `update` per batch, then `compute`. Per image:
      1. valid = conf > 0.5 (confident pixels; strict, as the official `confidence_mask`). A
         predicted segment (its valid pixels) whose IoU with the true background is >= 0.5 is
         the predicted background and is dropped.
      2. True objects = labels > 0; predicted objects = the remaining labels on the remaining
         valid pixels. IoU matrix [G, P]; Hungarian matching maximising IoU (scipy). An object's
         score is the IoU with its match (0 if unmatched); TP = predictions with score >= 0.5,
         FP = P - TP, FN = G - TP. A prediction's confidence = mean conf over its pixels.
    Every IoU (steps 1 and 2) is computed as the official code does, in float32:
    inter / (union + 1e-6). So an IoU of exactly 0.5 is a match (>= 0.5) when the union has
    >= 32 pixels, where the 1e-6 vanishes in float32 (e.g. 16 / 32 -> 0.5); below 32 pixels
    the 1e-6 pushes it just under 0.5 (1 / 2 -> 0.49999976, no match), as in the official code.
    Over the dataset: precision = TP / (TP + FP), recall = TP / (TP + FN),
    PQ = sum of TP IoUs / (TP + FP/2 + FN/2), AP@0.5 = area under the precision-recall curve of
    all predictions ranked by confidence (recall denominator = all true objects; COCO-style
    monotone precision envelope). Empty denominators give 0.0.

    update(true [B,H,W] int (0 = background), pred [B,H,W] int (any ids), conf [B,H,W] float in
    [0,1], e.g. the max slot probability; None = all 1). Raises ValueError on shape mismatch.
    compute() -> dict(ap, pq, precision, recall) of Python floats in [0, 1].
    """

    def __init__(self):
        self.tp = self.fp = self.fn = 0
        self.tp_iou = 0.0
        self.scores, self.confs = [], []     # per prediction: matched IoU, confidence

    def update(self, true, pred, conf=None) -> None:
        true = torch.as_tensor(true).detach().cpu().numpy()
        pred = torch.as_tensor(pred).detach().cpu().numpy()
        conf = np.ones(pred.shape) if conf is None else torch.as_tensor(conf).detach().cpu().double().numpy()
        if true.shape != pred.shape or pred.shape != conf.shape or true.ndim != 3:
            raise ValueError(f"expected true, pred, conf [B, H, W], got {true.shape}, {pred.shape}, {conf.shape}")
        for t, p, c in zip(true, pred, conf):
            valid = c > 0.5
            bg = t == 0
            for label in np.unique(p[valid]):                  # drop the predicted background
                seg = (p == label) & valid
                inter = (seg & bg).sum()
                if _iou_f32(inter, seg.sum() + bg.sum() - inter) >= 0.5:
                    valid &= ~seg
            gts = [t == g for g in np.unique(t[t > 0])]
            preds = [(p == q) & valid for q in np.unique(p[valid])]
            iou = np.zeros((len(gts), len(preds)), dtype=np.float32)
            for i, g in enumerate(gts):
                for j, q in enumerate(preds):
                    inter = (g & q).sum()
                    iou[i, j] = _iou_f32(inter, g.sum() + q.sum() - inter)
            score = np.zeros(len(preds), dtype=np.float32)
            if iou.size:
                rows, cols = linear_sum_assignment(iou, maximize=True)
                score[cols] = iou[rows, cols]
            tp = int((score >= 0.5).sum())
            self.tp, self.fp, self.fn = self.tp + tp, self.fp + len(preds) - tp, self.fn + len(gts) - tp
            self.tp_iou += float(score[score >= 0.5].sum())
            self.scores += score.tolist()
            self.confs += [float(c[q].mean()) for q in preds]

    def compute(self) -> dict[str, float]:
        div = lambda a, b: float(a / b) if b > 0 else 0.0            # noqa: E731
        order = np.argsort(-np.asarray(self.confs), kind="stable")
        hit = np.asarray(self.scores)[order] >= 0.5
        n_true = self.tp + self.fn
        prec = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        rec = np.cumsum(hit) / max(n_true, 1)
        mrec = np.concatenate([[0.0], rec, [1.0]])
        mprec = np.concatenate([[0.0], prec, [0.0]])
        mprec = np.maximum.accumulate(mprec[::-1])[::-1]             # monotone precision envelope
        i = np.nonzero(mrec[1:] != mrec[:-1])[0]
        ap = float(np.sum((mrec[i + 1] - mrec[i]) * mprec[i + 1])) if n_true else 0.0
        return dict(ap=ap, pq=div(self.tp_iou, self.tp + 0.5 * self.fp + 0.5 * self.fn),
                    precision=div(self.tp, self.tp + self.fp), recall=div(self.tp, self.tp + self.fn))


def segmentation_metrics(true, pred) -> dict[str, torch.Tensor]:
    """All label-map metrics at once, for eval loops.

    Args:
        true, pred: int label maps `[B, H, W]` (0 = background).
    Returns:
        dict with float64 tensors `[B]`: "ari" (all pixels), "ari_fg" (true label > 0;
        1.0 for images without foreground), "miou" (ClevrTex), "msc_fg" (GENESIS, fg only;
        0.0 without foreground), "mbo" (mean best overlap; NaN for images without objects).
        Average over a dataset with `nanmean(torch.cat(per_batch_values))`: a per-image mean
        that skips only mBO's NaN images.
    """
    return {
        "ari": ari(true, pred),
        "ari_fg": ari(true, pred, foreground_only=True),
        "miou": miou(true, pred),
        "msc_fg": msc(true, pred, foreground_only=True),
        "mbo": mbo(true, pred),
    }


def segments_per_image(pred, min_pixels: int = 4) -> torch.Tensor:
    """How many foreground segments each predicted label map holds: a diagnostic of dead slots, not a
    paper metric (a model whose slots never win a pixel's argmax explains every image with fewer segments).

    Args:
        pred: int label maps `[B, H, W]`, labels >= 0 (0 = background).
        min_pixels: a label counts when it owns at least this many pixels (>= 1), so that a few stray
            pixels at object borders do not count as a slot in use.
    Returns:
        float64 tensor `[B]`: the number of labels > 0 owning >= min_pixels pixels.
    Raises:
        ValueError: pred is not 3-D or min_pixels < 1.
    """
    pred = torch.as_tensor(pred)
    if pred.dim() != 3 or min_pixels < 1:
        raise ValueError(f"segments_per_image: needs [B, H, W] labels and min_pixels >= 1, got shape "
                         f"{tuple(pred.shape)} and min_pixels={min_pixels}")
    flat = pred.reshape(pred.shape[0], -1).long().cpu()
    counts = torch.zeros(flat.shape[0], int(flat.max()) + 1 if flat.numel() else 1, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))              # pixels per label, per image
    return (counts[:, 1:] >= min_pixels).sum(dim=1).double()


def nanmean(x) -> float:
    """Mean over all finite-or-inf values ignoring NaN, as a Python float.

    Args:
        x: a tensor of any shape, a number, or a sequence of tensors / numbers
            (e.g. the per-batch `[B]` tensors collected in an eval loop).
    Returns:
        float; NaN when there is no non-NaN value (empty input included).
    """
    if isinstance(x, (list, tuple)):
        parts = [torch.as_tensor(v, dtype=torch.float64).detach().cpu().flatten() for v in x]
        x = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
    x = torch.as_tensor(x).detach().cpu().double().flatten()
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


# =============================================================================
# 2. Config / CLI
# =============================================================================


@dataclass
class RunConfig:
    """The settings every script shares: data, run, logging, device, precision and checkpoints. Each script's
    `Config` inherits them (redeclaring `out_dir`, and `dtype` where its default differs) and adds its model
    and schedule; `--help` lists them first."""
    # data
    dataset: str = "synthetic"      # dataset to train and evaluate on (`python data.py --list`); its paper settings
                                    # are applied first (the script's PRESETS), then your flags
    data_dir: str = ""              # root of the dataset on disk as published (not needed for synthetic)
    num_workers: int = 1            # DataLoader worker processes that read and decode the images
    # run
    out_dir: str = "out"            # folder of checkpoints, metrics.jsonl, sample images and eval results
    seed: int = 0                   # random seed of the initialisation and the data order (one --out_dir per seed)
    device: str = "auto"            # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"          # precision of the training forward: float32 | bfloat16 (autocast) | auto:
                                    # bfloat16 where the CPU/GPU runs it natively, else float32; evaluation: float32
    compile: bool = False           # torch.compile the trained model (the first steps compile it; README, Speed)
    log_interval: int = 10          # print and log the training loss every N steps
    eval_interval: int = 500        # evaluate, save sample images and a checkpoint every N steps
    eval_items: int = 256           # images (videos) of the periodic evaluations, on --eval_split (0 = whole split)
    eval_split: str = "val"         # split of the periodic evaluations during training (val: choose settings on
                                    # it); the final evaluation is on test
    test_items: int = 0             # test images (videos) of the final evaluation and --eval_only (0: the whole
                                    # split, at the end of training only when it has <= 1024, else eval_items)
    resume: bool = True             # continue from out_dir/ckpt.pt when it exists (same --seed, --dataset and model)
    init_from: str = ""             # checkpoint to start training from, weights only: one of ours, or an official
                                    # one (boqsa.py, ast_seg.py)
    ckpt: str = ""                  # --eval_only / --predict: the checkpoint (default init_from, else out_dir/ckpt.pt)
    eval_only: bool = False         # evaluate the checkpoint on the test split, write out_dir/eval_<dataset>.json,
                                    # print the summary line and exit
    predict: str = ""               # folder (or file) of your own images to segment with the checkpoint ->
                                    # out_dir/predict/


class ConfigError(ValueError):
    """A config override names an unknown key or has a value of the wrong type."""


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _field_types(config) -> dict[str, Any]:
    """Field name -> resolved type annotation (works with `from __future__ import annotations`)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config)}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _parse_scalar(text: str, tp) -> Any:
    """Cast one string to a scalar type; raises ValueError when it does not fit."""
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(text)
    if tp is int:
        try:
            return int(text)
        except ValueError:
            f = float(text)  # allow "1e4" for an int field when it is integral
            if f.is_integer():
                return int(f)
            raise
    if tp is float:
        return float(text)
    if tp is str or tp is Any:
        return text
    raise ValueError(text)


def _parse_value(text: str, tp, default: Any = None) -> Any:
    """Cast a command-line string to the annotated type `tp`.

    Supports bool, int, float, str, Optional[...] / `X | None` ("none" -> None),
    Literal[...], and tuple / list of scalars written as "1,2,3". Other types fall back
    to `ast.literal_eval`. Raises ValueError on a bad value.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() == "none":
            return None
        for a in inner:  # first member that accepts the text wins
            try:
                return _parse_value(text, a, default)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        for choice in args:
            try:
                if _parse_value(text, type(choice)) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError(text)
    if tp in (tuple, list) or origin in (tuple, list):
        container = origin or tp
        items = [s.strip() for s in text.split(",")] if text.strip() else []
        if not args:  # bare `tuple`: element type from the default's first element
            elem = type(default[0]) if default else str
            elem_types = [elem] * len(items)
        elif container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(text)
            elem_types = list(args)
        else:
            elem_types = [args[0]] * len(items)
        return container(_parse_value(s, t) for s, t in zip(items, elem_types))
    if tp in (bool, int, float, str) or tp is Any:
        return _parse_scalar(text, tp)
    import ast  # unsupported annotation: accept a Python literal (nanoGPT configurator style)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unknown_key_message(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"unknown flag --{key}{hint}; known flags: " + ", ".join(f"--{k}" for k in known)


def _set_field(config, key: str, value: Any, ftypes: dict[str, Any]) -> None:
    """Set one field, casting strings by the field's type. Raises ConfigError."""
    key = key.replace("-", "_")
    if key not in ftypes:
        raise ConfigError(_unknown_key_message(key, list(ftypes)))
    tp = ftypes[key]
    if isinstance(value, str) and tp is not str:
        try:
            value = _parse_value(value, tp, getattr(config, key))
        except ValueError:
            raise ConfigError(f"--{key} expects {_type_name(tp)}, got {value!r}") from None
    setattr(config, key, value)


def apply_overrides(config, overrides: dict[str, Any]):
    """Programmatic overrides: `apply_overrides(cfg, {"lr": 1e-3, "steps": "100"})`.

    String values are cast by the field's type exactly as on the command line; other
    values are set as given. Keys may use '-' for '_'.
    Returns the same config object (updated in place).
    Raises:
        ConfigError (a ValueError) for an unknown key (with a close-match suggestion)
        or a string that does not parse as the field's type.
    """
    ftypes = _field_types(config)
    for key, value in overrides.items():
        _set_field(config, key, value, ftypes)
    return config


def config_to_dict(config) -> dict[str, Any]:
    """Dataclass config -> plain dict (field name -> value), e.g. to store in a checkpoint."""
    return dataclasses.asdict(config)


def _is_bool_type(tp) -> bool:
    """bool, Optional[bool] or `bool | None`: the fields a bare `--flag` sets to True."""
    if tp is bool:
        return True
    args = typing.get_args(tp)
    return typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", None)) and bool in args


def _comment_text(token: str) -> str:
    return token.lstrip("#").strip()


def _source_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """The comments of a dataclass's source, read with `tokenize`: (field -> its help, field -> its group).

    A field's help is its trailing comment plus the comment lines below it that are indented further
    than the class body (continuations); a comment line at the class body's indentation is a group
    header for the fields below it (a second header line right below continues it). Returns two empty
    dicts when the source cannot be read (a class made in a REPL or by `make_dataclass`)."""
    helps: dict[str, str] = {}
    groups: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError, SyntaxError):
        return helps, groups
    depth, body_col = 0, None
    group = None                    # the current group header
    header_open = False             # the last line was a header: a second one continues it
    field_name = None               # the field on the logical line being read
    last_field = None               # the field a continuation comment belongs to
    line_start = True               # the next token starts a logical line
    for i, tok in enumerate(tokens):
        kind = tok.type
        if kind == tokenize.INDENT:
            depth += 1
            if depth == 1 and body_col is None:
                body_col = len(tok.string)
            continue
        if kind == tokenize.DEDENT:
            depth -= 1
            continue
        if kind == tokenize.NEWLINE:
            last_field = field_name if field_name in helps else None
            field_name, line_start = None, True
            continue
        if kind == tokenize.NL:
            if field_name is None:
                line_start = True
            continue
        if kind == tokenize.COMMENT:
            text = _comment_text(tok.string)
            own_line = not tok.line[:tok.start[1]].strip()
            if field_name is not None:                      # on the field's line(s)
                helps[field_name] = f"{helps[field_name]} {text}".strip() if field_name in helps else text
            elif own_line and body_col is not None and depth == 1:
                if last_field is not None and tok.start[1] > body_col:
                    helps[last_field] += " " + text         # continuation of the field above
                elif tok.start[1] <= body_col:
                    group = f"{group} {text}" if header_open and group else text
                    header_open, last_field = True, None
            continue
        if line_start and kind not in (tokenize.ENCODING, tokenize.ENDMARKER):
            line_start, header_open, last_field = False, False, None
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if depth == 1 and kind == tokenize.NAME and nxt is not None and nxt.string == ":":
                field_name = tok.string
                groups[field_name] = group
    return helps, groups


def _dataclass_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """_source_comments over the dataclass bases too (a subclass's own comment wins)."""
    helps: dict[str, str] = {}
    groups: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            h, g = _source_comments(klass)
            helps.update(h)
            groups.update(g)
    return helps, groups


def _format_default(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else '""'
    if isinstance(value, str):
        return value if value else '""'
    if value is None:
        return "none"
    return str(value)


def _metavar(tp, default: Any = None) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _metavar(inner[0], default) if len(inner) == 1 else "VALUE"
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if tp in (tuple, list) or origin in (tuple, list):
        elem = args[0] if args else (type(default[0]) if default else str)
        return f"{_metavar(elem)},..."
    if isinstance(tp, type) and tp in (bool, int, float, str):
        return tp.__name__.upper()
    return "VALUE"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lines `--name METAVAR   help`: only the underscore spelling of a flag (the dash one is an alias),
    the description kept as written (the config's docstring)."""

    def __init__(self, prog, indent_increment=2, max_help_position=30, width=None):
        if width is None:
            width = min(shutil.get_terminal_size().columns, 110) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        if action.nargs == 0:                                   # -h, --help
            return ", ".join(action.option_strings)
        fmt = "[%s]" if action.nargs == argparse.OPTIONAL else "%s"
        return f"{action.option_strings[0]} {fmt % self._metavar_formatter(action, action.dest)(1)[0]}"


class ConfigArgumentParser(argparse.ArgumentParser):
    """The argparse parser of a dataclass config (see `build_parser`). Errors are one line on stderr and
    exit code 2 (`common.fail`); parse them with `parse_config`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "--lr -1e-3": a value, as "--lr -1" (argparse's default pattern misses the exponent form)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):  # argparse's own messages (usage line + text) -> one line
        fail(message, code=2)


def build_parser(config, only: Sequence[str] | None = None, epilog: str | None = None) -> ConfigArgumentParser:
    """An `argparse` parser with one `--name` flag per field of the dataclass instance `config`.

    Flags are grouped by the comment headers of the dataclass source (`# model`, ...), each flag's help is
    the field's comment (or `metadata={"help": ...}`) plus its current value in `config` as the default.
    `--name-with-dashes` is an alias of `--name_with_dashes`. Values are cast by the field's annotation
    (see `parse_config`); every flag defaults to argparse.SUPPRESS, so the parsed namespace holds
    exactly the flags that were given. `only`: the parser of just these fields, without --help.
    """
    ftypes = _field_types(config)
    cls = type(config)
    helps, groups = _dataclass_comments(cls)
    doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    usage_note = ("Flags: --key=value or --key value (--key-name = --key_name); bool flags: bare --flag = true,\n"
                  "--flag=false/0/no; tuples as 1,2,3; none for an Optional.")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if epilog:
        epilog = "\n".join(textwrap.fill(line, 100) for line in epilog.splitlines())
    parser = ConfigArgumentParser(
        prog=prog, usage="%(prog)s [--key=value ...]", description=f"{doc}\n\n{usage_note}" if doc else usage_note,
        epilog=epilog, formatter_class=_HelpFormatter, allow_abbrev=False, add_help=only is None,
        exit_on_error=False, argument_default=argparse.SUPPRESS)
    containers: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(config):
        if only is not None and f.name not in only:
            continue
        tp, default = ftypes[f.name], getattr(config, f.name)
        group = groups.get(f.name)
        if group not in containers:
            containers[group] = parser.add_argument_group(group)

        def convert(text, name=f.name, tp=tp, default=default):
            try:
                return _parse_value(text, tp, default)
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name} expects {_type_name(tp)}, got {text!r}") from None

        help_text = (f.metadata or {}).get("help") or helps.get(f.name, "")
        help_text = f"{help_text} (default: {_format_default(default)})".strip().replace("%", "%%")
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = dict(dest=f.name, type=convert, help=help_text, metavar=_metavar(tp, default))
        if _is_bool_type(tp):
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        containers[group].add_argument(*names, **kwargs)
    return parser


def parse_config(config, argv: Sequence[str] | None = None, only: Sequence[str] | None = None,
                 epilog: str | None = None) -> tuple[Any, set[str]]:
    """`parse_args` that also returns the names of the fields given on the command line: (config, explicit).

    `only`: read just these fields and ignore every other argument (no --help, no unknown-flag error):
    a first pass that learns `--dataset` before the preset is chosen. `epilog`: text after the --help list.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(config, only=only, epilog=epilog)
    try:
        namespace, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        name = (e.argument_name or "").split("/")[0]
        if e.message.startswith(("expected one argument", "expected at most one argument")):
            tp = _field_types(config).get(name[2:].replace("-", "_"))
            fail(f"{name} expects a value ({_type_name(tp)})", code=2)
        fail(e.message if e.message.startswith("--") else f"{name}: {e.message}", code=2)
    if rest and only is None:
        arg = rest[0]
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].partition("=")[0].replace("-", "_")
            fail(_unknown_key_message(key, list(_field_types(config))), code=2)
        fail(f"unexpected argument {arg!r}; use --key=value", code=2)
    given = vars(namespace)
    for key, value in given.items():
        setattr(config, key, value)
    return config, set(given)


def parse_args(config, argv: Sequence[str] | None = None, explicit: set | None = None,
               only: Sequence[str] | None = None, epilog: str | None = None):
    """Override the fields of a dataclass config from the command line (argparse, `build_parser`).

    Accepted forms: `--key=value`, `--key value`, and for bool fields a bare `--flag` (= True) or
    `--flag=true/false/1/0/yes/no` (also `--flag false`). Dashes in keys are read as underscores
    (`--batch-size`); the last of a repeated flag wins. Values are cast by the field's annotation: int
    (also "1e4" when integral), float, str, bool, Optional[...] ("none" -> None), Literal[...], tuple/list
    of ints/floats written as "1,2,3" (or one number). `--help` lists the flags in the groups of the
    dataclass source's comment headers, each with its comment and default.

    Args:
        config: a dataclass instance holding the defaults.
        argv: list of strings; defaults to `sys.argv[1:]`.
        explicit: a set that receives the names of the fields given on the command line.
        only, epilog: see `parse_config`.
    Returns:
        the same config object, updated in place.
    Raises:
        SystemExit(0) after printing help for `--help` / `-h`.
        SystemExit(2) with one line on stderr for an unknown flag
        (`error: unknown flag --foo (did you mean --lr?); known flags: ...`), a bad value
        (`error: --lr expects float, got 'abc'`), a missing value or a stray argument.
    """
    config, given = parse_config(config, argv, only=only, epilog=epilog)
    if explicit is not None:
        explicit.update(given)
    return config


def explicit_fields(config, argv: Sequence[str] | None = None) -> set[str]:
    """Names of the fields of `config` given on the command line (`--key=value`, `--key value`, `--flag`,
    dashes read as underscores), by the same parser as `parse_args`; `config` is not changed."""
    return parse_config(dataclasses.replace(config), argv)[1]


# =============================================================================
# 3. Runtime
# =============================================================================

def seed_everything(seed: int) -> None:
    """Seed Python `random`, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(seed)  # also seeds every CUDA / MPS device


DTYPES = ("float32", "bfloat16", "auto")  # the --dtype values of every script


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run natively: the CUDA GPU `device` itself (its index, not the
    current device) with compute capability 8.0 or more (Ampere and later: bf16 tensor cores), or a CPU
    with bf16 instructions (x86: AVX512-BF16 or AMX-BF16; Arm: BF16), read from
    `torch.cpu.get_capabilities()`. Elsewhere bf16 autocast is emulated and slower than float32 (a V100 or
    T4 accepts bf16, and `torch.cuda.is_bf16_supported()` says True there by default); a BO-QSA step
    measured 14x slower on an AVX2-only CPU and 3.2x on an AVX512 CPU without AVX512-BF16, though oneDNN
    accepts bf16 on both (README, Command line)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        try:
            caps = torch.cpu.get_capabilities()
        except (AttributeError, RuntimeError):                        # torch < 2.9: no capability table
            return False
        return any(bool(caps.get(k, False)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    return False


def resolve_dtype(device: torch.device, dtype: str, announce: str = "") -> str:
    """--dtype for this device: "auto" -> "bfloat16" where `native_bf16(device)`, else "float32". With
    `announce` (e.g. "training") an "auto" prints one line saying what it chose and why.
    Raises ValueError for a value not in DTYPES."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    dtype = "bfloat16" if native_bf16(device) else "float32"
    if announce:
        print(f"--dtype=auto: {announce} in {dtype} ({'native' if dtype == 'bfloat16' else 'no native'} bf16 "
              f"on {device.type})")
    return dtype


def train_autocast(device: torch.device, dtype: str):
    """The --dtype rule shared by the three scripts: a context manager for the TRAINING forward.

    dtype "bfloat16": torch.autocast(device.type, bfloat16) (matrix products and convolutions in bf16;
    each script keeps its losses, softmaxes and solvers in float32). "float32": autocast disabled (as the
    official code of all three papers, and every --dataset preset). "auto": bfloat16 where the device runs
    it natively, else float32 (`resolve_dtype`). Evaluation always runs in float32.
    Raises ValueError for any other value.
    """
    dtype = resolve_dtype(device, dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def get_device(name: str = "auto") -> torch.device:
    """Pick the compute device.

    Args:
        name: "auto" (cuda if available, then mps, then cpu) or an explicit device string
            such as "cpu", "cuda", "cuda:1", "mps".
    Returns:
        torch.device.
    Raises:
        SystemExit(1) with a one-line message when the requested device is unavailable
        or the name is not a device.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"device {name!r} requested but CUDA is not available; use --device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not _mps_available():
        fail(f"device {name!r} requested but MPS is not available; use --device=cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        fail(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


@dataclass
class DDPInfo:
    """Distributed-run facts. Single process: enabled=False, rank 0, world_size 1."""
    enabled: bool
    rank: int
    local_rank: int
    world_size: int
    is_main: bool
    device: torch.device


def ddp_setup(backend: str | None = None, device: str = "auto") -> DDPInfo:
    """Initialise torch.distributed when launched by torchrun, else describe a single process.

    Under torchrun (env vars RANK, WORLD_SIZE, LOCAL_RANK set) the device follows --device: "cpu" trains
    on the CPU with gloo; "cuda" or "cuda:N" on `cuda:LOCAL_RANK` with nccl (one GPU per process, so N is
    not used); "auto" is cuda when CUDA is available, else cpu. `backend` overrides the backend. Then
    `torch.distributed.init_process_group` (env:// rendezvous). Without those env vars nothing is
    initialised and the device is `get_device(device)`.

    Returns:
        DDPInfo(enabled, rank, local_rank, world_size, is_main, device).
    Raises:
        SystemExit (one line) for an unavailable or unknown device, or --device=mps under torchrun.
    """
    if int(os.environ.get("RANK", -1)) == -1 or "WORLD_SIZE" not in os.environ:
        return DDPInfo(False, 0, 0, 1, True, get_device(device))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":                     # one GPU per process, else the CPU (never MPS: no process group)
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            fail(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if kind == "mps":
        fail("torchrun with --device=mps is not supported (no MPS process-group backend); use --device=cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available; use --device=cpu or auto")
    if kind not in ("cpu", "cuda"):
        fail(f"unsupported device {device!r} under torchrun; use auto, cpu or cuda")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            fail(f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                 f"exist; use --nproc_per_node={torch.cuda.device_count()} or --device=cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # before init so NCCL uses the right GPU
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if kind == "cuda" else "gloo"))
    return DDPInfo(True, rank, local_rank, world_size, rank == 0, dev)


def ddp_cleanup() -> None:
    """Destroy the process group if one was initialised, after a barrier (safe to call always). Free the DDP
    model first: a DDP reducer freed after this destroys the gloo group itself, and that could wait forever."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()               # every rank is here: no collective of a rank that already left is pending
        dist.destroy_process_group()


def all_reduce_mean(value, info: DDPInfo):
    """Average a tensor or Python number over all ranks.

    Args:
        value: a float/int or a tensor (any shape) on any device.
        info: the DDPInfo from `ddp_setup`.
    Returns:
        same kind as the input: a float for a number, a new tensor (floating dtype, on the
        input's device) for a tensor. Without DDP the value comes back unchanged
        (a number as float).
    """
    is_number = not isinstance(value, torch.Tensor)
    if not info.enabled:
        return float(value) if is_number else value
    import torch.distributed as dist

    t = torch.as_tensor(value, dtype=torch.float64) if is_number else value.detach()
    src_device = t.device
    if not t.is_floating_point():
        t = t.double()
    t = t.to(info.device, copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return float(t) if is_number else t.to(src_device)


# =============================================================================
# 4. Checkpoints
# =============================================================================

class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or corrupt (message: one line)."""


def prev_checkpoint_path(path) -> Path:
    """Where `save_checkpoint` keeps the previous checkpoint: ckpt.pt -> ckpt_prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}_prev{path.suffix}")


def non_finite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(path, state: dict, keep_prev: bool = True) -> Path:
    """Write `state` atomically with torch.save, keeping the previous checkpoint.

    The data goes to a temp file in the same directory, is flushed and fsync'ed, then
    `os.replace`d over `path`, so a crash never leaves a half-written checkpoint. With
    `keep_prev` the file it replaces is first renamed to `prev_checkpoint_path(path)`
    (ckpt.pt -> ckpt_prev.pt), so a corrupt file never leaves nothing to resume from.
    Parent directories are created.

    Args:
        path: destination file (str or Path).
        state: dict of tensors / state_dicts / plain Python values. Keep to types that
            `torch.load(weights_only=True)` accepts (no numpy objects): use
            `get_rng_state()` for RNG states and `float(x)` for numpy scalars.
        keep_prev: keep the replaced file as <stem>_prev<suffix>.
    Returns:
        the Path written.
    Raises:
        CheckpointError (nothing is written) when `state["model"]` has NaN/inf weights, and (one line:
        the folder, the bytes needed and free, what was kept) when the disk or quota is full; the
        previous checkpoint is then untouched.
    """
    path = Path(path)
    bad = non_finite_tensors(state.get("model", {})) if isinstance(state.get("model"), dict) else []
    if bad:
        raise CheckpointError(f"refusing to write {path}: the model has non-finite weights ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); the last good "
                              f"checkpoint is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_prev and path.exists():
            os.replace(path, prev_checkpoint_path(path))
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _disk_full(e, path.parent, _state_nbytes(state)):
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous checkpoint {path} is kept" if path.exists() else "no checkpoint was written"
            raise CheckpointError(f"no space left in {path.parent} to write {path.name} (about "
                                  f"{_mib(_state_nbytes(state))} needed, {_mib(free)} free); {kept}; free some space "
                                  f"and run the same command to resume, or choose another --out_dir") from e
        raise
    try:  # persist the rename itself (POSIX); not possible on every OS/filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _state_nbytes(state) -> int:
    """The bytes of the tensors in a (nested) checkpoint dict: about the size torch.save writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_nbytes(v) for v in state)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _disk_full(exc: Exception, folder, needed: int) -> bool:
    """True when a failed write was the disk (or quota) filling up: an OSError ENOSPC / EDQUOT, or any
    error (torch.save's zip writer raises a RuntimeError, "unexpected pos") with less free space left
    in `folder` than `needed` bytes plus the archive's overhead (5% and 1 MiB)."""
    e = exc
    while e is not None:                                      # the error or what caused it
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:                                                      # + zip and pickle overhead
        return shutil.disk_usage(folder).free < needed * 1.05 + 2 ** 20
    except OSError:
        return False


def load_checkpoint(path, map_location="cpu", weights_only: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint`.

    Args:
        path: checkpoint file.
        map_location: passed to torch.load (default "cpu").
        weights_only: torch's safe unpickler (default True); pass False only for a
            trusted file holding arbitrary Python objects.
    Returns:
        the saved dict.
    Raises:
        CheckpointError (one line naming the path and what to do) when the file is
        missing, truncated/corrupt, holds objects the safe loader refuses, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path, or start "
                              f"from scratch without resuming")
    # torch.save writes a zip archive; a truncated or overwritten file fails this check
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a torch zip "
                              f"archive); delete it and resume from another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"checkpoint {path} holds a {refused.group(1)} object that the safe loader "
                f"refuses; save plain types instead, or load a trusted file with "
                f"weights_only=False") from e
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first}); "
                              f"delete it and resume from another checkpoint") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict; "
                              f"it was not written by save_checkpoint")
    return state


def load_resume_checkpoint(path) -> dict | None:
    """The checkpoint to resume from: `path`, or, if that is corrupt or missing, its `_prev` copy.

    Removes stale temp files that an interrupted `save_checkpoint` left next to `path`. Prints one
    warning line when it falls back to the previous checkpoint. Returns None when neither file exists.
    Raises CheckpointError (one line) when the files that exist are all unreadable.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else []:
        stale.unlink(missing_ok=True)
    prev = prev_checkpoint_path(path)
    if not path.exists() and not prev.exists():
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if not prev.exists():
            raise
        print(f"warning: {e}; resuming from the previous checkpoint {prev}", file=sys.stderr)
        return load_checkpoint(prev)


def get_rng_state() -> dict:
    """Snapshot of every RNG the training loop uses.

    Returns:
        dict with "python" (`random.getstate()`), "numpy" (legacy global RNG as a dict of
        plain values and an int64 tensor, so `torch.load(weights_only=True)` accepts it),
        "torch" (CPU ByteTensor), "cuda" (list of ByteTensors, one per device, or None
        when CUDA is unavailable) and "mps" (ByteTensor or None).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "mps": None,
    }
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNGs from `get_rng_state()` output (e.g. loaded from a checkpoint).

    Missing keys are skipped. CUDA states are restored for as many devices as both the
    snapshot and this machine have; a CPU-only machine ignores them.
    """
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))  # tuples may come back as lists
    if state.get("numpy") is not None:
        s = state["numpy"]
        keys = np.asarray(torch.as_tensor(s["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]),
                             float(s["cached_gaussian"])))
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s.cpu(), i)
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())


# =============================================================================
# 4a. Long runs on a shared machine
# =============================================================================

# Run settings that a resumed run must share with its checkpoint besides the model's (each script's
# MODEL_KEYS): another --seed or --dataset in the same --out_dir is another run, never a continuation.
RUN_KEYS = ("seed", "dataset")

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def _out_dir_lock(out_dir):
    """Hold an exclusive OS lock (flock) on <out_dir>/train.lock; the OS releases it when the process
    ends, however it ends, so a crashed run never blocks the next. Exits with one line when another
    process holds it. Where the OS or filesystem has no flock (Windows, some network filesystems) the run
    goes on unlocked, with one warning."""
    try:
        import fcntl
    except ImportError:                                               # Windows
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            f.close()
            fail(f"another process{f' (pid {pid})' if pid.isdigit() else ''} is training in --out_dir={out_dir} "
                 f"(it holds {path}); wait for it to end, or choose another --out_dir")
        except OSError as e:
            print(f"warning: cannot lock {path} ({e.strerror or e}); nothing stops a second run in this folder",
                  file=sys.stderr)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        if not f.closed:
            f.close()                                                 # releases the lock


class StopSignals:
    """SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C) as a request to
    stop after the current training step: the handler only records the signal; the loop asks `received`
    after each step and `stop_on_signal` saves a checkpoint and exits 128 + signal number (143 for
    SIGTERM, 130 for SIGINT), so a resumed run continues bit-identically (a signal during a periodic
    evaluation acts when it ends; `restore` before the final test evaluation). A second SIGINT (Ctrl-C twice)
    stops at once (KeyboardInterrupt); a repeated SIGTERM is ignored (schedulers and torchrun send it to
    every process, some twice). Signals that reach a forked DataLoader worker are ignored there (the main
    process ends its workers). Installed only in the main thread; elsewhere it records nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._pid = os.getpid()
        self._previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:                                  # a forked DataLoader worker
            return
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        # os.write, not print: the signal may have interrupted a write to stderr (a progress bar), and print
        # from the handler would then fail as a reentrant call
        msg = f"\n{signal.Signals(signum).name}: stopping after the current step or evaluation\n"
        os.write(2, msg.encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def restore(self) -> None:
        """Put back the handlers that were there before (the training loop calls it when its last step is
        done, so a signal during the final test evaluation acts as it normally would)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def received(self, ddp: "DDPInfo | None" = None) -> int:
        """The signal number received by this process, or under DDP by any rank (all ranks agree, so they
        stop at the same step: one all-reduce of one number per call); 0 when none."""
        if ddp is None or not ddp.enabled:
            return self.signum
        import torch.distributed as dist

        t = torch.tensor([self.signum], dtype=torch.int64, device=ddp.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn` of every loader: the worker ignores SIGTERM and SIGINT. A scheduler signals
    every process of a job and Ctrl-C the whole foreground group; torch's workers die of SIGTERM (from any
    process but their parent) and of SIGINT, and a dead worker makes the main process raise in the middle of
    its step, before StopSignals can save. The main process ends its workers when it exits (they leave
    their loop when it sets their done event, or when their watchdog sees it gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_loader_workers_at_exit() -> None:
    """At interpreter exit, before multiprocessing's own exit handler: end the daemonic children still alive
    (DataLoader workers whose loader was not shut down, e.g. held by an exception's traceback). multiprocessing
    sends them SIGTERM and then joins them; DataLoader workers ignore SIGTERM (`worker_ignores_stop_signals`)
    and their watchdog waits for the parent to go, so that join never returned. Here they get SIGTERM as
    there, and SIGKILL if still alive after 0.5 s. torch's SIGCHLD handler goes first: it raises when a
    worker dies, which would end this handler after the first worker."""
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for p in children:
        p.terminate()
    deadline = time.monotonic() + 0.5
    for p in children:
        p.join(timeout=max(deadline - time.monotonic(), 0))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


atexit.register(_kill_loader_workers_at_exit)  # after multiprocessing.util registered its handler: runs before it


def stop_on_signal(stop: "StopSignals | None", ddp: "DDPInfo", step: int, ckpt_path, save) -> None:
    """Called after each training step: when SIGTERM / SIGINT arrived (on any rank), rank 0 calls `save()`
    (the script's checkpoint write, RNG included) and prints one line (signal, step, checkpoint, how to
    resume); every rank then leaves the process group and exits with status 128 + the signal number.
    Returns None when no signal arrived (or `stop` is None)."""
    signum = stop.received(ddp) if stop is not None else 0
    if not signum:
        return
    if ddp.is_main:
        save()
        print(f"stopped by {signal.Signals(signum).name} after step {step}: saved {ckpt_path}; run the same "
              f"command to resume from it", flush=True)
    if ddp.enabled:                                                   # no rank leaves before the checkpoint is written
        import torch.distributed as dist

        dist.barrier()
    ddp_cleanup()
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def training_run(out_dir):
    """The context of one training process in `out_dir`: checks the folder (check_out_dir), takes its lock
    (rank 0 of a torchrun only; the other ranks belong to the same run) and catches SIGTERM / SIGINT.
    Yields the StopSignals that the training loop passes to `stop_on_signal` after each step.
    Exits with one line when the folder is not writable or another process trains there."""
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    if main_rank:
        check_out_dir(out_dir)
    with (_out_dir_lock(out_dir) if main_rank else contextlib.nullcontext()), StopSignals() as stop:
        yield stop


# =============================================================================
# 4b. Inference from a checkpoint (--eval_only / --predict of every script), the final test evaluation
# =============================================================================
# Each script passes what differs: its MODEL_KEYS (the Config fields that shape the model), a function
# building the model from a config, one loading a file's weights into it, and its file name.

def inference_checkpoint(cfg) -> str:
    """The checkpoint file that --eval_only / --predict read.

    Args:
        cfg: a script's Config (fields `ckpt`, `init_from`, `out_dir`).
    Returns:
        cfg.ckpt if set, else cfg.init_from if set, else <cfg.out_dir>/ckpt.pt (a str). The output
        folder of an evaluation may differ from the checkpoint's, which may then be read-only.
    Raises:
        nothing; whether the file exists is checked by `load_for_inference`.
    """
    return cfg.ckpt or cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")


def saved_setting(saved: Any, like: Any) -> Any:
    """A config value read from a checkpoint, in the type of the current value `like`.

    Args:
        saved: the value in the checkpoint's config dict.
        like: the current Config value of the same field.
    Returns:
        tuple(saved) when `like` is a tuple and `saved` a list or tuple (tuples compare as tuples,
        whatever the pickling made of them); type(like)(saved) when both are bool / int / float / str
        and the conversion keeps the value (an int 6 for a float field -> 6.0; 6.5 for an int field
        stays 6.5, so it still compares unequal); else `saved` unchanged.
    Raises:
        nothing.
    """
    if isinstance(like, tuple) and isinstance(saved, (list, tuple)):
        return tuple(saved)
    scalars = (bool, int, float, str)
    if type(like) in scalars and type(saved) in scalars and type(saved) is not type(like):
        try:
            value = type(like)(saved)
        except (TypeError, ValueError):
            return saved
        return value if value == saved else saved
    return saved


def same_setting(saved: Any, value: Any) -> bool:
    """True when the checkpoint's value `saved` equals the current value `value` (via `saved_setting`)."""
    return saved_setting(saved, value) == value


def flag_value(value: Any) -> str:
    """A config value as written on the command line: a tuple or list comma-joined (1,2), else str()."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def check_same_model(saved, cfg, path, model_keys: Sequence[str]) -> None:
    """Refuse to resume a checkpoint trained with another value of a model setting.

    The one rule: every key of `model_keys` must equal cfg's value in the saved config (`same_setting`:
    tuples compare as tuples); a key the saved config lacks differs from every value.

    Args:
        saved: the checkpoint's config dict (ckpt["config"]); None or a non-dict counts as {}.
        cfg: the current Config.
        path: the checkpoint file, named in the message.
        model_keys: the script's MODEL_KEYS.
    Returns:
        None when all saved keys agree.
    Exits:
        via `fail` (one line on stderr, status 1) at the first key that differs:
        "<path> was trained with --KEY=SAVED, not CURRENT; pass --KEY=SAVED to resume it, or start
        over with --resume=false or another --out_dir" (tuples written comma-joined, as on the command line).
    """
    saved = saved if isinstance(saved, dict) else {}
    for key in model_keys:
        if key not in saved:
            fail(f"{path} does not record --{key}, so it was not written by this script's training; start over "
                 f"with --resume=false or another --out_dir")
        if not same_setting(saved[key], getattr(cfg, key)):
            show = flag_value(saved[key])
            fail(f"{path} was trained with --{key}={show}, not {flag_value(getattr(cfg, key))}; pass --{key}={show} "
                 f"to resume it, or start over with --resume=false or another --out_dir")


def checkpoint_config(cfg, model_keys: Sequence[str], keep: Sequence[str] = (), weights_only: bool = True):
    """Copy the model settings saved in the inference checkpoint into cfg, so --eval_only and --predict
    need no model flags (the dataset may differ from the training one: its images are then loaded at
    the checkpoint's image size).

    Args:
        cfg: the Config from the command line; changed in place.
        model_keys: the script's MODEL_KEYS, the fields copied.
        keep: keys whose command-line value wins over the checkpoint's (e.g. boqsa's explicit --iters).
        weights_only: torch's safe unpickler; False for a file the user chose to trust that pickles
            other objects (an official checkpoint's hyper-parameters).
    Returns:
        cfg, with the saved values converted by `saved_setting`. cfg is unchanged when the file does not
        exist (`load_for_inference` reports it) or holds no config dict (an official checkpoint).
    Exits:
        via `fail` (one line, status 1, naming the file) when the file exists but is truncated, corrupt or
        unreadable, or its config lacks one of `model_keys`.
    """
    path = inference_checkpoint(cfg)
    if not os.path.exists(path):
        return cfg
    try:
        ckpt = load_checkpoint(path, weights_only=weights_only)
        saved = ckpt.get("config")
    except CheckpointError as e:
        fail(error_line(e))
    if isinstance(saved, dict):
        for key in model_keys:
            if key not in saved:
                fail(f"{path} does not record --{key}, so it was not written by this script's training; pass "
                     f"another --ckpt")
            if key not in keep:
                setattr(cfg, key, saved_setting(saved[key], getattr(cfg, key)))
    return cfg


def load_for_inference(cfg, device, build_model, load_weights, script: str):
    """The model of cfg with the weights of `inference_checkpoint(cfg)`, on `device`, in eval mode.

    Args:
        cfg: the Config (after `checkpoint_config`).
        device: torch.device.
        build_model: cfg -> torch.nn.Module (the script's model class or factory).
        load_weights: (model, path) -> None, loads the file's weights into the model; it exits with
            one line itself when the file does not fit (another model, truncated, ...).
        script: the script's file name, for the hint "train first (python <script>)".
    Returns:
        the model, after printing "loaded <path>".
    Exits:
        via `fail` (one line, status 1) when the file does not exist: "no checkpoint at <path>: train
        first (python <script>) or pass --ckpt=PATH / --init_from=PATH".
    """
    path = inference_checkpoint(cfg)
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: train first (python {script}) or pass --ckpt=PATH / --init_from=PATH")
    model = build_model(cfg).to(device)
    load_weights(model, path)
    print(f"loaded {path}")
    return model.eval()


def predict_images(cfg, model, device, label_offset: int = 0) -> list[Path]:
    """--predict=FOLDER or FILE: `predict_folder` with a loaded model, into <cfg.out_dir>/predict/
    (<name>.png picture, <name>_labels.png slot index map).

    Args:
        cfg: the Config (fields `predict`, `image_size`, `out_dir`).
        model: returns a dict with "recon" [B, 3, S, S] in [0, 1] and "masks" [B, K, S, S].
        device: where the model is; the images are moved there.
        label_offset: 1 colours every slot; 0 paints slot 0 black (a background slot).
    Returns:
        the pictures written.
    Exits:
        as `predict_folder` (one line) when the path is missing or holds no readable image.
    """
    def model_fn(x):
        out = model(x.to(device))
        return out["recon"].clamp(0, 1), out["masks"]
    return predict_folder(cfg.predict, model_fn, cfg.image_size, os.path.join(cfg.out_dir, "predict"),
                          label_offset=label_offset)


FINAL_EVAL_MAX_ITEMS = 1024     # the end of training evaluates a test split of up to this many items whole
# after a loader's error for the val split, which the scripts read only for the periodic evaluations
VAL_SPLIT_HINT = ("; the periodic evaluations during training read the val split (--eval_split=val): "
                  "provide one, or pass --eval_split=train or --eval_split=test")


def test_eval_items(split_size: int, test_items: int = 0, eval_items: int = 0, final: bool = True) -> int:
    """How many items of the test split an evaluation on it uses (the first ones).

    The rule: --test_items=N > 0 evaluates the first N items (all of a smaller split). With --test_items=0,
    --eval_only (final=False) evaluates the whole split; the final evaluation at the end of training the
    whole split when it has at most FINAL_EVAL_MAX_ITEMS (1024) items (the built-in synthetic test split
    has 512 images, synthetic_video 256 videos), else the first eval_items (0 = the whole split; the paper
    presets set eval_items=0).

    Args:
        split_size: the number of items of the test split.
        test_items: the Config's test_items; eval_items: its eval_items.
        final: True at the end of training, False for --eval_only.
    Returns:
        the number of items evaluated, in [0, split_size].
    """
    if test_items > 0:
        return min(test_items, split_size)
    if final and split_size > FINAL_EVAL_MAX_ITEMS and eval_items > 0:
        return min(eval_items, split_size)
    return split_size


def format_duration(seconds: float) -> str:
    """Wall time for people: "4.2 s" (under 10 s), "42 s", "29 min 41 s", "3 h 05 min"."""
    s = max(0.0, float(seconds))
    if s < 9.95:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


METRIC_NAMES = {"ari_fg": "ARI-FG", "msc_fg": "MSC-FG", "mbo": "mBO", "miou": "mIoU", "ari": "ARI", "mse": "MSE"}


def format_metric_values(metrics: dict) -> str:
    """"ARI-FG 0.7120  mIoU 0.5900  ..." in the dict's order (METRIC_NAMES, else the key), 4 decimals."""
    return "  ".join(f"{METRIC_NAMES.get(k, k)} {float(v):.4f}" for k, v in metrics.items())


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "s")


def summary_line(script: str, dataset: str, split: str, n_items: int | None, metrics: dict, steps: int | None = None,
                 wall_s: float | None = None, out_dir: str | None = None, *, resumed_at: int | None = None,
                 total_steps: int | None = None, unit: str = "image", note: str = "", fmt=None) -> str:
    """The one-line summary that ends every training run and every --eval_only (all three scripts).

    "<script> <dataset>: <steps> steps[ (resumed at step N)][ in <wall time>]; <split> (<n> images[, note]):
    <metrics>; files in <out_dir>", e.g. "boqsa.py synthetic: 6000 steps in 29 min 41 s; test (512 images,
    3 slot-attention iterations): ARI-FG 0.7120  ...  MSE 22.4000; files in out/boqsa". A part whose value
    is None is left out (--eval_only: no wall time; steps only when the checkpoint stores them).

    Args:
        script: the script's file name; dataset: cfg.dataset; split: the split evaluated.
        n_items: the items evaluated; metrics: name -> value; steps: training steps (the checkpoint's step).
        wall_s: seconds from the start of train() to the end of the final evaluation.
        out_dir: the run's folder; resumed_at: the step this process resumed at.
        total_steps: the run's planned steps when it stopped before them ("300 of 2400 steps").
        unit: singular ("image", "video"); note: more about the evaluation (BO-QSA's iterations).
        fmt: metrics -> str (the script's format_metrics, as its per-evaluation lines); default
            `format_metric_values`.
    Returns:
        the line (no newline).
    """
    run = ""
    if steps is not None:
        run = (f"{steps} of {_count(total_steps, 'step')}" if total_steps is not None and total_steps != steps
               else _count(steps, "step"))
        run += f" (resumed at step {resumed_at})" if resumed_at is not None else ""
        run += f" in {format_duration(wall_s)}" if wall_s is not None else ""
    what = ", ".join(x for x in (_count(n_items, unit) if n_items is not None else "", note) if x)
    evaluated = f"{split}{f' ({what})' if what else ''}: {(fmt or format_metric_values)(metrics) or 'no metrics'}"
    files = f"files in {out_dir}" if out_dir else ""
    return f"{script} {dataset}: " + "; ".join(p for p in (run, evaluated, files) if p)


def checkpoint_step(path) -> int | None:
    """The training step stored in one of our checkpoints ("step"), read without loading the weights (mmap);
    None for a missing, unreadable or official file, or one without an int step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def evaluate_checkpoint(cfg, model, device, evaluate, format_metrics, extra: dict | None = None,
                        note: str = "", *, script: str = "", load_dataset=None, unit: str = "image",
                        checkpoint: str | None = None, steps: int | None = None, start_time: float | None = None,
                        resumed_at: int | None = None, final: bool = False) -> dict:
    """Evaluate a model on the test split, write <cfg.out_dir>/eval_<dataset>.json, print the summary line:
    --eval_only (final=False) and the final evaluation at the end of training (final=True, `finish_training`).

    Args:
        cfg: the Config (fields `dataset`, `out_dir`, `test_items`, `eval_items`; missing ones count as 0).
        model: the loaded model (`load_for_inference`) or the trained one.
        device: torch.device.
        evaluate: (model, cfg, device, num_items, png_path) -> dict of metrics on the test split; called
            with the `test_eval_items` of the split (0 = the whole split when `load_dataset` is None and
            cfg.test_items is 0) and <out_dir>/eval_samples.png.
        format_metrics: metrics dict -> str, for the summary line.
        extra: more JSON entries after the metrics (e.g. iters=3).
        note: more about the evaluation, in the summary line's parentheses (e.g. "3 slot-attention iterations").
        script: the script's file name, the line's first word; load_dataset: (cfg, split) -> dataset, to
            count the test split; unit: "image" or "video".
        checkpoint: the file evaluated (default `inference_checkpoint(cfg)`), in the JSON.
        steps: the training steps (default: the checkpoint's stored step, if any); start_time: time.time()
            at the start of training (wall time in the line), None for --eval_only; resumed_at: the step
            this training process resumed at.
    Returns:
        the metrics dict of `evaluate`.
    Writes:
        eval_<dataset>.json: the metrics, checkpoint, `extra`, then split "test", items, step, wall_s,
        resumed_at and the printed summary line.
    Prints:
        `summary_line(...)`.
    Raises:
        what `evaluate` raises (data.DatasetError: the scripts' main turns it into one line).
    """
    checkpoint = checkpoint or inference_checkpoint(cfg)
    test_items, eval_items = getattr(cfg, "test_items", 0), getattr(cfg, "eval_items", 0)
    if load_dataset is not None:
        n = test_eval_items(len(load_dataset(cfg, "test")), test_items, eval_items, final)
        num_items = n
    else:
        n, num_items = (test_items or None), test_items
    metrics = evaluate(model, cfg, device, num_items, os.path.join(cfg.out_dir, "eval_samples.png"))
    if steps is None:
        steps = checkpoint_step(checkpoint)
    wall = time.time() - start_time if start_time is not None else None
    line = summary_line(script, cfg.dataset, "test", n, metrics, steps=steps, wall_s=wall, out_dir=cfg.out_dir,
                        resumed_at=resumed_at, unit=unit, note=note, fmt=format_metrics)
    record = {k: _jsonable(v) for k, v in metrics.items()}
    record.update(dict(checkpoint=checkpoint), **(extra or {}))
    record.update(split="test", items=n, step=steps, wall_s=None if wall is None else round(wall, 1),
                  resumed_at=resumed_at, summary=line)
    with open(os.path.join(cfg.out_dir, f"eval_{cfg.dataset}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(line)
    return metrics


def finish_training(cfg, model, device, evaluate, format_metrics, load_dataset, *, script: str, step: int,
                    start_time: float, checkpoint: str, resumed_at: int | None = None, unit: str = "image",
                    extra: dict | None = None, note: str = "") -> dict:
    """The end of a training run (rank 0, after the last step): the final evaluation on the test split.

    `evaluate_checkpoint` with final=True: the first `test_eval_items` test items (the whole split up to
    1024 items), eval_<dataset>.json, the summary line with the steps and this process's wall time.
    Not repeated: a process that trained no step (resumed at the end) whose eval_<dataset>.json already
    holds the same evaluation (same checkpoint, step, split, number of items and `extra`) prints that
    file's summary line again, after a line saying so. To evaluate again, use --eval_only.

    Args:
        as `evaluate_checkpoint`; checkpoint: the run's ckpt.pt; step: the last step; start_time:
        time.time() at the start of train().
    Returns:
        the metrics (the JSON's entries when not repeated).
    """
    path = os.path.join(cfg.out_dir, f"eval_{cfg.dataset}.json")
    if resumed_at == step and os.path.exists(path):
        try:
            with open(path) as f:
                prev = json.load(f)
        except (OSError, ValueError):
            prev = None
        n = test_eval_items(len(load_dataset(cfg, "test")), getattr(cfg, "test_items", 0),
                            getattr(cfg, "eval_items", 0), final=True)
        same = (isinstance(prev, dict) and isinstance(prev.get("summary"), str) and prev.get("step") == step
                and prev.get("split") == "test" and prev.get("items") == n
                and isinstance(prev.get("checkpoint"), str)
                and os.path.abspath(prev["checkpoint"]) == os.path.abspath(checkpoint)
                and all(prev.get(k) == _jsonable(v) for k, v in (extra or {}).items()))
        if same:
            print(f"{checkpoint} finished training at step {step}; its test evaluation in {path} "
                  f"(not repeated; --eval_only evaluates again):")
            print(prev["summary"])
            return prev
    return evaluate_checkpoint(cfg, model, device, evaluate, format_metrics, extra=extra, note=note, script=script,
                               load_dataset=load_dataset, unit=unit, checkpoint=checkpoint, steps=step,
                               start_time=start_time, resumed_at=resumed_at, final=True)


# =============================================================================
# 5. Logging / progress
# =============================================================================

def _jsonable(v: Any) -> Any:
    """Tensors / numpy values -> Python numbers or lists for json."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.ndarray):
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


class MetricsLog:
    """Append-only JSON-lines log of training / eval metrics.

    `log(step, **metrics)` appends `{"step": step, "time": unix_seconds, **metrics}` as
    one line and flushes it; tensors and numpy values become Python numbers (or lists).
    NaN / inf are written as JSON's NaN / Infinity extensions, which `read()` accepts.
    Re-opening the same path (resuming) appends. A line cut off by a crash is repaired
    on the next write (a newline is inserted first) and skipped, with a warning, by `read()`.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics) -> dict:
        """Append one record; returns the dict that was written."""
        record = {"step": int(step), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        line = json.dumps(record)
        with open(self.path, "a+b") as f:
            # a previous crash may have left a partial line without its newline
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
        return record

    def truncate(self, step: int) -> int:
        """Drop the records logged after `step` (on resume from a checkpoint of that step, so no step
        appears twice). Rewrites the file atomically; returns the number of records dropped."""
        records = self.read()
        keep = [r for r in records if int(r.get("step", 0)) <= step]
        if len(keep) < len(records):
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.path)
        return len(records) - len(keep)

    def read(self) -> list[dict]:
        """All records in file order ([] when the file does not exist yet)."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{n}: skipping unreadable line (interrupted write?)")
        return records


def progress(total: int, initial: int = 0, desc: str = "train", disable: bool = False) -> tqdm:
    """A tqdm progress bar for step loops (resumable via `initial`).

    Use as `bar.set_postfix(loss=..., img_s=...)` and `bar.update()`; close with
    `bar.close()`. Pass `disable=not info.is_main` under DDP.
    """
    return tqdm(total=total, initial=initial, desc=desc, disable=disable,
                dynamic_ncols=True, smoothing=0.05)


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled index stream that can restart at any training step (and shard for DDP).

    The global stream is the concatenation of epochs, each a permutation of range(num_items)
    drawn from a generator seeded with (seed, epoch). Global batch b is stream positions
    [b*batch_size, (b+1)*batch_size); rank r of world_size takes the r-th contiguous slice of
    batch_size // world_size. Starting at `start_step` skips the first start_step global batches
    without touching the data, so a resumed run sees exactly the batches it would have seen.

    Use with DataLoader(batch_size=batch_size // world_size, drop_last=True). Iteration never ends.
    Raises ValueError if num_items < 1 or batch_size is not divisible by world_size.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("ResumableSampler: the dataset is empty")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n, self.batch, self.seed, self.start = num_items, batch_size, seed, start_step
        self.rank, self.world = rank, world_size

    def _epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        local = self.batch // self.world
        pos = self.start * self.batch                     # global stream position
        epoch, perm = -1, None
        while True:
            for j in range(pos + self.rank * local, pos + (self.rank + 1) * local):
                if j // self.n != epoch:
                    epoch = j // self.n
                    perm = self._epoch(epoch)
                yield int(perm[j % self.n])
            pos += self.batch

    def __len__(self):  # DataLoader asks; the stream is endless
        return 2 ** 62


def fail(msg: str, code: int = 1) -> typing.NoReturn:
    """Print `error: {msg}` as a single line to stderr and exit with `code` (SystemExit).
    Open progress bars are closed first, so the error is on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    one_line = " ".join(str(msg).split())  # newlines would break the one-line contract
    print(f"error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(code)


def error_line(exc: BaseException) -> str:
    """The one-line message of an exception. An error raised in a DataLoader worker comes back with the
    worker's whole traceback in its message ("Caught X in DataLoader worker process 0. Original
    Traceback ..."): this returns the original exception's own message."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception)\w*: ", last) else last
    return " ".join(msg.split()) or type(exc).__name__


def clip_gradients(parameters, max_norm: float) -> float:
    """Total L2 norm of the gradients before clipping, as a float; clips them to `max_norm` when
    max_norm > 0 (0 = no clipping, as the official min-cut and AST code)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))


def check_finite_step(step: int, loss: float, grad_norm: float, ckpt_path, lr: float) -> None:
    """Stop a diverged run: exits with one line (step, loss, gradient norm, the last good checkpoint
    and how to resume at a lower learning rate) when the loss or the gradient norm is NaN or inf.
    Call it after backward and before optimizer.step(), so no non-finite update is applied."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    ckpt = Path(ckpt_path)
    last = (f"the last good checkpoint is {ckpt}; resume from it at a lower learning rate, e.g. --lr={lr / 10:g}"
            if ckpt.exists() else "no checkpoint was written yet; start again at a lower learning rate, "
                                  f"e.g. --lr={lr / 10:g}")
    fail(f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; stopped, {last}")


def check_config(cfg, positive: Sequence[str] = (), nonnegative: Sequence[str] = (),
                 choices: dict | None = None) -> None:
    """Validate config values before any data is loaded: exits with one line naming the flag.

    positive: fields that must be > 0; nonnegative: fields that must be >= 0; choices: field -> allowed values.
    """
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, (tuple, list)) and any(x <= 0 for x in v) or not isinstance(v, (tuple, list)) and v <= 0:
            fail(f"--{name} must be > 0, got {v}", code=2)
    for name in nonnegative:
        v = getattr(cfg, name)
        if v < 0:
            fail(f"--{name} must be >= 0, got {v}", code=2)
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            fail(f"--{name}={getattr(cfg, name)}: choose one of {', '.join(map(str, allowed))}", code=2)


def check_out_dir(path) -> None:
    """Exit with one line unless `path` is (or can be made) a writable folder: called at start, so a
    long run never fails at its first checkpoint."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        fail(f"--out_dir={path} is a file, not a folder; choose another --out_dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        fail(f"--out_dir={path} is not writable ({e.strerror or e}); choose another --out_dir")


# =============================================================================
# 6. Visualisation
# =============================================================================

def _make_palette() -> torch.Tensor:
    """Index 0 black; 1..12 hand-picked saturated colours; the rest step the hue by the
    golden ratio with a few saturation/value levels so neighbouring labels differ."""
    base = [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (170, 110, 40),
    ]
    colours = [(0, 0, 0)] + base
    seen = set(colours)
    i = 0
    while len(colours) < 256:
        h = (i * 0.618033988749895) % 1.0
        s = (1.0, 0.75, 0.55)[i % 3]
        v = (1.0, 0.8, 0.6)[(i // 3) % 3]
        c = tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))
        if c not in seen:
            seen.add(c)
            colours.append(c)
        i += 1
    return torch.tensor(colours, dtype=torch.uint8)


PALETTE: torch.Tensor = _make_palette()  # [256, 3] uint8; label 0 (background) is black


def labels_to_rgb(labels: torch.Tensor) -> torch.Tensor:
    """Colour a label map with PALETTE.

    Args:
        labels: int tensor `[B, H, W]` (labels are taken modulo 256).
    Returns:
        float32 tensor `[B, 3, H, W]` in [0, 1] on the labels' device.
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    rgb = PALETTE.to(labels.device)[labels.long() % 256]  # [B, H, W, 3]
    return rgb.permute(0, 3, 1, 2).float() / 255.0


def to_uint8_image(tensor: torch.Tensor) -> Image.Image:
    """`[3, H, W]` (or `[1, H, W]`) float tensor in [0, 1] (clamped) -> RGB PIL.Image."""
    t = tensor.detach().float().cpu().clamp(0, 1)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected a [3, H, W] image tensor, got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    arr = (t * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


_PAD = 2  # pixels between cells and around the grid


def _label_font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def save_image_grid(path, rows: list[tuple[str, torch.Tensor]], max_images: int = 8, min_side: int = 0) -> Path:
    """Write one PNG with a row per (name, images) pair and a column per batch element.

    Layout (pad = 2 px, white background, black labels in PIL's default font):
    label column of width `label_w = ceil(max font.getlength(name))`, then the images.
    Width  = label_w + n_cols * cell_w + (n_cols + 2) * pad, where cell_w is the largest
             image width and n_cols = min(max_images, largest batch).
    Height = sum over rows of max(image height, text height) + (n_rows + 1) * pad.

    Args:
        path: output .png path (parent directories are created).
        rows: list of (name, tensor `[B, 3, H, W]` or `[B, 1, H, W]`, values in [0, 1],
            clamped); rows may have different B and H.
        max_images: at most this many batch elements per row.
        min_side: enlarge each row's images by the integer factor ceil(min_side / min(H, W))
            (nearest, so model pixels stay sharp squares); 0 = as they are.
    Returns:
        the Path written.
    Raises:
        ValueError for an empty row list or a tensor that is not `[B, 1|3, H, W]`.
    """
    if not rows:
        raise ValueError("save_image_grid needs at least one row")
    for name, t in rows:
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"row {name!r}: expected [B, 3, H, W], got {tuple(t.shape)}")
    if min_side:
        factors = [max(1, math.ceil(min_side / min(t.shape[2:]))) for _, t in rows]
        rows = [(name, t.repeat_interleave(f, 2).repeat_interleave(f, 3)) for (name, t), f in zip(rows, factors)]
    font = _label_font()
    label_w = max(math.ceil(font.getlength(name)) for name, _ in rows)
    text_h = font.getbbox("Ag")[3]
    n_cols = min(max_images, max(t.shape[0] for _, t in rows))
    cell_w = max(t.shape[3] for _, t in rows)
    row_hs = [max(t.shape[2], text_h) for _, t in rows]
    width = label_w + n_cols * cell_w + (n_cols + 2) * _PAD
    height = sum(row_hs) + (len(rows) + 1) * _PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = _PAD
    for (name, t), row_h in zip(rows, row_hs):
        draw.text((_PAD, y + (row_h - text_h) // 2), name, fill=(0, 0, 0), font=font)
        for j in range(min(n_cols, t.shape[0])):
            x = 2 * _PAD + label_w + j * (cell_w + _PAD)
            canvas.paste(to_uint8_image(t[j]), (x, y))
        y += row_h + _PAD
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def match_to_truth(pred, true) -> torch.Tensor:
    """Relabel each predicted segment with the true label it is matched to, so that prediction and truth
    share colours in a figure: the Hungarian matching of `miou` (one-to-one, maximum total IoU,
    background included, per image). A predicted segment matched to the true background becomes 0
    (black); one matched to no true segment (more segments than objects, or a match without overlap)
    gets a label above every true label of its image, so a colour no true object has.

    Args:
        pred, true: int label maps `[B, H, W]` (any labels; 0 = background in `true`).
    Returns:
        int64 tensor `[B, H, W]` on CPU.
    Raises:
        TypeError for floating-point inputs, ValueError for mismatched shapes.
    """
    t, p = _label_maps(true, pred)
    out = np.empty_like(p)
    for b in range(t.shape[0]):
        t_labels, p_labels, iou = _iou_table(t[b], p[b])
        rows, cols = linear_sum_assignment(iou, maximize=True)
        keep = iou[rows, cols] > 0                                         # a pair that does not overlap: unmatched
        new = np.arange(len(p_labels)) + t_labels.max() + 1               # unmatched: labels of their own
        new[cols[keep]] = t_labels[rows[keep]]
        out[b] = new[np.searchsorted(p_labels, p[b])]
    return torch.from_numpy(out).reshape(torch.as_tensor(pred).shape[0], *torch.as_tensor(true).shape[-2:])


def save_slot_grid(path, image, recon, pred_seg, true_seg=None, slot_recons=None,
                   max_images: int = 8) -> Path:
    """Standard qualitative figure for slot models (one PNG via `save_image_grid`).

    Rows: "input", "recon", "pred seg" (labels_to_rgb), "true seg" (if given), then one
    row "slot k" per slot of `slot_recons`. With a true segmentation, each predicted segment takes the
    colour of the true object it is matched to (`match_to_truth`, as mIoU) and the background is black
    in both rows.

    Args:
        image, recon: `[B, 3, H, W]` in [0, 1] (convert [-1, 1] models first).
        pred_seg, true_seg: int label maps `[B, H, W]`.
        slot_recons: optional `[B, K, 3, H, W]` in [0, 1], e.g. mask * rgb per slot.
        max_images: columns (batch elements) shown.
    Returns:
        the Path written.
    """
    if true_seg is not None:
        true_seg = torch.as_tensor(true_seg)
        true_seg = true_seg[:, 0] if true_seg.dim() == 4 else true_seg
        pred_seg = match_to_truth(pred_seg, true_seg)
    rows = [("input", image), ("recon", recon), ("pred seg", labels_to_rgb(pred_seg))]
    if true_seg is not None:
        rows.append(("true seg", labels_to_rgb(true_seg)))
    if slot_recons is not None:
        if slot_recons.dim() != 5:
            raise ValueError(f"slot_recons must be [B, K, 3, H, W], got {tuple(slot_recons.shape)}")
        rows += [(f"slot {k}", slot_recons[:, k]) for k in range(slot_recons.shape[1])]
    return save_image_grid(path, rows, max_images=max_images)


# =============================================================================
# 7. Prediction on the user's own images (--predict)
# =============================================================================

PREDICT_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_rgb(path) -> Image.Image:
    """Read any image file Pillow opens as an 8-bit RGB PIL.Image, scaled by its bit depth.

    Pillow's own convert("RGB") clips 16-bit grey at 255 (all white), so integer grey ("I;16*",
    and "I", as which some 16-bit files open) is divided by 65535 and float grey ("F") is taken
    as [0, 1] when its max is <= 1, else as [0, 255]. Palette images with transparency go via
    RGBA; everything else ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr", ...) via convert("RGB"),
    alpha dropped. Raises what Pillow raises for a missing, unreadable or unconvertible file.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I") or img.mode == "F":
            a = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if img.mode.startswith("I") else (1.0 if a.max(initial=0) <= 1 else 255.0)
            a = np.clip(np.rint(a / scale * 255.0), 0, 255).astype(np.uint8)
            return Image.fromarray(np.repeat(a[..., None], 3, axis=-1))      # uint8 [H,W,3]: RGB
        if img.mode == "P" and "transparency" in img.info:
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")


def predict_folder(path, model_fn, image_size: int, out_dir, label_offset: int = 0, min_side: int = 128,
                   flag: str = "--predict") -> list[Path]:
    """Segment one image file, or every image (PREDICT_EXTS) in a folder, with a trained model.

    Each image is read by `load_rgb`, centre-cropped to a square, resized to image_size x
    image_size (BILINEAR) and given to `model_fn` as float32 [1, 3, S, S] in [0, 1] on the CPU,
    under torch.no_grad(). model_fn(x) -> (recon [1, 3, S, S] in [0, 1], masks [1, K, S, S]),
    on any device, K <= 256. For an input file NAME (its whole name, extension included, so a.png
    and a.jpg do not overwrite each other) it writes into out_dir:
      NAME.png         rows "input", "reconstruction", "segmentation" (argmax over slots, plus
                       label_offset, coloured by PALETTE), each panel enlarged (nearest, integer
                       factor) to at least min_side px on its side
      NAME_labels.png  uint8 grey PNG [S, S] at the model's resolution: the slot index 0..K-1
                       (argmax over slots) of each pixel, for downstream use
    label_offset: 1 gives every slot a colour; 0 paints slot 0 black (a background slot).
    A file that cannot be read is skipped with a one-line warning on stderr; one summary line
    goes to stdout. Exits via `fail` (one line, status 1) when path does not exist, a folder
    holds no image file, or no image could be read. Returns the pictures written.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PREDICT_EXTS)
        if not files:
            fail(f"{flag}={path}: no images ({', '.join(PREDICT_EXTS)}) found in the folder")
    elif path.is_file():
        files = [path]                      # an explicit file is tried whatever its extension
    else:
        fail(f"{flag}={path}: no such file or folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], 0
    for f in files:
        try:
            img = load_rgb(f)
        except Exception as e:  # noqa: BLE001 - any decode error is reported the same way
            skipped += 1
            print(" ".join(f"warning: {f}: cannot read image ({type(e).__name__}: {e}); skipped".split()),
                  file=sys.stderr, flush=True)
            continue
        side = min(img.size)                                               # centre crop to a square
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((image_size,) * 2, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            recon, masks = model_fn(x)
        labels = masks.detach().float().argmax(1).cpu()                    # [1, S, S] slot index
        rows = [("input", x), ("reconstruction", recon.detach().float().cpu().clamp(0, 1)),
                ("segmentation", labels_to_rgb(labels + label_offset))]
        written.append(save_image_grid(out_dir / f"{f.name}.png", rows, min_side=min_side))
        Image.fromarray(labels[0].numpy().astype(np.uint8)).save(out_dir / f"{f.name}_labels.png")  # mode L
    if not written:
        fail(f"{flag}={path}: none of the {len(files)} file(s) could be read as an image; nothing written")
    print(f"wrote {len(written)} segmentation(s) to {out_dir} ({skipped} skipped)")
    return written

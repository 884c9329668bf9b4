"""Tests for common.py (pytest). Every test name starts with test_common_."""

import dataclasses
import json
import math
import random
import socket
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from sklearn.metrics import adjusted_rand_score

import common
from common import (CheckpointError, MetricsLog, ari, fg_iou_dice, miou, msc, mse,
                    nanmean, parse_args, segmentation_metrics)

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

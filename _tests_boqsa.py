"""Tests for boqsa.py (pytest). Every test name starts with test_boqsa_."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import boqsa
from boqsa import BOQSA, Config, SlotAttention, convert_official_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "..", "shared", "data", "real")
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
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                        os.path.join(HERE, "boqsa.py"), *TINY, "--max_steps=3", "--eval_interval=3",
                        f"--out_dir={out}"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert os.listdir(out).count("ckpt.pt") == 1

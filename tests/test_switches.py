"""The paper's ablation switches in the training step (paper §4.3, Tables 3 and 4) and L_reg in
training (paper §3.4): --reg-weight, --seg-label, --aff-weight 0, --propagate-with."""
import contextlib
import dataclasses
import json
import math
import os

import pytest
import torch

import data
import evaluate
import metrics
import pipeline
import random_walk
import synthetic
import train
import train_step
from cam import cam_to_label, multi_scale_cam
from attention_affinity import mhsa_affinity
from crf_loss import DenseCRFLoss
from config import PRESETS, Config, ConfigError, parse_config
from model import AFANet
from par import PAR

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def net():
    """A small network in eval mode: every pass is deterministic (no stochastic depth), so the
    labels of a step can be recomputed outside it."""
    torch.manual_seed(0)
    return AFANet(NUM_CLASSES, backbone="mit_b0").eval(), PAR()


def batch_of(B=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls_labels = torch.zeros(B, NUM_CLASSES - 1)
    cls_labels[0, 1] = cls_labels[1, 3] = cls_labels[1, 0] = 1
    return {"image": torch.randn(B, 3, size, size, generator=g), "cls_labels": cls_labels,
            "valid_box": torch.tensor([[0, size, 0, size], [0, size // 2 + 8, 0, size - 16]])}


def config(**changes):
    return Config(backbone="mit_b0", num_classes=NUM_CLASSES, crop=64, cam_scales=(1.0, 1.5),
                  cam_iters=2, switch_iters=4, **changes)


def step(net, batch, at, cfg):
    model, par = net
    return train_step.compute_losses(model, model, par, batch, at, cfg, contextlib.nullcontext)


@pytest.fixture
def spy(monkeypatch):
    """Records the label seg_loss and reg_loss receive in the step."""
    seen = {}
    real_seg, real_reg = pipeline.seg_loss, pipeline.reg_loss

    def seg_loss(logits, target, *a, **k):
        seen["seg"] = target
        return real_seg(logits, target, *a, **k)

    def reg_loss(logits, images, box, target):
        seen["reg"] = target
        return real_reg(logits, images, box, target)

    monkeypatch.setattr(train_step, "seg_loss", seg_loss)
    monkeypatch.setattr(train_step, "reg_loss", reg_loss)
    return seen


# --- L_reg in the step ------------------------------------------------------------------------
def test_reg_is_off_before_cam_iters_and_adds_its_weight_after(net, spy):
    batch, cfg = batch_of(), config()
    before = step(net, batch, cfg.cam_iters, cfg)
    assert set(before.terms) == {"cls"} and "reg" not in spy         # not even computed
    after = step(net, batch, cfg.cam_iters + 1, cfg)
    assert set(after.terms) == {"cls", "seg", "aff", "reg"}
    assert torch.equal(spy["reg"], spy["seg"])                        # the step's seg target
    reg = after.terms["reg"].item()
    assert math.isfinite(reg) and reg < 0                            # an energy: −S̃·G·W S̃
    without = step(net, batch, cfg.cam_iters + 1, dataclasses.replace(cfg, reg_weight=0.0))
    assert set(without.terms) == {"cls", "seg", "aff"}
    # reg_weight · L_reg is added (a large weight: at 0.01 it is below float32's resolution here)
    heavy = step(net, batch, cfg.cam_iters + 1, dataclasses.replace(cfg, reg_weight=1e4))
    assert heavy.terms["reg"].item() == reg
    assert heavy.loss.item() - without.loss.item() == pytest.approx(1e4 * reg, rel=1e-3)


def test_reg_weight_zero_computes_nothing(net, spy):
    out = step(net, batch_of(), 5, config(reg_weight=0.0))
    assert "reg" not in out.terms and "reg" not in spy


def test_reg_loss_is_the_release_layer_on_the_step_inputs():
    """RGB 0–255 (denormalised), the softmax not detached, ROI = valid box, label = seg target."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 4, 32, 40
    pixels = torch.randint(0, 256, (B, 3, H, W), generator=g).float()
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    logits = torch.randn(B, C, H, W, generator=g, requires_grad=True)
    box = torch.tensor([[0, H, 0, W], [4, 20, 8, 30]])
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[:, :5] = 255
    roi = torch.zeros(B, H, W)
    roi[0] = 1
    roi[1, 4:20, 8:30] = 1
    expected = DenseCRFLoss(1e-7, 15, 100, 0.5)(pixels, logits.softmax(1), roi, target)
    got = pipeline.reg_loss(logits, images, box, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert logits.grad.abs().sum() > 0                               # not detached


def test_reg_loss_finite_on_all_ignored_and_empty_roi_crops():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    logits = torch.randn(2, 3, 32, 32, generator=g, requires_grad=True)
    ignored = torch.full((2, 32, 32), 255)
    reg = pipeline.reg_loss(logits, images, torch.tensor([[0, 32, 0, 32]] * 2), ignored)
    reg.backward()
    assert math.isfinite(reg.item()) and reg.item() < 0 and torch.isfinite(logits.grad).all()
    logits.grad = None
    empty = torch.tensor([[5, 5, 0, 32], [0, 32, 7, 7]])            # top == bottom, left == right
    reg = pipeline.reg_loss(logits, images, empty, ignored)
    reg.backward()
    assert reg.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# --- --seg-label: what supervises the seg branch ----------------------------------------------------
def reference_labels(net, batch, cfg, propagate_with="affinity"):
    model, par = net
    settings = pipeline.LabelSettings(cam_scales=cfg.cam_scales, propagate_with=propagate_with)
    return pipeline.make_pseudo_labels(model, par, batch, settings, need=("cam", "par", "afa"))


def test_cam_label_is_the_three_band_label_of_the_multi_scale_cam(net):
    model, _ = net
    batch, cfg = batch_of(), config()
    cams, _ = multi_scale_cam(model, batch["image"], cfg.cam_scales)
    expected = cam_to_label(cams, batch["cls_labels"], low=0.35, high=0.55,
                            valid_box=batch["valid_box"])
    assert torch.equal(reference_labels(net, batch, cfg).cam, expected)
    assert set(expected.unique().tolist()) >= {0, 255}


@pytest.mark.parametrize("seg_label, aff_weight, at, kind", [
    ("afa", 0.1, 3, "par"), ("afa", 0.1, 5, "afa"),   # the paper's schedule: PAR, then AFA
    ("par", 0.1, 5, "par"), ("par", 0.0, 5, "par"),   # +PAR; w/o AFA
    ("cam", 0.0, 3, "cam"), ("cam", 0.0, 5, "cam"),   # the baseline never sees PAR
    ("cam", 0.1, 5, "cam"),
])
def test_seg_target_follows_seg_label(net, spy, seg_label, aff_weight, at, kind):
    batch = batch_of()
    cfg = config(seg_label=seg_label, aff_weight=aff_weight)
    out = step(net, batch, at, cfg)
    expected = getattr(reference_labels(net, batch, cfg), kind)
    assert torch.equal(spy["seg"], expected) and torch.equal(spy["reg"], expected)
    made = {k for k in ("cam", "par", "afa") if getattr(out.labels, k) is not None}
    # only the labels something uses are made: L_aff needs the PAR label while it trains
    assert made == {kind} | ({"par"} if aff_weight else set())


@pytest.mark.parametrize("argv, words", [
    (["--aff-weight", "0"], ("--seg-label afa", "--aff-weight 0")),
    (["--aff-weight", "0", "--seg-label", "afa"], ("--seg-label afa", "--aff-weight 0")),
    (["--aff-weight", "0", "--seg-label", "par", "--aff-from-afa"], ("--aff-from-afa", "--aff-weight 0")),
    (["--data", "COCO", "--aff-weight", "0", "--seg-label", "cam", "--aff-from-afa"],  # typed: refused
     ("drop --aff-from-afa", "--aff-weight 0")),                                       # (not yielded)
    (["--seg-label", "crf"], ("--seg-label crf", "cam, par or afa")),
    (["--propagate-with", "mhsa"], ("--propagate-with mhsa", "affinity or attention")),
    (["--reg-weight", "-1"], ("--reg-weight -1",)),
])
def test_contradictory_switches_are_one_line_errors(argv, words, capsys):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    assert train.main(argv) == 2
    assert capsys.readouterr().err.count("error: ") == 1


# --- --propagate-with attention: the raw MHSA maps -------------------------------------------------
def naive_mhsa(attn_logits, head_dim):
    """The definition, element by element in float64: softmax(q·kᵀ/√d) per block and head,
    averaged over all of them, then (A + Aᵀ)/2."""
    B, N = attn_logits[0].shape[0], attn_logits[0].shape[-1]
    total, count = torch.zeros(B, N, N, dtype=torch.float64), 0
    for logits in attn_logits:
        for m in range(logits.shape[1]):
            scaled = logits[:, m].double() / math.sqrt(head_dim)
            e = torch.exp(scaled - scaled.max(dim=-1, keepdim=True).values)
            total += e / e.sum(dim=-1, keepdim=True)
            count += 1
    mean = total / count
    return (mean + mean.transpose(1, 2)) / 2


def test_mhsa_affinity_is_the_definition():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 12, 12, generator=g) * 5 for _ in range(2)]
    a = mhsa_affinity(logits, head_dim=16)
    assert torch.allclose(a.double(), naive_mhsa(logits, 16), atol=1e-6)
    assert torch.equal(a, a.transpose(1, 2)) and (a >= 0).all() and (a <= 1).all()
    # rows of each map sum to 1, so the symmetric mean has total mass N per image
    assert torch.allclose(a.sum(dim=(1, 2)), torch.full((2,), 12.0), atol=1e-4)


def test_the_cam_pass_with_attention_gives_the_mhsa_of_its_last_blocks_and_head_width(net):
    model, _ = net
    x = torch.randn(2, 3, 64, 48)
    _, all_logits = model.encoder(x)                                # every block, (B, nh, N, N)
    last = all_logits[-model.afa_blocks:]
    attention = model.encoder.block4[-1].attn
    head_dim = attention.q.out_features // attention.num_heads      # 256 / 8 for mit_b0
    expected = naive_mhsa(last, head_dim)
    cams, got = model.cam(x, pairwise="attention")
    assert got.shape == (2, 12, 12) and torch.allclose(got.double(), expected, atol=1e-6)
    assert torch.equal(cams, model.cam(x)[0])
    with pytest.raises(ValueError, match="pairwise"):
        model.cam(x, pairwise="mhsa")


def mhsa_of(model, x):
    """The MHSA affinity of the model's AFA blocks for images x: (B, N, N)."""
    return model.mhsa_affinity(model.encoder(x)[1][-model.afa_blocks:])


def walks_of(monkeypatch) -> list:
    """The affinities the random walk receives, recorded."""
    walks, real = [], random_walk.propagate
    monkeypatch.setattr(random_walk, "propagate",
                        lambda cams, affinity, *a, **k: walks.append(affinity) or real(cams, affinity, *a, **k))
    return walks


def test_training_labels_walk_with_attention_at_the_largest_scale(net, monkeypatch):
    """The random walk receives the MHSA maps of the un-flipped images at the largest CAM scale;
    the CAMs are those of the plain multi-scale CAM."""
    model, par = net
    batch, cfg = batch_of(), config()
    walks = walks_of(monkeypatch)
    labels = reference_labels(net, batch, cfg, propagate_with="attention")
    largest = torch.nn.functional.interpolate(batch["image"], size=(96, 96), mode="bilinear",
                                              align_corners=False)   # scale 1.5 of 64
    expected = mhsa_of(model, largest)                            # (B, 36, 36)
    assert len(walks) == 2 and all(torch.allclose(w, expected, atol=1e-5) for w in walks)
    learned = reference_labels(net, batch, cfg)
    assert torch.equal(labels.cam, learned.cam) and torch.equal(labels.par, learned.par)
    # the switch reaches the step
    walks.clear()
    step(net, batch, 5, config(propagate_with="attention"))
    assert len(walks) == 2 and all(torch.allclose(w, expected, atol=1e-5) for w in walks)


def test_validation_walks_with_attention_when_asked(net, monkeypatch):
    """Validation walks with the learned affinity of the eval forward, or with the MHSA
    affinity at its scale 1.0."""
    model, _ = net
    batch = {**batch_of(), "label": torch.zeros(2, 64, 64, dtype=torch.long)}
    walks = walks_of(monkeypatch)
    mhsa, learned = mhsa_of(model, batch["image"]), model(batch["image"]).affinity  # (B, 16, 16)
    metrics.validate(model, [batch], NUM_CLASSES, "cpu", pipeline.LabelSettings(cam_scales=(1.0,)))
    assert walks and all(torch.allclose(w, learned, atol=1e-6) for w in walks)
    walks.clear()
    metrics.validate(model, [batch], NUM_CLASSES, "cpu",
                     pipeline.LabelSettings(cam_scales=(1.0,), propagate_with="attention"))
    assert walks and all(torch.allclose(w, mhsa, atol=1e-6) for w in walks)


@pytest.mark.parametrize("propagate_with", ["affinity", "attention"])
def test_evaluate_pseudo_reads_propagate_with_from_the_checkpoint(propagate_with, tmp_path,
                                                                  monkeypatch, net):
    data_root = str(tmp_path / "synthetic")
    synthetic.make_synthetic(data_root, num_train=2, num_val=1, size=64)
    cfg = Config(**{**PRESETS["synthetic"], "data_root": data_root, "val_batch_size": 2,
                    "cam_scales": (1.0, 1.5), "propagate_with": propagate_with})
    checkpoint = str(tmp_path / "tiny.pth")
    torch.save({"model": net[0].state_dict(), "config": dataclasses.asdict(cfg), "step": 0},
               checkpoint)
    calls = []
    real = AFANet.mhsa_affinity
    monkeypatch.setattr(AFANet, "mhsa_affinity", lambda *a: calls.append(1) or real(*a))
    out = str(tmp_path / "out")
    assert evaluate.main(["--checkpoint", checkpoint, "--out", out, "--pseudo", "--workers", "0",
                          "--device", "cpu"]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        result = json.load(f)
    assert result["propagate_with"] == propagate_with
    assert bool(calls) == (propagate_with == "attention")
    assert 0 <= result["afa_miou"] <= 1

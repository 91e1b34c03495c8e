"""train.py: the balanced seg loss, the schedule, the configuration, the data stream, checkpoints,
and the step's fidelity to the release (BatchNorm statistics of the CAM passes, float32 labels)."""
import contextlib
import copy
import dataclasses
import math
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fast
import pipeline
import random_walk
import runner
import train
import train_step
from config import Config, ConfigError, parse_config
from model import AFANet
from par import PAR
from pipeline import seg_loss
from train import lr_factor

GOLDEN = Path(__file__).parent / "golden"


# --- L_seg ----------------------------------------------------------------------------------------
def test_seg_loss_matches_release():
    g = np.load(GOLDEN / "seg_loss.npz")
    loss = seg_loss(torch.from_numpy(g["seg_logits"]), torch.from_numpy(g["label"]))
    assert loss.item() == pytest.approx(float(g["loss"]), rel=1e-5)


def test_seg_loss_is_half_background_half_foreground():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 4, (2, 8, 8))
    label[0, :2] = 255
    bg = label.clone()
    bg[label != 0] = 255
    fg = label.clone()
    fg[label == 0] = 255
    expected = 0.5 * (F.cross_entropy(logits, bg, ignore_index=255)
                      + F.cross_entropy(logits, fg, ignore_index=255))
    assert seg_loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("fill", [0, 3, 255])
def test_seg_loss_finite_when_a_half_is_empty(fill):
    """All background, all foreground or all ignored: the empty half contributes 0, never NaN."""
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    label = torch.full((2, 8, 8), fill)
    loss = seg_loss(logits, label)
    assert math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    if fill == 255:
        assert loss.item() == 0.0
    else:
        full = F.cross_entropy(logits, label, ignore_index=255)
        assert loss.item() == pytest.approx(0.5 * full.item(), rel=1e-6)


# --- schedule -------------------------------------------------------------------------------------
def test_lr_schedule_is_linear_warmup_then_polynomial_decay():
    """Paper §4.1 and the release's optimizer: warm-up lr·(1 − (1 − t/1500)(1 − 1e-6)), then
    lr·(1 − t/20000)^1."""
    assert lr_factor(0, 1500, 20000) == pytest.approx(1e-6)
    assert lr_factor(750, 1500, 20000) == pytest.approx(1 - 0.5 * (1 - 1e-6))
    assert lr_factor(1500, 1500, 20000) == pytest.approx(1 - 1500 / 20000)
    assert lr_factor(10000, 1500, 20000) == pytest.approx(0.5)
    assert lr_factor(20000, 1500, 20000) == 0.0
    assert lr_factor(10000, 1500, 20000, power=0.9) == pytest.approx(0.5 ** 0.9)


def test_optimizer_groups_follow_release():
    cfg = Config(backbone="mit_b0", num_classes=5)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone)
    opt = train_step.build_optimizer(model, cfg)
    # Building the optimiser changes nothing in the model; freezing the norms is its own call.
    assert all(p.requires_grad for p in model.parameters())
    train_step.freeze_encoder_norms(model)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == [pytest.approx(6e-5), 0.0, pytest.approx(6e-4), pytest.approx(6e-4)]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert all(not p.requires_grad for p in opt.param_groups[1]["params"])
    assert all(p.requires_grad for g in opt.param_groups[::2] for p in g["params"])
    n_params = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    train.set_lr(opt, 750, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * lr_factor(750, 1500, 20000))


# --- configuration --------------------------------------------------------------------------------
def test_defaults_are_the_papers_and_presets_apply():
    voc = parse_config(["--data", "VOC2012"])
    assert (voc.backbone, voc.crop, voc.batch_size, voc.iters) == ("mit_b1", 512, 4, 20000)
    assert (voc.cam_iters, voc.switch_iters, voc.lr, voc.warmup_iters) == (2000, 6000, 6e-5, 1500)
    assert voc.cam_scales == (1.0, 0.5, 1.5) and voc.freeze_norm
    coco = parse_config(["--data", "COCO"])
    assert (coco.num_classes, coco.iters, coco.par_iters, coco.switch_iters) == (81, 80000, 15, 15000)
    assert coco.aff_from_afa and coco.reg_weight == 0.0  # the release's COCO script: no L_reg
    assert voc.reg_weight == 0.01 and not voc.aff_from_afa
    assert parse_config(["--data", "COCO", "--reg-weight", "0.01"]).reg_weight == 0.01
    syn = parse_config([])
    assert syn.data == "synthetic" and syn.backbone == "mit_b0"


def test_flags_override_presets():
    cfg = parse_config(["--data", "VOC2012", "--crop", "320", "--no-freeze-norm", "--amp",
                        "--rescale", "0.75", "1.5", "--lr", "1e-4"])
    assert cfg.crop == 320 and not cfg.freeze_norm and cfg.amp
    assert cfg.rescale == (0.75, 1.5) and cfg.lr == 1e-4


@pytest.mark.parametrize("argv, words", [
    (["--crop", "100"], "multiple of 16"),
    (["--backbone", "resnet50"], "choose one of mit_b0, mit_b1"),
    (["--cam-iters", "700", "--switch-iters", "600"], "--cam-iters"),
    (["--low", "0.6", "--high", "0.5"], "low <= high"),
    (["--rescale", "2", "1"], "--rescale"),
])
def test_contradictory_flags_are_refused(argv, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(argv)


@pytest.mark.parametrize("data", ["synthetic", "VOC2012", "COCO"])
@pytest.mark.parametrize("flags", [["--aff-weight", "0", "--seg-label", "cam"],
                                   ["--aff-weight", "0", "--seg-label", "par"],
                                   ["--switch-iters", "1"], ["--cam-iters", "100000"]],
                         ids=["baseline row", "+PAR row", "early switch", "late cam phase"])
def test_a_presets_default_never_turns_an_explicit_flag_into_an_error(data, flags, capsys):
    """What the user typed holds; the contradicting default yields, and a note says so."""
    cfg = parse_config(["--data", data, *flags])
    given = dict(zip(flags[::2], flags[1::2]))
    if "--aff-weight" in given:
        assert cfg.aff_weight == 0 and not cfg.aff_from_afa
    if "--switch-iters" in given:
        assert cfg.switch_iters == 1 and cfg.cam_iters == 1
    if "--cam-iters" in given:
        assert cfg.cam_iters == cfg.switch_iters == 100000
    err = capsys.readouterr().err
    assert ("note: " in err) == (data == "COCO" or "--aff-weight" not in given), err


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--iters", "many"])
    assert e.value.code == 2
    assert "--iters" in capsys.readouterr().err


# --- data stream ----------------------------------------------------------------------------------
class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"index": i, "noise": torch.rand(3)}


def test_stream_is_a_pure_function_of_seed_and_position():
    a, b = runner.TrainStream(_Noise(), seed=1), runner.TrainStream(_Noise(), seed=1)
    first = [a[k] for k in range(12)]
    torch.rand(10)  # global RNG state must not matter
    again = [b[k] for k in reversed(range(12))][::-1]
    for x, y in zip(first, again):
        assert x["index"] == y["index"] and torch.equal(x["noise"], y["noise"])
    epoch0 = sorted(x["index"] for x in first[:5])
    assert epoch0 == list(range(5))                      # every item once per epoch
    assert sorted(x["index"] for x in first[5:10]) == list(range(5))
    other = runner.TrainStream(_Noise(), seed=2)
    assert any(not torch.equal(other[k]["noise"], first[k]["noise"]) for k in range(5))


def test_step_sampler_shards_each_batch():
    world, batch = 2, 4
    shards = [list(runner.StepSampler(3, 5, batch, rank, world)) for rank in range(world)]
    assert shards[0] == [12, 13, 16, 17] and shards[1] == [14, 15, 18, 19]


# --- checkpoints ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_rng(tmp_path):
    path = tmp_path / "c.pth"
    torch.manual_seed(3)
    np.random.seed(3)
    state = {"model": {"w": torch.arange(3.0)}, "config": {"backbone": "mit_b0", "num_classes": 6},
             "rng": runner.rng_state(), "step": 7}
    expected = (torch.rand(2), np.random.rand(2))
    runner.save_checkpoint(str(path), state)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]       # no temporary left behind
    loaded = runner.load_checkpoint(str(path))                     # weights_only=True load
    runner.set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])
    assert loaded["step"] == 7


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        runner.load_checkpoint(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pth.*corrupt"):
        runner.load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pth"
    torch.save({"patch_embed1.proj.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ConfigError, match="not written by train.py"):
        runner.load_checkpoint(str(foreign))
    with pytest.raises(ConfigError, match="num_classes=81.*--num-classes 81"):
        runner.check_compatible({"config": {"backbone": "mit_b0", "num_classes": 81}},
                               Config(backbone="mit_b0", num_classes=6), "x.pth")


def test_token_grid_matches_encoder():
    model = AFANet(3, backbone="mit_b0").eval()
    for size in (48, 50, 64, 72):
        with torch.no_grad():
            cams, affinity = model.cam(torch.zeros(1, 3, size, size + 16))
        assert cams.shape[-2:] == (pipeline.token_grid(size), pipeline.token_grid(size + 16))
        assert affinity.shape[-1] == cams.shape[-1] * cams.shape[-2]


def test_token_grid_is_the_ceiling_of_a_sixteenth():
    assert [pipeline.token_grid(s) for s in (16, 17, 32, 56, 64)] == [1, 2, 2, 4, 4]


# --- fidelity: the CAM passes and the decoder's BatchNorm statistics (paper §3.1, as the release) ---
class ReleaseCAM(torch.nn.Module):
    """The release's CAM path: `cam` runs the whole network, decoder included, before returning the
    CAMs, so in train mode the decoder's BatchNorm statistics see every CAM pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def cam(self, x, **options):
        out = self.model(x)
        return out.cams, out.affinity


def step_batch(B=2, size=64, num_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls_labels = torch.zeros(B, num_classes - 1)
    cls_labels[0, 1] = cls_labels[1, 3] = cls_labels[1, 0] = 1
    return {"image": torch.randn(B, 3, size, size, generator=g), "cls_labels": cls_labels,
            "valid_box": torch.tensor([[0, size, 0, size], [0, size // 2 + 8, 0, size]])}


def decoder_batchnorm(model):
    return model.decoder.linear_fuse.bn


@pytest.mark.parametrize("step", [1, 3, 5], ids=["classification only", "PAR label", "AFA label"])
def test_statistics_after_a_step_equal_the_release_decoder_on_every_cam_pass(step):
    """The forward and each of the 3 CAM passes (images + mirrors) update the decoder's running
    mean and variance, the classification-only phase included, as when the decoder runs whole."""
    cfg = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=2, switch_iters=4)
    # Without stochastic depth no pass draws random numbers, so the release path's Dropout2d
    # (after the BatchNorm) shifts nothing: the two runs see the same features.
    torch.manual_seed(0)
    ours = AFANet(cfg.num_classes, backbone=cfg.backbone, drop_path_rate=0.0).train()
    release = copy.deepcopy(ours)
    par, batch = PAR(), step_batch()
    train_step.compute_losses(ours, ours, par, batch, step, cfg, contextlib.nullcontext)
    # the plain multi-scale CAM calls `cam` (the speed paths need an AFANet)
    train_step.compute_losses(release, ReleaseCAM(release), par, batch, step,
                              dataclasses.replace(cfg, speed_paths=False), contextlib.nullcontext)
    bn, release_bn = decoder_batchnorm(ours), decoder_batchnorm(release)
    assert int(release_bn.num_batches_tracked) == 1 + len(cfg.cam_scales)
    assert int(bn.num_batches_tracked) == int(release_bn.num_batches_tracked)
    torch.testing.assert_close(bn.running_mean, release_bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, release_bn.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step", [1, 3, 5], ids=["classification only", "PAR label", "AFA label"])
def test_statistics_after_a_step_equal_those_of_the_plain_batchnorm_pass(step, monkeypatch):
    """The CAM passes' BatchNorm update from moments on the stage grids
    (`fast.update_bn_stats_from_moments`) leaves the buffers of a whole step where the
    plain decoder pass up to the BatchNorm leaves them, stochastic depth on, on an odd crop."""
    cfg = Config(backbone="mit_b0", num_classes=6, crop=80, cam_iters=2, switch_iters=4)
    assert cfg.cam_bn_stats
    torch.manual_seed(0)
    ours = AFANet(cfg.num_classes, backbone=cfg.backbone).train()
    plain = copy.deepcopy(ours)
    pipeline.choose_paths(plain, True, [v for v in fast.VARIANTS if v != "bn_stats_moments"])
    par, batch = PAR(), step_batch(size=cfg.crop)
    torch.manual_seed(1)
    train_step.compute_losses(ours, ours, par, batch, step, cfg, contextlib.nullcontext)
    torch.manual_seed(1)  # the same stochastic-depth draws: neither update draws random numbers
    train_step.compute_losses(plain, plain, par, batch, step, cfg, contextlib.nullcontext)
    bn, plain_bn = decoder_batchnorm(ours), decoder_batchnorm(plain)
    assert int(bn.num_batches_tracked) == int(plain_bn.num_batches_tracked) == 1 + len(cfg.cam_scales)
    for name in ("running_mean", "running_var"):
        actual, expected = getattr(bn, name), getattr(plain_bn, name)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("step", [1, 5])
def test_no_cam_bn_stats_leaves_the_statistics_to_the_forward(step):
    cfg = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=2, switch_iters=4,
                 cam_bn_stats=False)
    torch.manual_seed(0)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone, drop_path_rate=0.0).train()
    forward_only = copy.deepcopy(model)
    pipeline.choose_paths(forward_only, cfg.speed_paths)  # the step's implementation
    batch = step_batch()
    train_step.compute_losses(model, model, PAR(), batch, step, cfg, contextlib.nullcontext)
    with torch.no_grad():
        forward_only(batch["image"])
    bn, expected = decoder_batchnorm(model), decoder_batchnorm(forward_only)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=0)


# --- fidelity: --amp covers the network, not the pseudo labels -----------------------------------
def test_amp_leaves_the_pseudo_labels_in_float32(monkeypatch):
    """Under --amp (bf16 autocast) the forward runs in bf16 but the CAM passes, the AFA head and
    the random walk do not, unless --cam-bf16 asks for bf16 CAM passes: the labels are those of
    a float32 run."""
    import pipeline
    cfg = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=0, switch_iters=0, amp=True)
    autocast, _ = train_step.make_autocast(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone).eval()   # deterministic passes
    par, batch = PAR(), step_batch()
    seen = []
    real_cam, real_propagate = fast.partial_cam, random_walk.propagate

    def cam(model, x, num_affinity, **options):
        seen.append(("cam", torch.is_autocast_enabled("cpu")))
        return real_cam(model, x, num_affinity, **options)

    def propagate(cams, affinity, *args, **kwargs):
        seen.append(("walk", torch.is_autocast_enabled("cpu") or affinity.dtype != torch.float32))
        return real_propagate(cams, affinity, *args, **kwargs)

    monkeypatch.setattr(fast, "partial_cam", cam)
    monkeypatch.setattr(random_walk, "propagate", propagate)
    out = train_step.compute_losses(model, model, par, batch, 1, cfg, autocast)
    assert {kind for kind, _ in seen} == {"cam", "walk"}
    assert not any(low_precision for _, low_precision in seen), seen
    expected = pipeline.make_pseudo_labels(model, par, batch,
                                           pipeline.LabelSettings.from_config(cfg, model))
    assert torch.equal(out.labels.par, expected.par) and torch.equal(out.labels.afa, expected.afa)
    seen.clear()
    train_step.compute_losses(model, model, par, batch, 1, dataclasses.replace(cfg, cam_bf16=True),
                         autocast)
    assert all(bf16 for kind, bf16 in seen if kind == "cam")        # --cam-bf16: CAM passes only
    assert not any(low for kind, low in seen if kind == "walk")


# --- DDP: each process builds the data sets once, rank 0 first --------------------------------
def test_each_process_builds_the_data_sets_once_rank_0_first(monkeypatch):
    events = []
    monkeypatch.setattr(train, "build_datasets", lambda cfg: events.append("build") or ("tr", "va"))
    monkeypatch.setattr(train.dist, "barrier", lambda: events.append("barrier"))
    cfg = Config(data="VOC2012")
    for rank, expected in ((0, ["build", "barrier"]), (1, ["barrier", "build"])):
        events.clear()
        assert train.load_datasets(cfg, rank, world=2) == ("tr", "va")
        assert events == expected, rank
    events.clear()
    assert train.load_datasets(cfg, 0, world=1) == ("tr", "va") and events == ["build"]


# --- the command line ------------------------------------------------------------------------------
def test_abbreviated_flags_are_refused(capsys):
    """--iter is not --iters: argparse's prefix matching is off."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--iter", "10"])
    assert e.value.code == 2 and "--iter" in capsys.readouterr().err


def test_help_shows_each_presets_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())           # argparse wraps the lines
    assert "synthetic when --data is not given" in text
    assert "(default: synthetic 128; VOC2012, COCO 512)" in text          # --crop
    assert "(default: synthetic 600; VOC2012 20000; COCO 80000)" in text  # --iters
    assert "(default: 0.45)" in text                                      # --bkg-score: one value


# --- stopping: SIGTERM like the first Ctrl-C ---------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_for_a_stop_a_second_ctrl_c_stops_at_once(signum):
    """A second SIGTERM (torchrun passes one on after the group's) leaves the save to finish."""
    before = {s: signal.getsignal(s) for s in runner.StopSignal.SIGNALS}
    stop = runner.StopSignal.install()
    try:
        assert stop.signum is None
        os.kill(os.getpid(), signum)
        assert stop.signum == signum                  # the handler ran: finish the step, save
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
        else:
            os.kill(os.getpid(), signum)
            assert stop.signum == signum
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in runner.StopSignal.SIGNALS} == before


def test_resume_auto_takes_the_newest_checkpoint_of_any_kind(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert runner.latest_checkpoint(str(tmp_path)) is None
    for name in ("iter_4.pth", "iter_30.pth", "nonfinite_iter_33.pth", ".iter_40.pth.tmp1",
                 "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert runner.latest_checkpoint(str(tmp_path)) == str(folder / "nonfinite_iter_33.pth")
    (folder / "interrupted_iter_35.pth").write_bytes(b"x")
    assert runner.latest_checkpoint(str(tmp_path)) == str(folder / "interrupted_iter_35.pth")
    (folder / "iter_100.pth").write_bytes(b"x")         # by step, not by name: 100 > 35
    assert runner.latest_checkpoint(str(tmp_path)) == str(folder / "iter_100.pth")


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_writes_into_the_work_dir_after_all_has_loaded_and_every_process_looked(rank,
                                                                                       monkeypatch):
    """A slower rank must not find rank 0's fresh files and refuse the run as an old one; a start
    that fails while loading data, weights or checkpoint writes nothing (only the probe that the
    folder takes files)."""
    events = []

    class Stop(Exception):
        pass

    def event(name, value=None):
        return lambda *args, **kwargs: events.append(name) or value

    monkeypatch.setattr(train, "setup_distributed", lambda cfg: (rank, 2, torch.device("cpu")))
    monkeypatch.setattr(train.dist, "barrier", event("barrier"))
    monkeypatch.setattr(train, "check_new_run", event("check"))
    monkeypatch.setattr(train, "check_work_dir_writable", event("probe"))
    monkeypatch.setattr(train, "load_datasets", event("data", (None, None)))
    monkeypatch.setattr(train, "build_model", event("model"))
    monkeypatch.setattr(train, "build_optimizer", event("optimizer"))
    monkeypatch.setattr(train, "make_autocast", event("autocast", (None, None)))
    monkeypatch.setattr(train, "resume_from", event("checkpoint", (0, [], [])))
    monkeypatch.setattr(train, "warn_if_unlearnable", event("warn"))
    monkeypatch.setattr(train, "warn_if_bf16_is_emulated", event("warn"))
    monkeypatch.setattr(train, "start_work_dir", event("write"))

    def compile_and_wrap(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(train, "compile_and_wrap", compile_and_wrap)
    with pytest.raises(Stop):
        train.train(Config(data="VOC2012"))
    events = [e for e in events if e not in ("warn", "optimizer", "autocast")]
    assert events == (["check", "barrier", "probe", "data", "model", "checkpoint", "write",
                       "barrier"] if rank == 0 else
                      ["check", "barrier", "data", "model", "checkpoint", "barrier"])


# --- bf16 on a CPU without it; the speed line ----------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_warns(native, monkeypatch, capsys):
    monkeypatch.setattr(runner, "cpu_has_native_bf16", lambda: native)
    for argv, warned in ((["--amp"], "--amp"), (["--cam-bf16"], "--cam-bf16"), ([], None)):
        runner.warn_if_bf16_is_emulated(parse_config(argv), torch.device("cpu"))
        err = capsys.readouterr().err
        if native or warned is None:
            assert err == ""
        else:
            assert err.startswith(f"warning: {warned}: this CPU has no bf16 instructions")
            assert err.count("\n") == 1 and "slower" in err
    runner.warn_if_bf16_is_emulated(parse_config(["--amp"]), torch.device("cuda"))
    assert capsys.readouterr().err == ""  # a GPU decides for itself


def test_phase_times_average_per_phase():
    times = runner.PhaseTimes()
    for phase, seconds in (("classification-only steps", 0.2), ("classification-only steps", 0.4),
                           ("validation", 8.0), ("full steps", 1.5)):
        times.add(phase, seconds)
    assert times.summary() == ("classification-only steps 0.30 s/it (2), full steps 1.50 s/it (1), "
                               "validation 8.00 s (1)")


def test_phase_times_warn_once_when_steps_run_far_slower_than_the_phases_first_ones():
    warnings = []
    times = runner.PhaseTimes(warn=warnings.append)
    for _ in range(30):                                  # steady: no warning
        times.add("full steps", 0.5)
    for _ in range(5):                                   # 5 of the last 10 slow: median not
        times.add("full steps", 2.5)
    assert warnings == []
    times.add("full steps", 2.5)
    assert len(warnings) == 1 and warnings[0].startswith("warning: full steps now take 2.50 s, 5×")
    assert "another program is using the CPU" in warnings[0] and "OMP_NUM_THREADS=1" in warnings[0]
    for _ in range(30):
        times.add("full steps", 5.0)
    assert len(warnings) == 1                            # once per run
    quiet = runner.PhaseTimes(warn=warnings.append)
    for seconds in [3.0, 3.0] + [0.5] * 30 + [1.9] * 10:  # slow warm-ups, then under 4×
        quiet.add("classification-only steps", seconds)
        quiet.add("validation", 50.0)
    assert len(warnings) == 1


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc on Linux only")
@pytest.mark.parametrize("default_malloc", [False, True])
def test_freed_memory_is_kept_unless_the_user_asks_for_the_default(default_malloc):
    """runner.keep_freed_memory takes effect with glibc, and AFA_DEFAULT_MALLOC=1 keeps glibc's
    default (the same numbers either way; what it saves is in docs/demo_study.md)."""
    env = {**os.environ, "AFA_DEFAULT_MALLOC": "1" if default_malloc else "0"}
    code = f"import sys; sys.path.insert(0, {str(Path(runner.__file__).parent)!r}); import runner; " \
           "print(runner.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(not default_malloc)


SPIN_SCRIPTS = ("train.py", "evaluate.py", "bench.py")


@pytest.mark.parametrize("script", SPIN_SCRIPTS)
def test_the_spin_count_is_set_before_torch_loads_unless_the_user_set_one(script):
    """GNU OpenMP reads GOMP_SPINCOUNT once, when torch loads it: importing a script sets it
    before torch is loaded; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    module = script[:-3]
    probe = (f"import os, sys; import {module}; loaded = list(sys.modules); "
             "print(loaded.index('spin_count') < loaded.index('torch'), "
             "os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    for env, expected in (({}, "True 3000 None"), ({"GOMP_SPINCOUNT": "77"}, "True 77 None"),
                          ({"OMP_WAIT_POLICY": "ACTIVE"}, "True None ACTIVE")):
        base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        out = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, text=True,
                             capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        assert out == expected, (env, out)


def test_validation_scores_print_in_percent_as_evaluate_and_the_paper():
    """train.py's validation line and end-of-run table use evaluate.py's unit: percent."""
    from metrics import format_metrics, metrics_table
    m = {"step": 600, "cls_f1": 1.0, "cam_miou": 0.5783, "walk_miou": 0.512, "seg_miou": 0.81}
    assert format_metrics(m) == ("iter 600: cls F1 100.0, cam mIoU 57.8, walk mIoU 51.2, "
                                 "seg mIoU 81.0")
    table = metrics_table([m])
    assert "| 600 | 100.0 | 57.8 | 51.2 | 81.0 |" in table and "0.810" not in table

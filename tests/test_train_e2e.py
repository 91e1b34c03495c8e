"""End-to-end: train.py through every stage of the step on a tiny synthetic set, and under torchrun."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import config
import data
import pipeline
import runner
import synthetic
import train
import train_step
import visualize
from model import AFANet
from par import PAR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(str(root), num_train=16, num_val=4, size=64)
    return root


def tiny_flags(root, work_dir, **overrides):
    flags = dict(data="synthetic", data_root=root, work_dir=work_dir, crop=64, batch_size=2,
                 iters=6, cam_iters=1, switch_iters=3, eval_every=3, warmup_iters=1, workers=0,
                 val_batch_size=4, num_figures=2, log_every=1)
    flags.update(overrides)
    return [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]


def test_every_stage_runs_and_writes_its_outputs(tiny_synthetic, tmp_path, capsys):
    work_dir = tmp_path / "run"
    assert train.main(tiny_flags(tiny_synthetic, work_dir)) == 0
    # the last line: seconds per phase, so that a slow machine can be told from a slow program
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speed on this machine: classification-only steps \d+\.\d\d s/it \(2\), "
                        r"full steps \d+\.\d\d s/it \(4\), validation \d+\.\d\d s \(2\)", last), last

    log = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # steps 0..cam_iters: L_cls only; afterwards all three terms, all finite
    assert set(log[0]) >= {"cls"} and "seg" not in log[0]
    for r in log[2:]:
        assert {"cls", "seg", "aff"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("cls", "seg", "aff"))

    metrics = json.loads((work_dir / "metrics.json").read_text())
    assert metrics["step"] == 6 and [m["step"] for m in metrics["history"]] == [3, 6]
    for key in ("cls_f1", "cam_miou", "walk_miou", "seg_miou"):
        assert 0.0 <= metrics[key] <= 1.0

    ckpt = runner.load_checkpoint(str(work_dir / "checkpoints" / "iter_6.pth"))
    assert ckpt["step"] == 6 and ckpt["config"]["crop"] == 64
    assert json.loads((work_dir / "config.json").read_text())["iters"] == 6

    # 2 rows of 8 panels (image, truth, CAM, CAM+PAR, AFA+PAR, seg, affinity and attention of a
    # pixel) after a column of the images' names, then the legend and the heat maps' colour bar
    figure = Image.open(work_dir / "figures" / "val_iter_6.png")
    tile, pad, caption = 64, visualize.PAD, visualize.CAPTION
    names = [s["name"] for s in (data.build_dataset("synthetic", str(tiny_synthetic), "val",
                                                    train=False, num_classes=6)[i] for i in (0, 1))]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names_width = max(int(measure.textlength(n)) for n in names) + pad
    assert figure.width == names_width + 8 * (tile + pad) + pad
    footer = figure.height - 2 * (tile + caption + pad) - pad
    assert footer > visualize.colour_bar(8 * (tile + pad) - pad).shape[0] + caption


def test_post_switch_step_uses_the_afa_label(tiny_synthetic, monkeypatch):
    """After switch_iters the seg target is the AFA label; before, the PAR label."""
    cfg = config.parse_config(tiny_flags(tiny_synthetic, "unused"))
    dataset = data.build_dataset("synthetic", str(tiny_synthetic), "train", train=True,
                                 num_classes=cfg.num_classes, crop_size=64,
                                 rescale_range=cfg.rescale)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    model, par = AFANet(cfg.num_classes, backbone=cfg.backbone), PAR()
    seen = {}
    real_seg_loss = pipeline.seg_loss

    def spy(logits, target, *a, **k):
        seen["target"] = target
        return real_seg_loss(logits, target, *a, **k)

    monkeypatch.setattr(train_step, "seg_loss", spy)
    import contextlib
    for step, kind in ((cfg.switch_iters, "par"), (cfg.switch_iters + 1, "afa")):
        out = train_step.compute_losses(model, model, par, batch, step, cfg, contextlib.nullcontext)
        assert getattr(out.labels, kind) is not None
        assert torch.equal(seen["target"], getattr(out.labels, kind))
        out.loss.backward()
    assert out.labels.afa.shape == (2, 64, 64)
    assert set(out.labels.afa.unique().tolist()) <= set(range(cfg.num_classes)) | {255}


# Parameters, not buffers: on CPU BatchNorm is not synchronised (SyncBatchNorm needs GPUs), so
# each rank's running statistics follow its own last batch; DDP broadcasts rank 0's at every
# forward, and rank 0's are the ones saved.
TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(script, flags) -> list:
    """The command line of `torchrun --standalone --nproc_per_node 2 script flags`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), *flags]


DDP_SCRIPT = """
import os, sys, torch, config, train
cfg = config.parse_config(sys.argv[1:])
result = train.train(cfg)
torch.save({k: v.detach().clone() for k, v in result.model.named_parameters()},
           f"{cfg.work_dir}/rank{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree(tiny_synthetic, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): both ranks end with the same weights."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    work_dir = tmp_path / "ddp"
    flags = tiny_flags(tiny_synthetic, work_dir, iters=4, eval_every=4, num_figures=0,
                       batch_size=4)
    proc = subprocess.run(torchrun(script, flags), cwd=ROOT, env=TORCHRUN_ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    announced = "distributed: 2 processes, backend gloo, 2 images per process per iteration"
    assert proc.stdout.count(announced) == 1, proc.stdout[-3000:]
    weights = [torch.load(work_dir / f"rank{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    metrics = json.loads((work_dir / "metrics.json").read_text())
    assert metrics["step"] == 4


SIGTERM_SCRIPT = """
import os, sys, config, train
cfg = config.parse_config(sys.argv[1:])
open(f"{cfg.work_dir}.pid{os.environ['RANK']}", "w").write(str(os.getpid()))
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tiny_synthetic, tmp_path):
    """Under torchrun a SIGTERM that reaches one rank only still stops all of them after one
    common step: rank 0 saves the checkpoint, nobody hangs in a collective."""
    script = tmp_path / "ddp_sigterm.py"
    script.write_text(SIGTERM_SCRIPT)
    work_dir = tmp_path / "ddp"
    flags = tiny_flags(tiny_synthetic, work_dir, iters=200, eval_every=1000, num_figures=0,
                       batch_size=4)
    proc = subprocess.Popen(torchrun(script, flags), cwd=ROOT, env=TORCHRUN_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, pid_file = work_dir / "log.jsonl", tmp_path / "ddp.pid1"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2 and pid_file.exists()):
        assert proc.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    saved = [n for n in os.listdir(work_dir / "checkpoints") if n.startswith("interrupted_iter_")]
    assert len(saved) == 1, err[-3000:]
    done = int(saved[0][len("interrupted_iter_"):-len(".pth")])
    assert f"interrupted after iteration {done} (SIGTERM)" in out
    assert runner.load_checkpoint(str(work_dir / "checkpoints" / saved[0]))["step"] == done


@pytest.mark.slow
def test_sigterm_to_torchruns_process_group_stops_every_rank_after_the_same_step(tiny_synthetic,
                                                                                tmp_path):
    """`timeout`/SLURM signal torchrun, its ranks and their data-loading workers at once, and
    torchrun passes a second SIGTERM on to the ranks: the run still saves and exits 143."""
    script = tmp_path / "ddp_sigterm.py"
    script.write_text(SIGTERM_SCRIPT)
    work_dir = tmp_path / "ddp"
    flags = tiny_flags(tiny_synthetic, work_dir, iters=200, eval_every=1000, num_figures=0,
                       batch_size=4, workers=1)
    proc = subprocess.Popen(torchrun(script, flags), cwd=ROOT, env=TORCHRUN_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = work_dir / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    saved = [n for n in os.listdir(work_dir / "checkpoints") if n.startswith("interrupted_iter_")]
    assert len(saved) == 1, err[-3000:]
    done = int(saved[0][len("interrupted_iter_"):-len(".pth")])
    assert f"interrupted after iteration {done} (SIGTERM)" in out
    # torchrun itself prints a traceback of its SignalException; the ranks print none
    assert "KeyboardInterrupt" not in err and "DataLoader worker" not in err, err[-3000:]
    assert runner.load_checkpoint(str(work_dir / "checkpoints" / saved[0]))["step"] == done

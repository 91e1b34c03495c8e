"""Train AFA end to end (paper §3, §4.1): one network, one step, pseudo labels made on the fly.

Every iteration runs the pipeline of the paper's Fig. 2 (`compute_losses`; the stages are in
pipeline.py):

    forward ─► multi-scale CAM ─► CAM label ─► PAR label ─► affinity labels ─► L_aff
                      │                                                          │
                      └► random walk with the learned affinity (two thresholds)  │
                           ─► PAR ─► AFA pseudo label ─► L_seg ◄─────────────────┘ + L_cls

    python train.py                                   # built-in synthetic data, CPU, minutes
    python train.py --data VOC2012 --data-root data/VOCdevkit/VOC2012 --pretrained mit_b1.pth
    torchrun --nproc_per_node 2 train.py --data VOC2012 ...          # the paper's 2 GPUs × 2
    python train.py --resume auto                     # continue the run in --work-dir

The `Config` dataclass (config.py) holds the paper's numbers (VOC 2012); `PRESETS` changes what a
data set needs (`synthetic` trains from scratch on a CPU, `COCO` follows the release's COCO
script); any command-line flag overrides both. The step is `compute_losses` (train_step.py), its
stages are in pipeline.py; what keeps a run safe (atomic checkpoints, exact resume, one run per
work dir, DDP, signals, the stop on a non-finite loss) is in runner.py, which a reader of the
method can skip. Importing this module starts nothing.

The authors' final release differs from the paper: it leaves out the dense-CRF loss L_reg
(paper §3.4), whose C++ filter would not build for users; here it is on (`--reg-weight 0.01`, the
paper's full system, in plain PyTorch: crf_loss.py), and `--reg-weight 0` is that release. The
switches `--seg-label`, `--aff-weight 0` and `--propagate-with` rerun the rows of the paper's
ablation tables (ablation.py runs them all). As in the release, the CAM passes run in train mode
on every iteration, the classification-only phase included, and update the decoder's BatchNorm
statistics (`--no-cam-bn-stats` skips that: faster, other eval-mode numbers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import NamedTuple

import spin_count  # noqa: F401  (first: it sets OpenMP's spin count before torch loads)

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import synthetic
from config import PRESETS, Config, ConfigError, note, parse_flags
from metrics import format_metrics, metrics_table, validate
from model import AFANet
from par import PAR
from pipeline import LabelSettings, choose_paths
from pretrained import load_pretrained
from runner import (BatchFailed, CutShort, Resumed, Run, StepSampler, StepStart, StopSignal,
                    TrainStream, agree, agreed_batch, agreed_batches, check_new_run,
                    check_work_dir_writable, compile_and_wrap, control_group, data_workers,
                    exit_code, keep_freed_memory, leave_stop_signals_to_main,
                    nothing_left_on_failure, one_line, rank_0_log, resume_from, run_config, save,
                    set_cuda_math, setup_distributed, shard_loader, start_work_dir, stop_at_once,
                    stop_after_error, stop_nonfinite, stop_on_failure, stop_on_signal,
                    warn_if_bf16_is_emulated, worker_deaths_read_with_batches, write_metrics)
from train_step import build_optimizer, compute_losses, freeze_encoder_norms, make_autocast, update
from visualize import class_names_of, training_figure


# =============================================================================================
# Schedule (paper §4.1): linear warm-up, then polynomial decay
# =============================================================================================
def lr_factor(step: int, warmup_iters: int, total_iters: int, warmup_ratio: float = 1e-6,
              power: float = 1.0) -> float:
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return max(0.0, 1 - step / total_iters) ** power


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> None:
    factor = lr_factor(step, cfg.warmup_iters, cfg.iters, cfg.warmup_ratio, cfg.poly_power)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


# =============================================================================================
# Set-up: data, model, loaders
# =============================================================================================
SYNTHETIC_HINT = "the synthetic preset is active; did you mean --data VOC2012?"


def build_datasets(cfg: Config):
    """(train set, val set) of the run. A mask with class ids the synthetic preset does not know,
    in a --data-root of the user's, most likely means a forgotten --data: the error says so."""
    cache_dir = os.path.join(cfg.work_dir, "cache")
    if cfg.data == "synthetic" and not os.path.isdir(cfg.data_root):
        own = cfg.data_root != PRESETS["synthetic"]["data_root"]
        print(f"building the built-in synthetic data set in {cfg.data_root}: "
              + ("the --data-root given does not exist (a typo? for your own data in VOC layout "
                 "pass --data VOC2012)" if own else "the first run (kept for later runs)"),
              file=sys.stderr)
        synthetic.make_synthetic(cfg.data_root)  # once; a set made with other sizes is kept
    common = dict(num_classes=cfg.num_classes, cache_dir=cache_dir)
    try:
        train_set = data.build_dataset(cfg.data, cfg.data_root, cfg.train_split, train=True,
                                       crop_size=cfg.crop, rescale_range=tuple(cfg.rescale),
                                       **common)
        val_set = data.build_dataset(cfg.data, cfg.data_root, cfg.val_split, train=False, **common)
    except data.DatasetError as e:
        own_root = cfg.data_root != PRESETS["synthetic"]["data_root"]
        if cfg.data == "synthetic" and own_root and "class ids" in str(e):
            raise data.DatasetError(f"{one_line(e)}; {SYNTHETIC_HINT}") from e
        raise
    return train_set, val_set


def load_datasets(cfg: Config, rank: int, world: int):
    """Every process builds the sets once: rank 0 first (it writes the synthetic set and the
    image-level label caches), the others after it, reading those caches."""
    if rank > 0:
        dist.barrier()
    sets = build_datasets(cfg)
    if rank == 0 and world > 1:
        dist.barrier()
    return sets


def warn_if_unlearnable(cfg: Config) -> None:
    """One line on stderr when the settings are the paper's but the weights are random."""
    if cfg.data != "synthetic" and not cfg.pretrained and not cfg.resume:
        print(f"warning: --data {cfg.data} without --pretrained: the encoder starts from random "
              f"weights, and with the paper's settings (lr {cfg.lr:g}, encoder norms frozen) it "
              "cannot learn; pass --pretrained mit_b1.pth (SegFormer's ImageNet-1k weights, see "
              "the README) or, from scratch, settings like the synthetic preset's (--lr 1e-3 "
              "--no-freeze-norm)", file=sys.stderr)


def build_model(cfg: Config, device: torch.device, world: int) -> AFANet:
    """AFANet on `device`: encoder from --pretrained (unless resuming), norms frozen if asked,
    synchronised BatchNorm across GPUs, its implementation chosen (--speed-paths)."""
    model = AFANet(cfg.num_classes, backbone=cfg.backbone)
    if cfg.pretrained and not cfg.resume:
        try:
            loaded = load_pretrained(model.encoder, cfg.pretrained)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"--pretrained: {e}") from e
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"encoder initialised from {cfg.pretrained} ({loaded})")
    if cfg.freeze_norm:
        freeze_encoder_norms(model)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    choose_paths(model, cfg.speed_paths)     # the plain forms or fast.py's variants, once
    return model.to(device)


def make_loaders(cfg: Config, train_set, val_set, start_step: int, rank: int, world: int,
                 device: torch.device):
    """The training stream from `start_step` on (this process's share) and the val shard; on a
    GPU in page-locked memory, so that `to_device`'s copies run asynchronously."""
    workers, pin = data_workers(cfg.workers), device.type == "cuda"
    # A dedicated generator keeps the DataLoader from drawing on the global RNG (exact resume).
    loader = DataLoader(TrainStream(train_set, cfg.seed), batch_size=cfg.batch_size // world,
                        sampler=StepSampler(start_step, cfg.iters, cfg.batch_size, rank, world),
                        num_workers=workers, pin_memory=pin, generator=torch.Generator(),
                        worker_init_fn=leave_stop_signals_to_main, drop_last=False)
    return loader, shard_loader(val_set, cfg.val_batch_size, rank, world, workers, pin)


# =============================================================================================
# Training
# =============================================================================================
class TrainResult(NamedTuple):
    model: AFANet                # the trained network (unwrapped)
    metrics: dict                # the last validation scores


def train(cfg: Config, resumed: Resumed | None = None) -> TrainResult:
    """Run the whole training (or its remainder: `resumed`, or the checkpoint cfg.resume names)."""
    keep_freed_memory()                      # fewer page faults: the same numbers, faster
    rank, world, device = setup_distributed(cfg)
    set_cuda_math(device, cfg.tf32, benchmark=True)  # training crops all have one size
    log = print if rank == 0 else (lambda *a, **k: None)
    check_new_run(cfg)
    if world > 1:
        dist.barrier()                       # every process has looked before rank 0 writes
    if rank == 0:
        check_work_dir_writable(cfg.work_dir)
    with nothing_left_on_failure(cfg.work_dir, rank):
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        train_set, val_set = load_datasets(cfg, rank, world)
        model = build_model(cfg, device, world)
        if rank == 0:
            warn_if_unlearnable(cfg)
            warn_if_bf16_is_emulated(cfg, device)
        optimizer = build_optimizer(model, cfg)
        autocast, scaler = make_autocast(cfg, device)
        start_step, history, overrides = resume_from(cfg, model, optimizer, scaler, log, resumed,
                                                     rank, world, device)
    if rank == 0:                            # data, weights and checkpoint loaded: now it is a run
        start_work_dir(cfg, start_step, overrides)
        log("config:\n" + "\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(cfg).items()))
        warn_if_classification_only(cfg)
    if world > 1:
        dist.barrier()
    net = compile_and_wrap(model, cfg, device, world, log=log)
    run = Run(cfg, rank, world, device, model, net, PAR(num_iter=cfg.par_iters).to(device),
              optimizer, autocast, scaler, history, overrides=overrides,
              control=control_group(world, device))
    loader, val_loader = make_loaders(cfg, train_set, val_set, start_step, rank, world, device)
    t_start = time.time()
    metrics = train_loop(run, loader, val_loader, val_set, start_step)
    if rank == 0 and history:
        print(metrics_table(history))
        print(f"done in {time.time() - t_start:.0f} s; checkpoints in {cfg.work_dir}/checkpoints")
        if run.times.summary():                  # nothing ran: a finished run resumed
            print(f"speed on this machine: {run.times.summary()}")
    if world > 1:
        dist.destroy_process_group()
    return TrainResult(model, metrics)


def warn_if_classification_only(cfg: Config) -> None:
    """One line when the run ends before its first step with pseudo labels (step cam_iters + 1)."""
    if cfg.iters <= cfg.cam_iters + 1:
        note(f"--iters {cfg.iters} ends within the classification-only phase (--cam-iters "
             f"{cfg.cam_iters}): this run trains the classifier alone, without pseudo labels, "
             "L_seg or L_aff")


def train_loop(run: Run, loader, val_loader, val_set, start_step: int) -> dict:
    """Steps start_step … iters−1: the step, its update, the log; validation and checkpoints
    every eval_every. Every process stops at the same step, with a checkpoint of the last
    completed one, after a non-finite loss, on SIGINT / SIGTERM (during validation at once), or
    when reading a batch fails on any of them. Returns the last validation's scores."""
    cfg = run.cfg
    bar = tqdm(total=cfg.iters, initial=start_step, disable=not run.is_main, dynamic_ncols=True,
               desc="train")
    running, started = {}, time.time()
    metrics = run.history[-1] if run.history else {}
    done, batches = start_step, iter(loader)  # steps completed; this process's batches
    stop = StopSignal.install()
    try:
        with worker_deaths_read_with_batches():  # reported by the next read, agreed
            if validation_missing(run, start_step):  # a stop cut it short: it comes first
                metrics = validate_and_save(run, val_loader, val_set, start_step, stop)
            for step in range(start_step, cfg.iters):
                batch = to_device(agreed_batch(run, batches), run.device)
                set_lr(run.optimizer, step, cfg)
                before = StepStart.take(run.model, run.device)  # undone if the step cannot complete
                step_started = time.perf_counter()
                out = compute_losses(run.net, run.model, run.par, batch, step, cfg, run.autocast)
                # One host sync per step: the loss values, for the log and the finiteness check.
                values = dict(zip(out.terms, torch.stack(list(out.terms.values())).tolist()))
                signum, nonfinite = agree(run, stop.signum or 0,
                                          not all(map(math.isfinite, values.values())))
                if nonfinite:
                    stop_nonfinite(run, step, values, before)
                update(run.optimizer, run.scaler, out.loss)
                done = step + 1
                run.times.add("classification-only steps" if step <= cfg.cam_iters
                              else "full steps", time.perf_counter() - step_started)
                running = log_progress(run, bar, running, values, done, started)
                if done % cfg.eval_every == 0 or done == cfg.iters:
                    metrics = validate_and_save(run, val_loader, val_set, done, stop)
                if signum:
                    stop_on_signal(run, bar, done, signum)
    except CutShort:
        stop_on_signal(run, bar, done, stop.signum, cut_short=True)
    except BatchFailed as failure:
        stop_on_failure(run, bar, done, failure.error, failure.failed)
    except KeyboardInterrupt:
        stop_at_once(run, done)
    except Exception as error:  # under DDP: which process failed first, said once
        stop_after_error(run, error)
    finally:  # also on an error: the bar ends before the message, the signals are the caller's
        bar.close()
        stop.restore()
    return metrics


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def log_progress(run: Run, bar, running: dict, values: dict, done: int, started: float) -> dict:
    """Accumulate the loss values; every log_every steps one line in log.jsonl and on the bar.
    Returns the running sums (emptied after each line)."""
    cfg = run.cfg
    for k, v in values.items():
        running[k] = running.get(k, 0.0) + v
    running["n"] = running.get("n", 0) + 1
    bar.update(1)
    if done % cfg.log_every and done != cfg.iters:
        return running
    means = {k: v / running["n"] for k, v in running.items() if k != "n"}
    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
    if run.is_main:
        with open(os.path.join(cfg.work_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": done, "lr": run.optimizer.param_groups[0]["lr"], **means,
                                "time": time.time() - started}) + "\n")
    return {}


def validation_missing(run: Run, step: int) -> bool:
    """Whether the validation after `step` is due but not in the history (a stop cut it short)."""
    due = step > 0 and (step % run.cfg.eval_every == 0 or step == run.cfg.iters)
    return due and not any(m["step"] == step for m in run.history)


def validate_and_save(run: Run, val_loader, val_set, step: int, stop: StopSignal) -> dict:
    """The validation scores (metrics.json, a line on screen), the figures, a checkpoint. A stop
    signal during the validation and the figures cuts them short (single process: under DDP
    every process must finish the validation's collectives)."""
    cfg = run.cfg
    validation_started = time.perf_counter()
    run.model.eval()
    settings = LabelSettings.from_config(cfg, run.model)
    with stop.cutting_short(allowed=run.world == 1):  # under DDP: agreed per batch
        scores = validate(run.model, agreed_batches(run, val_loader, stop), cfg.num_classes,
                          run.device, settings, world=run.world)
        if run.is_main and cfg.num_figures > 0:
            training_figure(run.model, run.par, val_set, range(min(cfg.num_figures, len(val_set))),
                            os.path.join(cfg.work_dir, "figures", f"val_iter_{step}.png"),
                            run.device, class_names_of(cfg.data, cfg.num_classes), settings)
    run.model.train()
    metrics = {"step": step, **scores}
    run.history.append(metrics)
    if run.is_main:
        write_metrics(cfg.work_dir, run.history)
        tqdm.write(format_metrics(metrics))
    save(run, step)
    run.times.add("validation", time.perf_counter() - validation_started)
    return metrics


# =============================================================================================
# Command line
# =============================================================================================
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    summary = __doc__.split("\n")[0]
    return exit_code(lambda: train(*run_config(parse_flags(argv, summary), log=rank_0_log)),
                     debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

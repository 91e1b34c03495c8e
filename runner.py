"""How train.py runs, apart from what it computes: a reader of the method can skip this file.

Each guarantee of a training run lives here, tested in tests/test_train.py,
tests/test_reliability.py, tests/test_exits.py and (under torchrun) tests/test_train_e2e.py:
- exact resume: the training set is a stream seeded by (seed, position) (`TrainStream`,
  `StepSampler`), every checkpoint carries every RNG state (`rng_state`), and `resume_from` puts
  them back, so a resumed run repeats the uninterrupted one number for number;
- atomic checkpoints: written to a temporary file and renamed (`save_checkpoint`), the last
  keep_ckpts periodic ones kept (`save`), read back with one clear message per failure;
- one run per work dir (`check_new_run`), written to only once data, weights and checkpoint have
  loaded (`start_work_dir`), its log cut back on resume (`trim_log`);
- processes: DDP set-up (`setup_distributed`), every process stopping at the same step (`agree`);
- stops that keep the work: SIGINT / SIGTERM save and exit with 128 + signal (`StopSignal`,
  `stop_on_signal`), a non-finite loss undoes its step and saves the weights before it
  (`StepStart`, `stop_nonfinite`), a data-loading worker's death ends in one line and a
  checkpoint of the last completed step (`deferred`, `stop_worker_died`); a signal during
  validation saves at once (`CutShort`), a second Ctrl-C stops in one line (`stop_at_once`);
- user errors as one line and exit code 2, and no data-loading worker outliving the script,
  however it ends (`exit_code`, `end_data_workers`);
- a warning when steps run far slower than at the start (`PhaseTimes`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import data
from config import Config, ConfigError


# =============================================================================================
# Data: the training set as a seeded stream, so that a resumed run sees the same batches
# =============================================================================================
class TrainStream(Dataset):
    """Item k of an endless stream of augmented training samples, a pure function of (seed, k).

    Epoch e = k // n visits the dataset in the order randperm(n, seed + e); the augmentation of
    item k draws from a generator seeded with (seed, k). Neither depends on worker processes or on
    where a run was resumed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._order = (None, None)  # (epoch, permutation) of the last epoch asked for

    def __len__(self):
        return sys.maxsize

    def __getitem__(self, k: int):
        n = len(self.dataset)
        epoch, position = divmod(k, n)
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=g))
        index = int(self._order[1][position])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 2_000_003 + k) % (2 ** 63))
            random.seed(k)
            return self.dataset[index]


class StepSampler(Sampler):
    """The stream positions this process reads for steps [start, end): its share of each batch."""

    def __init__(self, start: int, end: int, batch_size: int, rank: int, world: int):
        self.start, self.end, self.batch_size = start, end, batch_size
        self.per_rank, self.rank = batch_size // world, rank

    def __iter__(self):
        for step in range(self.start, self.end):
            first = step * self.batch_size + self.rank * self.per_rank
            yield from range(first, first + self.per_rank)

    def __len__(self):
        return (self.end - self.start) * self.per_rank


def shard_loader(dataset: Dataset, batch_size: int, rank: int, world: int, workers: int,
                 pin_memory: bool = False):
    """This process's share of an evaluation set: items rank, rank + world, … (no repeats).
    `pin_memory` (for a GPU): batches in page-locked memory, so that copies to the GPU run
    asynchronously."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator(),
                      worker_init_fn=leave_stop_signals_to_main)


def leave_stop_signals_to_main(worker_id: int) -> None:
    """In a DataLoader worker: ignore SIGINT / SIGTERM. `timeout`, SLURM and Ctrl-C signal the
    whole process group; a worker killed by them would take the run down (a RuntimeError in the
    next forward) before the main process could save. The main process stops its workers when
    it exits."""
    for signum in StopSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# =============================================================================================
# Checkpoints: atomic writes, the last K kept, everything needed to resume exactly
# =============================================================================================
CHECKPOINT_NAME = re.compile(r"(iter|interrupted_iter|nonfinite_iter)_(\d+)\.pth")


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def rng_state() -> dict:
    """Every RNG the step draws on, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_torch_file(path: str, missing_hint: str, corrupt_hint: str = "use an earlier checkpoint"):
    """torch.load(path) on the CPU, with one clear message for a missing or unreadable file;
    `missing_hint` / `corrupt_hint` end those messages."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist; {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt, "
                          f"truncated or not a PyTorch file — {corrupt_hint}") from e


def load_checkpoint(path: str, missing_hint: str = "pass the path of a .pth written by train.py "
                    "(work_dir/checkpoints/), or --resume auto") -> dict:
    """Read a checkpoint written by train.py, with one clear message for each failure;
    `missing_hint` ends the message for a file that does not exist."""
    ckpt = read_torch_file(path, missing_hint)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"checkpoint {path} was not written by train.py (no 'model'/'config' "
                          "entries); for SegFormer ImageNet weights use --pretrained instead")
    return ckpt


def check_compatible(ckpt: dict, cfg: Config, path: str) -> None:
    saved = ckpt["config"]
    for key in ("backbone", "num_classes"):
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(f"checkpoint {path} was made with {key}={saved.get(key)} but this "
                              f"run has {key}={getattr(cfg, key)}; pass --{key.replace('_', '-')} "
                              f"{saved.get(key)} or use a matching checkpoint")


def checkpoints(work_dir: str, kinds=("iter", "interrupted_iter", "nonfinite_iter")) -> list:
    """Paths of the run's checkpoints of these kinds, oldest first (by step, then by time)."""
    folder = os.path.join(work_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and match.group(1) in kinds:
            path = os.path.join(folder, name)
            found.append((int(match.group(2)), os.path.getmtime(path), path))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(work_dir: str) -> str | None:
    """The newest checkpoint of any kind (periodic, interrupted, non-finite), by step."""
    found = checkpoints(work_dir)
    return found[-1] if found else None


def resume_from(cfg: Config, model: torch.nn.Module, optimizer, scaler, log) -> tuple:
    """(start step, validation history): from --resume (a path, or 'auto': the newest checkpoint
    in the work dir), or (0, []) for a new run."""
    path = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and path is None:
        log(f"--resume auto: no checkpoint in {cfg.work_dir}/checkpoints, starting afresh")
    if not path:
        return 0, []
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, cfg, path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    log(f"resumed from {path} at iteration {ckpt['step']}")
    if ckpt["step"] >= cfg.iters:
        log(f"nothing to do: the checkpoint is at iteration {ckpt['step']} of {cfg.iters}")
    return ckpt["step"], ckpt.get("history", [])


# =============================================================================================
# The work dir: one run per folder
# =============================================================================================
RUN_FILES = ("log.jsonl", "metrics.json")  # with a checkpoint, what makes a folder a run's


def existing_run_files(work_dir: str) -> list:
    """The files of a run already in `work_dir` (log, metrics, checkpoints). config.json alone,
    left by a start that failed, and the label cache do not count: a corrected retry may go on."""
    files = [os.path.join(work_dir, n) for n in RUN_FILES if os.path.isfile(os.path.join(work_dir, n))]
    return files + checkpoints(work_dir)


def check_new_run(cfg: Config) -> None:
    """A run without --resume must not write into another run's folder: refuse in one line."""
    if cfg.resume or cfg.overwrite:
        return
    found = existing_run_files(cfg.work_dir)
    if found:
        names = ", ".join(os.path.relpath(p, cfg.work_dir) for p in found[:3])
        raise ConfigError(f"work dir {cfg.work_dir} already holds a run ({names}"
                          f"{', ...' if len(found) > 3 else ''}); continue it with --resume auto, "
                          "start it over with --overwrite, or pass another --work-dir")


def check_work_dir_writable(work_dir: str) -> None:
    """Rank 0, before anything is loaded: the folder (and its checkpoints/) exists and takes files."""
    try:
        os.makedirs(os.path.join(work_dir, "checkpoints"), exist_ok=True)
        probe = os.path.join(work_dir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"work dir {work_dir} is not writable ({e.strerror}); pass "
                          "--work-dir with a folder you can write to") from e


def start_work_dir(cfg: Config, start_step: int) -> None:
    """Rank 0, once data, weights and checkpoint have loaded (a start that fails writes nothing):
    with --overwrite the old run's files and figures go, on resume the log is cut back to the
    checkpoint; config.json is written."""
    if cfg.overwrite and not cfg.resume:
        figures = os.path.join(cfg.work_dir, "figures")
        old_figures = [os.path.join(figures, n) for n in os.listdir(figures)] \
            if os.path.isdir(figures) else []
        for path in existing_run_files(cfg.work_dir) + old_figures:
            os.remove(path)
    if cfg.resume:
        trim_log(cfg.work_dir, start_step)
    with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def trim_log(work_dir: str, start_step: int) -> None:
    """A resumed run continues the log from its checkpoint: later lines (of the steps it will
    run again) go."""
    path = os.path.join(work_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def write_metrics(work_dir: str, history: list) -> None:
    """metrics.json: the latest validation at the top level, every validation under 'history'."""
    path = os.path.join(work_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**history[-1], "history": history}, f, indent=2)
    os.replace(tmp, path)


# =============================================================================================
# Set-up: processes, devices, compilation
# =============================================================================================
def setup_distributed(cfg: Config):
    """(rank, world size, device); under torchrun the process group too: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: no CUDA device here; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if world > 1:
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} "
                              "processes; use a multiple of the process count")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    if rank == 0:
        print(device_line(device, world))
        if cfg.device == "auto":
            warn_if_no_gpu(cfg.data, device)
    if world > 1 and rank == 0:
        print(f"distributed: {world} processes, backend {backend}, {cfg.batch_size // world} "
              f"images per process per iteration ({cfg.batch_size} in all)")
    return rank, world, device


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a cluster's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def data_workers(requested: int) -> int:
    """--workers: as given, or for -1 the cores per training process on this machine (torchrun's
    LOCAL_WORLD_SIZE processes share them), at least 1, at most 8: each worker holds its own
    prefetched batches in memory, and a few keep a GPU fed. Two cores, one process: 2."""
    if requested >= 0:
        return requested
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, usable_cores() // processes))


def device_line(device: torch.device, processes: int) -> str:
    """"device: cuda:0 (NVIDIA A100-SXM4-40GB), 4 processes" or "device: cpu, 1 process": which
    device runs, said first, so that a run that fell back to the CPU shows it at once."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"device: {device}{name}, {processes} process{'es' if processes > 1 else ''}"


def warn_if_no_gpu(data_name: str, device: torch.device) -> None:
    """One line on stderr when a VOC 2012 or COCO run fell back to the CPU (--device auto found no
    GPU): why, where torch can tell, and what to install."""
    if device.type != "cpu" or data_name not in ("VOC2012", "COCO"):
        return
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of "
               "torch (the pip command for your CUDA version is on https://pytorch.org/get-started/"
               "locally/)")
    else:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        why = (f"this torch ({torch.__version__}, built for {built}) sees no GPU: no driver or no "
               "GPU visible; check nvidia-smi and CUDA_VISIBLE_DEVICES")
    print(f"warning: no GPU was found, so this {data_name} run is on the CPU, many times slower: "
          f"{why}", file=sys.stderr)


def set_cuda_math(device: torch.device, tf32: bool, benchmark: bool) -> None:
    """On a GPU: float32 matrix multiplies and convolutions in TF32 (`tf32`; Ampere GPUs and later,
    as the release ran under torch 1.7, whose default it was: the products on the tensor cores
    with 10-bit mantissas, the sums in float32), and cuDNN's autotuner (`benchmark`), which picks the fastest
    convolution algorithm per input shape: worth it where the shapes repeat (training's fixed crop),
    not where every image has its own size. On a CPU nothing changes."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark


def keep_freed_memory() -> bool:
    """Let the process keep the memory it frees, for the next step's tensors (glibc on Linux).

    By default glibc gives each block above its mmap threshold (128 KiB, rising to 32 MiB) back
    to the system when it is freed, and maps it anew for the next tensor of that size, so every
    step pays a page fault and the kernel's zeroing for each 4 KiB page of its large activations
    (tens of thousands of faults a step; docs/demo_study.md, round 4). With mmap off and the heap
    never trimmed, those pages are reused once the heap has settled (a few steps). The numbers are
    untouched; the peak memory grows by the heap's fragmentation. Elsewhere (macOS, Windows,
    musl) nothing changes; AFA_DEFAULT_MALLOC=1 in the environment keeps glibc's default.
    Returns whether the setting took effect."""
    if os.environ.get("AFA_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (x86: AVX512-BF16 or AMX); elsewhere, where
    PyTorch cannot tell, assumed so."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")]
    return not all(checks) or any(check() for check in checks)


def warn_if_bf16_is_emulated(cfg: Config, device: torch.device) -> None:
    """One line on stderr when --amp / --cam-bf16 would run bf16 on a CPU that emulates it."""
    flags = [flag for flag, on in (("--amp", cfg.amp), ("--cam-bf16", cfg.cam_bf16)) if on]
    if flags and device.type == "cpu" and not cpu_has_native_bf16():
        print(f"warning: {' and '.join(flags)}: this CPU has no bf16 instructions (AVX512-BF16 or "
              "AMX), so bf16 is emulated and makes the step several times slower, not faster; "
              f"drop {' and '.join(flags)}", file=sys.stderr)


def compile_and_wrap(model: torch.nn.Module, cfg: Config, device: torch.device, world: int):
    """The module the loop calls: `model`, compiled if asked, inside DDP when distributed."""
    if cfg.compile:
        # One graph per input shape: the multi-scale CAM feeds the encoder 3 more shapes than the
        # training forward, and with dynamic shapes inductor fails on the encoder (torch 2.13).
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


# =============================================================================================
# The run: what the loop works with; saving, agreeing, stopping
# =============================================================================================
class PhaseTimes:
    """Wall-clock seconds per phase of the run, for the speed line at its end: a user can tell a
    slow machine from a slow program. When a phase's steps run far slower than its first steps
    did (another program took the cores), one line on stderr says why and what to do."""

    PHASES = ("classification-only steps", "full steps", "validation")
    PACE = slice(2, 10)      # the steps of a phase whose median is its pace (after two warm-ups)
    RECENT = 10              # the last steps compared with it
    SLOWER = 4.0             # how many times slower counts as "far slower"

    def __init__(self, warn: Callable[[str], None] | None = None):
        self.seconds, self.counts, self.steps = {}, {}, {}
        self.warn = warn or (lambda line: tqdm.write(line, file=sys.stderr))
        self.warned = False

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.counts[phase] = self.counts.get(phase, 0) + 1
        if phase == "validation" or self.warned:
            return
        steps = self.steps.setdefault(phase, [])
        steps.append(seconds)
        if len(steps) < self.PACE.stop + self.RECENT:
            return
        pace, recent = (float(np.median(s)) for s in (steps[self.PACE], steps[-self.RECENT:]))
        del steps[self.PACE.stop:-self.RECENT]
        if recent > self.SLOWER * pace:
            self.warned = True
            self.warn(f"warning: {phase} now take {recent:.2f} s, {recent / pace:.0f}× the "
                      f"{pace:.2f} s of this run's first ones: another program is using the CPU "
                      "(see top). Threads of programs that share cores wait for each other far "
                      "beyond a fair share: run one job at a time, or give each fewer threads "
                      "(OMP_NUM_THREADS=1 before the command).")

    def summary(self) -> str:
        """"classification-only steps 0.30 s/it (201), full steps 0.74 s/it (399), validation
        8.10 s (3)": the phases run so far, in the order of PHASES."""
        return ", ".join(f"{phase} {self.seconds[phase] / self.counts[phase]:.2f} "
                         f"s{'' if phase == 'validation' else '/it'} ({self.counts[phase]})"
                         for phase in self.PHASES if phase in self.counts)


@dataclass
class Run:
    """What the loop works with, built once by `train`."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module        # the network, model.AFANet (unwrapped)
    net: torch.nn.Module          # what the forward calls: the model, or its DDP wrapper
    par: torch.nn.Module          # par.PAR
    optimizer: torch.optim.Optimizer
    autocast: Callable            # () -> the forward's autocast context
    scaler: torch.amp.GradScaler | None
    history: list                 # every validation so far
    times: PhaseTimes = field(default_factory=PhaseTimes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def save(run: Run, step: int, name: str | None = None) -> str | None:
    """Rank 0 writes the checkpoint `name` (default iter_<step>.pth) and keeps the last
    keep_ckpts periodic ones; returns its path (None on the other processes)."""
    if not run.is_main:
        return None
    path = os.path.join(run.cfg.work_dir, "checkpoints", name or f"iter_{step}.pth")
    save_checkpoint(path, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step,
        "config": dataclasses.asdict(run.cfg), "rng": rng_state(), "history": run.history,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None})
    periodic = checkpoints(run.cfg.work_dir, kinds=("iter",))
    for old in periodic[:-run.cfg.keep_ckpts]:
        os.remove(old)
    return path


def agree(run: Run, signum: int | None, finite: bool) -> tuple:
    """(signal number or 0, all finite) agreed by every process, so that all stop at one step."""
    if run.world == 1:
        return signum or 0, finite
    flags = torch.tensor([signum or 0, 0 if finite else 1], device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), not bool(flags[1])


class StepStart(NamedTuple):
    """What a step changes before its update: the norms' running statistics (a few hundred
    numbers) and the random state. Kept so that a step that cannot finish is undone before a
    checkpoint is saved, and resuming from it repeats the step exactly."""
    buffers: list
    rng: dict

    @classmethod
    def take(cls, model: torch.nn.Module) -> StepStart:
        return cls([b.clone() for b in model.buffers()], rng_state())

    def restore(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for b, kept in zip(model.buffers(), self.buffers):
                b.copy_(kept)
        set_rng_state(self.rng)


@contextlib.contextmanager
def deferred(signum: int):
    """Hold back the Python handler of `signum` until the block is over (then run it once), so
    that an exception it raises (DataLoader's on SIGCHLD) cannot cut an optimizer step in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signum, lambda s, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signum, previous)
        if caught and callable(previous):
            previous(signum, caught[-1])


def stop_nonfinite(run: Run, step: int, values: dict, before: StepStart) -> None:
    """Undo the step's statistics, save the weights from before it, stop with one line."""
    before.restore(run.model)
    name = f"nonfinite_iter_{step}.pth"
    path = save(run, step, name=name) or os.path.join(run.cfg.work_dir, "checkpoints", name)
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
    where = f" (on one of the {run.world} processes; this one's losses)" if run.world > 1 else ""
    raise FloatingPointError(
        f"non-finite loss at iteration {step}{where}: {values}. The weights before this step are "
        f"saved in {path}; lower --lr or try without --amp, then --resume it.")


def stop_on_signal(run: Run, bar, done: int, signum: int, cut_short: bool = False) -> None:
    """After the first SIGINT / SIGTERM: save, say how to continue, exit with 128 + signal.
    `cut_short`: the signal stopped the validation after iteration `done`, which the resumed run
    does first."""
    path = save(run, done, name=f"interrupted_iter_{done}.pth")
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
        dist.destroy_process_group()
    bar.close()
    if run.is_main:
        validation = "; its validation was cut short and runs first on resume" if cut_short else ""
        print(f"\ninterrupted after iteration {done} ({signal.Signals(signum).name}); saved "
              f"{path}{validation}; continue with --resume auto (or --resume {path})", flush=True)
    raise SystemExit(128 + signum)


class WorkerDied(Exception):
    """A data-loading worker process died (most often killed by the system for lack of memory)."""


def stop_worker_died(run: Run, done: int, before: StepStart | None, error: RuntimeError) -> None:
    """Undo the step in progress, save the state after the last completed one, stop with one
    line. Under DDP only rank 0 writes; another rank names the newest checkpoint there is."""
    if before is not None:
        before.restore(run.model)
    path = save(run, done, name=f"interrupted_iter_{done}.pth")
    saved = (f"the state after iteration {done} is saved in {path}" if path else
             f"the newest checkpoint is {latest_checkpoint(run.cfg.work_dir)}")
    what = one_line(error).rstrip(". ")
    raise WorkerDied(
        f"a data-loading worker died ({what}), most often because the system ran out of "
        f"memory: lower --workers or --batch-size. {saved}; continue with --resume auto")


class StopSignal:
    """The first SIGINT (Ctrl-C) or SIGTERM (a cluster's time limit or preemption) asks the loop
    to finish its step, save a checkpoint and exit; inside `cutting_short()` (validation) it stops
    the work at once instead (`CutShort`), as nothing there needs finishing. A second Ctrl-C stops
    at once (KeyboardInterrupt). A second SIGTERM changes nothing: torchrun passes its own SIGTERM
    on to the ranks that the group's already reached, and SLURM follows its SIGTERM with a
    SIGKILL anyway."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.cut_short = False

    @classmethod
    def install(cls) -> StopSignal:
        stop = cls()
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread
            for signum in cls.SIGNALS:
                stop.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, stop.handle)
        return stop

    def handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.cut_short:
            raise CutShort
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this iteration"
                   f"{again}")

    @contextlib.contextmanager
    def cutting_short(self, allowed: bool = True):
        """A stop signal inside the block raises `CutShort` at once (when `allowed`)."""
        self.cut_short = allowed
        try:
            if allowed and self.signum is not None:
                raise CutShort
            yield
        finally:
            self.cut_short = False

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:
                signal.signal(signum, handler)


class CutShort(Exception):
    """A stop signal arrived during work that can be dropped (validation): save and exit now."""


class StoppedAtOnce(Exception):
    """A second Ctrl-C: the run stopped without saving."""


def stop_at_once(run: Run, done: int) -> None:
    """After a second Ctrl-C: no save; one line that says what is kept and what is lost."""
    if not run.is_main:
        raise SystemExit(128 + signal.SIGINT)
    kept = latest_checkpoint(run.cfg.work_dir)
    kept_step = int(CHECKPOINT_NAME.fullmatch(os.path.basename(kept)).group(2)) if kept else 0
    what = (f"kept: {kept} (iteration {kept_step}), continue with --resume auto" if kept else
            "no checkpoint was written yet")
    lost = (f"; lost: iterations {kept_step + 1}–{done}" if done > kept_step else "")
    raise StoppedAtOnce(f"stopped at once by a second Ctrl-C after iteration {done}; {what}{lost}")


# =============================================================================================
# Command line
# =============================================================================================
USER_ERRORS = (ConfigError, data.DatasetError, FloatingPointError, WorkerDied)


def one_line(error: Exception) -> str:
    """The message of a user error; one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the original message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def exit_code(command: Callable[[], object], debug: bool) -> int:
    """Run `command()`: 0 when it returns; a user error is printed as one line "error: …" and
    gives 2 (with `debug`, it is raised with its traceback); Ctrl-C gives one line and 130.
    However it ends, no data-loading worker outlives it (`end_data_workers`)."""
    try:
        command()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except (StoppedAtOnce, KeyboardInterrupt) as e:
        if debug:
            raise
        print(f"\n{str(e) or 'stopped by Ctrl-C'}", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        end_data_workers()
    return 0


def end_data_workers() -> None:
    """Kill the data-loading workers that are still alive when a script ends.

    A DataLoader shuts its workers down when its iterator is freed, but an error raised in the
    loop keeps the iterator alive in its traceback until the interpreter exits; multiprocessing's
    exit handler then ends the workers with SIGTERM, which they ignore
    (`leave_stop_signals_to_main`), and waits for them forever. Nothing is lost: a worker holds
    no state of the run."""
    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # DataLoader's handler would call it a crash
    for child in children:
        child.kill()
    for child in multiprocessing.active_children():
        child.join(timeout=10)

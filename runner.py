"""How train.py runs, apart from what it computes: a reader of the method can skip this file.

Each guarantee of a training run lives here, tested in tests/test_train.py,
tests/test_reliability.py, tests/test_exits.py and (under torchrun) tests/test_train_e2e.py:
- exact resume: the training set is a stream seeded by (seed, position) (`TrainStream`,
  `StepSampler`), every checkpoint carries every process's RNG streams (`gather_rng_states`),
  and `resume_from` gives each process its own back, so a resumed run repeats the uninterrupted
  one number for number; a resumed run continues with its saved settings (`run_config`);
- atomic checkpoints: written to a temporary file and renamed (`save_checkpoint`), the last
  keep_ckpts periodic ones kept (`save`), read back with one clear message per failure;
- one run per work dir (`check_new_run`), written to only once data, weights and checkpoint have
  loaded (`start_work_dir`), its log cut back on resume (`trim_log`);
- processes: DDP set-up (`setup_distributed`), every process stopping at the same step (`agree`);
- stops that keep the work: SIGINT / SIGTERM save and exit with 128 + signal (`StopSignal`,
  `stop_on_signal`), a non-finite loss undoes its step and saves the weights before it
  (`StepStart`, `stop_nonfinite`), a data-loading worker's death ends in one line and a
  checkpoint of the last completed step (`worker_deaths_read_with_batches`); under DDP every
  process agrees before each step and at each validation batch, so that a failed read on one
  stops all with that checkpoint (`agreed_batch`, `agreed_batches`, `stop_on_failure`); a
  signal during validation saves at once (`CutShort`), a second Ctrl-C stops in one line
  (`stop_at_once`); an error in one process's step is named once by the others
  (`stop_after_error`);
- user errors as one line and exit code 2, and no data-loading worker outliving the script,
  however it ends (`exit_code`, `end_data_workers`);
- a warning when steps run far slower than at the start (`PhaseTimes`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
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
from config import PRESETS, Config, ConfigError, config_from_flags, resumed_config


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


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG streams (CPU, Python, NumPy, and `device`'s when it is a GPU), in types
    that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Put back `rng_state`'s streams; the GPU stream onto `device` where both have one."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # a checkpoint that saved every visible GPU's stream
        index = (device.index or 0) if device is not None else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def gather_rng_states(rank: int, world: int, device: torch.device) -> list | None:
    """Every process's `rng_state`, in rank order, on rank 0 (None on the others): a checkpoint
    keeps each process's own streams."""
    state = rng_state(device)
    if world == 1:
        return [state]
    states = [None] * world if rank == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def restore_rng_states(saved, rank: int, world: int, device: torch.device, log) -> None:
    """Give this process its own saved streams. `saved` is the list of `gather_rng_states` (a
    single dict: a checkpoint of one process). Resumed on another process count, process r takes
    stream r mod (saved count): the run continues, but not number for number as the
    uninterrupted one would, which needs the same count; one line says so."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        log(f"note: the checkpoint was saved by {len(states)} process(es) and this run has "
            f"{world}: it continues, but exact resume (the numbers of an uninterrupted run) "
            f"needs {len(states)} process(es)")
    set_rng_state(states[rank % len(states)], device)


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


def rank_0_log(*args, **kwargs) -> None:
    """print, on the first process alone (before the process group exists: torchrun's RANK)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


class Resumed(NamedTuple):
    """A run to continue: its checkpoint, read once, and the settings typed flags changed."""
    checkpoint: dict
    overrides: dict              # field -> (the run's value, the value from now on)


def run_config(given: dict, log=print) -> tuple:
    """(Config, Resumed or None) of the command's typed flags `given` (config.parse_flags).

    A new run: defaults ← preset ← flags. With --resume (a path, or 'auto': the newest checkpoint
    in the work dir): the run continues as it was configured, its saved settings the base and a
    typed flag over them only where typed, each such override named in one line."""
    resume = given.get("resume")
    if resume:
        work_dir = given.get("work_dir") or PRESETS[given.get("data", Config.data)].get(
            "work_dir", Config.work_dir)
        path = latest_checkpoint(work_dir) if resume == "auto" else resume
        if path:
            ckpt = load_checkpoint(path)
            cfg, overrides = resumed_config(ckpt["config"], given)
            for name, (before, now) in overrides.items():
                log(f"override: --{name.replace('_', '-')} {now} (the run had {before}) from "
                    f"iteration {ckpt['step']} on")
            return dataclasses.replace(cfg, resume=path), Resumed(ckpt, overrides)
        log(f"--resume auto: no checkpoint in {work_dir}/checkpoints, starting afresh")
        given = {k: v for k, v in given.items() if k != "resume"}
    return config_from_flags(given), None


def resume_from(cfg: Config, model: torch.nn.Module, optimizer, scaler, log,
                resumed: Resumed | None = None, rank: int = 0, world: int = 1,
                device: torch.device | None = None) -> tuple:
    """(start step, validation history, override record): the state of `resumed` (or of the
    checkpoint cfg.resume names) loaded into model, optimizer and scaler, and this process's own
    RNG streams put back (`restore_rng_states`); (0, [], []) for a new run. The record lists each
    override with the iteration it took effect, the checkpoint's earlier ones first."""
    if resumed is None and not cfg.resume:
        return 0, [], []
    ckpt = resumed.checkpoint if resumed else load_checkpoint(cfg.resume)
    check_compatible(ckpt, cfg, cfg.resume)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng_states(ckpt["rng"], rank, world, device, log)
    log(f"resumed from {cfg.resume} at iteration {ckpt['step']}")
    if ckpt["step"] >= cfg.iters:
        log(f"nothing to do: the checkpoint is at iteration {ckpt['step']} of {cfg.iters}")
    record = ckpt.get("overrides", []) + [
        {"iteration": ckpt["step"], "setting": name, "was": before, "now": now}
        for name, (before, now) in (resumed.overrides if resumed else {}).items()]
    return ckpt["step"], ckpt.get("history", []), record


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
    """Rank 0, before anything is loaded: the folder, or the nearest folder above it that exists
    (where it will be made), takes files. Nothing is created: a start that fails leaves nothing."""
    folder = os.path.abspath(work_dir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"work dir {work_dir} is not writable ({folder} is not a folder you can "
                          "write to); pass --work-dir with a folder you can write to")


@contextlib.contextmanager
def nothing_left_on_failure(work_dir: str, rank: int):
    """A start that fails leaves no folder behind: the work dir (with the label cache written
    into it) is removed if this start created it."""
    existed = os.path.exists(work_dir)
    try:
        yield
    except BaseException:
        if rank == 0 and not existed and os.path.isdir(work_dir):
            shutil.rmtree(work_dir, ignore_errors=True)
        raise


def start_work_dir(cfg: Config, start_step: int, overrides: list) -> None:
    """Rank 0, once data, weights and checkpoint have loaded (a start that fails writes nothing):
    with --overwrite the old run's files and figures go, on resume the log is cut back to the
    checkpoint; config.json is written: the run's settings and, under "overrides", each setting
    a resume command changed, with the iteration from which it holds."""
    os.makedirs(os.path.join(cfg.work_dir, "checkpoints"), exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        figures = os.path.join(cfg.work_dir, "figures")
        old_figures = [os.path.join(figures, n) for n in os.listdir(figures)] \
            if os.path.isdir(figures) else []
        for path in existing_run_files(cfg.work_dir) + old_figures:
            os.remove(path)
    if cfg.resume:
        trim_log(cfg.work_dir, start_step)
    with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "overrides": overrides}, f, indent=2)


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


COMPILED = ("torch.compile ({backend}): the training forward and its backward (encoder, heads, "
            "decoder; one graph at the crop's shape); eager: the pseudo labels (the multi-scale "
            "CAM passes, PAR, the random walk), the losses, the optimizer step, validation")


def compile_and_wrap(model: torch.nn.Module, cfg: Config, device: torch.device, world: int, *,
                     backend: str = "inductor", log: Callable = print) -> torch.nn.Module:
    """The module the step's forward calls (`net`): `model`, inside DDP when distributed, and
    compiled (`backend`; one line through `log` says what runs compiled) with --compile.

    The compiled handle is a separate module around `model`; `model` itself stays eager, and
    the label chain and validation call it. So the compiled forward sees one input shape (the
    crop), validation's and evaluate.py's image sizes compile nothing, and the CAM passes run
    the speed variants' own block loops (fast.py), which compiling would not reach anyway
    through the encoder's forward. With dynamic shapes inductor fails on the encoder (torch
    2.13), hence `dynamic=False`. DDP is compiled inside, as PyTorch documents it: dynamo
    splits the graph at DDP's gradient buckets, so the all-reduce overlaps the backward."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, dynamic=False, backend=backend)
        log(COMPILED.format(backend=backend))
    return net


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
    net: torch.nn.Module          # what the forward calls: the model, or its DDP wrapper,
                                  # compiled with --compile (`compile_and_wrap`)
    par: torch.nn.Module          # par.PAR
    optimizer: torch.optim.Optimizer
    autocast: Callable            # () -> the forward's autocast context
    scaler: torch.amp.GradScaler | None
    history: list                 # every validation so far
    overrides: list = field(default_factory=list)  # what resume commands changed (config.json)
    control: object = None        # the process group of `agree` (gloo, CPU tensors); None: default
    times: PhaseTimes = field(default_factory=PhaseTimes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def save(run: Run, step: int, name: str | None = None) -> str:
    """The checkpoint `name` (default iter_<step>.pth), with every process's RNG streams: every
    process calls this; rank 0 writes it and keeps the last keep_ckpts periodic ones. Returns its
    path (on every process)."""
    path = os.path.join(run.cfg.work_dir, "checkpoints", name or f"iter_{step}.pth")
    rng = gather_rng_states(run.rank, run.world, run.device)
    if not run.is_main:
        return path
    save_checkpoint(path, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step,
        "config": dataclasses.asdict(run.cfg), "overrides": run.overrides, "rng": rng,
        "history": run.history,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None})
    periodic = checkpoints(run.cfg.work_dir, kinds=("iter",))
    for old in periodic[:-run.cfg.keep_ckpts]:
        os.remove(old)
    return path


def resume_command(cfg: Config) -> str:
    """The command that continues this run (its settings come from its checkpoint)."""
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launcher = f"torchrun --nproc_per_node {nproc} train.py" if nproc > 1 else "python train.py"
    return f"{launcher} --work-dir {cfg.work_dir} --resume auto"


def agree(run: Run, *flags: int) -> list:
    """The maximum of each integer flag over every process (one all-reduce of CPU numbers on the
    control group: no GPU synchronisation), so that all processes take one decision."""
    if run.world == 1:
        return list(flags)
    values = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=run.control)
    return values.tolist()


def control_group(world: int, device: torch.device):
    """The process group `agree` uses: the default one on CPU (gloo), a gloo group beside NCCL."""
    return dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None


class StepStart(NamedTuple):
    """What a step changes before its update: the norms' running statistics (a few hundred
    numbers) and the random state. Kept so that a step that cannot finish is undone before a
    checkpoint is saved, and resuming from it repeats the step exactly."""
    buffers: list
    rng: dict

    @classmethod
    def take(cls, model: torch.nn.Module, device: torch.device) -> StepStart:
        return cls([b.clone() for b in model.buffers()], rng_state(device))

    def restore(self, model: torch.nn.Module, device: torch.device) -> None:
        with torch.no_grad():
            for b, kept in zip(model.buffers(), self.buffers):
                b.copy_(kept)
        set_rng_state(self.rng, device)


@contextlib.contextmanager
def worker_deaths_read_with_batches():
    """Inside the block a data-loading worker's death is reported by the loader's next read
    (`next_batch`, between steps, where every process can agree to stop), not by DataLoader's
    SIGCHLD handler, which raises in the middle of whatever runs: a forward, a collective, an
    optimizer step. The read notices a dead worker within its status check (5 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    set_handler = getattr(torch.utils.data._utils.signal_handling, "_set_SIGCHLD_handler", None)
    if set_handler is not None:
        set_handler()  # installed once per process: a loader made inside the block does not
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def stop_nonfinite(run: Run, step: int, values: dict, before: StepStart) -> None:
    """Undo the step's statistics, save the weights from before it, stop with one line."""
    before.restore(run.model, run.device)
    path = save(run, step, name=f"nonfinite_iter_{step}.pth")
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
    where = f" (on one of the {run.world} processes; this one's losses)" if run.world > 1 else ""
    raise FloatingPointError(
        f"non-finite loss at iteration {step}{where}: {values}. The weights before this step are "
        f"saved in {path}; lower --lr or try without --amp, typed on the command that continues "
        f"the run: {resume_command(run.cfg)}")


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
              f"{path}{validation}; continue with: {resume_command(run.cfg)}", flush=True)
    raise SystemExit(128 + signum)


class WorkerDied(Exception):
    """A data-loading worker process died (most often killed by the system for lack of memory)."""


class PeerFailed(Exception):
    """Another process of the run failed: this one stopped with it."""


def next_batch(batches) -> tuple:
    """(batch, None), (None, None) at the end, or (None, the error) when reading it failed: a data
    error, a data-loading worker's death, or a bug in loading. Under DDP the processes then
    agree to stop together (`stop_on_failure`) instead of waiting on the one that failed."""
    try:
        return next(batches), None
    except StopIteration:
        return None, None
    except Exception as error:  # whatever it is, every process must hear of it
        return None, error


def stop_on_failure(run: Run, bar, done: int, error: Exception | None, failed: int) -> None:
    """Reading a batch failed on process `failed` (this one when `error` is not None): every
    process stops, the state after iteration `done` (the last completed step: the failing one
    had not started) is saved, and each process ends with one line. A data error or a worker's
    death is a user error (exit 2); another error keeps its traceback."""
    path = save(run, done, name=f"interrupted_iter_{done}.pth")
    if run.world > 1:
        dist.barrier()                          # the file is complete before anyone exits
        dist.destroy_process_group()
    bar.close()
    saved = f"the state after iteration {done} is saved in {path}"
    if error is None:
        raise PeerFailed(f"process {failed} of {run.world} stopped the run with an error (its "
                         f"message is above); {saved}")
    if isinstance(error, RuntimeError) and "DataLoader worker" in str(error):
        what = one_line(error).rstrip(". ")
        raise WorkerDied(
            f"a data-loading worker died ({what}), most often because the system ran out of "
            f"memory: lower --workers or --batch-size. {saved}; continue with: "
            f"{resume_command(run.cfg)}") from error
    if isinstance(error, USER_ERRORS):
        raise type(error)(f"{one_line(error).rstrip('. ')}; {saved}; once that is fixed, "
                          f"continue with: {resume_command(run.cfg)}") from error
    raise error


FAILED_KEY = "afa_failed"  # in the process group's store: "<rank>\t<error>" of a failed process


def default_store():
    """The store of the default process group (hosted by torchrun's agent, so it outlives any one
    process), or None."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None and dist.is_initialized() else None
    except (RuntimeError, ValueError):
        return None


def stop_after_error(run: Run, error: Exception) -> None:
    """An error raised in a step. Under DDP the other processes then fail in their next
    collective (the broken connection); each tells which it is: the first to fail writes its
    error into the store and raises it with its traceback; a process whose collective broke
    because another one failed ends with one line naming that process, its error and the
    newest checkpoint, instead of a traceback of its own."""
    store = default_store() if run.world > 1 else None
    if store is None or isinstance(error, USER_ERRORS):
        raise error
    try:  # the failed process writes its line before it exits, which breaks the collectives
        store.wait([FAILED_KEY], datetime.timedelta(seconds=2))
        failed, what = store.get(FAILED_KEY).decode().split("\t", 1)
    except RuntimeError:  # no other process failed first: this error is the cause
        store.set(FAILED_KEY, f"{run.rank}\t{type(error).__name__}: {one_line(error)}")
        raise error
    if int(failed) == run.rank:
        raise error
    kept = latest_checkpoint(run.cfg.work_dir)
    where = (f"the newest checkpoint is {kept}; continue with: {resume_command(run.cfg)}" if kept
             else "no checkpoint was written yet")
    raise PeerFailed(f"process {failed} of {run.world} failed ({what}), so this one stopped; "
                     f"{where}") from error


class BatchFailed(Exception):
    """Reading a batch failed on process `failed` (`error`: this process's error, or None)."""

    def __init__(self, error: Exception | None, failed: int):
        super().__init__(f"reading a batch failed on process {failed}")
        self.error, self.failed = error, failed


def agreed_batch(run: Run, batches):
    """The next training batch of this process, once every process has read its own: a failed
    read on any of them raises `BatchFailed` on all, before any collective of the step."""
    batch, error = next_batch(batches)
    (failed,) = agree(run, run.rank + 1 if error else 0)
    if failed:
        raise BatchFailed(error, failed - 1)
    return batch


def agreed_batches(run: Run, loader, stop: StopSignal):
    """The batches of `loader` (this process's shard of a validation), with every process
    agreeing after each one whether to go on: a stop signal on any process raises `CutShort`
    and a failed read `BatchFailed` on all of them at the same batch, so that none is left
    waiting in a collective. A process whose shard has ended keeps agreeing until all have."""
    batches = iter(loader)
    while True:
        batch, error = next_batch(batches)
        signum, failed, more = agree(run, stop.signum or 0, run.rank + 1 if error else 0,
                                     int(batch is not None))
        if failed:
            raise BatchFailed(error, failed - 1)
        if signum:
            raise CutShort
        if not more:
            return
        if batch is not None:
            yield batch


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
    what = (f"kept: {kept} (iteration {kept_step}), continue with: {resume_command(run.cfg)}"
            if kept else "no checkpoint was written yet")
    lost = (f"; lost: iterations {kept_step + 1}–{done}" if done > kept_step else "")
    raise StoppedAtOnce(f"stopped at once by a second Ctrl-C after iteration {done}; {what}{lost}")


# =============================================================================================
# Command line
# =============================================================================================
USER_ERRORS = (ConfigError, data.DatasetError, FloatingPointError, WorkerDied, PeerFailed)


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

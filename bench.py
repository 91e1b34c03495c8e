"""Speed and memory of one AFA training step, against the same network trained on given labels.

What a training step of AFA costs beyond learning itself (paper §3): the pseudo labels are made
on the fly — a multi-scale, flip-augmented CAM (7 image-equivalents of forward at the default
scales), PAR twice, a random walk — so the question is how the full step compares with the
network-only step that would train the same network on labels given in advance. This script
measures both in one run, on the same synthetic batch:

- **full step**: `compute_losses` after the label switch (every stage on: CAM, PAR label,
  affinity labels, random walk, AFA label), then backward and the AdamW step — the step that
  gives the release's numbers, the CAM passes updating the decoder's BatchNorm statistics;
- **network-only step**: the same forward, L_cls + 0.1·L_seg + 0.1·L_aff + 0.01·L_reg on fixed
  labels, backward, AdamW;
- the cost of those BatchNorm statistics: the full step and a step of the classification-only
  phase (where the CAM passes run for the statistics alone), each with and without them;
- each stage of the full step, to see where time goes: the step itself under torch.profiler, its
  stages the ranges labelled in compute_losses, make_pseudo_labels and update (`STAGES`), with
  L_reg (the dense-CRF energy loss, paper §3.4) as its own stage and its share of the step;
- with `--variants`, the full step with every speed variant of fast.py, with none, and with each
  one off alone, interleaved in one process: what each variant saves;
- PAR alone on one (1, 3, 160, 160) image with 3 masks, against the straightforward translation of
  paper §3.3 kept in tests/reference.py;
- with `--profile`, the full step's operators by self time (torch.profiler, CPU);
- peak memory: RSS on CPU, max allocated on CUDA. Every configuration runs in a fresh process,
  because the RSS high-water mark of a process never goes down; each keeps the memory it frees,
  as train.py does (`runner.keep_freed_memory`; AFA_DEFAULT_MALLOC=1 keeps glibc's default).

    python bench.py                              # crops 192, 320, 448; CPU, or CUDA when present
    python bench.py --crops 320 --steps 7 --json bench.json
    python bench.py --crops 320 448 --profile    # and the operators that take the time
    python bench.py --amp                        # bf16 autocast (fp16 on GPUs without bf16)
    python bench.py --compile                    # torch.compile the training forward
    python bench.py --no-tf32                    # on a GPU: strict float32 (TF32 by default)
    python bench.py --no-speed-paths             # the plain forms alone, as train.py's
    python bench.py --crops 320 448 --variants --no-stages --no-bn-stats
                                                 # what each speed variant of fast.py saves
    python bench.py --options reuse_forward_cam bf16_cam   # also the step with options that
                                                 # change its numbers (off in training)

Times are medians over `--steps` steps after `--warmup` steps. Random weights, batch 2, `mit_b1`
by default; the images are smooth random fields, the image-level labels 1–3 of 20 classes, the
second image's valid box a sub-box of the crop (as after padding a small image). The table also
gives the ratio of CPU times (all threads of the process), steadier than wall time when other jobs
share the machine; `--threads 1` makes it track the work done.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import spin_count  # noqa: F401  (first: it sets OpenMP's spin count before torch loads)

import torch
import torch.nn.functional as F

import data
import fast
import pipeline
import train_step
from attention_affinity import affinity_labels, affinity_loss, window_mask
from config import Config
from model import BACKBONES, AFANet
from par import PAR
from runner import compile_and_wrap, keep_freed_memory, set_cuda_math
from train_step import build_optimizer, compute_losses, freeze_encoder_norms, make_autocast, update

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 21  # PASCAL VOC: 20 classes + background
PAR_SHAPE = (1, 3, 160, 160)  # one crop of 320 downsampled by 2, as PAR sees it in training
PAR_MASKS = 3
# Options of the full step that change its numbers (off in training), timed on request.
OPTIONS = {
    "reuse_forward_cam": "the multi-scale CAM reuses the training forward's scale-1.0 CAMs "
                         "(multi_scale_cam(forward_cams=...))",
    "bf16_cam": "the multi-scale CAM alone runs under bf16 autocast",
    "no_cam_bn_stats": "the CAM passes leave the decoder's BatchNorm statistics alone "
                       "(--no-cam-bn-stats)",
}


# =============================================================================================
# One configuration, run in its own process
# =============================================================================================
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource  # Unix only, hence here
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of fn(), from and to an idle device (on a GPU, synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synthetic_batch(batch_size: int, crop: int, num_classes: int, device: torch.device,
                    generator: torch.Generator) -> dict:
    """A normalised batch of smooth random images, 1–3 present classes each, valid boxes."""
    coarse = torch.rand(batch_size, 3, crop // 16, crop // 16, generator=generator)
    pixels = F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=False) * 255
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std                                             # (B, 3, H, W)
    cls_labels = torch.zeros(batch_size, num_classes - 1)
    boxes = []
    for b in range(batch_size):
        count = int(torch.randint(1, 4, (1,), generator=generator))
        present = torch.randperm(num_classes - 1, generator=generator)[:count]
        cls_labels[b, present] = 1
        if b == 0:
            boxes.append([0, crop, 0, crop])
        else:  # a padded image: the valid box covers at least half of each side
            height, width = (int(torch.randint(crop // 2, crop + 1, (1,), generator=generator))
                             for _ in range(2))
            boxes.append([0, height, 0, width])
    return {"image": images.to(device), "cls_labels": cls_labels.to(device),
            "valid_box": torch.tensor(boxes, device=device)}


def fixed_targets(batch: dict, num_classes: int, generator: torch.Generator, radius: int):
    """The network-only step's given labels: a random pseudo label and its affinity labels."""
    images = batch["image"]
    B, _, H, W = images.shape
    label = torch.randint(0, num_classes, (B, H, W), generator=generator)
    label[torch.rand(B, H, W, generator=generator) < 0.2] = 255                # some ignored pixels
    label = label.to(images.device)
    grid = pipeline.token_grid(H), pipeline.token_grid(W)                      # (h, w), stride 16
    window = window_mask(*grid, radius, device=images.device)                 # (N, N)
    return label, affinity_labels(label, grid, window)                        # (B, N, N)


class Setup(NamedTuple):
    """One configuration's network, optimiser and batch, as train.py builds them."""
    cfg: object                  # config.Config
    model: torch.nn.Module
    net: torch.nn.Module         # what the forward calls: the model, compiled with --compile
    par: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object
    scaler: object
    batch: dict
    generator: torch.Generator


def build(spec: dict) -> Setup:
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    options = spec.get("options", ())
    cfg = Config(backbone=spec["backbone"], crop=spec["crop"], amp=spec["amp"],
                 compile=spec["compile"], num_classes=NUM_CLASSES,
                 reuse_forward_cam="reuse_forward_cam" in options,
                 cam_bf16="bf16_cam" in options,
                 cam_bn_stats="no_cam_bn_stats" not in options,
                 speed_paths=spec.get("speed_paths", True), tf32=spec.get("tf32", True))
    set_cuda_math(device, cfg.tf32, benchmark=True)  # as train.py: one crop size per process
    model = AFANet(cfg.num_classes, backbone=cfg.backbone).to(device).train()
    pipeline.choose_paths(model, cfg.speed_paths)  # also the network-only step's forward
    freeze_encoder_norms(model)
    optimizer = build_optimizer(model, cfg)
    autocast, scaler = make_autocast(cfg, device)
    net = compile_and_wrap(model, cfg, device, world=1, log=lambda line: None,
                           backend=spec.get("backend", "inductor"))
    generator = torch.Generator().manual_seed(spec["crop"])
    batch = synthetic_batch(spec["batch_size"], spec["crop"], cfg.num_classes, device, generator)
    return Setup(cfg, model, net, PAR(num_iter=cfg.par_iters).to(device), optimizer, autocast,
                 scaler, batch, generator)


def training_step(s: Setup, step: int) -> None:
    """train.py's step at iteration `step`: compute_losses, the one host sync, the update."""
    out = compute_losses(s.net, s.model, s.par, s.batch, step, s.cfg, s.autocast)
    torch.stack(list(out.terms.values())).tolist()  # the training loop's one host sync
    update(s.optimizer, s.scaler, out.loss)


def network_step(s: Setup, label: torch.Tensor, aff_label: torch.Tensor) -> None:
    """The same network trained on labels given in advance: forward, the four losses, update."""
    images, cfg = s.batch["image"], s.cfg
    with s.autocast():
        out = s.net(images)
    cls_loss = F.multilabel_soft_margin_loss(out.cls_logits.float(), s.batch["cls_labels"])
    seg_logits = pipeline.upsample(out.seg_logits, images.shape[-2:])         # (B, C, H, W)
    seg = pipeline.seg_loss(seg_logits, label)
    aff = affinity_loss(out.affinity.float(), aff_label)
    reg = pipeline.reg_loss(seg_logits, images, s.batch["valid_box"], label)
    loss = cls_loss + cfg.seg_weight * seg + cfg.aff_weight * aff + cfg.reg_weight * reg
    torch.stack([cls_loss, seg, aff, reg]).tolist()
    update(s.optimizer, s.scaler, loss)


# The labels of compute_losses, make_pseudo_labels and update (torch.profiler.record_function),
# in the step's order: the stages the full step is timed by.
STAGES = ("forward", "multi-scale CAM", "CAM label", "PAR label", "random walk", "AFA label (PAR)",
          "losses", "L_reg", "backward", "optimizer")


def run_one(spec: dict) -> dict:
    """Build model, optimiser and batch for one configuration; time its steps; return a row.

    Kinds: "full" (the step after the label switch, every stage), "cls" (a step of the
    classification-only phase), "network" (the same network on given labels), "stages" (the full
    step under torch.profiler: its stage labels' times and, "profile", its operators), "variants"
    (the full step with each speed variant of fast.py on and off), "par" (PAR alone)."""
    s = build(spec)
    device, kind = s.batch["image"].device, spec["kind"]
    row = {"crop": spec["crop"], "kind": kind, "device": str(device), "amp": s.cfg.amp,
           "compile": s.cfg.compile, "threads": torch.get_num_threads(),
           "options": list(spec.get("options", ()))}
    if kind == "par":
        return {**row, **time_par(s.par, spec, device)}
    if kind == "memory":
        return {**row, **count_memory(s)}
    targets = fixed_targets(s.batch, s.cfg.num_classes, s.generator, s.cfg.radius)
    step = {"cls": lambda: training_step(s, 0),
            "network": lambda: network_step(s, *targets)}.get(
                kind, lambda: training_step(s, s.cfg.switch_iters + 1))
    if kind == "variants":
        return {**row, "variants_s": time_variants(s, spec["warmup"], spec["steps"])}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["base_mb"] = round(peak_memory_mb(device), 1)
    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":  # the peak of the steps timed, after the warm-up's compiling
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "stages" and device.type == "cuda":
        return {**row, **metered(step, spec["steps"], device)}
    if kind in ("stages", "profile"):
        return {**row, **profiled(step, spec["steps"], device)}
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # CPU time (all threads of the process) is less sensitive than wall time to other jobs on the
    # machine; with one thread it tracks the work done.
    return {**row, "step_s": statistics.median(times), "all_s": [round(t, 4) for t in times],
            "cpu_s": statistics.median(cpu_times), "peak_mb": round(peak_memory_mb(device), 1)}


def profiled(step, steps: int, device: torch.device, top: int = 12) -> dict:
    """The step under torch.profiler (CPU), `steps` times: the medians of its wall time and of
    each of its STAGES (their labels' ranges); its operators by self time, the `top` largest as
    (name, share of the total self time, calls per step, self seconds per step), the stage labels
    left out (their self time is the Python between the operators); the peak memory."""
    from torch.profiler import ProfilerActivity, profile
    times, stages, operators = [], {}, {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            times.append(timed(step, device))
        for event in prof.key_averages():
            if event.key in STAGES:
                stages.setdefault(event.key, []).append(event.cpu_time_total / 1e6)
            elif event.self_cpu_time_total > 0:
                seconds, calls = operators.get(event.key, (0.0, 0))
                operators[event.key] = (seconds + event.self_cpu_time_total / 1e6, calls + event.count)
    total = sum(seconds for seconds, _ in operators.values())
    ranked = sorted(operators.items(), key=lambda item: -item[1][0])[:top]
    return {"step_s": statistics.median(times), "peak_mb": round(peak_memory_mb(device), 1),
            "stages_s": {name: statistics.median(stages[name]) for name in STAGES if name in stages},
            "operators": [(name, seconds / total, calls / steps, seconds / steps)
                          for name, (seconds, calls) in ranked]}


def metered(step, steps: int, device: torch.device) -> dict:
    """The step on a GPU, `steps` times: the medians of its wall time and of each of its STAGES,
    each stage timed between two synchronisations of the device (its kernels run after their
    launch, so the profiler's CPU ranges would time the launches), and the peak memory allocated
    during each stage (the peak statistics reset at its start), the highest over the steps."""
    times, stages, peaks = [], {}, {}

    @contextlib.contextmanager
    def stage(name):  # stands for record_function in the step's modules
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            torch.cuda.synchronize(device)
            stages.setdefault(name, []).append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0.0), peak_memory_mb(device))

    with mock.patch.object(train_step, "record_function", stage), \
            mock.patch.object(pipeline, "record_function", stage):
        times = [timed(step, device) for _ in range(steps)]
    return {"step_s": statistics.median(times), "peak_mb": round(max(peaks.values()), 1),
            "stages_s": {name: statistics.median(stages[name]) for name in STAGES if name in stages},
            "stages_peak_mb": {name: round(peaks[name], 1) for name in STAGES if name in peaks}}


def time_variants(s: Setup, warmup: int, steps: int) -> dict:
    """The full step with every speed variant of fast.py on, all off, and each one off alone, one
    network, one process: rounds of one step in each configuration, the order rotated every
    round so that a change of load touches all alike; median seconds by configuration."""
    configurations = ([("all on", True, ()), ("all off", False, ())]  # (name, speed paths, off)
                      + [(f"without {name}", True, (name,)) for name in fast.VARIANTS])
    times = {name: [] for name, _, _ in configurations}
    device = s.batch["image"].device
    for round_index in range(warmup + steps):
        shift = round_index % len(configurations)
        for name, speed_paths, off in configurations[shift:] + configurations[:shift]:
            setup = s._replace(cfg=dataclasses.replace(s.cfg, speed_paths=speed_paths))
            pipeline.choose_paths(s.model, speed_paths, [v for v in fast.VARIANTS if v not in off])
            seconds = timed(lambda: training_step(setup, s.cfg.switch_iters + 1), device)
            if round_index >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def load_reference():
    """tests/reference.py, the naive implementations the tests compare against, as a module."""
    spec = importlib.util.spec_from_file_location("reference", HERE / "tests" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_par(par, spec: dict, device: torch.device) -> dict:
    """PAR on (1, 3, 160, 160) with 3 masks at the image's size, and the straightforward
    translation of paper §3.3 kept in tests/reference.py."""
    par_reference = load_reference().par_reference
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(PAR_SHAPE, generator=generator).to(device)
    masks = torch.rand(PAR_SHAPE[0], PAR_MASKS, *PAR_SHAPE[2:], generator=generator).softmax(dim=1).to(device)

    def median_time(fn, steps):
        fn()
        return statistics.median(timed(fn, device) for _ in range(steps))

    steps = max(spec["steps"], 5)
    reference_s = median_time(lambda: par_reference(images.cpu(), masks.cpu()), steps) \
        if device.type == "cpu" else None  # the reference builds its indices on the CPU
    return {"par_s": median_time(lambda: par(images, masks), 4 * steps), "par_reference_s": reference_s}


# =============================================================================================
# Memory: what a step holds on a GPU, counted on the CPU
# =============================================================================================
GPU_OVERHEAD = 1.2      # the CUDA caching allocator's rounding and fragmentation over the count
GPU_CONTEXT_GB = 1.0    # the CUDA context and the cuBLAS / cuDNN handles, outside the count
GPU_SIZES_GB = (16, 24, 40, 80)


def tensor_bytes(tensors) -> int:
    """The bytes of the storages under `tensors`, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def resident_bytes(s: Setup) -> dict:
    """What a step finds allocated: the parameters and buffers, the gradients of the previous
    step (alive until the next update sets them to None), AdamW's two states, the batch."""
    params = list(s.model.parameters())
    return {"parameters": tensor_bytes([*params, *s.model.buffers(), *s.par.buffers()]),
            "gradients": tensor_bytes(p.grad for p in params if p.grad is not None),
            "adamw": tensor_bytes(t for state in s.optimizer.state.values()
                                  for t in state.values() if torch.is_tensor(t) and t.dim()),
            "batch": tensor_bytes(v for v in s.batch.values() if torch.is_tensor(v))}


def saved_activation_bytes(s: Setup, step: int) -> int:
    """The bytes the step's autograd graph keeps for its backward (the training forward and the
    losses; the pseudo labels are made without gradient), each storage once, the parameters and
    the batch left out: torch.autograd.graph.saved_tensors_hooks."""
    known = {t.untyped_storage().data_ptr() for t in [*s.model.parameters(), *s.batch.values()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute_losses(s.net, s.model, s.par, s.batch, step, s.cfg, s.autocast)
    return sum(saved.values())


def allocation_peak(run, measured) -> tuple:
    """(bytes, stage): the highest bytes of tensors allocated during measured() above what was
    allocated when it began, and the stage of STAGES it occurred in. PyTorch's allocations and
    frees (torch.profiler with profile_memory, CPU) summed in time order, what
    torch.cuda.max_memory_allocated less the start's allocation measures on a GPU. The profiler
    sees the frees of the blocks allocated while it runs only: `run()` first, so that
    measured() frees what a previous call left (a step frees the previous step's gradients)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
        with record_function("measured"):
            measured()
    events = prof.profiler.kineto_results.events()
    (window,) = [e for e in events if e.name() == "measured"]
    start, end = window.start_ns(), window.end_ns()
    live, base, peak, peak_at = 0, None, 0, start
    for at, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if at > end:
            break
        if at >= start and base is None:
            base = live
        live += nbytes
        if base is not None and live - base > peak:
            peak, peak_at = live - base, at
    stage = next((e.name() for e in events if e.name() in STAGES
                  and start <= e.start_ns() <= peak_at <= e.end_ns() <= end), "between stages")
    return peak, stage


def count_memory(s: Setup) -> dict:
    """The bytes a full step after the label switch holds at its peak, counted on the CPU as a
    GPU would hold them (fp32 unless --amp; on a GPU `skip_dropped` is the plain masked
    product, so it is off here too): what the step finds allocated (`resident_bytes`), the
    activations its graph saves (`saved_activation_bytes`), its peak above what it found
    (`allocation_peak`, in the stage named), and their sum "peak", which
    torch.cuda.max_memory_allocated of the same step on a GPU should be close to (kernels'
    workspaces and the CUDA kernels' own choices aside)."""
    if s.batch["image"].device.type != "cpu":
        raise ValueError("the memory count runs on the CPU (bench.py --memory --device cpu)")
    step = s.cfg.switch_iters + 1
    if s.cfg.speed_paths:
        pipeline.choose_paths(s.model, True, [v for v in fast.VARIANTS if v != "skip_dropped"])
    training_step(s, step)  # AdamW's states exist from the first step on
    resident = resident_bytes(s)
    saved = saved_activation_bytes(s, step)
    peak, stage = allocation_peak(lambda: training_step(s, step), lambda: training_step(s, step))
    return {**resident, "saved_activations": saved, "above_resident": peak, "peak_stage": stage,
            "peak": sum(resident.values()) + peak}


def largest_batch(at_batch: dict, gib: float) -> int:
    """The largest batch per GPU whose counted peak, times GPU_OVERHEAD and plus GPU_CONTEXT_GB,
    fits in `gib` GiB; the peak is linear in the batch, fitted through the counts `at_batch`
    ({batch size: bytes}, two sizes)."""
    (b1, p1), (b2, p2) = sorted(at_batch.items())
    per_image = (p2 - p1) / (b2 - b1)
    fixed = p1 - b1 * per_image
    room = (gib - GPU_CONTEXT_GB) * 2 ** 30 / GPU_OVERHEAD - fixed
    return max(0, int(room // per_image))


def memory_report(rows: list) -> str:
    """The memory table: per crop and paths, the count at the first batch size, its parts, the
    expected allocation on a GPU and the largest batch for each of GPU_SIZES_GB."""
    gib = 2 ** 30
    lines = [f"memory of the full step per GPU (fp32), counted on the CPU (bench.py --memory): "
             f"parameters and buffers, gradients, AdamW's states, batch, saved activations, and "
             f"the step's peak over what it finds; on the card x{GPU_OVERHEAD} (the caching "
             f"allocator) + {GPU_CONTEXT_GB:g} GiB (CUDA context); the largest batch from the "
             f"peaks at two batch sizes (linear)", ""]
    table = []
    for r in rows:
        sizes = sorted(r["counts"])
        c = r["counts"][sizes[0]]
        fixed = c["parameters"] + c["gradients"] + c["adamw"]
        table.append([r["backbone"], r["crop"], "speed" if r["speed_paths"] else "plain",
                      sizes[0], f"{fixed / gib:.2f}", f"{c['saved_activations'] / gib:.2f}",
                      f"{c['above_resident'] / gib:.2f} ({c['peak_stage']})",
                      f"{c['peak'] / gib:.2f}",
                      f"{(c['peak'] * GPU_OVERHEAD) / gib + GPU_CONTEXT_GB:.1f}"]
                     + [largest_batch({b: r["counts"][b]["peak"] for b in sizes[:2]}, size)
                        for size in GPU_SIZES_GB])
    lines += markdown_table(["backbone", "crop", "paths", "batch", "weights, grads, AdamW (GiB)",
                             "saved activations (GiB)", "step above resident (GiB, at)",
                             "peak (GiB)", "on the card (GiB)"]
                            + [f"largest batch, {size} GB" for size in GPU_SIZES_GB], table)
    return "\n".join(lines)


# =============================================================================================
# The driver: one subprocess per configuration, one table
# =============================================================================================
def run_in_subprocess(spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--_one", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {spec} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "n/a"


def markdown_table(header: list, rows: list) -> list:
    """Lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def format_report(result: dict) -> str:
    mode = "+".join(m for m in ("amp", "compile") if result[m]) or "eager"
    mode += "" if result.get("speed_paths", True) else ", plain paths"
    mode += ", TF32" if result.get("tf32") else ""
    lines = [f"AFA training step, {result['backbone']}, batch {result['batch_size']}, "
             f"{result['device']} ({result['threads']} threads), {mode}; median of "
             f"{result['num_steps']} steps after {result['warmup']} warm-up; load before "
             f"{result['load_before']}, after {result['load_after']}", ""]
    lines += markdown_table(
        ["crop", "full step (s)", "network-only step (s)", "ratio", "full peak (MB)",
         "network peak (MB)", "peak ratio", "CPU time ratio"],
        [[r["crop"], f"{r['full_step_s']:.3f}", f"{r['network_step_s']:.3f}", f"{r['ratio']:.2f}x",
          f"{r['full_peak_mb']:.0f}", f"{r['network_peak_mb']:.0f}", f"{r['peak_ratio']:.2f}x",
          f"{r['full_cpu_s'] / r['network_cpu_s']:.2f}x"] for r in result["steps"]])
    if result.get("bn_stats"):
        lines += ["", "the CAM passes' decoder BatchNorm statistics (on, as in the release; off "
                  "with --no-cam-bn-stats), same run (s; ratios to the network-only step):", ""]
        lines += markdown_table(
            ["crop", "full step", "without", "cost", "ratio / without", "classification-only step",
             "without", "cost"],
            [[r["crop"], f"{r['full_s']:.3f}", f"{r['full_without_s']:.3f}",
              f"{r['full_s'] - r['full_without_s']:+.3f}",
              f"{r['full_s'] / r['network_s']:.2f}x / {r['full_without_s'] / r['network_s']:.2f}x",
              f"{r['cls_s']:.3f}", f"{r['cls_without_s']:.3f}",
              f"{r['cls_s'] - r['cls_without_s']:+.3f}"] for r in result["bn_stats"]])
    if result.get("options"):
        lines += ["", "full step with options that change the numbers (off in training), same "
                  "run:", ""]
        lines += markdown_table(
            ["crop", "options", "full step (s)", "ratio to network-only", "peak (MB)",
             "CPU time ratio"],
            [[r["crop"], " + ".join(r["options"]) or "none", f"{r['full_step_s']:.3f}",
              f"{r['ratio']:.2f}x", f"{r['full_peak_mb']:.0f}", f"{r['cpu_ratio']:.2f}x"]
             for r in result["options"]])
    if result.get("stages"):
        names = list(result["stages"][0]["stages_s"])
        lines += ["", "stages of the full step (s):", ""]
        lines += markdown_table(
            ["stage"] + [str(r["crop"]) for r in result["stages"]],
            [[name] + [f"{sum(r['stages_s'].values()) if name == 'sum' else r['stages_s'][name]:.3f}"
                       for r in result["stages"]] for name in names + ["sum"]])
        if all("stages_peak_mb" in r for r in result["stages"]):  # on a GPU
            lines += ["", "peak memory allocated during each stage of the full step (MB, "
                      "torch.cuda.max_memory_allocated, reset at the stage's start):", ""]
            lines += markdown_table(
                ["stage"] + [str(r["crop"]) for r in result["stages"]],
                [[name] + [f"{r['stages_peak_mb'][name]:.0f}" for r in result["stages"]]
                 for name in names])
        lines += ["", "L_reg's share of the profiled full step (its forward, wall time): "
                  + ", ".join(f"crop {r['crop']} {r['stages_s'].get('L_reg', 0) / r['step_s']:.1%}"
                              for r in result["stages"])]
    for r in result.get("variants", []):
        base = r["variants_s"]["all on"]
        lines += ["", f"the speed variants of fast.py at crop {r['crop']}: the full step in each "
                  "configuration, one process, rounds interleaved:", ""]
        lines += markdown_table(
            ["configuration", "full step (s)", "/ all on", "the variant saves"],
            [[name, f"{seconds:.3f}", f"{seconds / base:.3f}x",
              f"{1 - base / seconds:.1%}" if name.startswith("without") else ""]
             for name, seconds in r["variants_s"].items()])
    for r in result.get("profile", []):
        lines += ["", f"operators of the full step at crop {r['crop']} by self time "
                  "(torch.profiler, CPU):", ""]
        lines += markdown_table(["operator", "share", "calls / step", "s / step"],
                                [[name, f"{share:.1%}", f"{calls:g}", f"{seconds:.3f}"]
                                 for name, share, calls, seconds in r["operators"]])
    par = result["par"]
    reference = par["par_reference_s"]
    lines += ["", f"PAR on {PAR_SHAPE} with {PAR_MASKS} masks: {par['par_s'] * 1000:.1f} ms"
              + (f"; the straightforward translation of paper §3.3 (tests/reference.py): "
                 f"{reference * 1000:.1f} ms, {reference / par['par_s']:.1f}x slower"
                 if reference else "")]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--crops", type=int, nargs="+", default=[192, 320, 448], help="crop sizes")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--backbone", default="mit_b1", choices=BACKBONES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 1; 2 with --compile)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast of the network (fp16 "
                        "on GPUs without bf16); the pseudo labels stay fp32, as in train.py")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward, "
                        "as train.py --compile")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="on GPUs, TF32 matrix multiplies and convolutions, as train.py "
                             "(--no-tf32: strict float32; default: on)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: PyTorch's choice)")
    parser.add_argument("--options", nargs="+", default=[], choices=list(OPTIONS),
                        help="also time the full step with these options, alone and together: "
                             + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
    parser.add_argument("--speed-paths", action=argparse.BooleanOptionalAction, default=True,
                        help="the speed variants of fast.py, as train.py (--no-speed-paths: "
                             "time everything with the plain forms of the method files alone)")
    parser.add_argument("--variants", action="store_true", help="also time the full step with "
                        "every speed variant of fast.py on, all off, and each one off alone, "
                        "interleaved in one process: what each variant saves")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timing")
    parser.add_argument("--no-bn-stats", action="store_true", help="skip the timing of the CAM "
                        "passes' BatchNorm statistics (the steps without them)")
    parser.add_argument("--profile", action="store_true", help="also profile the full step "
                        "(torch.profiler, CPU): its operators by self time")
    parser.add_argument("--memory", action="store_true", help="instead of timing, count the "
                        "memory a full step holds per GPU, on the CPU, speed paths on and off, at "
                        "--batch-size and twice it, and the largest batch for 16/24/40/80 GB")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(c < 32 or c % 16 for c in args.crops):
        parser.error(f"--crops {args.crops}: crops must be multiples of 16, at least 32")
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2 (one image gets a sub-box)")
    return args


def measure_crop(common: dict, crop: int, args, result: dict) -> None:
    """Every configuration asked for at one crop, each in its own process, into `result`."""
    def run(kind, options=()):
        return run_in_subprocess({**common, "crop": crop, "kind": kind, "options": list(options)})

    full, network = run("full"), run("network")
    result["threads"] = full["threads"]
    result["steps"].append({"crop": crop, "full_step_s": full["step_s"],
                            "network_step_s": network["step_s"],
                            "full_peak_mb": full["peak_mb"], "network_peak_mb": network["peak_mb"],
                            "ratio": full["step_s"] / network["step_s"],
                            "peak_ratio": full["peak_mb"] / network["peak_mb"],
                            "full_cpu_s": full["cpu_s"], "network_cpu_s": network["cpu_s"],
                            "full_all_s": full["all_s"], "network_all_s": network["all_s"],
                            "base_mb": full["base_mb"]})
    if not args.no_bn_stats:
        without = ["no_cam_bn_stats"]
        result["bn_stats"].append({
            "crop": crop, "network_s": network["step_s"], "full_s": full["step_s"],
            "full_without_s": run("full", without)["step_s"], "cls_s": run("cls")["step_s"],
            "cls_without_s": run("cls", without)["step_s"]})
    if not args.no_stages:
        staged = run("stages")
        result["stages"].append({"crop": crop, "stages_s": staged["stages_s"],
                                 "step_s": staged["step_s"],
                                 **({"stages_peak_mb": staged["stages_peak_mb"]}
                                    if "stages_peak_mb" in staged else {})})
    if args.variants:
        result["variants"].append({"crop": crop, "variants_s": run("variants")["variants_s"]})
    if args.profile:
        result["profile"].append({"crop": crop, "operators": run("profile")["operators"]})
    # the step without options first: the reference these options are timed against
    combinations = ([[]] + [[o] for o in args.options]
                    + ([args.options] if len(args.options) > 1 else []) if args.options else [])
    for options in combinations:
        variant = run("full", options)
        result["options"].append({"crop": crop, "options": options,
                                  "full_step_s": variant["step_s"],
                                  "ratio": variant["step_s"] / network["step_s"],
                                  "cpu_ratio": variant["cpu_s"] / network["cpu_s"],
                                  "full_peak_mb": variant["peak_mb"]})


def count_memory_of_crops(common: dict, args) -> int:
    """bench.py --memory: the count at each crop, speed paths on and off, two batch sizes, each
    in its own process on the CPU; the table, and the JSON if asked."""
    rows = []
    for crop in args.crops:
        for speed in (True, False):
            sizes = (args.batch_size, 2 * args.batch_size)
            counts = {b: run_in_subprocess({**common, "device": "cpu", "crop": crop,
                                            "kind": "memory", "batch_size": b,
                                            "speed_paths": speed, "options": []})
                      for b in sizes}
            rows.append({"backbone": args.backbone, "crop": crop, "speed_paths": speed,
                         "counts": counts})
    print(memory_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._one:
        keep_freed_memory()  # as train.py runs
        print(json.dumps(run_one(json.loads(args._one))))
        return 0
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    common = dict(device=device, backbone=args.backbone, batch_size=args.batch_size,
                  steps=args.steps, warmup=warmup, amp=args.amp, compile=args.compile,
                  threads=args.threads, speed_paths=args.speed_paths, tf32=args.tf32)
    result = {"backbone": args.backbone, "batch_size": args.batch_size, "device": device,
              "amp": args.amp, "compile": args.compile, "speed_paths": args.speed_paths,
              "tf32": args.tf32 and device.startswith("cuda"),
              "steps": [], "stages": [], "options": [], "bn_stats": [], "profile": [], "variants": [],
              "warmup": warmup, "num_steps": args.steps,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "load_before": load_average()}
    if args.memory:
        return count_memory_of_crops(common, args)
    for crop in args.crops:
        measure_crop(common, crop, args, result)
    par = run_in_subprocess({**common, "crop": PAR_SHAPE[-1], "kind": "par"})
    result["par"] = {"par_s": par["par_s"], "par_reference_s": par["par_reference_s"]}
    result["load_after"] = load_average()
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory of one AFA training step, against the same network trained on given labels.

What a training step of AFA costs beyond learning itself (paper §3, SPEC §2–6): the pseudo labels
are made on the fly — a multi-scale, flip-augmented CAM (7 image-equivalents of forward at the
default scales), PAR twice, a random walk — so the question is how the full step compares with
the network-only step that would train the same network on labels given in advance. This script
measures both in one run, on the same synthetic batch:

- **full step**: `train.compute_losses` after the label switch (every stage on: CAM, PAR label,
  affinity labels, random walk, AFA label), then backward and the AdamW step;
- **network-only step**: the same forward, L_cls + 0.1·L_seg + 0.1·L_aff on fixed labels,
  backward, AdamW;
- each stage of the full step on its own (the functions train.py chains), to see where time goes;
- PAR alone on one (1, 3, 160, 160) image with 3 masks, against the straightforward translation of
  SPEC §3 kept in tests/reference.py;
- peak memory: RSS on CPU, max allocated on CUDA. Every configuration runs in a fresh process,
  because the RSS high-water mark of a process never goes down.

    python bench.py                              # crops 192, 320, 448; CPU, or CUDA when present
    python bench.py --crops 320 --steps 7 --json bench.json
    python bench.py --amp                        # bf16 autocast (fp16 on GPUs without bf16)
    python bench.py --compile                    # torch.compile the encoder and decoder
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
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 21  # PASCAL VOC: 20 classes + background
PAR_SHAPE = (1, 3, 160, 160)  # one crop of 320 downsampled by 2, as PAR sees it in training
PAR_MASKS = 3
# Options of the full step that change its numbers (off in training), timed on request.
OPTIONS = {
    "reuse_forward_cam": "the multi-scale CAM reuses the training forward's scale-1.0 CAMs "
                         "(multi_scale_cam(forward_cams=...))",
    "bf16_cam": "the multi-scale CAM alone runs under bf16 autocast",
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


def synthetic_batch(batch_size: int, crop: int, num_classes: int, device: torch.device,
                    generator: torch.Generator) -> dict:
    """A normalised batch of smooth random images, 1–3 present classes each, valid boxes."""
    import train
    coarse = torch.rand(batch_size, 3, crop // 16, crop // 16, generator=generator)
    pixels = F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=False) * 255
    mean = torch.tensor(train.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(train.IMAGENET_STD).view(1, 3, 1, 1)
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
    from attention_affinity import affinity_labels, window_mask
    from train import token_grid
    images = batch["image"]
    B, _, H, W = images.shape
    label = torch.randint(0, num_classes, (B, H, W), generator=generator)
    label[torch.rand(B, H, W, generator=generator) < 0.2] = 255                # some ignored pixels
    label = label.to(images.device)
    h, w = token_grid(H), token_grid(W)
    aff_label = affinity_labels(label, grid=(h, w), mask=window_mask(h, w, radius, device=images.device))
    return label, aff_label


def run_one(spec: dict) -> dict:
    """Build model, optimiser and batch for one configuration; time its steps; return a row."""
    import train
    from model import AFANet
    from par import PAR

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = train.Config(backbone=spec["backbone"], crop=spec["crop"], amp=spec["amp"],
                       compile=spec["compile"], num_classes=NUM_CLASSES)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone).to(device).train()
    par = PAR(num_iter=cfg.par_iters).to(device)
    optimizer = train.build_optimizer(model, cfg)
    autocast, scaler = train.make_autocast(cfg, device)
    if cfg.compile:
        # One graph per input shape: the multi-scale CAM feeds the encoder 3 more shapes than the
        # training forward, and with dynamic shapes inductor fails on the encoder (torch 2.13).
        model.encoder.compile(dynamic=False)
        model.decoder.compile(dynamic=False)
    generator = torch.Generator().manual_seed(spec["crop"])
    batch = synthetic_batch(spec["batch_size"], spec["crop"], cfg.num_classes, device, generator)
    step_index = cfg.switch_iters + 1  # after the label switch: every stage of the step runs

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def full_step():
        out = train.compute_losses(model, model, par, batch, step_index, cfg, autocast)
        torch.stack(list(out.terms.values())).tolist()  # the training loop's one host sync
        update(out.loss)

    label, aff_label = fixed_targets(batch, cfg.num_classes, generator, cfg.radius)

    def network_step():
        images = batch["image"]
        with autocast():
            out = model(images)
        cls_loss = F.multilabel_soft_margin_loss(out.cls_logits.float(), batch["cls_labels"])
        seg_logits = F.interpolate(out.seg_logits.float(), size=images.shape[-2:], mode="bilinear",
                                   align_corners=False)                         # (B, C, H, W)
        seg = train.seg_loss(seg_logits, label)
        aff = train.affinity_loss(out.affinity.float(), aff_label)
        loss = cls_loss + cfg.seg_weight * seg + cfg.aff_weight * aff
        torch.stack([cls_loss, seg, aff]).tolist()
        update(loss)

    timers, cpu_timers = {}, {}

    def stage(name):
        @contextlib.contextmanager
        def timed():
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            yield
            synchronize(device)
            timers.setdefault(name, []).append(time.perf_counter() - start)
            cpu_timers.setdefault(name, []).append(time.process_time() - cpu_start)
        return timed()

    def staged_step():
        """The full step cut at the stages of compute_losses / make_pseudo_labels."""
        from attention_affinity import affinity_labels, affinity_loss, window_mask
        from cam import cam_to_label, multi_scale_cam, refine_cams_with_par, refine_propagated_with_par
        images, cls_labels, box = batch["image"], batch["cls_labels"], batch["valid_box"]
        with stage("forward"), autocast():
            out = model(images)
        with torch.no_grad():
            # options that change the numbers, off by default: the forward's scale-1.0 CAMs reused
            # by the multi-scale CAM (see cam.py); the multi-scale CAM alone in bf16
            cam_autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
                if "bf16_cam" in spec.get("options", ()) else autocast
            with stage("multi-scale CAM"), cam_autocast():
                forward_cams = out.cams.detach() if "reuse_forward_cam" in spec.get("options", ()) else None
                cams, affinity = multi_scale_cam(model, images, cfg.cam_scales, forward_cams=forward_cams)
                cams, affinity = cams.float(), affinity.float()
            with stage("CAM label"):
                cam_to_label(cams, cls_labels, low=cfg.low, high=cfg.high, valid_box=box)
            with stage("PAR label"):
                pixels = train.denormalize(images.float())
                par_label = refine_cams_with_par(par, pixels, cams, cls_labels, low=cfg.low,
                                                 high=cfg.high, valid_box=box)
            with stage("random walk"):
                walked = [train.random_walk_cams(cams, affinity, cls_labels, max(cfg.cam_scales), t,
                                                 cfg.radius) for t in (cfg.low, cfg.high)]
            with stage("AFA label (PAR)"):
                afa_label = refine_propagated_with_par(par, pixels, *walked, cls_labels, box)
        with stage("losses"):
            h, w = train.token_grid(images.shape[-2]), train.token_grid(images.shape[-1])
            mask = window_mask(h, w, cfg.radius, device=images.device)
            aff_loss = affinity_loss(out.affinity.float(), affinity_labels(par_label, (h, w), mask))
            seg_logits = F.interpolate(out.seg_logits.float(), size=images.shape[-2:],
                                       mode="bilinear", align_corners=False)
            loss = (F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_labels)
                    + cfg.seg_weight * train.seg_loss(seg_logits, afa_label) + cfg.aff_weight * aff_loss)
        with stage("backward"):
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with stage("optimizer"):
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()

    kind = spec["kind"]
    row = {"crop": spec["crop"], "kind": kind, "device": str(device), "amp": cfg.amp,
           "compile": cfg.compile, "threads": torch.get_num_threads()}
    if kind == "par":
        return {**row, **time_par(par, spec, device)}
    step = {"full": full_step, "network": network_step, "stages": staged_step}[kind]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["base_mb"] = round(peak_memory_mb(device), 1)
    times, cpu_times = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            timers.clear()
            cpu_timers.clear()
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    times, cpu_times = times[spec["warmup"]:], cpu_times[spec["warmup"]:]
    # CPU time (all threads of the process) is less sensitive than wall time to other jobs on the
    # machine; with one thread it tracks the work done.
    row.update(step_s=statistics.median(times), all_s=[round(t, 4) for t in times],
               cpu_s=statistics.median(cpu_times), peak_mb=round(peak_memory_mb(device), 1))
    if kind == "stages":
        row["stages_s"] = {name: statistics.median(t) for name, t in timers.items()}
        row["stages_cpu_s"] = {name: statistics.median(t) for name, t in cpu_timers.items()}
    return row


def load_reference():
    """tests/reference.py, the naive implementations the tests compare against, as a module."""
    spec = importlib.util.spec_from_file_location("reference", HERE / "tests" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_par(par, spec: dict, device: torch.device) -> dict:
    """PAR on (1, 3, 160, 160) with 3 masks at the image's size, and the reference of SPEC §3."""
    par_reference = load_reference().par_reference
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(PAR_SHAPE, generator=generator).to(device)
    masks = torch.rand(PAR_SHAPE[0], PAR_MASKS, *PAR_SHAPE[2:], generator=generator).softmax(dim=1).to(device)

    def median_time(fn, steps):
        fn()
        times = []
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    steps = max(spec["steps"], 5)
    reference_s = median_time(lambda: par_reference(images.cpu(), masks.cpu()), steps) \
        if device.type == "cpu" else None  # the reference builds its indices on the CPU
    return {"par_s": median_time(lambda: par(images, masks), 4 * steps), "par_reference_s": reference_s}


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


def format_report(result: dict) -> str:
    mode = "+".join(m for m in ("amp", "compile") if result[m]) or "eager"
    lines = [f"AFA training step, {result['backbone']}, batch {result['batch_size']}, "
             f"{result['device']} ({result['threads']} threads), {mode}; median of {result['num_steps']} "
             f"steps after {result['warmup']} warm-up; load before {result['load_before']}, "
             f"after {result['load_after']}", "",
             "| crop | full step (s) | network-only step (s) | ratio | full peak (MB) | "
             "network peak (MB) | peak ratio | CPU time ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['crop']} | {r['full_step_s']:.3f} | {r['network_step_s']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['full_peak_mb']:.0f} | {r['network_peak_mb']:.0f} | "
                     f"{r['peak_ratio']:.2f}x | {r['full_cpu_s'] / r['network_cpu_s']:.2f}x |")
    if result.get("options"):
        lines += ["", "full step with options that change the numbers (off in training), timed as the "
                  "staged step, same run:", "",
                  "| crop | options | full step (s) | ratio to network-only | peak (MB) | CPU time ratio |",
                  "|---|---|---|---|---|---|"]
        for r in result["options"]:
            lines.append(f"| {r['crop']} | {' + '.join(r['options']) or 'none'} | {r['full_step_s']:.3f} | "
                         f"{r['ratio']:.2f}x | {r['full_peak_mb']:.0f} | {r['cpu_ratio']:.2f}x |")
    if result.get("stages"):
        crops = [r["crop"] for r in result["stages"]]
        names = list(result["stages"][0]["stages_s"])
        lines += ["", "stages of the full step (s):", "",
                  "| stage | " + " | ".join(str(c) for c in crops) + " |",
                  "|---" * (len(crops) + 1) + "|"]
        for name in names + ["sum"]:
            values = [sum(r["stages_s"].values()) if name == "sum" else r["stages_s"][name]
                      for r in result["stages"]]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    par = result["par"]
    reference = par["par_reference_s"]
    lines += ["", f"PAR on {PAR_SHAPE} with {PAR_MASKS} masks: {par['par_s'] * 1000:.1f} ms"
              + (f"; the reference of SPEC §3 (tests/reference.py): {reference * 1000:.1f} ms, "
                 f"{reference / par['par_s']:.1f}x slower" if reference else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[192, 320, 448], help="crop sizes")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--backbone", default="mit_b1", choices=["mit_b0", "mit_b1"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 1; 2 with --compile)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 on GPUs without bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: PyTorch's choice)")
    parser.add_argument("--options", nargs="+", default=[], choices=list(OPTIONS),
                        help="also time the full step with these options, alone and together: "
                             + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(run_one(json.loads(args._one))))
        return 0

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if any(c < 32 or c % 16 for c in args.crops):
        parser.error(f"--crops {args.crops}: crops must be multiples of 16, at least 32")
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2 (one image gets a sub-box)")
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    common = dict(device=device, backbone=args.backbone, batch_size=args.batch_size,
                  steps=args.steps, warmup=warmup, amp=args.amp, compile=args.compile,
                  threads=args.threads)
    result = {"backbone": args.backbone, "batch_size": args.batch_size, "device": device,
              "amp": args.amp, "compile": args.compile, "steps": [], "stages": [], "options": [],
              "warmup": warmup, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__, "load_before": load_average()}
    result["num_steps"] = args.steps
    for crop in args.crops:
        full = run_in_subprocess({**common, "crop": crop, "kind": "full"})
        network = run_in_subprocess({**common, "crop": crop, "kind": "network"})
        result["threads"] = full["threads"]
        result["steps"].append({"crop": crop, "full_step_s": full["step_s"],
                                "network_step_s": network["step_s"],
                                "full_peak_mb": full["peak_mb"], "network_peak_mb": network["peak_mb"],
                                "ratio": full["step_s"] / network["step_s"],
                                "peak_ratio": full["peak_mb"] / network["peak_mb"],
                                "full_cpu_s": full["cpu_s"], "network_cpu_s": network["cpu_s"],
                                "full_all_s": full["all_s"], "network_all_s": network["all_s"],
                                "base_mb": full["base_mb"]})
        if not args.no_stages:
            staged = run_in_subprocess({**common, "crop": crop, "kind": "stages"})
            result["stages"].append({"crop": crop, "stages_s": staged["stages_s"],
                                     "stages_cpu_s": staged["stages_cpu_s"]})
        # the staged step without options first: the reference these variants are timed against
        combinations = ([[]] + [[o] for o in args.options] + ([args.options] if len(args.options) > 1 else [])
                        if args.options else [])
        for options in combinations:
            variant = run_in_subprocess({**common, "crop": crop, "kind": "stages", "options": options})
            result["options"].append({"crop": crop, "options": options, "full_step_s": variant["step_s"],
                                      "ratio": variant["step_s"] / network["step_s"],
                                      "cpu_ratio": variant["cpu_s"] / network["cpu_s"],
                                      "full_peak_mb": variant["peak_mb"], "stages_s": variant["stages_s"]})
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

"""The run on a GPU: the step there against the CPU's, the speed paths, AMP, --compile, DDP over
NCCL, the peak memory, bench.py. Each test takes a `device`; its CUDA case is marked `cuda` and
skipped without a GPU (tests/conftest.py), its CPU case runs everywhere, small (mit_b0, crop
64), so that none of them is dead code on a machine without one. On a GPU:

    python -m pytest -q -m cuda && python bench.py --device cuda --crops 512

TF32 is off in these tests (the equalities below are float32's); train.py's own setting is
not theirs to judge.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import bench
import runner
from config import Config
from metrics import validation_labels
from model import AFANet
from pipeline import LabelSettings
from train_step import compute_losses, update
from vit import DropPath

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
GIB = 2 ** 30
# bench.py --memory --crops 512 (BENCHMARKS.md, "Memory per GPU"): a full step of mit_b1, crop
# 512, 2 images, speed paths on, holds 1.87 GiB at its peak (in the multi-scale CAM); the bound
# allows x1.2 for the caching allocator's rounding and 0.25 GiB for the kernels' workspaces
# (cuDNN, cuBLAS, foreach AdamW), which the count on the CPU does not see.
COUNTED_GIB = 1.87
PEAK_BOUND_GIB = 1.2 * COUNTED_GIB + 0.25


@pytest.fixture(autouse=True)
def float32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def setup(device, **spec) -> bench.Setup:
    """bench.py's set-up, as train.py builds it: AFANet (seed 0), AdamW, autocast, a batch."""
    return bench.build({"device": device, "backbone": "mit_b0", "batch_size": 2, "crop": 64,
                        "amp": False, "compile": False, "threads": 0, "speed_paths": True,
                        "kind": "full", "options": [], **spec})


def without_randomness(model) -> None:
    """Stochastic depth and dropout off: a CPU and a GPU draw them from different generators."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
        elif isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0


def full_step(s: bench.Setup, seed: int = 1, step: int | None = None):
    """train.py's step (after the label switch by default) and its update: (the loss terms as
    floats, the pseudo labels, the gradients flattened, on the CPU)."""
    torch.manual_seed(seed)
    step = s.cfg.switch_iters + 1 if step is None else step
    out = compute_losses(s.net, s.model, s.par, s.batch, step, s.cfg, s.autocast)
    values = {name: float(value) for name, value in out.terms.items()}
    update(s.optimizer, s.scaler, out.loss)
    grads = torch.cat([p.grad.flatten().float().cpu() for p in s.model.parameters()
                       if p.grad is not None])
    return values, out.labels, grads


def assert_labels_agree(labels, reference, fraction: float) -> None:
    for name in ("cam", "par", "afa"):
        mine, theirs = getattr(labels, name), getattr(reference, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            agree = (mine.cpu() == theirs.cpu()).float().mean().item()
            assert agree >= fraction, f"{name} label: {agree:.4f} of the pixels agree"


# ---------------------------------------------------------------- the step on the device

@pytest.mark.parametrize("device", DEVICES)
def test_the_step_on_the_device_equals_the_step_on_the_cpu(device):
    """The full step on `device` against the same step on the CPU (the same weights and batch):
    loss terms within 1e-3 (relative), the PAR and AFA labels on 99.5 % of the pixels or more,
    the gradient's direction (cosine > 0.999) and norm (1e-3)."""
    results = []
    for where in ("cpu", device):
        s = setup(where)
        without_randomness(s.model)
        results.append(full_step(s))
    (cpu_values, cpu_labels, cpu_grads), (values, labels, grads) = results
    assert values.keys() == cpu_values.keys() == {"cls", "seg", "aff", "reg"}
    for name, value in values.items():
        assert value == pytest.approx(cpu_values[name], rel=1e-3, abs=1e-6), name
    assert_labels_agree(labels, cpu_labels, 0.995)
    assert torch.nn.functional.cosine_similarity(grads, cpu_grads, dim=0) > 0.999
    assert grads.norm().item() == pytest.approx(cpu_grads.norm().item(), rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_the_speed_paths_equal_the_plain_forms_on_the_device(device):
    """--speed-paths against --no-speed-paths on `device`, stochastic depth on (the same
    draws): loss terms within 1e-4, labels on 99.9 % of the pixels, gradients (cosine)."""
    (values, labels, grads), (plain_values, plain_labels, plain_grads) = (
        full_step(setup(device, speed_paths=not plain)) for plain in (False, True))
    for name, value in values.items():
        assert value == pytest.approx(plain_values[name], rel=1e-4, abs=1e-6), name
    assert_labels_agree(labels, plain_labels, 0.999)
    assert torch.nn.functional.cosine_similarity(grads, plain_grads, dim=0) > 0.9999


@pytest.mark.parametrize("device", DEVICES)
def test_an_amp_step_is_finite_and_near_the_float32_step(device):
    """--amp (bf16 autocast; fp16 with loss scaling on a GPU without bf16) on `device`: every
    loss term and parameter finite, the terms within 5 % (+0.01) of float32's (the pseudo labels
    are made in float32 either way, so only the forward's rounding differs)."""
    fp32, _, _ = full_step(setup(device))
    s = setup(device, amp=True)
    amp, _, _ = full_step(s)
    assert all(math.isfinite(v) for v in amp.values())
    assert all(torch.isfinite(p).all() for p in s.model.parameters())
    for name, value in amp.items():
        assert value == pytest.approx(fp32[name], rel=0.05, abs=0.01), name


# ---------------------------------------------------------------- --compile

@pytest.mark.parametrize("device, backend", [
    ("cpu", "eager"),
    pytest.param("cpu", "inductor", marks=pytest.mark.slow),
    pytest.param("cuda", "inductor", marks=pytest.mark.cuda)])
def test_compile_runs_the_step_and_equals_eager(device, backend):
    """train.py --compile on `device`: the step's forward compiles (one graph or more), a second
    step compiles nothing more, and the loss terms equal the eager step's within 1e-3 (randomness
    off: inductor draws its own random numbers)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = setup(device), setup(device, compile=True, backend=backend)
    assert compiled.net is not compiled.model
    for s in (eager, compiled):
        without_randomness(s.model)
    expected, _, _ = full_step(eager)
    values, _, _ = full_step(compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for name, value in values.items():
        assert value == pytest.approx(expected[name], rel=1e-3, abs=1e-5), name
    full_step(compiled, seed=2)
    assert counters["stats"]["unique_graphs"] == graphs


def test_validation_on_images_of_five_sizes_compiles_nothing():
    """With --compile, validation (and evaluate.py, which never compiles) runs the bare model,
    eager: images of 5 sizes add no graph to the training forward's (torch.compile with
    dynamic=False would otherwise compile per size, up to dynamo's recompile limit)."""
    torch._dynamo.reset()
    counters.clear()
    s = setup("cpu", compile=True, backend="eager")
    full_step(s)
    trained = counters["stats"]["unique_graphs"]
    assert trained >= 1
    s.model.eval()
    settings = LabelSettings.from_config(s.cfg, s.model)
    cls_labels = torch.zeros(1, 20)
    cls_labels[0, 3] = 1
    for size in (64, 80, 96, 112, 128):
        validation_labels(s.model, torch.randn(1, 3, size, size + 16), cls_labels, settings)
    assert counters["stats"]["unique_graphs"] == trained
    assert not counters["recompiles"]


def test_compile_says_what_runs_compiled_and_what_eager():
    """train.py --compile prints one line at the start: what is compiled, what runs eager."""
    model, lines = AFANet(21, backbone="mit_b0"), []
    net = runner.compile_and_wrap(model, Config(compile=True), torch.device("cpu"), 1,
                                  backend="eager", log=lines.append)
    assert net is not model and len(lines) == 1
    assert "the training forward" in lines[0] and "eager: the pseudo labels" in lines[0]
    lines.clear()
    assert runner.compile_and_wrap(model, Config(), torch.device("cpu"), 1,
                                   log=lines.append) is model and lines == []


# ---------------------------------------------------------------- DDP

@pytest.mark.parametrize("device, backend", [
    ("cpu", None), ("cpu", "eager"),
    pytest.param("cuda", None, marks=pytest.mark.cuda),
    pytest.param("cuda", "inductor", marks=pytest.mark.cuda)])
def test_a_one_process_ddp_step_equals_the_plain_step(device, backend, tmp_path):
    """The DDP wrapper of a multi-process run (compile_and_wrap, compiled around DDP with a
    `backend`; SyncBatchNorm on GPUs, as train.build_model converts it) over a process group of
    one (NCCL on a GPU, gloo on the CPU): a classification-only step and a full step run, and
    give the plain steps' loss terms and parameters (the all-reduce averages over one process;
    compiled, randomness off and a tolerance of 1e-3)."""
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                            store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        plain, wrapped = setup(device), setup(device)
        if backend is not None:
            for s in (plain, wrapped):
                without_randomness(s.model)
        if device == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(wrapped.model)
        device_of = wrapped.batch["image"].device
        # world=2: the wrapper a multi-process run gets; the group it reduces over has one process
        wrapped = wrapped._replace(net=runner.compile_and_wrap(
            wrapped.model, dataclasses.replace(wrapped.cfg, compile=backend is not None),
            torch.device(device_of.type, device_of.index or 0), 2,
            backend=backend or "inductor", log=lambda line: None))
        ddp = wrapped.net if backend is None else wrapped.net._orig_mod
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        tolerance = 1e-5 if backend is None else 1e-3
        for step in (0, plain.cfg.switch_iters + 1):
            expected, _, _ = full_step(plain, step=step)
            values, _, _ = full_step(wrapped, step=step)
            for name, value in values.items():
                assert value == pytest.approx(expected[name], rel=tolerance, abs=1e-7), (step, name)
        for p, q in zip(plain.model.parameters(), wrapped.model.parameters()):
            torch.testing.assert_close(p, q, rtol=tolerance, atol=tolerance / 10)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("device", DEVICES)
def test_the_peak_memory_of_a_step(device):
    """On a GPU: a full step, mit_b1, crop 512, 2 images, speed paths on, allocates at its peak
    less than PEAK_BOUND_GIB (bench.py --memory's count, x1.2 + 0.25 GiB) and more than half
    the count. On
    the CPU: the counting method itself (bench.allocation_peak, bench.count_memory)."""
    if device == "cuda":
        s = setup(device, backbone="mit_b1", crop=512)
        full_step(s)                                  # AdamW's states exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        full_step(s, seed=2)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB
        assert 0.5 * COUNTED_GIB < peak < PEAK_BOUND_GIB, f"{peak:.2f} GiB"
        return
    kept, MiB = [], 2 ** 20

    def holds_12_mib():  # 4 + 8 MiB at once, then 1 MiB kept in place of the previous call's
        first, second = torch.ones(MiB), torch.ones(2 * MiB)
        del first, second
        kept[:] = [torch.ones(MiB // 4)]

    def replaces_8_mib():  # frees the previous call's 8 MiB before it takes 8 MiB
        kept.clear()
        kept.append(torch.ones(2 * MiB))

    peak, stage = bench.allocation_peak(holds_12_mib, holds_12_mib)
    assert 12 * MiB <= peak < 12 * MiB + 2 ** 16 and stage == "between stages"
    peak, _ = bench.allocation_peak(replaces_8_mib, replaces_8_mib)
    assert peak < 2 ** 16  # the free of a block the profiler saw allocated is counted
    count = bench.count_memory(setup("cpu"))
    trainable = sum(p.numel() * 4 for p in setup("cpu").model.parameters() if p.requires_grad)
    assert count["gradients"] == trainable and count["adamw"] == 2 * trainable
    assert count["saved_activations"] > 0 and count["peak_stage"] in bench.STAGES
    assert count["peak"] >= sum(count[k] for k in ("parameters", "gradients", "adamw", "batch",
                                                   "saved_activations"))


# ---------------------------------------------------------------- bench.py on the device

@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda"])
def test_bench_reports_seconds_and_peak_memory_per_stage_on_the_gpu(device, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--device", device, "--crops", "64", "--backbone", "mit_b0", "--steps",
                       "2", "--no-bn-stats", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    (row,), (stages,) = result["steps"], result["stages"]
    assert row["full_step_s"] > 0 and row["full_peak_mb"] > row["network_peak_mb"] * 0.5 > 0
    assert list(stages["stages_peak_mb"]) == list(bench.STAGES)
    assert "peak memory allocated during each stage" in capsys.readouterr().out

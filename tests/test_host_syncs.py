"""The host synchronisations of one training step: each read of a device value on the host (an
`.item()`, `.tolist()`, `bool(t)`, `int(t)`, a `nonzero`, a `torch.unique`, a boolean mask index)
and each tensor made on the training device from Python numbers (a host→device copy, which a GPU
waits on too) stalls the CPU until the GPU has caught up. The step may make exactly those
listed here, each with its reason in BENCHMARKS.md ("Host synchronisations per training step");
a new one fails this test. Counted on the CPU by intercepting the operators and methods that
synchronise on a GPU."""
import collections
import contextlib
import dataclasses
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_step
from config import Config
from model import AFANet
from par import PAR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Operators whose result the host must wait for (the output shape or a value is read).
READS = {"_local_scalar_dense": "item", "nonzero": "nonzero", "_unique2": "unique",
         "unique_dim": "unique", "unique_consecutive": "unique", "masked_select": "masked_select",
         "equal": "equal", "is_nonzero": "item"}
# Where a read is made on the CPU alone: fast.skip_dropped_residual runs its `nonzero` on the
# CPU only (elsewhere it is the plain product); AdamW keeps its step counters on the CPU (not
# capturable), so their `.item()`s never wait on a GPU.
CPU_ONLY = ("fast.py:skip_dropped_residual", "torch/optim/")


def call_site():
    """'file:function' of the innermost frame of the project (not of tests/) that made the call,
    or None when the call comes from a place in CPU_ONLY."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if "torch/optim/" in frame.filename:
            return None
        if os.path.dirname(os.path.abspath(frame.filename)) == ROOT:  # a module of the project
            site = f"{os.path.basename(frame.filename)}:{frame.name}"
            return None if site in CPU_ONLY else site
    return "elsewhere"


class CountSyncs(TorchDispatchMode):
    """Counts (kind, call site) of the host syncs made inside the block."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.patches = contextlib.ExitStack()

    def record(self, kind):
        site = call_site()
        if site is not None:
            self.counts[(kind, site)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS:
            self.record(READS[name])
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
            self.record("boolean mask index")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        def counted(owner, name, kind, made_from_numbers=None):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                if made_from_numbers is None or made_from_numbers(args, kwargs):
                    self.record(kind)
                return original(*args, **kwargs)
            self.patches.enter_context(_patched(owner, name, wrapper))
        for name in ("tolist", "cpu", "numpy"):
            counted(torch.Tensor, name, name)
        # Host→device: a tensor made from Python numbers on a device (torch.tensor(..., device=)
        # or t.new_tensor(...), which takes t's device).
        counted(torch, "tensor", "host→device",
                lambda args, kwargs: "device" in kwargs and not torch.is_tensor(args[0]))
        counted(torch.Tensor, "new_tensor", "host→device",
                lambda args, kwargs: not torch.is_tensor(args[1]))
        return super().__enter__()

    def __exit__(self, *exc):
        self.patches.close()
        return super().__exit__(*exc)


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def step_batch(B=2, size=64, num_classes=6):
    g = torch.Generator().manual_seed(0)
    cls_labels = torch.zeros(B, num_classes - 1)
    cls_labels[0, 1] = cls_labels[1, 3] = cls_labels[1, 0] = 1
    return {"image": torch.randn(B, 3, size, size, generator=g), "cls_labels": cls_labels,
            "valid_box": torch.tensor([[0, size, 0, size], [0, size // 2 + 8, 0, size - 16]])}


def count_step(cfg, step):
    """The host syncs of train.py's step (compute_losses, then the update) at iteration `step`,
    after one step that fills the caches; train.py's own `.tolist()` of the loss values is not
    part of it."""
    torch.manual_seed(0)
    model = AFANet(cfg.num_classes, backbone=cfg.backbone).train()
    optimizer = train_step.build_optimizer(model, cfg)
    batch, par = step_batch(), PAR()
    for counting in (False, True):
        with CountSyncs() if counting else contextlib.nullcontext() as syncs:
            out = train_step.compute_losses(model, model, par, batch, step, cfg, contextlib.nullcontext)
            train_step.update(optimizer, None, out.loss)
    return dict(syncs.counts)


# The full step after the label switch (PAR label, random walk, AFA label, L_reg): what stays.
FULL_STEP = {
    ("tolist", "cam.py:refine_propagated_with_par"): 1,  # the boxes and class counts, for the per-image loop
    ("item", "crf_loss.py:forward"): 1,                  # DenseCRFLoss's check that images are RGB 0–255
    ("tolist", "crf_loss.py:permutohedral_lattice"): 1,  # the lattice's radix: its size check and strides
    ("unique", "crf_loss.py:permutohedral_lattice"): 1,  # the lattice's vertices (their number M is a shape)
}
SPEED_PATHS = {("tolist", "fast.py:refine_cams_with_par_packed"): 1}  # K, with the box check
PLAIN_PATHS = {("item", "cam.py:_checked_box_mask"): 1}               # the box check


CFG = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=2, switch_iters=4)


@pytest.mark.parametrize("speed_paths", [True, False], ids=["speed paths", "plain forms"])
def test_the_full_step_makes_only_the_listed_host_syncs(speed_paths):
    counts = count_step(dataclasses.replace(CFG, speed_paths=speed_paths), step=5)
    assert counts == {**FULL_STEP, **(SPEED_PATHS if speed_paths else PLAIN_PATHS)}


def test_a_classification_only_step_makes_no_host_sync():
    assert count_step(CFG, step=1) == {}


def test_the_counter_sees_each_kind_of_sync():
    x = torch.tensor([0.0, 1.0, 2.0])
    with CountSyncs() as syncs:
        x.sum().item(), bool(x.any()), int(x[0]), x.tolist(), x.nonzero(), x[x > 0], torch.unique(x)
        x.new_tensor([1.0]), torch.tensor([1.0], device=x.device), torch.tensor([1.0])  # the last stays on the host
    kinds = collections.Counter(kind for kind, _ in syncs.counts.elements())
    assert kinds == {"item": 3, "tolist": 1, "nonzero": 1, "boolean mask index": 1, "unique": 1,
                     "host→device": 2}

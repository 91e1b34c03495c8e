"""Tests for fast.py: each speed variant equals the plain form it replaces (up to float rounding),
a whole training step with the speed paths equals the step without them, and an encoder the
variants do not know trains with them on (the plain forms stand in)."""
import contextlib
import copy
import dataclasses
import functools
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cam
import fast
import pipeline
import train_step
from attention_affinity import AffinityHead
from config import Config
from model import AFANet, Block, SegFormerHead, mit_b0
from par import PAR
from vit import DropPath, vit_tiny16

IGNORE = 255


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return mit_b0().eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vit_tiny16().eval()


@pytest.fixture(scope="module")
def afanet():
    torch.manual_seed(0)
    return AFANet(num_classes=5, backbone="mit_b0").eval()


# ---------------------------------------------------------------- the switch: a whole step, plain against fast

def step_batch(B=2, size=64, num_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls_labels = torch.zeros(B, num_classes - 1)
    cls_labels[0, 1] = cls_labels[1, 3] = cls_labels[1, 0] = 1
    return {"image": torch.randn(B, 3, size, size, generator=g), "cls_labels": cls_labels,
            "valid_box": torch.tensor([[0, size, 0, size], [0, size // 2 + 8, 0, size - 16]])}


def run_step(cfg, step, seed=0, backbone="mit_b0", variants=None):
    """One training step (compute_losses and backward) of a fresh network (with `variants` chosen
    for it, or by cfg.speed_paths): the loss terms, the labels, every parameter's gradient, the
    decoder's BatchNorm buffers, the variants bound."""
    torch.manual_seed(seed)
    model = AFANet(cfg.num_classes, backbone=backbone).train()  # stochastic depth on
    if variants is not None:
        pipeline.choose_paths(model, True, variants)
    torch.manual_seed(seed + 1)
    out = train_step.compute_losses(model, model, PAR(), step_batch(), step, cfg, contextlib.nullcontext)
    out.loss.backward()
    bn = model.decoder.linear_fuse.bn
    return (out, {name: p.grad for name, p in model.named_parameters()},
            [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()],
            fast.bound(model))


def assert_same_step(fast_run, plain_run):
    (out, grads, bn, _), (plain_out, plain_grads, plain_bn, _) = fast_run, plain_run
    assert out.terms.keys() == plain_out.terms.keys()
    for name in out.terms:
        torch.testing.assert_close(out.terms[name], plain_out.terms[name], rtol=1e-5, atol=1e-7)
    if plain_out.labels is not None:
        for name, label in plain_out.labels._asdict().items():
            if label is not None and label.dtype == torch.int64:  # the labels themselves
                assert torch.equal(getattr(out.labels, name), label), name
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert (grad is None) == (grads[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grads[name], grad, rtol=1e-4,
                                       atol=1e-5 * grad.abs().max().item() + 1e-8, msg=name)
    for actual, expected in zip(bn, plain_bn):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [1, 3, 5], ids=["classification only", "PAR label", "AFA label"])
@pytest.mark.parametrize("options", [{}, {"propagate_with": "attention", "reg_weight": 0.0},
                                     {"reuse_forward_cam": True, "cam_bn_stats": False}],
                         ids=["default", "mhsa", "demo options"])
def test_a_step_with_the_speed_paths_equals_the_plain_step(step, options):
    """--speed-paths against --no-speed-paths: losses, pseudo labels, every gradient and the
    decoder's BatchNorm statistics, stochastic depth on (the same draws), up to float rounding."""
    cfg = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=2, switch_iters=4, **options)
    with_speed = run_step(cfg, step)
    plain = run_step(dataclasses.replace(cfg, speed_paths=False), step)
    assert with_speed[3] == frozenset(fast.VARIANTS) and plain[3] == frozenset()
    assert_same_step(with_speed, plain)


def test_a_vit_step_with_the_speed_paths_equals_the_plain_step():
    cfg = Config(backbone="vit_tiny16", num_classes=6, crop=64, cam_iters=2, switch_iters=4)
    assert_same_step(run_step(cfg, 5, backbone=cfg.backbone),
                     run_step(dataclasses.replace(cfg, speed_paths=False), 5, backbone=cfg.backbone))


@pytest.mark.parametrize("variant", fast.VARIANTS)
def test_each_variant_turns_off_alone(variant):
    """`choose_paths(model, True, variants)`: those variants on that network, the others plain;
    the same step. The choice is the network's own: a network built later gets all of them."""
    cfg = Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=2, switch_iters=4)
    others = [v for v in fast.VARIANTS if v != variant]
    without = run_step(cfg, 5, variants=others)
    assert without[3] == frozenset(others)
    every = run_step(cfg, 5)
    assert every[3] == frozenset(fast.VARIANTS)
    assert_same_step(without, every)
    with pytest.raises(ValueError, match="unknown speed variants"):
        pipeline.choose_paths(AFANet(3, backbone="mit_b0"), True, ["no_such_variant"])


def plain_methods(model) -> bool:
    """Whether every module of `model` runs its class's own forward (and residual, statistics)."""
    return all(getattr(module, name).__func__ is getattr(type(module), name)
               for module in model.modules() for name in ("forward", "residual", "update_bn_stats")
               if hasattr(type(module), name))


def test_apply_binds_on_the_instance_and_unbinds():
    torch.manual_seed(0)
    model = AFANet(5, backbone="mit_b0")
    keys = list(model.state_dict())
    fast.apply(model)
    assert fast.bound(model) == frozenset(fast.VARIANTS) and not plain_methods(model)
    assert model.encoder.forward.__func__ is type(model.encoder).forward  # the encoder's own
    other = AFANet(5, backbone="mit_b0")                                   # other instances: plain
    assert fast.bound(other) is None and plain_methods(other)
    copied = copy.deepcopy(model)  # bound methods follow their module into the copy
    assert copied.decoder.forward.__self__ is copied.decoder
    assert list(model.state_dict()) == keys
    fast.apply(model, ())
    assert fast.bound(model) == frozenset() and plain_methods(model)
    assert pipeline.choose_paths(model, False) == pipeline.Paths()
    assert pipeline.choose_paths(model, True) == pipeline.Paths(
        fast.multi_scale_cam_partial_affinity, fast.refine_cams_with_par_packed)


class ToyEncoder(nn.Module):
    """An encoder with the interface of model.py's docstring and nothing else: a strided conv to
    stride 16, one attention map per head from its own q and k."""

    def __init__(self, dim=24, heads=2):
        super().__init__()
        self.embed_dims, self.num_heads = (dim,), (heads,)
        self.patch = nn.Conv2d(3, dim, kernel_size=16, stride=16)
        self.qk = nn.Linear(dim, 2 * dim)
        self.drop = DropPath(0.5)

    def forward(self, x):
        x = self.drop(self.patch(x))  # (B, D, h, w)
        B, D, h, w = x.shape
        q, k = self.qk(x.flatten(2).transpose(1, 2)).view(B, h * w, 2, self.num_heads[0], -1).unbind(2)
        logits = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)  # (B, nh, N, N)
        return [x], [logits]


def test_a_toy_encoder_trains_with_the_speed_paths_on():
    """Only forward(x) -> (features, attn_logits), embed_dims and num_heads: the variants fall
    back to the plain forms for what it lacks, and a few steps train it end to end."""
    cfg = Config(num_classes=6, crop=64, cam_iters=1, switch_iters=2, lr=1e-3, reg_weight=0.0)
    assert cfg.speed_paths
    torch.manual_seed(0)
    model = AFANet(cfg.num_classes, backbone=ToyEncoder(), afa_blocks=1).train()
    optimizer = train_step.build_optimizer(model, cfg)
    par, batch = PAR(num_iter=2), step_batch()
    before = copy.deepcopy(model.encoder.state_dict())
    for step in (1, 2, 3, 4):
        out = train_step.compute_losses(model, model, par, batch, step, cfg, contextlib.nullcontext)
        assert torch.isfinite(out.loss)
        train_step.update(optimizer, None, out.loss)
    assert out.labels.afa.shape == (2, 64, 64) and set(out.terms) == {"cls", "seg", "aff"}
    assert fast.bound(model) == frozenset(fast.VARIANTS)
    assert model.encoder.forward.__func__ is ToyEncoder.forward  # a foreign encoder: its own
    assert any(not torch.equal(p, before[k]) for k, p in model.encoder.state_dict().items())


# ---------------------------------------------------------------- blocks and encoders: the fused kernel, skip_dropped

@pytest.mark.parametrize("encoder", ["b0", "tiny"])
def test_blocks_through_the_fused_kernel_give_the_same_features(encoder, request):
    """run_blocks (the CAM passes' blocks whose logits are not read: `fused_block`) against
    MixTransformer.forward and VisionTransformer.forward."""
    b0 = request.getfixturevalue(encoder)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, attn_logits = b0(images)
        features_fast, attn_logits_fast = fast.run_blocks(b0, images, 2,
                                                          lambda block, x, *grid: block(x, *grid))
        _, none = fast.run_blocks(b0, images, 0, None)
    assert len(attn_logits) == (8 if encoder == "b0" else 12) and len(attn_logits_fast) == 2 and none == []
    for slow, quick in zip(features, features_fast):
        assert torch.allclose(slow, quick, atol=1e-5, rtol=1e-5)
    for slow, quick in zip(attn_logits[-2:], attn_logits_fast):
        quick = quick if encoder == "b0" else quick[:, :, 1:, 1:]  # a ViT's: patch tokens only
        assert torch.allclose(slow, quick, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["b0", "tiny"])
def test_factored_blocks_give_the_features_and_the_factors_of_the_logits(encoder, request):
    b0 = request.getfixturevalue(encoder)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, attn_logits = b0(images)
        factored_features, factors = fast.run_blocks(b0, images, 2, fast.factored_block)
        _, none = fast.run_blocks(b0, images, 0, None)
    queries, keys = [q for q, _ in factors], [k for _, k in factors]
    assert len(queries) == len(keys) == 2 and none == []
    for plain, quick in zip(features, factored_features):
        assert torch.allclose(plain, quick, atol=1e-5, rtol=1e-5)
    for logits, q, k in zip(attn_logits[-2:], queries, keys):
        assert q.shape == k.shape == ((2, 8, 16, 32) if encoder == "b0" else (2, 3, 16, 64))  # (B, nh, N, d)
        torch.testing.assert_close(q @ k.transpose(-2, -1), logits, rtol=1e-5, atol=1e-4)


def plain_residual(self, x, branch):
    """The plain residual: x + self(branch(x)), the branch run on every sample."""
    return x + self(branch(x))


@pytest.mark.parametrize("grad", [False, True])
def test_drop_path_residual_runs_the_branch_on_the_kept_samples_only(grad, monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(5, 5, requires_grad=grad)
    seen = []

    def branch(t):  # a per-sample branch that records the batch it is given
        seen.append(t.shape[0])
        return torch.tanh(t @ weight)  # (K, 3, 5)

    drop = DropPath(0.5).train()
    for seed in range(12):
        x = torch.randn(8, 3, 5, requires_grad=grad)
        torch.manual_seed(seed)
        y = fast.skip_dropped_residual(drop, x, branch)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        expected = plain_residual(drop, x, branch)  # the same draw (one per sample)
        assert torch.equal(torch.get_rng_state(), after)
        assert torch.allclose(y, expected, atol=1e-6)
        kept = (expected != x).flatten(1).any(1)  # (8,) samples whose branch was added
        assert torch.equal(y[~kept], x[~kept])  # dropped: the input as it is
        runs_all = kept.all() or (grad and not kept.any())  # else the kept samples only
        assert seen[-2:] == [8 if runs_all else int(kept.sum()), 8]
        if grad:
            (g1,) = torch.autograd.grad((y * expected.detach()).sum(), weight)
            (g2,) = torch.autograd.grad((expected * expected.detach()).sum(), weight)
            assert torch.allclose(g1, g2, atol=1e-5)
    assert any(n not in (0, 8) for n in seen)  # some draws dropped part of the batch
    assert torch.equal(fast.skip_dropped_residual(drop.eval(), x, branch), x + branch(x))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # compiled: static shapes
    fast.skip_dropped_residual(drop.train(), x, branch)
    assert seen[-1] == 8


@pytest.mark.parametrize("grad", [False, True])
def test_blocks_skipping_dropped_branches_equal_the_plain_blocks(grad):
    """MiT and ViT blocks (stochastic depth 0.5, batch 4; with gradients, batch 1 at 0.9, where
    every sample is dropped at times): outputs, logits, random state and every gradient as with the
    plain x + drop_path(branch(x)); a parameter's gradient is zero, not none, when all are dropped."""
    from vit import Block as ViTBlock

    def run(skip, make, call, shape, seed, batch, drop_prob):
        torch.manual_seed(0)
        block = make(drop_prob).train()
        if skip:  # else the plain x + drop_path(branch(x))
            block.drop_path.residual = types.MethodType(fast.skip_dropped_residual, block.drop_path)
            block.forward = types.MethodType(fast.block_forward, block)
        block.mlp.register_forward_hook(lambda m, args, out: mlp_batches.append(args[0].shape[0]))
        x = torch.randn(batch, *shape, requires_grad=grad)
        torch.manual_seed(seed)
        with torch.set_grad_enabled(grad):
            outputs = call(block, x)
            if grad:
                sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs).backward()
        grads = [p.grad for p in block.parameters()] + ([x.grad] if grad else [])
        return outputs, torch.get_rng_state(), grads

    mlp_batches = []
    cases = [(lambda p: Block(16, 2, 4, 2, drop_path=p), (64, 16),
              lambda b, x: (fast.fused_block(b, x, 8, 8), *b(x, 8, 8))),
             (lambda p: ViTBlock(16, 2, drop_path=p), (10, 16),
              lambda b, x: (fast.fused_block(b, x), *b(x)))]
    for make, shape, call in cases:
        skipped = False
        for batch, drop_prob in [(4, 0.5)] + ([(1, 0.9)] if grad else []):
            for seed in range(8):
                mlp_batches.clear()
                plain = run(False, make, call, shape, seed, batch, drop_prob)
                assert min(mlp_batches) == batch
                mlp_batches.clear()
                ours = run(True, make, call, shape, seed, batch, drop_prob)
                skipped = skipped or min(mlp_batches) < batch
                assert torch.equal(plain[1], ours[1])  # the same draws
                for a, b in zip(plain[0], ours[0]):
                    assert torch.allclose(a, b, atol=1e-5)
                for a, b in zip(plain[2], ours[2]):
                    assert (a is None) == (b is None)
                    if a is not None:
                        assert torch.allclose(a, b, atol=3e-5 * a.abs().max().item() + 1e-7)  # float sums
        assert skipped  # some draws dropped a sample's MLP branch, which then did not run


# ---------------------------------------------------------------- the decoder: grid_fusion, bn_stats_moments

@pytest.mark.parametrize("grids", ["mit", "vit"])
def test_fusion_on_the_stage_grids_equals_the_plain_fusion(grids):
    # decoder_forward ("grid_fusion") against the plain forward: the same logits, gradients
    # (features and every parameter) and BatchNorm statistics in train mode, the same logits in
    # eval mode; on MiT-like grids that do not divide evenly and on one shared grid (a ViT's)
    torch.manual_seed(0)
    if grids == "mit":
        dims = (8, 16, 24, 32)
        shapes = [(17, 21), (9, 11), (5, 6), (5, 6)]
    else:
        dims = (20, 20, 20, 20)
        shapes = [(6, 7)] * 4
    plain = SegFormerHead(dims, num_classes=3, embed_dim=12)
    quick = copy.deepcopy(plain)
    quick.forward = types.MethodType(fast.decoder_forward, quick)
    features = [torch.randn(2, c, *hw) for c, hw in zip(dims, shapes)]
    results = []
    for head in (plain, quick):
        inputs = [f.clone().requires_grad_() for f in features]
        torch.manual_seed(1)  # the same Dropout2d draws
        out = head.train()(inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [x.grad for x in inputs] + [p.grad for p in head.parameters()]
        bn = head.linear_fuse.bn
        with torch.no_grad():
            evaluated = head.eval()(features)
        results.append((out.detach(), grads, bn.running_mean.clone(), bn.running_var.clone(), evaluated))
    (out_p, grads_p, mean_p, var_p, eval_p), (out_f, grads_f, mean_f, var_f, eval_f) = results
    assert out_p.shape == (2, 3, *shapes[0]) and out_p.abs().max() > 0.1
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eval_f, eval_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_f, mean_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var_f, var_p, rtol=1e-5, atol=1e-6)
    assert all(g is not None for g in grads_f) and len(grads_f) == len(grads_p)
    for g_f, g_p in zip(grads_f, grads_p):  # the Linear biases' are 0 up to rounding (train-mode BN)
        torch.testing.assert_close(g_f, g_p, rtol=1e-4, atol=5e-5)


def test_interpolation_matrix_is_f_interpolate():
    # U_h x U_wᵀ is F.interpolate's bilinear resizing (up, down, same size, odd ratios), and
    # bilinear_adjoint is its adjoint: <up(x), y> = <x, adjoint(y)>
    torch.manual_seed(0)
    for (h_in, w_in), (h_out, w_out) in [((5, 6), (17, 21)), ((9, 11), (17, 21)), ((7, 7), (7, 7)),
                                         ((17, 21), (5, 6)), ((1, 3), (4, 10))]:
        x = torch.randn(2, 3, h_in, w_in)
        U_h, U_w = fast.interpolation_matrix(h_out, h_in), fast.interpolation_matrix(w_out, w_in)
        expected = F.interpolate(x, size=(h_out, w_out), mode="bilinear", align_corners=False)
        torch.testing.assert_close(U_h @ x @ U_w.T, expected, rtol=1e-6, atol=1e-6)
        assert torch.allclose(U_h.sum(1), torch.ones(h_out))  # bilinear rows sum to 1
        y = torch.randn(2, 3, h_out, w_out)
        torch.testing.assert_close(fast.bilinear_adjoint(y, (h_in, w_in)), U_h.T @ y @ U_w, rtol=1e-5, atol=1e-5)


def test_fusion_by_grid_equals_fusion_of_the_concatenation():
    # conv(cat_s up(Linear_s f_s)) = β + Σ_g A_g·up(x_g): on grids that do not divide evenly, with
    # two stages on one grid as AFA's strides (4, 2, 2, 1) give, kept (8 channels) and projected
    # (16 and 24 + 32 channels > embed_dim = 12)
    torch.manual_seed(0)
    head = SegFormerHead((8, 16, 24, 32), num_classes=3, embed_dim=12)
    features = [torch.randn(2, 8, 17, 21), torch.randn(2, 16, 9, 11), torch.randn(2, 24, 5, 6),
                torch.randn(2, 32, 5, 6)]
    with torch.no_grad():
        expected = head.linear_fuse.conv(head.embed(features))  # (2, 12, 17, 21)
        terms, bias = fast.fusion_by_grid(head, features)
    assert [(x.shape[1], A is None) for x, A in terms] == [(12, True), (12, True), (8, False)]
    fused = bias[:, None, None]
    for x, projection in terms:
        if projection is not None:
            x = torch.einsum("bkhw,ek->behw", x, projection)
        fused = fused + F.interpolate(x, size=(17, 21), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def batchnorm_state(head):
    bn = head.linear_fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def assert_same_batchnorm_state(actual, expected):
    # relative to 1e-5, each buffer against its largest channel: a channel whose mean is near 0
    # carries the float rounding of the others (~1e-8 here, the plain pass's own against float64)
    (mean, var, count), (expected_mean, expected_var, expected_count) = actual, expected
    assert count == expected_count
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5 * expected_mean.abs().max().item())
    torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-5 * expected_var.abs().max().item())


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("size", [(96, 160), (112, 112)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backbone", ["mit_b0", "vit_tiny16"])  # stride-4 + coarser grids; one stride-16 grid
def test_update_bn_stats_from_moments_equal_the_plain_pass(backbone, batch, size, momentum):
    torch.manual_seed(0)
    model = AFANet(num_classes=5, backbone=backbone).train()
    model.decoder.linear_fuse.bn.momentum = momentum
    plain, moments = copy.deepcopy(model.decoder), copy.deepcopy(model.decoder)
    before = batchnorm_state(plain)
    with torch.no_grad():
        for seed in (1, 2):  # two updates: the running averages compound
            features, _ = model.encoder(torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)))
            plain.update_bn_stats(features)
            fast.update_bn_stats_from_moments(moments, features)
    expected = batchnorm_state(plain)
    assert int(expected[2]) == 2
    assert (expected[0] - before[0]).abs().max() > 1e-3 and (expected[1] - before[1]).abs().max() > 1e-3
    assert_same_batchnorm_state(batchnorm_state(moments), expected)


def test_update_bn_stats_from_moments_on_uneven_grids():
    # the grids of test_fusion_by_grid: no stage grid divides the stride-4 one evenly
    torch.manual_seed(0)
    plain = SegFormerHead((8, 16, 24, 32), num_classes=3, embed_dim=12).train()
    moments = copy.deepcopy(plain)
    features = [torch.randn(2, 8, 17, 21) + 3, torch.randn(2, 16, 9, 11), torch.randn(2, 24, 5, 6),
                torch.randn(2, 32, 5, 6)]
    plain.update_bn_stats(features)
    fast.update_bn_stats_from_moments(moments, features)
    assert_same_batchnorm_state(batchnorm_state(moments), batchnorm_state(plain))


def test_update_bn_stats_from_moments_keep_a_pending_backward_valid():
    # the training step: forward with graph (it saves the BatchNorm buffers), CAM passes that
    # update them, then backward; the plain pass allows it, so must this one
    torch.manual_seed(0)
    head = SegFormerHead((8, 16, 24, 32), num_classes=3, embed_dim=12).train()
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4),
                torch.randn(2, 32, 4, 4)]
    for update in (head.update_bn_stats,
                   functools.partial(fast.update_bn_stats_from_moments, head)):
        loss = head(features).square().mean()
        update([f + 1 for f in features])
        loss.backward()
    assert head.linear_fuse.conv.weight.grad is not None


def test_update_bn_stats_from_moments_follow_the_batchnorm_switches():
    # as a BatchNorm forward: nothing moves in eval mode or without running statistics, and a
    # single value per channel is refused
    torch.manual_seed(0)
    head = SegFormerHead((8, 16, 24, 32), num_classes=3, embed_dim=12)
    features = [torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2), torch.randn(1, 24, 1, 1),
                torch.randn(1, 32, 1, 1)]
    before = batchnorm_state(head)
    fast.update_bn_stats_from_moments(head.eval(), features)
    head.train().linear_fuse.bn.track_running_stats = False
    fast.update_bn_stats_from_moments(head, features)
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_state(head), before))
    head.linear_fuse.bn.track_running_stats = True
    single = [f[..., :1, :1] for f in features]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        head.linear_fuse.bn(head.linear_fuse.conv(head.embed(single)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast.update_bn_stats_from_moments(head, single)


# ---------------------------------------------------------------- the multi-scale CAM: partial_affinity

def test_factored_affinity_equals_the_plain_formula():
    torch.manual_seed(4)
    head = AffinityHead(num_maps=6)
    queries = [torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)]  # two blocks' heads, (B, m_i, N, d)
    keys = [torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)]
    blocks = [q @ k.transpose(-2, -1) for q, k in zip(queries, keys)]  # (B, m_i, N, N) each
    plain = head(torch.cat(blocks, dim=1))  # (B, N, N), the plain formula
    factored = fast.factored_affinity(head, queries, keys)
    torch.testing.assert_close(factored, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(factored, factored.transpose(1, 2))  # L + Lᵀ + b is symmetric exactly
    with pytest.raises(ValueError, match="queries and keys"):
        fast.factored_affinity(head, queries[:1], keys[:1])
    with pytest.raises(ValueError, match="attn_logits"):
        head(blocks)  # the plain path takes one (B, num_maps, N, N) tensor


def test_partial_cam_equals_cam(afanet):
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cams, affinity = afanet.cam(images)
        for n in (0, 2, 4):
            fast_cams, fast_affinity = fast.partial_cam(afanet, images, n)
            torch.testing.assert_close(fast_cams, cams, rtol=1e-5, atol=1e-5)
            assert fast_affinity.shape == (n, 16, 16)
            torch.testing.assert_close(fast_affinity, affinity[:n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_pairwise"):
        fast.partial_cam(afanet, images, 5)


def test_partial_cam_with_attention_gives_the_mhsa_affinity(afanet):
    """The MHSA ablation's pass: the same CAMs, and in place of the learned affinity the MHSA
    affinity of the logits q·kᵀ the AFA head reads, of the first n images."""
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cams, _ = afanet.cam(images)
        _, plain = afanet.cam(images, pairwise="attention")  # (B, N, N)
        attn_logits = afanet.encoder(images)[1][-afanet.afa_blocks:]  # each (B, nh, N, N)
        assert torch.equal(plain, afanet.mhsa_affinity(attn_logits))
        for n in (0, 2, 4):
            fast_cams, scores = fast.partial_cam(afanet, images, n, pairwise="attention")
            torch.testing.assert_close(fast_cams, cams, rtol=1e-5, atol=1e-5)
            assert scores.shape == (n, 16, 16)
            torch.testing.assert_close(scores, plain[:n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_pairwise"):
        fast.partial_cam(afanet, images, 5, pairwise="attention")
    with pytest.raises(ValueError, match="pairwise"):
        fast.partial_cam(afanet, images, 4, pairwise="mhsa")


def decoder_batchnorm_state(model):
    bn = model.decoder.linear_fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("num_affinity", [None, 0, 2])  # None: the plain `cam`
def test_cam_in_train_mode_updates_decoder_batchnorm_as_a_full_decoder_pass(num_affinity):
    # The release's CAM path runs the whole decoder, in train mode: its BatchNorm statistics see
    # every CAM pass. Ours runs it up to the BatchNorm only; the statistics must be the same.
    torch.manual_seed(0)
    model = AFANet(num_classes=5, backbone="mit_b0").train()  # DropPath active
    release = copy.deepcopy(model)
    images = torch.randn(4, 3, 64, 64)
    before = decoder_batchnorm_state(model)
    with torch.no_grad():
        for seed in (1, 2):  # two passes: the running averages compound
            torch.manual_seed(seed)
            if num_affinity is None:
                model.cam(images)
            else:
                fast.partial_cam(model, images, num_affinity)
            torch.manual_seed(seed)  # the same stochastic-depth draws
            release(images)  # the release's CAM path: encoder and the whole decoder
    mean, var, count = decoder_batchnorm_state(model)
    expected_mean, expected_var, expected_count = decoder_batchnorm_state(release)
    assert count == expected_count == 2
    assert (mean - before[0]).abs().max() > 1e-3 and (var - before[1]).abs().max() > 1e-3
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, expected_var, rtol=0, atol=1e-6)


def test_multi_scale_cam_partial_affinity_equals_the_plain_computation(afanet):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        forward_cams = afanet(images).cams  # (2, 4, 4, 4), the un-flipped images at scale 1.0
    plain_cams, plain_affinity = cam.multi_scale_cam(afanet, images)
    assert plain_affinity.shape == (2, 36, 36)  # the 96 × 96 input at scale 1.5, un-flipped half
    for function in (cam.multi_scale_cam, fast.multi_scale_cam_partial_affinity):
        for options in (dict(), dict(forward_cams=forward_cams)):  # equal in eval mode
            cams, affinity = function(afanet, images, **options)
            torch.testing.assert_close(cams, plain_cams, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(affinity, plain_affinity, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="forward_cams"):
        fast.multi_scale_cam_partial_affinity(afanet, images, forward_cams=forward_cams[:, :, :2])


# ---------------------------------------------------------------- the PAR label: packed_par

def test_refine_cams_with_par_packed_equals_the_plain_refinement():
    # different numbers of present classes per image exercise the padded channel slots
    generator = torch.Generator().manual_seed(0)
    B, num_foreground, H, W = 3, 6, 26, 30
    images = F.interpolate(torch.rand(B, 3, 5, 6, generator=generator), size=(H, W), mode="bilinear")
    cams = F.interpolate(torch.rand(B, num_foreground, 4, 5, generator=generator), size=(H, W), mode="bilinear")
    cls_labels = torch.tensor([[0, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    valid_box = torch.tensor([[0, 26, 0, 30], [2, 20, 3, 30], [5, 26, 0, 25]])
    par = PAR()
    batched = fast.refine_cams_with_par_packed(par, images, cams, cls_labels, valid_box=valid_box)
    assert torch.equal(batched, cam.refine_cams_with_par(par, images, cams, cls_labels, valid_box=valid_box))
    for b in range(B):
        single = fast.refine_cams_with_par_packed(par, images[b:b + 1], cams[b:b + 1], cls_labels[b:b + 1],
                                             valid_box=valid_box[b:b + 1])
        assert torch.equal(batched[b:b + 1], single)
    assert set(batched[0].unique().tolist()) <= {0, 2, 5, 6, IGNORE}
    assert set(batched[1].unique().tolist()) <= {0, IGNORE}  # background only
    assert (batched[1, :2] == IGNORE).all() and (batched[2, :, 25:] == IGNORE).all()
    assert len(batched[0].unique()) > 3  # not trivial

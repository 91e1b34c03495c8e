"""The speed variants: the plain forms' numbers with less work, one function per variant.

The method files hold the plain forms only; with `--no-speed-paths` they are all that runs. Each
function here replaces one of them and takes the plain module it works on; its docstring opens
with the plain function it replaces and the identity that makes the two equal (up to float
rounding), and tests/test_fast.py holds its equality test. `apply(model, variants)` binds the
variants onto one network's modules as instance attributes that shadow the plain methods (the
classes, state dicts and checkpoints are untouched; `apply(model, ())` unbinds them), `chain`
gives the label chain's two stage functions, and `pipeline.choose_paths` is the one caller. An
encoder other than a MixTransformer or a VisionTransformer keeps its plain forward.

The variants (`VARIANTS`; `without(*names)` turns some off, `bench.py --variants` times each):
- "skip_dropped": stochastic depth does not compute the branch of a dropped sample (CPU, eager);
- "grid_fusion": the decoder's 1×1 fusion conv runs on the stage grids, not at stride 4;
- "bn_stats_moments": the CAM passes' decoder BatchNorm statistics from moments on the stage grids;
- "partial_affinity": the multi-scale CAM computes only the affinity it keeps, from q and k;
- "packed_par": the PAR label refines each image's present classes only.
`pipeline.choose_paths(model, speed_paths, variants)` chooses them once per network, where it is
built (train.build_model, evaluate.py, bench.py); nothing is chosen per process or per step.

Symbols: B batch, C classes incl. background, K kept channels, H×W crop, N tokens, nh heads,
d head width, T tokens of a ViT with its class token.
"""
import functools
import types

import torch
import torch.nn.functional as F

import cam
from model import PAIRWISE, Block, MixTransformer
from vit import Block as ViTBlock
from vit import DropPath, VisionTransformer

VARIANTS = ("skip_dropped", "grid_fusion", "bn_stats_moments", "partial_affinity",
            "packed_par")
def bindings(model):
    """Every (module, method name, variant function, variant) that `apply` may bind on `model`."""
    for module in model.modules():
        if isinstance(module, DropPath):
            yield module, "residual", skip_dropped_residual, "skip_dropped"
        if isinstance(module, (Block, ViTBlock)):
            yield module, "forward", block_forward, "skip_dropped"
    decoder = getattr(model, "decoder", None)  # a wrapper of an AFANet may have none
    if decoder is not None:
        yield decoder, "forward", decoder_forward, "grid_fusion"
        yield decoder, "update_bn_stats", update_bn_stats_from_moments, "bn_stats_moments"


def apply(model, variants=VARIANTS):
    """Bind `variants` (names of VARIANTS) onto the modules of `model` (an AFANet) as instance
    attributes that shadow the plain methods, and unbind those bound before that are not asked
    for now; `model` then runs them in its forward, its CAM passes and its decoder statistics.
    The choice is recorded as `model.speed_variants`. Returns `model`."""
    variants = frozenset(variants)
    if not variants <= set(VARIANTS):
        raise ValueError(f"unknown speed variants {sorted(variants - set(VARIANTS))}; choose from {VARIANTS}")
    before = bound(model) or frozenset()
    if bound(model) == variants:
        return model
    for module, name, function, variant in bindings(model):
        if variant in variants:
            setattr(module, name, types.MethodType(function, module))
        elif variant in before:
            delattr(module, name)  # the class's plain method again
    model.speed_variants = variants
    return model


def bound(model):
    """The variants `apply` bound onto `model` (a frozenset), or None if it never ran on it."""
    return getattr(model, "speed_variants", None)


def chain(variants=VARIANTS) -> dict:
    """The label chain's stage functions for `variants`: {"multi_scale_cam": ...,
    "refine_cams_with_par": ...}, fast.py's where the variant is on, cam.py's otherwise."""
    return {"multi_scale_cam": (multi_scale_cam_partial_affinity if "partial_affinity" in variants
                                else cam.multi_scale_cam),
            "refine_cams_with_par": (refine_cams_with_par_packed if "packed_par" in variants
                                     else cam.refine_cams_with_par)}


# =============================================================================================
# Transformer blocks: "skip_dropped", and the fused kernel and the factors q, k of the CAM passes
# =============================================================================================
def skip_dropped_residual(drop_path, x, branch):
    """Replaces the plain residual x + drop_path(branch(x)); identity: a dropped sample's branch is
    multiplied by 0, so it need not be computed. `branch` is a function of x's samples one by one;
    the same draw (`DropPath.sample_mask`), the same values up to float rounding. On the CPU in
    eager mode; on other devices (no host sync) and under torch.compile (static shapes), the
    plain product. With gradients and every sample dropped the branch still runs, so that its
    parameters get zero gradients (not none) as in the plain form."""
    if drop_path.drop_prob == 0.0 or not drop_path.training:
        return x + branch(x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return x + drop_path(branch(x))
    keep_prob = 1.0 - drop_path.drop_prob
    mask = drop_path.sample_mask(x)  # (B, 1, ..., 1), the plain forward's draw
    kept = mask.view(-1).nonzero().view(-1)  # (K,) indices of the kept samples
    if len(kept) == x.shape[0] or (len(kept) == 0 and torch.is_grad_enabled()):
        out = branch(x)
        return x + out * mask.to(out.dtype) / keep_prob
    if len(kept) == 0:
        return x
    x_kept = x[kept]  # (K, ...)
    out = branch(x_kept)
    return x.index_copy(0, kept, x_kept + out * mask[kept].to(out.dtype) / keep_prob)


def residual(drop_path, x, branch):
    """x + drop_path(branch(x)), through `skip_dropped_residual` where "skip_dropped" bound it."""
    skip = getattr(drop_path, "residual", None)  # `skip_dropped_residual`, where bound
    return x + drop_path(branch(x)) if skip is None else skip(x, branch)


def block_forward(block, x, *grid):
    """Replaces `Block.forward(x, *grid)` (model.py's with grid = (H, W), vit.py's without);
    identity: its second residual through `residual` ("skip_dropped")."""
    attn_out, logits = block.attn(block.norm1(x), *grid)  # (B, N, C), (B, nh, N, N_kv)
    x = x + block.drop_path(attn_out)
    return residual(block.drop_path, x, lambda t: block.mlp(block.norm2(t), *grid)), logits


def fused_attention(attn, x, *grid):
    """Replaces the out of `Attention.forward(x, *grid)` when its logits are not read; identity:
    softmax(q·kᵀ/√d)·v is what PyTorch's fused kernel computes, with the same 1/√d, without
    forming the logits. x (B, N_q, C) -> (B, N_q, C)."""
    q, k, v = attn.queries_keys_values(x, *grid)  # (B, nh, N_q, d), (B, nh, N_kv, d), (B, nh, N_kv, d)
    return attn.merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N_q, C)


def fused_block(block, x, *grid):
    """Replaces `Block.forward(x, *grid)` when its logits are not read: the block through
    `fused_attention`, both residuals through `residual`. x (B, N, C) -> (B, N, C)."""
    x = residual(block.drop_path, x, lambda t: fused_attention(block.attn, block.norm1(t), *grid))
    return residual(block.drop_path, x, lambda t: block.mlp(block.norm2(t), *grid))


def factored_block(block, x, *grid):
    """Replaces `Block.forward(x, *grid)` with the logits as their factors: (x (B, N, C),
    (q (B, nh, N, d), k (B, nh, N_kv, d))); identity: the logits are q·kᵀ of these very q and k,
    and the out is `fused_attention`'s. A ViT's (no grid) q and k are its patch tokens'."""
    q, k, v = block.attn.queries_keys_values(block.norm1(x), *grid)  # (B, nh, N, d), k, v (B, nh, N_kv, d)
    x = x + block.drop_path(block.attn.merge_heads(F.scaled_dot_product_attention(q, k, v)))
    x = residual(block.drop_path, x, lambda t: block.mlp(block.norm2(t), *grid))
    return x, ((q, k) if grid else (q[:, :, 1:], k[:, :, 1:]))  # a ViT's: (B, nh, N, d) each


def run_blocks(encoder, x, num_attn, last_block):
    """The plain `encoder.forward(x)` of a MixTransformer or a VisionTransformer, but with the
    last `num_attn` blocks run by `last_block(block, x, *grid) -> (x, extra)` and the others by
    `fused_block`: (features, [extra of each of the last num_attn blocks])."""
    if x.ndim != 4 or x.shape[1] != encoder.in_chans:
        raise ValueError(f"x must be (B, {encoder.in_chans}, H, W), got {tuple(x.shape)}")
    B = x.shape[0]
    features, extras, index = [], [], 0
    if isinstance(encoder, VisionTransformer):
        first = encoder.depth - num_attn
        x, h, w = encoder.embed(x)  # (B, T, D)
        for index, block in enumerate(encoder.blocks):
            if index >= first:
                x, extra = last_block(block, x)
                extras.append(extra)
            else:
                x = fused_block(block, x)  # (B, T, D)
            if index in encoder.feature_blocks:
                features.append(encoder.feature_map(x, h, w))  # (B, D, h, w)
        return features, extras
    first = sum(encoder.depths) - num_attn
    for patch_embed, blocks, norm in encoder.stages():
        x, H, W = patch_embed(x)  # (B, N_i, C_i), N_i = H_i·W_i
        for block in blocks:
            if index >= first:
                x, extra = last_block(block, x, H, W)
                extras.append(extra)
            else:
                x = fused_block(block, x, H, W)  # (B, N_i, C_i)
            index += 1
        x = norm(x).transpose(1, 2).reshape(B, -1, H, W).contiguous()  # (B, C_i, H_i, W_i), as MixTransformer's
        features.append(x)
    return features, extras


# =============================================================================================
# The decoder: "grid_fusion", "bn_stats_moments"
# =============================================================================================
def decoder_forward(decoder, features):
    """Replaces `SegFormerHead.forward(features)` ("grid_fusion"); identity: its fusion conv of the
    stride-4 concatenation equals `fuse_by_grid`. features, 4 maps (B, C_i, H_i, W_i) ->
    logits (B, C, H_1, W_1)."""
    x = decoder.linear_fuse.relu(decoder.linear_fuse.bn(fuse_by_grid(decoder, features)))
    return decoder.linear_pred(decoder.dropout(x))  # (B, C, H_1, W_1)


@torch.no_grad()
def update_bn_stats_from_moments(decoder, features):
    """Replaces `SegFormerHead.update_bn_stats(features)`, which runs the fusion at
    stride 4 ("bn_stats_moments"); identity: in train mode the BatchNorm takes only the per-channel
    mean and variance of its input y = conv(embed(features)), and both follow from the moments of
    the features on their own grids. Returns nothing.

    Why it is the same: write y = β + Σ_g A_g·up_g(x_g) (`fusion_by_grid`: the fusion conv and
    the Linears commute with upsampling), up_g(x) = U_h,g x U_w,gᵀ the separable bilinear
    upsampling from grid g to (H_1, W_1) (`interpolation_matrix`), and P = B·H_1·W_1 pixels:
        mean(y)  = β + Σ_g A_g m_g,             m_g = Σ_{b,i,j} a_g[i] b_g[j] x_g[b, :, i, j] / P,
        P·var(y) = Σ_{g,g'} diag(A_g S_gg' A_g'ᵀ),
            S_gg' = Σ_b Σ_{i,j,k,l} x̃_g[b, :, i, j] x̃_g'[b, :, k, l]ᵀ G_h[i, k] G_w[j, l],
    with a_g, b_g the column sums of U_h,g, U_w,g, x̃_g = x_g − m_g (bilinear rows sum to 1, so
    up_g(x̃_g) = up_g(x_g) − m_g), and the Gram matrices G_h = U_h,gᵀ U_h,g', G_w = U_w,gᵀ U_w,g'.
    The running statistics then move as nn.BatchNorm2d moves them: the unbiased variance
    P·var / (P − 1), momentum or (momentum None) the cumulative average, num_batches_tracked + 1.
    The same values up to float rounding (~1e-6, computed in float32 also under autocast); the
    work is on the stage grids, in min(C_g, embed_dim) channels, never at stride 4 in embed_dim.

    Where the BatchNorm is a SyncBatchNorm of several processes (DDP), the statistics are the
    whole batch's over all of them, as SyncBatchNorm's own: the sums behind m_g and P, then the
    sums of squares, are all-reduced over its process group (two all-reduces).
    """
    bn = decoder.linear_fuse.bn
    if not (bn.training and bn.track_running_stats):
        return  # a train-mode forward would update nothing either
    group = synchronised_group(bn)
    B, _, H, W = features[0].shape  # (H_1, W_1), stride 4
    with torch.autocast(features[0].device.type, enabled=False):  # statistics in float32
        terms, bias = fusion_by_grid(decoder, [f.float() for f in features])
        matrices, sums = [], []
        for x, _ in terms:  # x (B, C_g, H_g, W_g)
            U_h = interpolation_matrix(H, x.shape[-2], device=x.device)  # (H_1, H_g)
            U_w = interpolation_matrix(W, x.shape[-1], device=x.device)  # (W_1, W_g)
            weights = torch.outer(U_h.sum(0), U_w.sum(0)).flatten()  # (H_g·W_g), a_g[i]·b_g[j]
            matrices.append((U_h, U_w))
            sums.append((x.flatten(2) @ weights).sum(0))  # (C_g), P·m_g over this process's batch
        pixels = B * H * W  # P, this process's
        if group is not None:  # the batch of every process: the sums and P added up, on the device
            totals = torch.cat([*sums, torch.full((1,), pixels, dtype=bias.dtype, device=bias.device)])
            torch.distributed.all_reduce(totals, group=group)
            sums, pixels = totals[:-1].split([len(s) for s in sums]), totals[-1]
        elif pixels < 2:
            raise ValueError(f"BatchNorm needs more than 1 value per channel in training, got {pixels}")
        mean, centred = bias.clone(), []
        for (x, projection), (U_h, U_w), m in zip(terms, matrices, sums):
            m = m / pixels  # (C_g), m_g
            mean += m if projection is None else projection @ m
            centred.append((x - m[:, None, None], projection, U_h, U_w))  # x̃_g (B, C_g, H_g, W_g)
        square_sum = torch.zeros_like(mean)  # P·var(y), (embed_dim)
        for first in range(len(centred)):
            for second in range(first, len(centred)):
                # S_g'g = S_gg'ᵀ: g is the finer grid, its map is carried onto the coarser g'
                (x, A, U_h, U_w), (x_other, A_other, U_h_other, U_w_other) = sorted(
                    (centred[first], centred[second]), key=lambda term: -term[0].shape[-2:].numel())
                if x.shape[-2:] == x_other.shape[-2:] == (H, W):
                    carried = x  # U = I on the stride-4 grid
                elif x.shape[-2:] == (H, W):  # G_hᵀ x̃_g G_w = U_h,g'ᵀ x̃_g U_w,g', upsampling's adjoint
                    carried = bilinear_adjoint(x, x_other.shape[-2:])  # (B, C_g, H_g', W_g')
                else:
                    G_h, G_w = U_h.T @ U_h_other, U_w.T @ U_w_other  # (H_g, H_g'), (W_g, W_g')
                    carried = G_h.T @ (x @ G_w)  # (B, C_g, H_g', W_g')
                if A is None and A_other is None:
                    products = (carried.flatten(2) * x_other.flatten(2)).sum(2).sum(0)  # diag(S_gg'), (embed_dim)
                else:
                    S = (carried.flatten(2) @ x_other.flatten(2).transpose(1, 2)).sum(0)  # (C_g, C_g'), S_gg'
                    left = S if A is None else A @ S  # (embed_dim, C_g')
                    # diag(A_g S_gg' A_g'ᵀ), (embed_dim)
                    products = left.diagonal() if A_other is None else (left * A_other).sum(1)
                square_sum += products if first == second else 2 * products
        if group is not None:
            torch.distributed.all_reduce(square_sum, group=group)
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    # Through .data, as the BatchNorm kernel writes them: a train-mode forward whose graph saved
    # the buffers (the step's forward, before its CAM passes) can still run its backward.
    bn.running_mean.data.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.data.mul_(1 - factor).add_(square_sum / (pixels - 1), alpha=factor)  # unbiased


def synchronised_group(bn):
    """The process group whose batch a SyncBatchNorm's statistics cover (None: this process's)."""
    dist = torch.distributed
    if not (isinstance(bn, torch.nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def fuse_by_grid(decoder, features):
    """The plain `decoder.linear_fuse.conv(decoder.embed(features))` (B, embed_dim, H_1, W_1)
    without the stride-4 map of 4·embed_dim channels: β + Σ_g up_g(A_g·x_g), each A_g applied on
    its own grid, then upsampled; the 1×1 conv and bilinear upsampling commute (`fusion_by_grid`),
    so the values are the same up to float rounding (~1e-6), and gradients reach every Linear and
    the fusion conv through A_g and β. The fusion conv at stride 4 and its backward never run."""
    terms, bias = fusion_by_grid(decoder, features)
    size = features[0].shape[-2:]  # (H_1, W_1), stride 4
    fused = None
    for x, projection in terms:  # x (B, C_g, H_g, W_g), projection A_g (embed_dim, C_g) or None
        if projection is not None:
            x = F.conv2d(x, projection[:, :, None, None])  # (B, embed_dim, H_g, W_g)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, embed_dim, H_1, W_1)
        fused = x if fused is None else fused + x
    return fused + bias[:, None, None]  # (B, embed_dim, H_1, W_1)


def fusion_by_grid(decoder, features):
    """`linear_fuse.conv(embed(features))` as β + Σ_g A_g·up_g(x_g) over the grids g of the
    stages: a list of (x_g (B, C_g, H_g, W_g), A_g (embed_dim, C_g) or None), and β (embed_dim).
    With W_s the conv's weights that read stage s and Linear_s(x) = L_s·x + b_s,
        conv(cat_s up(Linear_s f_s)) = Σ_s W_s·up(L_s f_s + b_s) = Σ_s up((W_s L_s) f_s) + Σ_s W_s b_s,
    since the 1×1 conv mixes channels and bilinear upsampling mixes pixels with weights that
    sum to 1, so the two commute. The stages on one grid are concatenated: x_g = cat_s f_s,
    A_g = cat_s W_s L_s; where that is wider than embed_dim, x_g is A_g·x_g and A_g is None
    (the identity), whichever has fewer channels."""
    if len(features) != decoder.num_stages:
        raise ValueError(f"features must hold {decoder.num_stages} maps, got {len(features)}")
    weight = decoder.linear_fuse.conv.weight.flatten(1)  # (embed_dim, 4·embed_dim)
    embed_dim = weight.shape[0]
    by_grid, bias = {}, 0  # (H_g, W_g) -> ([f_s], [W_s L_s]) of the stages on that grid
    for slot, stage in enumerate(reversed(range(1, decoder.num_stages + 1))):  # order c4, c3, c2, c1
        linear = getattr(decoder, f"linear_c{stage}").proj
        stage_weight = weight[:, slot * embed_dim:(slot + 1) * embed_dim]  # (embed_dim, embed_dim), W_s
        feature = features[stage - 1]  # (B, C_s, H_s, W_s)
        maps, projections = by_grid.setdefault(tuple(feature.shape[-2:]), ([], []))
        maps.append(feature)
        projections.append(stage_weight @ linear.weight)  # (embed_dim, C_s), W_s L_s
        bias = bias + stage_weight @ linear.bias  # (embed_dim)
    terms = []
    for maps, projections in by_grid.values():
        if sum(x.shape[1] for x in maps) > embed_dim:  # x_g = Σ_s (W_s L_s) f_s, (B, embed_dim, H_g, W_g)
            terms.append((sum(F.conv2d(x, A[:, :, None, None]) for x, A in zip(maps, projections)), None))
        elif len(maps) == 1:  # x_g = f_s (B, C_s, H_g, W_g), A_g = W_s L_s (embed_dim, C_s)
            terms.append((maps[0], projections[0]))
        else:  # x_g = cat_s f_s (B, C_g, H_g, W_g), A_g = cat_s W_s L_s (embed_dim, C_g)
            terms.append((torch.cat(maps, dim=1), torch.cat(projections, dim=1)))
    return terms, bias


def bilinear_adjoint(x, size):
    """The adjoint of bilinear upsampling from `size` to x's grid (align_corners=False):
    x (B, C, H, W) -> U_hᵀ x U_w (B, C, *size), with U_h, U_w as `interpolation_matrix` gives them.
    It is F.interpolate's backward, which visits each of x's pixels once (U has 2 weights a row)."""
    B, C, H, W = x.shape
    return torch.ops.aten.upsample_bilinear2d_backward(x, (H, W), (B, C, *size), False)  # (B, C, *size)


@functools.lru_cache(maxsize=64)  # the same few grids every step; callers never write to U
def interpolation_matrix(size_out, size_in, device=None):
    """The (size_out, size_in) matrix U of 1-D bilinear resizing with align_corners=False: row i
    weighs inputs ⌊s⌋ and min(⌊s⌋ + 1, size_in − 1) by 1 − (s − ⌊s⌋) and s − ⌊s⌋, at
    s = max((i + ½)·size_in / size_out − ½, 0). Made by resizing the identity with F.interpolate,
    so that the rounding and the edge clamping are PyTorch's own; 2-D bilinear resizing of a map
    x (…, H_in, W_in) is U_h x U_wᵀ."""
    basis = torch.eye(size_in, device=device).view(size_in, 1, size_in, 1)  # e_k as (size_in × 1) maps
    resized = F.interpolate(basis, size=(size_out, 1), mode="bilinear", align_corners=False)
    # (size_in, 1, size_out, 1): column k of U
    return resized.view(size_in, size_out).T  # (size_out, size_in)


# =============================================================================================
# The multi-scale CAM: "partial_affinity"
# =============================================================================================
def factored_affinity(head, queries, keys):
    """Replaces `AffinityHead.forward(torch.cat(logits, dim=1))` for logits A_m = q_m·k_mᵀ given as
    their factors; identity: the head's 1×1 convolution is linear, so with w its weights and b
    its bias
        Σ_m w_m (A_m + A_mᵀ) + b = L + Lᵀ + b,   L = Σ_m w_m q_m k_mᵀ = [w_m q_m]_m · [k_m]_mᵀ,
    one (N × num_maps·d) · (num_maps·d × N) product per image instead of num_maps N × N maps
    (16 × less memory in AFANet): the same values up to float rounding (~1e-6).
    queries, keys: sequences of (B, m_i, N, d) tensors, Σ m_i = num_maps (per block: its heads).
    Returns the affinity (B, N, N).
    """
    if len(queries) != len(keys) or not queries or sum(q.shape[1] for q in queries) != head.num_maps:
        raise ValueError(f"queries and keys must be matching sequences of (B, m_i, N, d) tensors with "
                         f"sum m_i = {head.num_maps}, got {[tuple(q.shape) for q in queries]}")
    weight = head.proj.weight.view(head.num_maps)  # (num_maps,)
    weighted, flat_keys, first = [], [], 0
    for q, k in zip(queries, keys):
        B, m, N, d = q.shape
        w = weight[first:first + m].to(q.dtype).view(1, m, 1, 1)  # (1, m, 1, 1)
        weighted.append((q * w).transpose(1, 2).reshape(B, N, m * d))  # (B, N, m·d): w_m q_m
        flat_keys.append(k.transpose(1, 2).reshape(B, N, m * d))  # (B, N, m·d)
        first += m
    weighted = torch.cat(weighted, dim=-1)  # (B, N, num_maps·d)
    flat_keys = torch.cat(flat_keys, dim=-1)  # (B, N, num_maps·d)
    L = weighted @ flat_keys.transpose(1, 2)  # (B, N, N), Σ_m w_m q_m k_mᵀ
    logits = (L + L.transpose(1, 2)).add_(head.proj.bias.to(L.dtype))  # (B, N, N)
    return torch.sigmoid(logits)  # (B, N, N)


def partial_cam(model, x, num_pairwise, *, bn_stats=True, pairwise="affinity"):
    """Replaces `AFANet.cam(x, bn_stats=..., pairwise=...)` followed by keeping the pairwise
    scores of the first n = num_pairwise images only; identity: every block's output is the same
    through the fused kernel (`fused_attention`), the affinity of the factors q, k of the logits
    is `factored_affinity`, and the MHSA affinity ("attention") is that of the logits q·kᵀ of the
    first n images. x (B, 3, H, W) -> (cams (B, C−1, h, w), scores (n, N, N)); n = 0 skips the
    AFA head. The same draws and decoder statistics as `cam`.
    """
    B = x.shape[0]
    if not 0 <= num_pairwise <= B:
        raise ValueError(f"num_pairwise must be in [0, {B}], got {num_pairwise}")
    if pairwise not in PAIRWISE:
        raise ValueError(f"pairwise must be one of {PAIRWISE}, got {pairwise!r}")
    encoder, n = model.encoder, num_pairwise
    if not isinstance(encoder, (MixTransformer, VisionTransformer)):  # the plain form, then the first n
        cams, scores = model.cam(x, bn_stats=bn_stats, pairwise=pairwise)
        return cams, scores[:n]
    if n == 0:
        features, _ = run_blocks(encoder, x, 0, None)
        N = features[-1].shape[-2:].numel()
        scores = features[-1].new_zeros((0, N, N))
    else:
        features, factors = run_blocks(encoder, x, model.afa_blocks, factored_block)
        queries, keys = [q[:n] for q, _ in factors], [k[:n] for _, k in factors]  # (n, nh, N, d) each
        if pairwise == "attention":  # of the logits q·kᵀ, (n, nh, N, N) each
            scores = model.mhsa_affinity([q @ k.transpose(-2, -1) for q, k in zip(queries, keys)])
        else:
            scores = factored_affinity(model.affinity_head, queries, keys)  # (n, N, N)
    if bn_stats and model.training:
        model.decoder.update_bn_stats(features)
    return model.classifier(features[-1]), scores  # (B, C−1, h, w), (n, N, N)


def multi_scale_cam_partial_affinity(model, images, scales=(1.0, 0.5, 1.5), **options):
    """Replaces `cam.multi_scale_cam(model, images, scales, **options)` ("partial_affinity"): the
    same arguments and values up to float rounding (~1e-6). Identity: the plain loop keeps the
    affinity of the un-flipped images at the largest scale only, so `partial_cam` computes that
    one (n = B in the pass of the 2B images at that size) and no other (n = 0). The loop itself
    is the plain one, run on the model as `partial_cam` presents it."""
    B, largest = images.shape[0], cam._resize(images[:1], max(scales)).shape[-2:]

    class PartialPasses:  # what the plain loop calls `model.cam`
        def cam(self, x, **pass_options):
            keep = x.shape[0] == 2 * B and x.shape[-2:] == largest
            return partial_cam(model, x, B if keep else 0, **pass_options)

    return cam.multi_scale_cam(PartialPasses(), images, scales, **options)


# =============================================================================================
# The PAR label: "packed_par"
# =============================================================================================
@torch.no_grad()
def refine_cams_with_par_packed(par, images, cams, cls_labels, low=0.35, high=0.55, valid_box=None,
                                down_scale=2, ignore_index=255):
    """Replaces `cam.refine_cams_with_par` ("packed_par"): the same arguments and labels.
    Identity: PAR refines each channel alone and linearly, so the channels of absent classes
    (probability 0) may be left out. Each image keeps K = 1 + max_b(#present classes) channel
    slots, its present classes first in class order, the padding slots at probability 0 (a
    softmax logit of −∞), which stay 0 under PAR and never win the arg-max."""
    B, H, W = cam._check_refine_shapes(images, cams, cls_labels, down_scale)
    inside_box = cam.valid_box_mask(valid_box, B, H, W, cams.device)  # (B, H, W); checks the box's shape
    small_images, small_cams, small_background = cam._downsample_for_par(images, cams, high, low, down_scale)
    h, w = small_cams.shape[-2:]

    # Pack background + present classes into K slots: stable sort puts present classes first, in order.
    present = cam._with_background(cls_labels)  # (B, C)
    # K is a shape: one device→host read, which also carries the box check of the plain form.
    widest = present.sum(dim=1).max()  # (), 1 + the most present classes of an image
    if valid_box is None:
        K = int(widest)
    else:
        K, boxes_fit = torch.stack([widest, cam._boxes_fit(valid_box, H, W).to(widest.device, widest.dtype)]).tolist()
        if not boxes_fit:
            cam._bad_boxes(valid_box, H, W)
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices  # (B, C)
    class_index = order[:, :K]  # (B, K) class id of each slot; slot 0 is background
    slot_used = present.gather(1, class_index)  # (B, K)
    foreground_index = (class_index[:, 1:] - 1).clamp(min=0)  # (B, K-1) channel in cams
    foreground = small_cams.gather(1, foreground_index[:, :, None, None].expand(B, K - 1, h, w))  # (B, K-1, h, w)
    logits = torch.stack([
        torch.cat([small_background[:, i:i + 1].expand(B, 1, h, w), foreground], dim=1)  # (B, K, h, w)
        for i in range(2)  # 0: high, 1: low
    ], dim=1)  # (B, 2, K, h, w)
    logits = logits.masked_fill(~slot_used[:, None, :, None, None], float("-inf"))
    probs = logits.softmax(dim=2).view(B, 2 * K, h, w)  # (B, 2K, h, w); padding slots exactly 0

    refined = par(small_images, probs)  # (B, 2K, h, w)
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)  # (B, 2K, H, W)
    slot = cam._argmax(refined.view(B, 2, K, H, W), dim=2)  # (B, 2, H, W)
    label = class_index.gather(1, slot.view(B, 2 * H * W)).view(B, 2, H, W)  # (B, 2, H, W) class ids
    label_high, label_low = label.unbind(dim=1)  # (B, H, W) each
    return cam._combine_high_low(label_high, label_low, inside_box, ignore_index)

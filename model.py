"""The AFA network: a Mix Transformer encoder with three heads (paper §3.1, Fig. 2).

One forward pass of `AFANet` gives everything the training step needs:

- the encoder, SegFormer's hierarchical Mix Transformer (MiT, Xie et al. 2021), returns four
  feature maps and the attention logits q·kᵀ of its blocks;
- the classifier (a 1×1 conv on the stage-4 features) gives the image-level logits after global
  max pooling, and the class activation maps (CAMs) when applied to the un-pooled features (§3.1);
- SegFormer's all-MLP decoder gives the segmentation logits at stride 4;
- the AFA head turns the attention logits of the last `afa_blocks` blocks into a pairwise
  affinity (B, N, N) over the stride-16 grid (§3.2, "Affinity from Attention").

The module attribute names below reproduce SegFormer's ImageNet checkpoints (`mit_b0.pth`,
`mit_b1.pth`) key for key. This module builds networks and loads no file: the caller loads ImageNet
weights into the built encoder with `pretrained.load_pretrained(model.encoder, path)`, which also
reads the other layouts these weights ship in.

`AFANet(..., backbone="vit_s16" | "vit_b16" | "vit_tiny16")` puts a plain ViT (`vit.py`) in the
MiT's place, as ToCo and later work do: the classifier and the CAM read its last block's patch
tokens, the AFA head its last `afa_blocks` blocks' attention over the patch tokens, and the same
SegFormer decoder takes 4 evenly spaced blocks, all at stride 16 (why: `vit.py`'s docstring).

As in the authors' release, and unlike the stock SegFormer encoder, the last stage keeps stride 16
(strides (4, 2, 2, 1) instead of (4, 2, 2, 2)), and the classification logits use global max pooling.
This module differs from the release in two places that leave AFA's numbers unchanged: the
attention logits of spatial-reduction blocks are returned in full rather than average-pooled (see
`Attention.forward`; AFA reads only stage-4 logits), and the decoder uses PyTorch's ordinary
BatchNorm where the release synchronises it across GPUs (the same on one device; convert it with
nn.SyncBatchNorm.convert_sync_batchnorm for several). As in the release, `AFANet.cam` in train mode lets the decoder's
BatchNorm statistics see every CAM pass.

The encoder interface. `AFANet(num_classes, backbone=module)` takes any encoder module that has
- `forward(x)`: x (B, 3, H, W) -> (features, attn_logits), features a list of maps (B, C_i, H_i, W_i)
  (the decoder reads them all, the classifier the last one) and attn_logits a list with one
  pre-softmax logit map (B, nh, N, N) per block, on the last feature map's grid (the AFA head
  reads the last `afa_blocks` of them);
- `embed_dims` (C_i of each feature map) and `num_heads` (whose last entry is nh).
The code in this file is all that runs with the speed paths off; `fast.py` holds their variants,
each a function of these modules, and uses the plain form for an encoder it does not know.

Symbols: B batch, C classes incl. background, H×W input, H_i×W_i and C_i the grid and width of
stage i, h×w the stage-4 grid, N = h·w tokens, N_q / N_kv query / key tokens, nh heads, d head width.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_affinity import AffinityHead, mhsa_affinity
from vit import VIT_CONFIGS, DropPath, VisionTransformer, init_vit_weights, vit  # one copy, shared

# SegFormer's MiT family (Xie et al. 2021, Table 6): all share heads (1, 2, 5, 8), MLP ratio 4 and
# spatial reduction (8, 4, 2, 1); they differ in width and depth.
MIT_CONFIGS = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
MIT_SHARED = dict(num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1))
BLOCK_NORM_EPS = 1e-6  # LayerNorms inside blocks and at the end of each stage
PATCH_NORM_EPS = 1e-5  # LayerNorms of the patch embeddings and of the spatial reduction (PyTorch default)


def init_segformer_weights(module):
    """SegFormer's initialisation: timm's for Linear and LayerNorm, as a ViT's (`init_vit_weights`:
    truncated normal, std 0.02, and ones/zeros), He normal over fan-out for Conv2d; biases zero."""
    init_vit_weights(module)
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv whose kernel is wider than its stride, then
    LayerNorm over channels. Returns tokens (B, N_i, C_i) and the grid size (H_i, W_i)."""

    def __init__(self, in_chans, embed_dim, patch_size, stride, norm_eps=PATCH_NORM_EPS):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x):
        x = self.proj(x)  # (B, C_i, H_i, W_i)
        _, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N_i, C_i)
        return self.norm(x), H, W


class Attention(nn.Module):
    """Efficient self-attention (SegFormer §3.1): keys and values come from the tokens after a
    strided `sr_ratio`×`sr_ratio` conv + LayerNorm, which shrinks the key sequence by sr_ratio²."""

    def __init__(self, dim, num_heads, sr_ratio=1, qkv_bias=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.inv_sqrt_d = (dim // num_heads) ** -0.5  # 1/√d
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            # the release builds this one with the PyTorch default eps, unlike the block norms
            self.norm = nn.LayerNorm(dim, eps=PATCH_NORM_EPS)

    def forward(self, x, H, W):
        """x (B, N_q, C) on an H×W grid -> (out (B, N_q, C), logits (B, nh, N_q, N_kv)).

        out = proj(softmax(q·kᵀ/√d)·v) per head; the logits q·kᵀ are returned unscaled and before
        softmax. The release returns, for sr_ratio > 1, the logits average-pooled over the query
        grid to (B, nh, N_kv, N_kv); here they are returned in full, (B, nh, N_q, N_kv). AFA uses
        only stage-4 blocks, where sr_ratio = 1 and both agree.
        """
        q, k, v = self.queries_keys_values(x, H, W)  # (B, nh, N_q, d), (B, nh, N_kv, d), (B, nh, N_kv, d)
        logits = q @ k.transpose(-2, -1)  # (B, nh, N_q, N_kv), q·kᵀ
        attn = (logits * self.inv_sqrt_d).softmax(dim=-1)  # softmax(q·kᵀ/√d)
        out = attn @ v  # (B, nh, N_q, d)
        return self.merge_heads(out), logits

    def queries_keys_values(self, x, H, W):
        """x (B, N_q, C) -> q (B, nh, N_q, d), k and v (B, nh, N_kv, d); keys and values from the
        tokens after the spatial reduction when sr_ratio > 1."""
        B, N, C = x.shape
        nh, d = self.num_heads, C // self.num_heads
        q = self.q(x).view(B, N, nh, d).transpose(1, 2)  # (B, nh, N_q, d)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
            x = self.sr(grid).flatten(2).transpose(1, 2)  # (B, N_kv, C), N_kv = ⌊H/sr⌋·⌊W/sr⌋
            x = self.norm(x)
        kv = self.kv(x).view(B, -1, 2, nh, d).permute(2, 0, 3, 1, 4)  # (2, B, nh, N_kv, d)
        k, v = kv.unbind(0)  # each (B, nh, N_kv, d)
        return q, k, v

    def merge_heads(self, out):
        """Per-head outputs (B, nh, N_q, d) -> the projected tokens (B, N_q, C)."""
        B, nh, N, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, N, nh * d))  # (B, N_q, C)


class DWConv(nn.Module):
    """3×3 depthwise conv over the token grid (the positional cue of Mix-FFN)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)  # (B, N, C)


class MixFFN(nn.Module):
    """Mix-FFN: Linear → 3×3 depthwise conv → GELU → Linear."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MixFFN(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        """x (B, N, C) -> (x (B, N, C), attention logits (B, nh, N, N_kv)); see Attention."""
        attn_out, logits = self.attn(self.norm1(x), H, W)  # (B, N, C), (B, nh, N, N_kv)
        x = x + self.drop_path(attn_out)
        return x + self.drop_path(self.mlp(self.norm2(x), H, W)), logits


class MixTransformer(nn.Module):
    """SegFormer's Mix Transformer encoder (MiT) as used by AFA (paper §3.1).

    Four stages; stage i is an overlapping patch embedding (7×7 conv, padding 3, for the first
    stage, 3×3 conv, padding 1, after), `depths[i]` blocks, and a LayerNorm. The patch-embedding
    strides are `strides`; AFA's (4, 2, 2, 1) keep stage 4 at stride 16.
    Attribute names follow SegFormer's ImageNet checkpoints (`patch_embed1.proj.weight`,
    `block1.0.attn.q.weight`, `norm1.weight`, ...).
    """

    def __init__(self, embed_dims, num_heads, mlp_ratios, depths, sr_ratios, strides=(4, 2, 2, 1),
                 drop_path_rate=0.1, qkv_bias=True, in_chans=3):
        super().__init__()
        num_stages = len(embed_dims)
        for name, value in dict(num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths,
                                sr_ratios=sr_ratios, strides=strides).items():
            if len(value) != num_stages:
                raise ValueError(f"{name} must have one entry per stage ({num_stages}), got {value}")
        self.embed_dims = tuple(embed_dims)
        self.num_heads = tuple(num_heads)
        self.depths = tuple(depths)
        self.sr_ratios = tuple(sr_ratios)
        self.strides = tuple(strides)
        self.in_chans = in_chans

        first_patch, later_patch = 7, 3  # SegFormer's overlapping patch sizes
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # linear over blocks
        stage_in = in_chans
        for i in range(num_stages):
            stage = i + 1
            setattr(self, f"patch_embed{stage}", OverlapPatchEmbed(
                stage_in, embed_dims[i], patch_size=first_patch if i == 0 else later_patch,
                stride=strides[i]))
            first_block = sum(depths[:i])
            setattr(self, f"block{stage}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], qkv_bias=qkv_bias,
                      drop_path=drop_path_rates[first_block + j])
                for j in range(depths[i])]))
            setattr(self, f"norm{stage}", nn.LayerNorm(embed_dims[i], eps=BLOCK_NORM_EPS))
            stage_in = embed_dims[i]
        self.apply(init_segformer_weights)

    def stages(self):
        """The (patch embedding, blocks, final norm) of each stage, in order."""
        return [(getattr(self, f"patch_embed{s}"), getattr(self, f"block{s}"), getattr(self, f"norm{s}"))
                for s in range(1, len(self.embed_dims) + 1)]

    def forward(self, x):
        """x (B, in_chans, H, W) -> (features, attn_logits).

        features: 4 maps (B, C_i, H_i, W_i). attn_logits: the pre-softmax, unscaled logits q·kᵀ
        (B, nh, N_q, N_kv), one per block in order.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        B = x.shape[0]
        features, attn_logits = [], []
        for patch_embed, blocks, norm in self.stages():
            x, H, W = patch_embed(x)  # (B, N_i, C_i), N_i = H_i·W_i
            for block in blocks:
                x, logits = block(x, H, W)  # (B, N_i, C_i), (B, nh, N_i, N_kv)
                attn_logits.append(logits)
            x = norm(x)
            # contiguous, as the release's: on a channels-last view the next stage's convolution
            # takes another kernel and rounds differently
            x = x.transpose(1, 2).reshape(B, -1, H, W).contiguous()  # (B, C_i, H_i, W_i)
            features.append(x)
        return features, attn_logits


def mit(name, strides=(4, 2, 2, 1), **kwargs):
    """A MixTransformer in one of SegFormer's configurations `MIT_CONFIGS[name]`."""
    if name not in MIT_CONFIGS:
        raise ValueError(f"backbone must be one of {sorted(MIT_CONFIGS)}, got {name!r}")
    return MixTransformer(**MIT_CONFIGS[name], **MIT_SHARED, strides=strides, **kwargs)


def mit_b0(strides=(4, 2, 2, 1), **kwargs):
    """MiT-B0: dims (32, 64, 160, 256), heads (1, 2, 5, 8), depths (2, 2, 2, 2); 3.3 M parameters."""
    return mit("mit_b0", strides=strides, **kwargs)


def mit_b1(strides=(4, 2, 2, 1), **kwargs):
    """MiT-B1, AFA's encoder: dims (64, 128, 320, 512), heads (1, 2, 5, 8), depths (2, 2, 2, 2)."""
    return mit("mit_b1", strides=strides, **kwargs)


BACKBONES = (*MIT_CONFIGS, *VIT_CONFIGS)  # every name `build_encoder` knows


def build_encoder(backbone, strides=(4, 2, 2, 1), drop_path_rate=0.1):
    """The encoder named `backbone`: a MiT of `MIT_CONFIGS` (with its patch-embedding `strides`)
    or a ViT of `vit.VIT_CONFIGS` (patch 16, every feature map at stride 16; `strides` unused)."""
    if backbone in MIT_CONFIGS:
        return mit(backbone, strides=strides, drop_path_rate=drop_path_rate)
    if backbone in VIT_CONFIGS:
        return vit(backbone, drop_path_rate=drop_path_rate)
    raise ValueError(f"backbone must be one of {sorted(MIT_CONFIGS) + sorted(VIT_CONFIGS)}, got {backbone!r}")


class LinearEmbedding(nn.Module):
    """Per-pixel Linear C_i -> embed_dim of the decoder, on a feature map."""

    def __init__(self, in_dim, embed_dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # (B, H·W, embed_dim)
        return x.transpose(1, 2).reshape(B, -1, H, W)  # (B, embed_dim, H, W)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (paper §3.1; Xie et al. 2021, §3.2): per stage a Linear to `embed_dim`, all upsampled to
    stride 4, concatenated (c4, c3, c2, c1), fused by 1×1 conv + BatchNorm + ReLU, then Dropout2d
    and a 1×1 conv to C classes. features: 4 maps (B, C_i, H_i, W_i) -> (B, C, H_1, W_1).

    The release uses synchronised BatchNorm across GPUs; here it is the ordinary BatchNorm2d
    (convert with nn.SyncBatchNorm.convert_sync_batchnorm for multi-GPU training).
    """

    def __init__(self, in_channels, num_classes, embed_dim=256, dropout=0.1):
        super().__init__()
        self.num_stages = len(in_channels)
        for stage, in_dim in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{stage}", LinearEmbedding(in_dim, embed_dim))
        fuse_conv = nn.Conv2d(self.num_stages * embed_dim, embed_dim, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(fuse_conv.weight, mode="fan_out", nonlinearity="relu")
        self.linear_fuse = nn.Sequential()
        self.linear_fuse.add_module("conv", fuse_conv)
        self.linear_fuse.add_module("bn", nn.BatchNorm2d(embed_dim))
        self.linear_fuse.add_module("relu", nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features):
        """features, 4 maps (B, C_i, H_i, W_i) -> logits (B, C, H_1, W_1)."""
        fused = self.linear_fuse.conv(self.embed(features))  # (B, 4·embed_dim, H_1, W_1) -> (B, embed_dim, H_1, W_1)
        x = self.linear_fuse.relu(self.linear_fuse.bn(fused))
        return self.linear_pred(self.dropout(x))  # (B, C, H_1, W_1)

    def embed(self, features):
        """The per-stage embeddings upsampled to stride 4 and concatenated (c4, c3, c2, c1):
        features, 4 maps (B, C_i, H_i, W_i) -> (B, 4·embed_dim, H_1, W_1)."""
        if len(features) != self.num_stages:
            raise ValueError(f"features must hold {self.num_stages} maps, got {len(features)}")
        size = features[0].shape[-2:]  # (H_1, W_1), stride 4
        embedded = []
        for stage in reversed(range(1, self.num_stages + 1)):  # order c4, c3, c2, c1
            x = getattr(self, f"linear_c{stage}")(features[stage - 1])  # (B, embed_dim, H_i, W_i)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, embed_dim, H_1, W_1)
            embedded.append(x)
        return torch.cat(embedded, dim=1)  # (B, 4·embed_dim, H_1, W_1)

    @torch.no_grad()
    def update_bn_stats(self, features):
        """Run the decoder on features (4 maps (B, C_i, H_i, W_i)) up to and including its
        BatchNorm, for the side effect alone: in train mode the BatchNorm's running mean and
        variance take this batch in, as a full `forward` would (what follows the BatchNorm, ReLU,
        Dropout2d and the last conv, cannot change them). Returns nothing."""
        self.linear_fuse.bn(self.linear_fuse.conv(self.embed(features)))  # (B, embed_dim, H_1, W_1), discarded


# What `AFANet.cam` gives as the random walk's pairwise scores (paper §3.2; Table 4's MHSA row):
# the values of --propagate-with.
PAIRWISE = ("affinity", "attention")


class AFAOutput(NamedTuple):
    cls_logits: torch.Tensor  # (B, C−1) image-level logits, global max pooling then classifier
    seg_logits: torch.Tensor  # (B, C, H/s, W/s) decoder output, s = 4 (MiT) or 16 (ViT)
    affinity: torch.Tensor  # (B, N, N) learned affinity in (0, 1), symmetric
    cams: torch.Tensor  # (B, C−1, h, w) classifier on the un-pooled stage-4 features, before ReLU


class AFANet(nn.Module):
    """The AFA network (paper §3, Fig. 2): MiT encoder, classifier, SegFormer decoder, AFA head.

    num_classes C counts the background; the classifier predicts the C−1 foreground classes.
    `backbone` is a MiT ("mit_b1", the paper's) or a plain ViT ("vit_s16", "vit_b16", "vit_tiny16"),
    randomly initialised: load ImageNet weights into `encoder` afterwards (`pretrained.load_pretrained`);
    or an encoder module of the interface in this module's docstring.
    `afa_blocks` last blocks of the encoder give their attention logits, afa_blocks × nh maps of
    N × N, to the AFA head: blocks of the MiT's stage 4 (where sr_ratio = 1), any blocks of a ViT
    (over its patch tokens). `strides` applies to a MiT only.
    """

    def __init__(self, num_classes, backbone="mit_b1", strides=(4, 2, 2, 1),
                 afa_blocks=2, decoder_dim=256, drop_path_rate=0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.backbone = backbone if isinstance(backbone, str) else type(backbone).__name__
        self.num_classes = num_classes
        if isinstance(backbone, nn.Module):
            self.encoder, square_blocks = backbone, afa_blocks  # the caller's encoder, as it is
        else:
            self.encoder = build_encoder(backbone, strides=strides, drop_path_rate=drop_path_rate)
        if isinstance(self.encoder, VisionTransformer):
            square_blocks = self.encoder.depth  # every block attends over the N patch tokens
        elif isinstance(self.encoder, MixTransformer):
            square_blocks = self.encoder.depths[-1] if self.encoder.sr_ratios[-1] == 1 else 0  # stage 4
        if not 1 <= afa_blocks <= square_blocks:
            raise ValueError(f"afa_blocks must be in [1, {square_blocks}] (the last blocks, whose attention "
                             f"is N × N), got {afa_blocks}")
        self.afa_blocks = afa_blocks
        embed_dims = self.encoder.embed_dims  # a ViT's: its width D for each of its 4 maps
        self.classifier = nn.Conv2d(embed_dims[-1], num_classes - 1, kernel_size=1, bias=False)
        self.decoder = SegFormerHead(embed_dims, num_classes, embed_dim=decoder_dim)
        self.affinity_head = AffinityHead(afa_blocks * self.encoder.num_heads[-1])

    def forward(self, x):
        """x (B, 3, H, W) -> AFAOutput(cls_logits, seg_logits, affinity, cams)."""
        features, attn_logits = self.encoder(x)  # 4 maps (B, C_i, H_i, W_i), each block's logits
        top = features[-1]  # (B, C_4, h, w)
        pooled = F.adaptive_max_pool2d(top, 1)  # (B, C_4, 1, 1), global max pooling
        cls_logits = self.classifier(pooled).flatten(1)  # (B, C−1)
        affinity = self.affinity_head(torch.cat(attn_logits[-self.afa_blocks:], dim=1))  # (B, afa_blocks·nh, N, N) -> (B, N, N)
        return AFAOutput(cls_logits=cls_logits, seg_logits=self.decoder(features),
                         affinity=affinity, cams=self.classifier(top))

    def cam(self, x, *, bn_stats=True, pairwise="affinity"):
        """x (B, 3, H, W) -> (cams (B, C−1, h, w) before ReLU, pairwise scores (B, N, N)).

        The classifier on the un-pooled stage-4 features, and the pairwise scores of the random
        walk from the attention logits the AFA head reads: "affinity", the learned affinity
        exactly as in `forward`; "attention", the raw MHSA maps as an affinity (`mhsa_affinity`,
        the paper's "propagation with MHSA", Table 4). Gradients as the grad mode allows.

        bn_stats: in train mode, also run the decoder without gradient up to its BatchNorm,
        so that its running statistics see this pass as in the release, whose CAM path runs the
        whole decoder, in train mode, on every CAM pass (the eval-mode segmentation depends on
        it). False skips it (faster, other statistics). Eval mode updates nothing either way.
        """
        if pairwise not in PAIRWISE:
            raise ValueError(f"pairwise must be one of {PAIRWISE}, got {pairwise!r}")
        features, attn_logits = self.encoder(x)  # 4 maps (B, C_i, H_i, W_i), each block's logits
        attn_logits = attn_logits[-self.afa_blocks:]  # each (B, nh, N, N)
        scores = (self.mhsa_affinity(attn_logits) if pairwise == "attention"
                  else self.affinity_head(torch.cat(attn_logits, dim=1)))  # (B, N, N)
        if bn_stats and self.training:
            self.decoder.update_bn_stats(features)
        return self.classifier(features[-1]), scores  # (B, C−1, h, w), (B, N, N)

    def mhsa_affinity(self, attn_logits):
        """`attention_affinity.mhsa_affinity` of the logits of the `afa_blocks` last blocks, each
        (B, nh, N, N), with the per-head width d of the encoder's last stage: (B, N, N)."""
        head_dim = self.encoder.embed_dims[-1] // self.encoder.num_heads[-1]
        return mhsa_affinity(attn_logits, head_dim)  # (B, N, N)

    def param_groups(self):
        """Parameters by learning-rate group (paper §4.1; the groups of the release): "encoder"
        (weights), "encoder_norm" (every encoder parameter whose name contains "norm": LayerNorms,
        learning rate 0 in the release's schedule), "heads" (classifier and AFA head) and
        "decoder". Each parameter appears exactly once.
        In a ViT the norms are the blocks' norm1 / norm2 and the final norm; its class token
        and position embedding are "encoder" weights."""
        encoder = [p for name, p in self.encoder.named_parameters() if "norm" not in name]
        encoder_norm = [p for name, p in self.encoder.named_parameters() if "norm" in name]
        heads = list(self.classifier.parameters()) + list(self.affinity_head.parameters())
        return {"encoder": encoder, "encoder_norm": encoder_norm, "heads": heads,
                "decoder": list(self.decoder.parameters())}

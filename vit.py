"""A plain Vision Transformer encoder for AFA (Dosovitskiy et al. 2021; DeiT, Touvron et al. 2021).

The paper (§3.1) builds AFA on SegFormer's Mix Transformer; the authors' follow-up, ToCo (CVPR
2023), trains on a plain ViT-B/16 but learns no affinity from attention: its attention returns the
post-softmax, scaled weights (class token included), which nothing reads, and its token-contrast
loss works on the features. This module is a plain ViT encoder, written like the MiT in `model.py`
so that `AFANet`'s heads, the multi-scale CAM, PAR and the random walk run on it unchanged:

- a 16×16 stride-16 patch embedding, a class token and a learned position embedding, then `depth`
  pre-norm blocks x + Attention(LN(x)), x + MLP(LN(x)) (MLP ratio 4, GELU, qkv bias) and a LayerNorm;
- every block returns its pre-softmax attention logits q·kᵀ, unscaled, as the MiT's blocks do;
  the encoder returns them for every block over the **patch tokens** only (the class
  token's row and column dropped): (B, nh, N, N) on the stride-16 grid, the N × N maps AFA reads
  (paper §3.2);
- the features are 4 maps (B, D, h, w) of the patch tokens after evenly spaced blocks (3, 6, 9, 12
  of 12), each through the final LayerNorm (timm's `forward_intermediates(norm=True)`); the last
  one is the ordinary ViT output, which the classifier and the CAM read (paper §3.1).

Position embeddings are learned on the 14 × 14 grid of 224-pixel pre-training and resampled
bicubically (with antialiasing, as timm's `resample_abs_pos_embed`) to the grid of each input,
including the multi-scale CAM's 0.5 and 1.5 scales and non-square crops; at the pre-training grid
they are used as they are, and the class token's embedding is never resampled. An input whose side
is not a multiple of 16 is zero-padded at the bottom and right (the mean colour after
normalisation) to the next multiple, so that its grid is h × w = ⌈H/16⌉ × ⌈W/16⌉ like the MiT's,
whose padded convolutions give the same ceiling.

Decoder. With this encoder we recommend `model.SegFormerHead` unchanged, fed with the 4 maps
above, all at stride 16: it makes no assumption on strides (it resizes every map to the first one's
size, here a no-op), so it runs as is and its logits come out at stride 16. Reasons: it is the
paper's decoder, so a MiT/ViT comparison changes the backbone only; the MLP fusion of early,
middle and late blocks gives the decoder spatial detail that the last block has smoothed away (the
multi-level reading of SETR-MLA and DPT); and DeepLab's LargeFOV head, which ToCo uses on the last
block alone, exists to widen a CNN's receptive field with dilated 3×3 convolutions, which global
self-attention does not need (it is also larger: two 3×3 convolutions of width 512, 5.9 M
parameters on ViT-B, against 1.1 M for the MLP head). Which of the two segments VOC better after AFA
training has not been measured here.

The state-dict keys are timm's (`cls_token`, `pos_embed`, `patch_embed.proj.weight`,
`blocks.0.attn.qkv.weight`, `blocks.0.mlp.fc1.weight`, `norm.weight`, ...), so timm's and DeiT's
ImageNet files load without renaming (`pretrained.load_pretrained`). DeiT's weights expect the
ImageNet mean and std that `data.py` uses; timm's "augreg" ViTs were trained on inputs scaled to
[-1, 1] (mean = std = 0.5), a shift of the input statistics that fine-tuning has to absorb.

Symbols: B batch, H×W input, D width, h×w the stride-16 token grid, N = h·w patch tokens,
T = 1 + N tokens with the class token, nh heads, d = D / nh head width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# The plain ViTs (Dosovitskiy et al. 2021, Table 1; DeiT, Touvron et al. 2021, Table 1): all have
# patch 16, MLP ratio 4 and 12 blocks; they differ in width and heads (head width d = 64).
VIT_CONFIGS = {
    "vit_tiny16": dict(embed_dim=192, depth=12, num_heads=3),  # DeiT-Ti: 5.5 M parameters without the head
    "vit_s16": dict(embed_dim=384, depth=12, num_heads=6),  # ViT-S/16 = DeiT-S: 21.7 M
    "vit_b16": dict(embed_dim=768, depth=12, num_heads=12),  # ViT-B/16 = DeiT-B: 85.8 M
}
PATCH_SIZE = 16
PRETRAIN_SIZE = 224  # ImageNet resolution of the released weights: a 14 × 14 position grid
NORM_EPS = 1e-6  # every LayerNorm of timm's and DeiT's ViTs
NUM_FEATURES = 4  # feature maps handed to the decoder


def init_vit_weights(module):
    """timm's ViT initialisation: truncated normal (std 0.02) for Linear with zero bias, ones/zeros
    for LayerNorm; the patch-embedding conv keeps PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resample_position_embedding(pos_embed, old_grid, new_grid, num_prefix_tokens=1):
    """Resize a learned position embedding to another token grid, as timm's resample_abs_pos_embed.

    pos_embed (1, P + g_0·g_1, D): the embeddings of P prefix tokens (the class token) then of the
    old_grid = (g_0, g_1) patch grid, row-major. Returns (1, P + h·w, D) for new_grid = (h, w): the
    prefix kept as it is, the grid resampled bicubically with antialiasing (which matters when
    shrinking), in float32 and back to the input dtype. The same tensor when the grids agree.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    _, T, D = pos_embed.shape
    if T != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(f"pos_embed holds {T} tokens, not {num_prefix_tokens} prefix tokens and a "
                         f"{old_grid[0]}×{old_grid[1]} grid")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]  # (1, P, D), (1, g0·g1, D)
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, g0, g1)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True,
                         align_corners=False)  # (1, D, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)  # (1, h·w, D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)  # (1, P + h·w, D)


class DropPath(nn.Module):
    """Stochastic depth: during training, drop the whole residual branch of a sample with
    probability `drop_prob` and rescale the kept ones by 1 / (1 − drop_prob)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        return x * self.sample_mask(x) / (1.0 - self.drop_prob)

    def sample_mask(self, x):
        """One draw per sample of x (B, ...): (B, 1, ..., 1) of 0 (dropped) or 1 (kept)."""
        return x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.drop_prob)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches: a patch_size × patch_size conv of the same stride, after zero-padding
    the bottom and right to a multiple of patch_size. x (B, 3, H, W) -> tokens (B, N, D), h, w with
    h = ⌈H / patch_size⌉, w = ⌈W / patch_size⌉."""

    def __init__(self, in_chans, embed_dim, patch_size=PATCH_SIZE):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % self.patch_size, -W % self.patch_size
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (B, 3, h·p, w·p)
        x = self.proj(x)  # (B, D, h, w)
        _, _, h, w = x.shape
        return x.flatten(2).transpose(1, 2), h, w  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention over all T tokens, q, k and v from one Linear (timm's `qkv`)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.inv_sqrt_d = (dim // num_heads) ** -0.5  # 1/√d
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x (B, T, D) -> (out (B, T, D), logits (B, nh, T, T)).

        out = proj(softmax(q·kᵀ/√d)·v) per head; the logits q·kᵀ are returned unscaled and before
        softmax, as the MiT's `Attention.forward` returns them.
        """
        q, k, v = self.queries_keys_values(x)  # each (B, nh, T, d)
        logits = q @ k.transpose(-2, -1)  # (B, nh, T, T), q·kᵀ
        attn = (logits * self.inv_sqrt_d).softmax(dim=-1)  # softmax(q·kᵀ/√d)
        out = attn @ v  # (B, nh, T, d)
        return self.merge_heads(out), logits

    def queries_keys_values(self, x):
        """x (B, T, D) -> q, k, v, each (B, nh, T, d), from the one `qkv` Linear (rows q, k, v)."""
        B, T, D = x.shape
        nh, d = self.num_heads, D // self.num_heads
        qkv = self.qkv(x).view(B, T, 3, nh, d).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, d)
        q, k, v = qkv.unbind(0)  # each (B, nh, T, d)
        return q, k, v

    def merge_heads(self, out):
        """Per-head outputs (B, nh, T, d) -> the projected tokens (B, T, D)."""
        B, nh, T, d = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, T, nh * d))  # (B, T, D)


class Mlp(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        """x (B, T, D) -> (x (B, T, D), attention logits (B, nh, T, T)); see Attention."""
        attn_out, logits = self.attn(self.norm1(x))  # (B, T, D), (B, nh, T, T)
        x = x + self.drop_path(attn_out)
        return x + self.drop_path(self.mlp(self.norm2(x))), logits


def evenly_spaced_blocks(depth, count=NUM_FEATURES):
    """Indices of `count` blocks spread evenly over `depth`, ending with the last: (2, 5, 8, 11) of 12."""
    if not 1 <= count <= depth:
        raise ValueError(f"cannot take {count} feature maps from {depth} blocks")
    return tuple(round((i + 1) * depth / count) - 1 for i in range(count))


class VisionTransformer(nn.Module):
    """A plain ViT encoder with the interface of `model.MixTransformer` (see the module docstring).

    Besides its own sizes (`embed_dim`, `depth`, `patch_size`, `grid_size` the pre-training grid,
    `feature_blocks`), it exposes the MiT's per-feature-map attributes that the pipeline reads:
    `embed_dims` (D for every map), `num_heads` (nh for every map), `strides` ((16, 1, 1, 1): the
    patch embedding's stride, then none, so every map is at stride 16), `sr_ratios` (all 1: every
    attention is N × N) and `depths` (the blocks leading to each map, summing to `depth`).
    """

    def __init__(self, embed_dim, depth, num_heads, patch_size=PATCH_SIZE, img_size=PRETRAIN_SIZE,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1, feature_blocks=None, in_chans=3):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        feature_blocks = evenly_spaced_blocks(depth) if feature_blocks is None else tuple(feature_blocks)
        if list(feature_blocks) != sorted(set(feature_blocks)) or not 0 <= feature_blocks[0] \
                or feature_blocks[-1] != depth - 1:
            raise ValueError(f"feature_blocks must be increasing block indices ending with the last "
                             f"block ({depth - 1}), got {feature_blocks}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.feature_blocks = feature_blocks
        self.in_chans = in_chans
        num_maps = len(feature_blocks)
        self.embed_dims = (embed_dim,) * num_maps
        self.num_heads = (num_heads,) * num_maps
        self.strides = (patch_size,) + (1,) * (num_maps - 1)
        self.sr_ratios = (1,) * num_maps
        self.depths = tuple(b - a for a, b in zip((-1,) + feature_blocks[:-1], feature_blocks))

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))  # class token first
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # linear
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path_rates[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=NORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit_weights)

    def position_embedding(self, h, w):
        """(1, 1 + h·w, D): the class token's embedding, then the patch grid's resampled to h × w."""
        return resample_position_embedding(self.pos_embed, self.grid_size, (h, w))

    def forward(self, x):
        """x (B, in_chans, H, W) -> (features, attn_logits), as `MixTransformer.forward`.

        features: `len(feature_blocks)` maps (B, D, h, w), the patch tokens after those blocks
        through the final LayerNorm; h = ⌈H/16⌉, w = ⌈W/16⌉. attn_logits: the pre-softmax, unscaled
        logits q·kᵀ between patch tokens (B, nh, N, N), one per block in order.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x, h, w = self.embed(x)  # (B, T, D)
        features, attn_logits = [], []
        for index, block in enumerate(self.blocks):
            x, logits = block(x)  # (B, T, D), (B, nh, T, T)
            attn_logits.append(logits[:, :, 1:, 1:])  # (B, nh, N, N): patch tokens only
            if index in self.feature_blocks:
                features.append(self.feature_map(x, h, w))  # (B, D, h, w)
        return features, attn_logits

    def embed(self, x):
        """x (B, in_chans, H, W) -> tokens (B, T, D) with the class token first and the position
        embedding added, and the patch grid h, w."""
        B = x.shape[0]
        x, h, w = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, T, D), class token first
        return x + self.position_embedding(h, w), h, w  # (B, T, D)

    def feature_map(self, x, h, w):
        """Tokens (B, T, D) -> the patch tokens through the final LayerNorm as a map (B, D, h, w)."""
        tokens = self.norm(x)[:, 1:]  # (B, N, D)
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)  # (B, D, h, w)


def vit(name, **kwargs):
    """A VisionTransformer in one of the configurations `VIT_CONFIGS[name]`, patch 16, 224 pixels."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"backbone must be one of {sorted(VIT_CONFIGS)}, got {name!r}")
    return VisionTransformer(**VIT_CONFIGS[name], **kwargs)


def vit_tiny16(**kwargs):
    """ViT-Ti/16 (DeiT-Ti): width 192, 3 heads, 12 blocks; 5.5 M parameters, for CPU runs and tests."""
    return vit("vit_tiny16", **kwargs)


def vit_s16(**kwargs):
    """ViT-S/16 (DeiT-S): width 384, 6 heads, 12 blocks; 21.7 M parameters."""
    return vit("vit_s16", **kwargs)


def vit_b16(**kwargs):
    """ViT-B/16 (DeiT-B), the encoder of ToCo: width 768, 12 heads, 12 blocks; 85.8 M parameters."""
    return vit("vit_b16", **kwargs)

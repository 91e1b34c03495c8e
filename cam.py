"""Class activation maps and the pseudo labels made from them (paper §3.1, §3.2 and §3.3).

The first stage of every training step: multi-scale CAMs from the classifier (§3.1), their
three-band labels (background / ignore / class), and the two PAR-refined labels that supervise
the segmentation branch — the CAM label refined with PAR (§3.3) and the refined label of the
CAMs propagated by the random walk with the learned affinity (§3.2, "Pseudo label propagation"):
the AFA pseudo label. The refiner (a `PAR` module or anything with its `forward(images, masks)`)
is passed in.

As in the authors' release, the background is a constant score channel (t = 0.35 or t = 0.55), and
each refined label combines a high- and a low-threshold result (high says background -> ignore;
both say background -> background). The release refines the CAM label one image at a time;
here all images go through PAR at once (the same labels). The release fails on a valid box thinner than the PAR downsampling factor; here such a
box is labelled.

Symbols: B batch, C classes incl. background, K kept channels, H×W crop, h×w a CAM grid,
N = h·w tokens.
"""
import torch
import torch.nn.functional as F

# Added to each (image, class) CAM maximum before dividing, so an all-zero CAM stays 0, not NaN.
CAM_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# checks and small shared pieces
# ---------------------------------------------------------------------------------------------

def _check_4d(name, x, expected):
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a {expected} tensor, got {shape}")


def _check_cls_labels(cls_labels, B, num_foreground):
    if not torch.is_tensor(cls_labels) or tuple(cls_labels.shape) != (B, num_foreground):
        shape = tuple(cls_labels.shape) if torch.is_tensor(cls_labels) else type(cls_labels).__name__
        raise ValueError(f"cls_labels must be (B, C-1) = ({B}, {num_foreground}), got {shape}")


def valid_box_mask(valid_box, B, H, W, device=None):
    """Pixels inside each image's valid box: valid_box (B, 4) integer (top, bottom, left, right),
    ends exclusive -> (B, H, W) bool. None means the whole crop; an empty box holds no pixel."""
    if valid_box is None:
        return torch.ones(B, H, W, dtype=torch.bool, device=device)
    box = torch.as_tensor(valid_box, device=device)
    if tuple(box.shape) != (B, 4) or box.is_floating_point():
        raise ValueError(
            f"valid_box must be an integer (B, 4) = ({B}, 4) tensor of (top, bottom, left, right), "
            f"got {tuple(box.shape)} {box.dtype}"
        )
    top, bottom, left, right = box.unbind(dim=1)  # (B,) each
    rows = torch.arange(H, device=box.device)  # (H,)
    cols = torch.arange(W, device=box.device)  # (W,)
    inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < right[:, None])  # (B, W)
    return inside_rows[:, :, None] & inside_cols[:, None, :]  # (B, H, W)


def _checked_box_mask(valid_box, B, H, W, device):
    """`valid_box_mask` of a box that must lie in the crop and hold a pixel, as the labels need."""
    inside_box = valid_box_mask(valid_box, B, H, W, device)  # (B, H, W)
    if valid_box is not None and not bool(_boxes_fit(valid_box, H, W)):  # one device→host read
        _bad_boxes(valid_box, H, W)
    return inside_box


def _boxes_fit(valid_box, H, W):
    """Whether every box (B, 4) lies in the H × W crop and holds a pixel: a 0-dim bool tensor on
    the box's device (reading it is the caller's host sync)."""
    top, bottom, left, right = torch.as_tensor(valid_box).unbind(dim=1)  # (B,) each
    return ((0 <= top) & (top < bottom) & (bottom <= H) & (0 <= left) & (left < right) & (right <= W)).all()


def _bad_boxes(valid_box, H, W):
    boxes = valid_box.tolist() if torch.is_tensor(valid_box) else valid_box
    raise ValueError(f"valid_box rows must satisfy 0 <= top < bottom <= {H} and 0 <= left < right <= {W}, "
                     f"got {boxes}")


def _with_background(cls_labels):
    """Present classes incl. background, which is always present: (B, C-1) -> (B, C) bool."""
    background = torch.ones_like(cls_labels[:, :1], dtype=torch.bool)  # (B, 1)
    return torch.cat([background, cls_labels != 0], dim=1)  # (B, C)


def _combine_high_low(label_high, label_low, inside_box, ignore_index):
    """The release's combination of the two refined labels: the high-threshold label; where it
    says background -> ignore; where the low one agrees -> background; outside the valid box ->
    ignore. All (B, H, W)."""
    label = torch.where(label_high == 0, ignore_index, label_high)
    label = torch.where((label_high == 0) & (label_low == 0), 0, label)
    return torch.where(inside_box, label, ignore_index)


def _argmax(x, dim):
    """torch.argmax over a short dimension `dim` (a handful of kept channels), the first maximum
    winning as in torch.argmax; a running comparison, several times faster on CPUs than argmax
    over a dimension that is not the last."""
    best = x.select(dim, 0)
    index = torch.zeros(best.shape, dtype=torch.long, device=x.device)
    for k in range(1, x.shape[dim]):
        value = x.select(dim, k)
        index.masked_fill_(value > best, k)
        best = torch.maximum(best, value)
    return index


# ---------------------------------------------------------------------------------------------
# multi-scale CAM (paper §3.1)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def multi_scale_cam(model, images, scales=(1.0, 0.5, 1.5), *, forward_cams=None, **cam_options):
    """Multi-scale, flip-augmented CAMs normalised to [0, 1], and the affinity at the largest scale.

    images (B, 3, H, W); `model.cam(x)` must return (cams (2B, C-1, h, w) before ReLU, affinity
    (2B, N, N)) for a batch x of 2B images. Returns cams (B, C-1, H, W) in [0, 1] and affinity
    (B, N, N) of the un-flipped images at the largest scale. At each scale s: resize to
    (int(s·H), int(s·W)), run the images with their mirrors, upsample the CAMs to H × W, take
    max(CAM, un-flipped CAM of the mirror), ReLU; sum over scales; per image and class subtract the
    min and divide by the max (+ 1e-5). The model runs in whatever mode (train / eval) it is in.

    cam_options are passed on to every `model.cam` call (AFANet's: bn_stats, pairwise).
    forward_cams: (B, C-1, h, w) raw CAMs of the un-flipped images at scale 1.0 that the caller
    already has (the training forward's); the scale-1.0 pass then runs on the mirrors only. Equal
    in eval mode; in train mode the forward drew its own stochastic-depth masks and the decoder's
    BatchNorm sees the mirrors alone at that scale: other numbers. Unused when 1.0 is the largest.

    The authors' release always evaluates scale 1.0, even when it is not among `scales`; here the
    given scales are used as they are (identical for the default scales).
    """
    B, H, W, scales = _check_multi_scale(images, scales, forward_cams)
    cams, affinity = 0, None
    for s in scales:
        scaled = _resize(images, s)  # (B, 3, sH, sW)
        keep_affinity = s == max(scales) and affinity is None
        if forward_cams is not None and s == 1.0 and not keep_affinity:
            # The forward's CAMs are the un-flipped half of this pass (exactly so in eval mode).
            mirrored_cams, _ = model.cam(scaled.flip(-1), **cam_options)  # (B, C-1, h, w)
            if forward_cams.shape[1:] != mirrored_cams.shape[1:]:
                raise ValueError(f"forward_cams must be (B, C-1, h, w) = {tuple(mirrored_cams.shape)}, "
                                 f"got {tuple(forward_cams.shape)}")
            scale_cams = torch.cat([forward_cams.to(mirrored_cams.dtype), mirrored_cams])  # (2B, C-1, h, w)
        else:
            both = torch.cat([scaled, scaled.flip(-1)], dim=0)  # (2B, 3, sH, sW): images and mirrors
            scale_cams, scale_affinity = model.cam(both, **cam_options)  # (2B, C-1, h, w), (2B, N, N)
            if keep_affinity:
                affinity = scale_affinity[:B]  # (B, N, N), the un-flipped images
            del scale_affinity  # at (2B, N, N) it may be large; free it before the next scale
        cams = cams + _flip_max(scale_cams, B, H, W)  # (B, C-1, H, W)
    return _normalise(cams), affinity


def _check_multi_scale(images, scales, forward_cams=None):
    """Checks the multi-scale CAM's arguments; returns B, H, W and the scales as a tuple."""
    _check_4d("images", images, "(B, 3, H, W)")
    scales = tuple(scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    B, _, H, W = images.shape
    if forward_cams is not None:
        _check_4d("forward_cams", forward_cams, "(B, C-1, h, w)")
        if forward_cams.shape[0] != B:
            raise ValueError(f"forward_cams must be (B, C-1, h, w) with B = {B}, got {tuple(forward_cams.shape)}")
    return B, H, W, scales


def _resize(images, s):
    """images (B, 3, H, W) resized by s to (int(s·H), int(s·W)), bilinear; as they are for s = 1."""
    if s == 1.0:
        return images
    H, W = images.shape[-2:]
    size = (int(s * H), int(s * W))
    if min(size) < 1:
        raise ValueError(f"scale {s} shrinks the {H}x{W} images to nothing")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)  # (B, 3, sH, sW)


def _flip_max(scale_cams, B, H, W):
    """One scale's CAMs of the images and their mirrors, (2B, C-1, h, w) -> (B, C-1, H, W):
    upsampled to H × W, max(CAM, un-flipped CAM of the mirrored image), then ReLU."""
    if scale_cams.dim() != 4 or scale_cams.shape[0] != 2 * B:
        raise ValueError(
            f"model.cam must return cams (2B, C-1, h, w) with 2B = {2 * B}, got {tuple(scale_cams.shape)}"
        )
    scale_cams = F.interpolate(scale_cams, size=(H, W), mode="bilinear", align_corners=False)  # (2B, C-1, H, W)
    return torch.maximum(scale_cams[:B], scale_cams[B:].flip(-1)).relu()  # (B, C-1, H, W)


def _normalise(cams):
    """Per image and class: subtract the min, divide by the max (+ eps). (B, C-1, H, W)."""
    cams = cams - cams.amin(dim=(2, 3), keepdim=True)
    return cams / (cams.amax(dim=(2, 3), keepdim=True) + CAM_NORM_EPS)


# ---------------------------------------------------------------------------------------------
# CAM -> label (paper §3.1)
# ---------------------------------------------------------------------------------------------

def cam_to_label(cams, cls_labels, bkg_score=0.45, low=None, high=None, valid_box=None, ignore_index=255):
    """Pseudo label (B, H, W) int64 from CAMs (B, C-1, H, W) in [0, 1] and cls_labels (B, C-1).

    v, k = max / arg-max over the label-masked CAMs; the label is k + 1, or background 0 where
    v <= bkg_score. With low and high given (training): v <= low -> 0, low < v <= high -> ignore,
    else k + 1. Pixels outside valid_box (B, 4) (top, bottom, left, right) -> ignore.
    """
    _check_4d("cams", cams, "(B, C-1, H, W)")
    B, num_foreground, H, W = cams.shape
    _check_cls_labels(cls_labels, B, num_foreground)
    if (low is None) != (high is None):
        raise ValueError(f"give both low and high, or neither; got low={low}, high={high}")
    score, cls_index = (cams * cls_labels[:, :, None, None]).max(dim=1)  # (B, H, W) each
    label = torch.where(score <= bkg_score, 0, cls_index + 1)  # class ids are 1-based
    if low is not None:
        label = torch.where(score <= high, ignore_index, label)
        label = torch.where(score <= low, 0, label)
    inside_box = _checked_box_mask(valid_box, B, H, W, cams.device)  # (B, H, W)
    return torch.where(inside_box, label, ignore_index).long()


# ---------------------------------------------------------------------------------------------
# refining the CAM label with PAR (paper §3.3)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def refine_cams_with_par(par, images, cams, cls_labels, low=0.35, high=0.55, valid_box=None,
                         down_scale=2, ignore_index=255):
    """PAR-refined CAM label (B, H, W) int64 from images (B, 3, H, W) and cams (B, C-1, H, W).

    For t in (high, low): prepend a background channel of value t to the CAMs; downsample it and
    the image by `down_scale`; softmax over background + present classes (an absent class has the
    logit −∞, probability 0); PAR; upsample to H × W; arg-max. The two results combine as in
    `_combine_high_low`; pixels outside valid_box (B, 4) -> ignore. All images and both
    thresholds go through one PAR call, stacked along the channels (PAR refines each channel
    alone), so each image's kernel is computed once.
    """
    B, H, W, inside_box = _check_refine(images, cams, cls_labels, valid_box, down_scale)
    small_images, small_cams, small_background = _downsample_for_par(images, cams, high, low, down_scale)
    C, h, w = small_cams.shape[1] + 1, *small_cams.shape[-2:]
    logits = torch.stack([
        torch.cat([small_background[:, i:i + 1].expand(B, 1, h, w), small_cams], dim=1)  # (B, C, h, w)
        for i in range(2)  # 0: high, 1: low
    ], dim=1)  # (B, 2, C, h, w)
    present = _with_background(cls_labels)  # (B, C)
    logits = logits.masked_fill(~present[:, None, :, None, None], float("-inf"))
    probs = logits.softmax(dim=2).view(B, 2 * C, h, w)  # (B, 2C, h, w); absent classes exactly 0
    refined = par(small_images, probs)  # (B, 2C, h, w)
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)  # (B, 2C, H, W)
    label_high, label_low = _argmax(refined.view(B, 2, C, H, W), dim=2).unbind(dim=1)  # (B, H, W) each
    return _combine_high_low(label_high, label_low, inside_box, ignore_index)


def _check_refine(images, cams, cls_labels, valid_box, down_scale):
    """Checks the arguments of the CAM-label refinement; returns B, H, W and the valid-box mask
    (B, H, W)."""
    B, H, W = _check_refine_shapes(images, cams, cls_labels, down_scale)
    return B, H, W, _checked_box_mask(valid_box, B, H, W, cams.device)  # (B, H, W)


def _check_refine_shapes(images, cams, cls_labels, down_scale):
    """`_check_refine` but the valid box (no host read): returns B, H, W."""
    _check_4d("images", images, "(B, 3, H, W)")
    _check_4d("cams", cams, "(B, C-1, H, W)")
    B, _, H, W = images.shape
    if cams.shape[0] != B or cams.shape[-2:] != (H, W):
        raise ValueError(f"cams must be (B, C-1, H, W) = ({B}, C-1, {H}, {W}), got {tuple(cams.shape)}")
    _check_cls_labels(cls_labels, B, cams.shape[1])
    if not isinstance(down_scale, int) or down_scale < 1 or H < down_scale or W < down_scale:
        raise ValueError(f"down_scale must be an int in [1, min(H, W)] = [1, {min(H, W)}], got {down_scale}")
    return B, H, W


def _downsample_for_par(images, cams, high, low, down_scale):
    """PAR's inputs at 1/down_scale: images (B, 3, h, w), cams (B, C-1, h, w) and the two constant
    background planes (1, 2, h, w) of values high and low, all bilinear."""
    H, W = images.shape[-2:]
    h, w = H // down_scale, W // down_scale
    small_images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)  # (B, 3, h, w)
    small_cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)  # (B, C-1, h, w)
    # The constant background planes are resized too (not just set to t) so that they carry the
    # same rounding as the release's, which resizes them together with the CAMs.
    # Filled on the device (no host→device copy, which a GPU would wait on).
    background = torch.cat([cams.new_full((1, 1, H, W), high), cams.new_full((1, 1, H, W), low)], dim=1)  # (1, 2, H, W)
    small_background = F.interpolate(background, size=(h, w), mode="bilinear", align_corners=False)  # (1, 2, h, w)
    return small_images, small_cams, small_background


# ---------------------------------------------------------------------------------------------
# refining the propagated CAMs with PAR: the AFA pseudo label (paper §3.2, §3.3)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def refine_propagated_with_par(par, images, cams_low, cams_high, cls_labels, valid_box, down_scale=2,
                               ignore_index=255):
    """AFA pseudo label (B, H, W) int64 from the random-walk outputs at t = low and t = high.

    images (B, 3, H, W); cams_low, cams_high (B, C, H, W) with background first and absent classes 0
    (already upsampled to the crop); cls_labels (B, C-1); valid_box (B, 4) (top, bottom, left, right)
    or None for the whole crop. Per image: crop image and maps to the box, downsample the image by
    `down_scale`, PAR on background + present channels (PAR resizes the maps to the image itself),
    upsample to the box, arg-max. The two labels combine as in `_combine_high_low`; outside the
    box -> ignore. A box thinner than `down_scale` is downsampled to 1 pixel a side.
    """
    _check_4d("images", images, "(B, 3, H, W)")
    _check_4d("cams_low", cams_low, "(B, C, H, W)")
    _check_4d("cams_high", cams_high, "(B, C, H, W)")
    B, _, H, W = images.shape
    if cams_low.shape != cams_high.shape or cams_low.shape[0] != B or cams_low.shape[-2:] != (H, W):
        raise ValueError(
            f"cams_low and cams_high must both be (B, C, H, W) = ({B}, C, {H}, {W}), "
            f"got {tuple(cams_low.shape)} and {tuple(cams_high.shape)}"
        )
    _check_cls_labels(cls_labels, B, cams_low.shape[1] - 1)
    if not isinstance(down_scale, int) or down_scale < 1:
        raise ValueError(f"down_scale must be a positive int, got {down_scale}")
    present = _with_background(cls_labels)  # (B, C)
    inside_box = valid_box_mask(valid_box, B, H, W, images.device)  # (B, H, W); checks the box's shape
    # The loop's slices need each box and class count k as numbers: one device→host read.
    counts = present.sum(dim=1, keepdim=True)  # (B, 1) k = 1 + present classes
    if valid_box is None:
        host = [[0, H, 0, W, k] for k in counts.view(-1).tolist()]
    else:
        box = torch.as_tensor(valid_box)  # (B, 4)
        host = torch.cat([box, counts.to(box.device)], dim=1).tolist()  # B × [top, bottom, left, right, k]
        if any(not (0 <= top < bottom <= H and 0 <= left < right <= W) for top, bottom, left, right, _ in host):
            _bad_boxes(valid_box, H, W)
    # Background + present class ids of each image, ascending, first: a stable sort, on the device.
    class_order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices  # (B, C)

    label_high = torch.zeros(B, H, W, dtype=torch.long, device=images.device)
    label_low = torch.zeros_like(label_high)
    # A loop over images: each is cropped to its own box, so image sizes and PAR kernels differ.
    for b, (top, bottom, left, right, k) in enumerate(host):
        keys = class_order[b, :k]  # (k,) background + present class ids
        box_image = images[b:b + 1, :, top:bottom, left:right]  # (1, 3, hb, wb)
        hb, wb = box_image.shape[-2:]
        # At least one pixel a side: a box thinner than down_scale (a sliver of image left by the
        # random crop) still gets a label, where the release's resize to size 0 fails.
        small_size = (max(1, hb // down_scale), max(1, wb // down_scale))
        small_image = F.interpolate(box_image, size=small_size, mode="bilinear", align_corners=False)  # (1, 3, hb/s, wb/s)
        maps = torch.cat([cams_high[b, keys, top:bottom, left:right],
                          cams_low[b, keys, top:bottom, left:right]], dim=0)  # (2k, hb, wb)
        refined = par(small_image, maps[None])  # (1, 2k, hb/s, wb/s): one kernel for both
        refined = F.interpolate(refined, size=(hb, wb), mode="bilinear", align_corners=False)  # (1, 2k, hb, wb)
        # Arg-max over the present channels only: absent ones are 0 and background comes first, so
        # this equals the arg-max over all C channels.
        box_label = keys[_argmax(refined.view(2, k, hb, wb), dim=1)]  # (2, hb, wb) class ids
        label_high[b, top:bottom, left:right] = box_label[0]
        label_low[b, top:bottom, left:right] = box_label[1]
    return _combine_high_low(label_high, label_low, inside_box, ignore_index)

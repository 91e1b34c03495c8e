"""Random walk propagation of CAMs with the learned affinity.

CAMs cover only the most discriminative parts of an object. AFA spreads them along the learned
semantic affinity (attention_affinity.py) with one step of a random walk (paper §3.2, "Pseudo label
propagation"): a constant background score is prepended to the label-masked CAMs, a softmax is
taken over background and the classes present in the image, and the result is multiplied by a
transition matrix built from the affinity restricted to a local window. The
propagated maps are upsampled, refined with PAR and turned into the AFA pseudo label that
supervises the segmentation branch.

The authors' release differs from the paper: the paper normalises the transition matrix exactly,
T = D⁻¹·a^β with D the degree matrix; the release divides each column by (its sum + 0.1), so the
walk leaks mass at pixels with little affinity in their window. This module follows the release,
with the offset exposed as `column_offset`.

`random_walk_cams` is the walk of the training step: the CAMs at the image size, label-masked and
resized to the affinity's grid, walked (`propagate`), resized back.
"""

import torch
import torch.nn.functional as F


def propagate(cams, affinity, mask, cls_labels, bkg_score, power=2, column_offset=0.1):
    """One random-walk step of the CAMs with the affinity (paper §3.2).

    With P (B, C, N) the softmax over background (constant bkg_score) and present classes,
        W_ij = a_ij^power · [(i, j) in window],   T_ij = W_ij / (Σ_i' W_i'j + column_offset),
    the result is P · T (per image, P as C × N): pixel j gathers class scores from the pixels i
    of its window in proportion to their affinity.

    cams: (B, C-1, h, w) foreground CAMs on the affinity's grid (label-masked by the caller).
    affinity: (B, N, N), N = h·w; detached here, never modified.
    mask: (N, N) bool window (see attention_affinity.window_mask), or None for no window.
    cls_labels: (B, C-1) multi-hot image-level labels; a class is present where it is non-zero.
    bkg_score: the constant background score t prepended to the CAMs.
    power: the exponent β sharpening the affinity before normalisation.
    column_offset: added to each column sum of the transition matrix (the release's 0.1).
    Returns (B, C, h, w): background first, absent classes exactly 0.
    """
    if cams.dim() != 4:
        raise ValueError(f"cams must have shape (B, C-1, h, w), got {tuple(cams.shape)}")
    B, num_fg, h, w = cams.shape
    N = h * w
    if affinity.shape != (B, N, N):
        raise ValueError(f"affinity must have shape (B, N, N) = ({B}, {N}, {N}) for cams "
                         f"{tuple(cams.shape)}, got {tuple(affinity.shape)}")
    if mask is not None and (mask.shape != (N, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be None or a bool tensor of shape ({N}, {N}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if cls_labels.shape != (B, num_fg):
        raise ValueError(f"cls_labels must have shape (B, C-1) = ({B}, {num_fg}), "
                         f"got {tuple(cls_labels.shape)}")

    # class probabilities over background + present classes; absent classes get logit -inf → 0
    background = cams.new_full((B, 1, h, w), bkg_score)  # (B, 1, h, w)
    scores = torch.cat([background, cams], dim=1).view(B, num_fg + 1, N)  # (B, C, N)
    background_present = torch.ones(B, 1, dtype=torch.bool, device=cams.device)  # (B, 1)
    present = torch.cat([background_present, cls_labels != 0], dim=1)  # (B, C)
    scores = scores.masked_fill(~present[:, :, None], float("-inf"))  # (B, C, N)
    probs = scores.softmax(dim=1)  # (B, C, N)

    # transition: T_ij = a_ij^β inside the window, each column j divided by its sum + offset
    transition = affinity.detach().to(probs.dtype) ** power  # (B, N, N), a new tensor
    if mask is not None:
        transition = transition.masked_fill(~mask.to(transition.device), 0)  # (B, N, N)
    transition = transition / (transition.sum(dim=1, keepdim=True) + column_offset)  # (B, N, N)

    propagated = torch.bmm(probs, transition)  # (B, C, N) @ (B, N, N) -> (B, C, N)
    return propagated.view(B, num_fg + 1, h, w)  # (B, C, h, w)


def random_walk_cams(cams, affinity, cls_labels, grid, mask, bkg_score):
    """Propagate the label-masked CAMs with the affinity (paper §3.2), back at the image size.

    cams: (B, C-1, H, W) in [0, 1]. affinity: (B, N, N) on the token grid (h, w) = `grid` of the
    images it was computed from, N = h·w. mask: (N, N) bool window, or None. cls_labels and
    bkg_score: as in `propagate`.
    Returns (B, C, H, W), background first, absent classes 0.
    """
    H, W = cams.shape[-2:]
    label_cams = cams * cls_labels[:, :, None, None]  # (B, C-1, H, W)
    label_cams = F.interpolate(label_cams, size=tuple(grid), mode="bilinear",
                               align_corners=False)  # (B, C-1, h, w)
    walked = propagate(label_cams, affinity, mask, cls_labels, bkg_score)  # (B, C, h, w)
    return F.interpolate(walked, size=(H, W), mode="bilinear", align_corners=False)  # (B, C, H, W)

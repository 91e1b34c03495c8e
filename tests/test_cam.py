"""Tests for cam.py: multi-scale CAMs, CAM labels and their PAR refinement (paper §3.1–3.3)."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from cam import _argmax, cam_to_label, multi_scale_cam, refine_cams_with_par, refine_propagated_with_par
from model import AFANet
from par import PAR

GOLDEN = Path(__file__).parent / "golden"
IGNORE = 255


def load_golden(name):
    return {key: torch.from_numpy(value) for key, value in np.load(GOLDEN / f"{name}.npz").items()}


# ---------------------------------------------------------------- cam_to_label

def test_cam_to_label_matches_release_golden():
    golden = load_golden("cam_to_label")
    train_label = cam_to_label(golden["cams"], golden["cls_labels"], low=0.35, high=0.55, valid_box=golden["valid_box"])
    eval_label = cam_to_label(golden["cams"], golden["cls_labels"], bkg_score=0.45)
    assert train_label.dtype == eval_label.dtype == torch.int64
    assert torch.equal(train_label, golden["train_label"])
    assert torch.equal(eval_label, golden["eval_label"])


def test_cam_to_label_bands_on_hand_made_case():
    # one image, 3 foreground classes (class 2 absent), 1 x 6 pixels
    cams = torch.tensor([
        [0.30, 0.35, 0.40, 0.55, 0.56, 0.10],  # class id 1
        [0.20, 0.10, 0.45, 0.10, 0.10, 0.90],  # class id 2 (absent: ignored even where largest)
        [0.10, 0.20, 0.30, 0.50, 0.90, 0.20],  # class id 3
    ]).view(1, 3, 1, 6)
    cls_labels = torch.tensor([[1.0, 0.0, 1.0]])
    train = cam_to_label(cams, cls_labels, low=0.35, high=0.55)
    assert train.tolist() == [[[0, 0, IGNORE, IGNORE, 3, 0]]]
    evaluation = cam_to_label(cams, cls_labels, bkg_score=0.45)
    assert evaluation.tolist() == [[[0, 0, 0, 1, 3, 0]]]
    boxed = cam_to_label(cams, cls_labels, bkg_score=0.45, valid_box=torch.tensor([[0, 1, 2, 5]]), ignore_index=99)
    assert boxed.tolist() == [[[99, 99, 0, 1, 3, 99]]]


def test_cam_to_label_box_mask_is_per_image():
    cams = torch.ones(2, 1, 4, 5)
    cls_labels = torch.ones(2, 1)
    label = cam_to_label(cams, cls_labels, valid_box=torch.tensor([[1, 3, 0, 5], [0, 4, 2, 4]]))
    expected = torch.full((2, 4, 5), IGNORE)
    expected[0, 1:3, :] = 1
    expected[1, :, 2:4] = 1
    assert torch.equal(label, expected)


# ---------------------------------------------------------------- refine_cams_with_par

@pytest.mark.parametrize("refine", [refine_cams_with_par, fast.refine_cams_with_par_packed])
def test_refine_cams_with_par_matches_release_golden(refine):
    golden = load_golden("refine_cams_with_par")
    label = refine(PAR(), golden["images"], golden["cams"], golden["cls_labels"],
                   low=0.35, high=0.55, valid_box=golden["valid_box"])
    assert label.dtype == torch.int64 and label.shape == golden["label"].shape
    # refined labels may differ on a handful of near-tied pixels
    assert (label == golden["label"]).float().mean() >= 0.999


# ---------------------------------------------------------------- refine_propagated_with_par

def test_refine_propagated_with_par_matches_release_golden():
    # Fixture made with the authors' release (CPU, float32): its refine_cams_with_cls_label on the
    # t = 0.35 and t = 0.55 maps, the high/low combination of its training script and its
    # ignore_img_box. Inputs: 3 crops 32 x 40, 10 foreground classes, boxes: the whole crop and two
    # that cut every side (odd sizes);
    # the maps are its propagte_aff_cam_with_bkg outputs upsampled to the crop.
    golden = load_golden("refine_propagated_with_par")
    images = golden["images_uint8"].float() / 255.0
    label = refine_propagated_with_par(PAR(), images, golden["cams_low"], golden["cams_high"],
                                       golden["cls_labels"], golden["valid_box"])
    assert label.dtype == torch.int64 and label.shape == golden["label"].shape == (3, 32, 40)
    assert (label == golden["label"]).float().mean() >= 0.999
    # the fixture is not trivial: background, several classes and ignore inside the boxes
    inside = golden["label"][0, 2:30, 3:37]
    assert {0, IGNORE} <= set(golden["label"].unique().tolist()) and len(inside.unique()) >= 3


def test_refine_propagated_with_par_equals_per_channel_refinement():
    # With the whole crop as box, the label is the §3 combination of two arg-maxes of PAR outputs.
    generator = torch.Generator().manual_seed(1)
    B, C, H, W = 2, 4, 20, 24
    images = torch.rand(B, 3, H, W, generator=generator)
    cls_labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    present = torch.cat([torch.ones(B, 1), cls_labels], dim=1)[:, :, None, None]  # (B, C, 1, 1)
    cams_low = torch.rand(B, C, H, W, generator=generator) * present
    cams_high = torch.rand(B, C, H, W, generator=generator) * present
    par = PAR()
    label = refine_propagated_with_par(par, images, cams_low, cams_high, cls_labels, valid_box=None)
    small = F.interpolate(images, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
    refine = lambda maps: F.interpolate(par(small, maps), size=(H, W), mode="bilinear", align_corners=False)
    high, low = refine(cams_high).argmax(dim=1), refine(cams_low).argmax(dim=1)
    expected = torch.where(high == 0, IGNORE, high)
    expected[(high == 0) & (low == 0)] = 0
    assert (label == expected).float().mean() >= 0.999


@pytest.mark.parametrize("box", [[0, 1, 0, 8], [3, 4, 5, 6], [2, 8, 7, 8]])
def test_refine_propagated_with_par_labels_boxes_thinner_than_down_scale(box):
    # A crop may keep a sliver of image 1 px wide: its box still gets a label (the release fails).
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cls_labels = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    cams_high = torch.zeros(2, 3, 8, 8)
    cams_high[0, 2] = 1.0  # image 0: class 2 wins at the high threshold
    cams_high[1, 0] = 1.0  # image 1: background at both thresholds
    cams_low = cams_high.clone()
    valid_box = torch.tensor([box, box])
    label = refine_propagated_with_par(PAR(), images, cams_low, cams_high, cls_labels, valid_box)
    top, bottom, left, right = box
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert (label[0][inside] == 2).all() and (label[1][inside] == 0).all()
    assert (label[:, ~inside] == IGNORE).all()


# ---------------------------------------------------------------- multi_scale_cam

class StridedConvCAM(nn.Module):
    """A stand-in network: CAMs from a stride-16 conv, affinity from their cosine similarity."""

    def __init__(self, num_foreground=4, stride=16):
        super().__init__()
        self.conv = nn.Conv2d(3, num_foreground, kernel_size=stride, stride=stride)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def cam(self, x):
        cams = self.conv(x)  # (B, C-1, h, w)
        features = F.normalize(cams.flatten(2), dim=1)  # (B, C-1, N)
        return cams, torch.sigmoid(features.transpose(1, 2) @ features)  # (B, N, N)


def test_multi_scale_cam_range_max_and_affinity_scale():
    model = StridedConvCAM()
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    cams, affinity = multi_scale_cam(model, images, scales=(1.0, 0.5, 1.5))
    assert cams.shape == (2, 4, 64, 80)
    assert cams.min() >= 0 and cams.max() <= 1
    peak = cams.amax(dim=(2, 3))  # (B, C-1)
    assert (cams.amin(dim=(2, 3)) == 0).all()
    assert ((peak > 0.999) | (peak == 0)).all() and (peak > 0.999).any()
    # the affinity of the un-flipped images at scale 1.5: a 96 x 120 input, a 6 x 7 grid
    assert affinity.shape == (2, 42, 42)
    resized = F.interpolate(images, size=(96, 120), mode="bilinear", align_corners=False)
    torch.testing.assert_close(affinity, model.cam(resized)[1])


def test_multi_scale_cam_single_scale_by_hand():
    model = StridedConvCAM()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    cams, _ = multi_scale_cam(model, images, scales=(1.0,))
    up = lambda x: F.interpolate(model.cam(x)[0], size=(32, 48), mode="bilinear", align_corners=False)
    expected = torch.maximum(up(images), up(images.flip(-1)).flip(-1)).relu()
    expected = expected - expected.amin(dim=(2, 3), keepdim=True)
    expected = expected / (expected.amax(dim=(2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(cams, expected)


def test_multi_scale_cam_is_flip_equivariant():
    model = StridedConvCAM()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    cams, _ = multi_scale_cam(model, images)
    cams_of_flipped, _ = multi_scale_cam(model, images.flip(-1))
    torch.testing.assert_close(cams_of_flipped, cams.flip(-1), rtol=1e-5, atol=1e-5)
    # the stand-in itself is not flip-equivariant, so the flip branch is what makes this hold
    single, single_of_flipped = model.cam(images)[0], model.cam(images.flip(-1))[0]  # (2, 4, 4, 4) each
    assert not torch.allclose(single_of_flipped, single.flip(-1), atol=1e-2)


def release_multi_scale_batchnorm(model, images, scales):
    """The release's CAM passes, as far as the decoder's BatchNorm sees them: in train mode, the
    whole network (decoder included) on each scale's images and their mirrors."""
    H, W = images.shape[-2:]
    for s in scales:
        scaled = F.interpolate(images, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=False)
        model(torch.cat([scaled, scaled.flip(-1)]))


def decoder_batchnorm_state(model):
    bn = model.decoder.linear_fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


@pytest.mark.parametrize("cam_function", [multi_scale_cam, fast.multi_scale_cam_partial_affinity])
def test_multi_scale_cam_in_train_mode_updates_decoder_batchnorm_as_the_release(cam_function):
    torch.manual_seed(0)
    model = AFANet(num_classes=5, backbone="mit_b0", drop_path_rate=0.0).train()
    release, skipped = copy.deepcopy(model), copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    before = decoder_batchnorm_state(model)
    # AFANet.cam's default: the statistics see every pass
    cam_function(model, images)
    cam_function(skipped, images, bn_stats=False)
    with torch.no_grad():
        release_multi_scale_batchnorm(release, images, (1.0, 0.5, 1.5))
    (mean, var, count), expected = decoder_batchnorm_state(model), decoder_batchnorm_state(release)
    assert count == expected[2] == 3  # one update per scale, images and mirrors together
    torch.testing.assert_close(mean, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(var, expected[1], rtol=0, atol=1e-6)
    assert not torch.allclose(mean, before[0], atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(decoder_batchnorm_state(skipped), before))


@pytest.fixture(scope="module")
def afanet():
    torch.manual_seed(0)
    return AFANet(num_classes=5, backbone="mit_b0").eval()


def test_argmax_over_channels_equals_torch_argmax_with_ties():
    x = torch.randint(0, 3, (2, 2, 4, 9, 11)).float()  # many ties: the first maximum must win
    for dim in (1, 2):
        assert torch.equal(_argmax(x, dim), x.argmax(dim=dim))
    x = torch.rand(3, 5, 7)
    assert torch.equal(_argmax(x, 0), x.argmax(dim=0))


# ---------------------------------------------------------------- argument checks

def test_bad_arguments_raise_value_errors():
    cams, cls_labels = torch.rand(2, 5, 8, 8), torch.ones(2, 5)
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="cls_labels"):
        cam_to_label(cams, torch.ones(2, 4))
    with pytest.raises(ValueError, match="low and high"):
        cam_to_label(cams, cls_labels, low=0.35)
    with pytest.raises(ValueError, match="valid_box"):
        cam_to_label(cams, cls_labels, valid_box=torch.tensor([[0, 8, 0, 8]]))
    with pytest.raises(ValueError, match="valid_box"):
        cam_to_label(cams, cls_labels, valid_box=torch.tensor([[0, 9, 0, 8], [0, 8, 0, 8]]))
    with pytest.raises(ValueError, match="cams"):
        cam_to_label(cams[0], cls_labels)
    with pytest.raises(ValueError, match="cams"):
        refine_cams_with_par(PAR(), images, cams[..., :4], cls_labels)
    with pytest.raises(ValueError, match="down_scale"):
        refine_cams_with_par(PAR(), images, cams, cls_labels, down_scale=9)
    with pytest.raises(ValueError, match="cams_low and cams_high"):
        refine_propagated_with_par(PAR(), images, torch.rand(2, 6, 8, 8), torch.rand(2, 5, 8, 8), cls_labels, None)
    with pytest.raises(ValueError, match="down_scale"):
        refine_propagated_with_par(PAR(), images, torch.rand(2, 6, 8, 8), torch.rand(2, 6, 8, 8), cls_labels,
                                   None, down_scale=0)
    with pytest.raises(ValueError, match="images"):
        multi_scale_cam(StridedConvCAM(), images[0])
    with pytest.raises(ValueError, match="scales"):
        multi_scale_cam(StridedConvCAM(), images, scales=())

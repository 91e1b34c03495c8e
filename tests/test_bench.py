"""bench.py runs and reports what it promises; the fast paths it measures equal the plain ones."""
import json

import pytest
import torch

import attention_affinity
import bench
import train_step
from attention_affinity import AffinityHead
from cam import _argmax
from model import AFANet


# ---------------------------------------------------------------- the benchmark itself

def test_bench_writes_the_promised_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--crops", "64", "--steps", "1", "--backbone", "mit_b0", "--threads", "1",
                       "--no-stages", "--no-bn-stats", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    (row,) = result["steps"]
    for key in ("crop", "full_step_s", "network_step_s", "full_peak_mb", "network_peak_mb"):
        assert key in row
    assert row["crop"] == 64
    assert row["full_step_s"] > 0 and row["network_step_s"] > 0
    # the full step holds the network step's activations and makes labels on top of them
    assert row["full_peak_mb"] >= 0.9 * row["network_peak_mb"] > 0
    assert result["par"]["par_s"] > 0 and result["par"]["par_reference_s"] > 0
    assert "| 64 |" in capsys.readouterr().out


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--crop", "64"])                 # not --crops
    assert e.value.code == 2 and "--crop" in capsys.readouterr().err


def test_staged_step_times_every_stage():
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="stages",
                options=["reuse_forward_cam", "bf16_cam"])
    row = bench.run_one(spec)
    assert list(row["stages_s"]) == ["forward", "multi-scale CAM", "CAM label", "PAR label",
                                     "random walk", "AFA label (PAR)", "losses", "L_reg", "backward",
                                     "optimizer"]
    assert all(t >= 0 for t in row["stages_s"].values())


@pytest.mark.parametrize("options", [[], ["no_cam_bn_stats"]])
def test_classification_phase_step_with_and_without_the_statistics_passes(options, monkeypatch):
    """The "cls" kind times train.py's step before cam_iters: the CAM passes run there for the
    decoder's BatchNorm statistics (as in the release) unless no_cam_bn_stats is given."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="cls", options=options)
    calls = []
    real = train_step.cam_statistics_passes
    monkeypatch.setattr(train_step, "cam_statistics_passes",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    row = bench.run_one(spec)
    assert row["step_s"] > 0 and row["options"] == options
    assert len(calls) == (0 if options else 1)


def test_report_gives_the_cost_of_the_statistics():
    row = {"crop": 64, "full_step_s": 3.0, "network_step_s": 1.0, "full_peak_mb": 2, "ratio": 3.0,
           "network_peak_mb": 1, "peak_ratio": 2.0, "full_cpu_s": 6.0, "network_cpu_s": 2.0}
    result = {"backbone": "mit_b0", "batch_size": 2, "device": "cpu", "threads": 1, "amp": False,
              "compile": False, "num_steps": 1, "warmup": 0, "load_before": "0", "load_after": "0",
              "steps": [row], "bn_stats": [{"crop": 64, "network_s": 1.0, "full_s": 3.0,
                                            "full_without_s": 2.5, "cls_s": 0.9,
                                            "cls_without_s": 0.4}],
              "par": {"par_s": 0.01, "par_reference_s": None}}
    report = bench.format_report(result)
    assert "| 64 | 3.000 | 2.500 | +0.500 | 3.00x / 2.50x | 0.900 | 0.400 | +0.500 |" in report


def test_synthetic_batch_has_labels_and_boxes():
    batch = bench.synthetic_batch(3, 64, 21, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert batch["image"].shape == (3, 3, 64, 64)
    counts = batch["cls_labels"].sum(dim=1)
    assert ((counts >= 1) & (counts <= 3)).all()
    box = batch["valid_box"]
    assert box[0].tolist() == [0, 64, 0, 64]
    assert ((box[:, 1] >= 32) & (box[:, 1] <= 64) & (box[:, 3] >= 32) & (box[:, 3] <= 64)).all()


# ---------------------------------------------------------------- fast paths equal plain ones

@pytest.fixture(scope="module")
def afanet():
    torch.manual_seed(0)
    return AFANet(num_classes=5, backbone="mit_b0").eval()


def test_affinity_head_row_blocks_and_map_lists_change_nothing(monkeypatch):
    torch.manual_seed(0)
    head = AffinityHead(num_maps=6)
    maps = [torch.randn(2, 4, 30, 30), torch.randn(2, 2, 30, 30)]
    with torch.enable_grad():
        whole = head(torch.cat(maps, dim=1).requires_grad_())  # the plain, one-shot computation
    monkeypatch.setattr(attention_affinity, "ROW_BLOCK_ELEMENTS", 2 * 6 * 30 * 7)  # 7 rows a block
    with torch.no_grad():
        in_blocks = head(maps)
    torch.testing.assert_close(in_blocks, whole.detach(), rtol=1e-6, atol=1e-7)


def test_affinity_from_factors_equals_affinity_from_logits():
    torch.manual_seed(1)
    head = AffinityHead(num_maps=6)
    queries = [torch.randn(2, 4, 25, 8), torch.randn(2, 2, 25, 8)]
    keys = [torch.randn(2, 4, 25, 8), torch.randn(2, 2, 25, 8)]
    logits = torch.cat([q @ k.transpose(-2, -1) for q, k in zip(queries, keys)], dim=1)  # (2, 6, 25, 25)
    expected = head(logits)
    factored = head(list(zip(queries, keys)))
    torch.testing.assert_close(factored, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(factored, factored.transpose(1, 2))  # L + Lᵀ is symmetric exactly
    with pytest.raises(ValueError, match="queries and keys"):
        head.forward_factored(queries[:1], keys[:1])


def test_cam_with_partial_affinity_equals_cam(afanet):
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cams, affinity = afanet.cam(images)
        for n in (0, 2, 4):
            fast_cams, fast_affinity = afanet.cam(images, num_affinity=n)
            torch.testing.assert_close(fast_cams, cams, rtol=1e-5, atol=1e-5)
            assert fast_affinity.shape == (n, 16, 16)
            torch.testing.assert_close(fast_affinity, affinity[:n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_affinity"):
        afanet.cam(images, num_affinity=5)


def test_argmax_over_channels_equals_torch_argmax_with_ties():
    x = torch.randint(0, 3, (2, 2, 4, 9, 11)).float()  # many ties: the first maximum must win
    for dim in (1, 2):
        assert torch.equal(_argmax(x, dim), x.argmax(dim=dim))
    x = torch.rand(3, 5, 7)
    assert torch.equal(_argmax(x, 0), x.argmax(dim=0))

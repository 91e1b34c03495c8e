"""bench.py runs and reports what it promises. (The fast paths it measures are tested against the
plain ones in the tests of their modules.)"""
import json

import pytest
import torch

import bench
import fast
import train_step


# ---------------------------------------------------------------- the benchmark itself

@pytest.mark.slow
def test_bench_writes_the_promised_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--crops", "64", "--steps", "1", "--backbone", "mit_b0", "--threads", "1",
                       "--no-stages", "--no-bn-stats", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    (row,) = result["steps"]
    for key in ("crop", "full_step_s", "network_step_s", "full_peak_mb", "network_peak_mb"):
        assert key in row
    assert row["crop"] == 64
    # the full step holds the network step's activations and makes labels on top of them
    assert row["full_peak_mb"] >= 0.9 * row["network_peak_mb"] > 0
    assert {"par_s", "par_reference_s"} <= set(result["par"])
    assert "| 64 |" in capsys.readouterr().out


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--crop", "64"])                 # not --crops
    assert e.value.code == 2 and "--crop" in capsys.readouterr().err


def test_no_speed_paths_give_the_same_step():
    """--no-speed-paths times the plain forms: no speed variant bound, and the step's loss the same
    up to float rounding."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="full", options=[])
    results = []
    for plain in (False, True):
        s = bench.build({**spec, "speed_paths": not plain})
        assert s.cfg.speed_paths is not plain
        assert fast.bound(s.model) == (frozenset() if plain else frozenset(fast.VARIANTS))
        torch.manual_seed(1)
        out = train_step.compute_losses(s.model, s.model, s.par, s.batch, s.cfg.switch_iters + 1,
                                        s.cfg, s.autocast)
        results.append(out.loss.detach())
    assert torch.allclose(results[0], results[1], rtol=1e-4)


def test_stages_are_the_labels_of_the_training_step():
    """bench.py times the training step itself, by the stage labels inside compute_losses,
    make_pseudo_labels and update: every stage is seen, in the step's order, within the step."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="stages", options=[])
    row = bench.run_one(spec)
    assert list(row["stages_s"]) == list(bench.STAGES)
    assert 0 < sum(row["stages_s"].values()) <= row["step_s"]


def test_variants_time_the_step_with_each_speed_variant_off(capsys):
    """--variants: all on, all off and each variant of fast.py off alone, in one process."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="variants", options=[])
    row = bench.run_one(spec)
    assert list(row["variants_s"]) == ["all on", "all off"] + [f"without {v}" for v in fast.VARIANTS]
    report = bench.format_report({"backbone": "mit_b0", "batch_size": 2, "device": "cpu",
                                  "threads": 1, "amp": False, "compile": False, "num_steps": 1,
                                  "warmup": 0, "load_before": "0", "load_after": "0", "steps": [],
                                  "variants": [{"crop": 64, **row}],
                                  "par": {"par_s": 0.01, "par_reference_s": None}})
    assert "without packed_par" in report and "the variant saves" in report


@pytest.mark.parametrize("options", [[], ["no_cam_bn_stats"]])
def test_classification_phase_step_with_and_without_the_statistics_passes(options, monkeypatch):
    """The "cls" kind times train.py's step before cam_iters: the CAM passes run there for the
    decoder's BatchNorm statistics (as in the release) unless no_cam_bn_stats is given."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="cls", options=options)
    calls = []
    real = train_step.cam_bn_stats_passes
    monkeypatch.setattr(train_step, "cam_bn_stats_passes",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    row = bench.run_one(spec)
    assert row["options"] == options
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


def test_profile_names_the_operators_of_the_full_step():
    """--profile: the full step's operators by self time, largest first, shares of one total."""
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=1, amp=False,
                compile=False, threads=0, crop=64, kind="profile", options=[])
    operators = bench.run_one(spec)["operators"]
    names = [name for name, *_ in operators]
    shares = [share for _, share, *_ in operators]
    assert len(names) == 12 and len(set(names)) == 12
    # the network's matrix products and convolutions are among the largest, whatever the load
    assert {"aten::addmm", "aten::mm", "aten::mkldnn_convolution"} & set(names[:6])
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert all(calls >= 1 for _, _, calls, _ in operators)


def test_on_a_gpu_each_stage_is_timed_between_synchronisations(monkeypatch):
    """bench.py --device cuda: the kernels run after their launch, so each stage of the step is
    timed between two synchronisations, and its peak memory read after a reset at its start
    (torch.cuda replaced here: the step runs on the CPU)."""
    calls, peaks = [], iter(range(1, 100))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks) * 2 ** 20)
    spec = dict(device="cpu", backbone="mit_b0", batch_size=2, steps=1, warmup=0, amp=False,
                compile=False, threads=0, crop=64, kind="stages", options=[])
    s = bench.build(spec)
    row = bench.metered(lambda: bench.training_step(s, s.cfg.switch_iters + 1), 1,
                        torch.device("cuda"))
    assert list(row["stages_s"]) == list(row["stages_peak_mb"]) == list(bench.STAGES)
    assert calls == ["sync"] + ["sync", "reset", "sync"] * len(bench.STAGES) + ["sync"]
    assert list(row["stages_peak_mb"].values()) == list(range(1, len(bench.STAGES) + 1))
    assert row["peak_mb"] == len(bench.STAGES) and 0 < sum(row["stages_s"].values()) <= row["step_s"]
    result = {"backbone": "mit_b0", "batch_size": 2, "device": "cuda", "threads": 1, "amp": False,
              "compile": False, "num_steps": 1, "warmup": 0, "load_before": "0",
              "load_after": "0", "steps": [], "stages": [{"crop": 64, **row}],
              "par": {"par_s": 0.01, "par_reference_s": None}}
    assert "| backward | " in bench.format_report(result).split("peak memory allocated")[1]
    del result["stages"][0]["stages_peak_mb"]  # on the CPU: no such table
    assert "peak memory allocated" not in bench.format_report(result)


def test_the_memory_table_gives_the_largest_batch_per_gpu():
    """bench.py --memory: a peak linear in the batch, x1.2 plus 1 GiB on the card."""
    gib = 2 ** 30
    count = dict(parameters=gib // 4, gradients=gib // 4, adamw=gib // 2, batch=0,
                 saved_activations=gib, above_resident=gib, peak_stage="backward")
    counts = {2: {**count, "peak": 3 * gib}, 4: {**count, "peak": 5 * gib}}  # 1 GiB + 1 per image
    assert bench.largest_batch({b: c["peak"] for b, c in counts.items()}, 16) == 11  # 15/1.2 - 1
    report = bench.memory_report([{"backbone": "mit_b1", "crop": 512, "speed_paths": True,
                                   "counts": counts}])
    assert "| mit_b1 | 512 | speed | 2 | 1.00 | 1.00 | 1.00 (backward) | 3.00 | 4.6 | 11 | 18 | 31 | 64 |" in report

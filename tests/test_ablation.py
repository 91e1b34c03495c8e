"""ablation.py: rows as ordinary train.py runs, evaluated, reported beside the paper; reruns skip."""
import json
import os

import pytest

import ablation
import config
import synthetic

TINY = ["--data", "synthetic", "--crop", "64", "--batch-size", "2", "--iters", "4",
        "--cam-iters", "1", "--switch-iters", "2", "--eval-every", "4", "--warmup-iters", "1",
        "--workers", "0", "--val-batch-size", "4", "--num-figures", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(str(root), num_train=8, num_val=4, size=64)
    return str(root)


@pytest.mark.slow
def test_two_rows_run_evaluate_and_report(tiny_root, tmp_path, capsys):
    work_dir = str(tmp_path / "ablation")
    argv = ["--rows", "baseline", "afa", "--work-dir", work_dir, "--crf", "off",
            "--eval-args", "--long-side 0 --workers 0", "--data-root", tiny_root, *TINY]
    assert ablation.main(argv) == 0

    for row, flags in (("baseline", {"seg_label": "cam", "aff_weight": 0.0}),
                       ("afa", {"seg_label": "afa"})):
        config = json.loads((tmp_path / "ablation" / row / "config.json").read_text())
        assert config["iters"] == 4 and config["reg_weight"] == 0.0
        assert all(config[k] == v for k, v in flags.items())
        assert os.path.isfile(tmp_path / "ablation" / row / "checkpoints" / "iter_4.pth")

    report = (tmp_path / "ablation" / "ablation.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith("| ")}
    # our number is a percentage in [0, 100] beside the paper's
    for title, paper_value in (("baseline: CAM label", "46.7"), ("+ AFA", "62.6")):
        cells = [c.strip() for c in rows[title].split("|")[1:-1]]
        assert 0.0 <= float(cells[2]) <= 100.0 and cells[4] == paper_value
    assert "68.7" in rows["AFA"] and "66.3" in rows["AFA w/o propagation (CAM + PAR)"]
    # the MHSA walk is measured on the afa row's own checkpoint, without a training run of its own
    mhsa = [c.strip() for c in rows["AFA, propagation with MHSA"].split("|")[1:-1]]
    assert mhsa[1] == "afa" and 0.0 <= float(mhsa[2]) <= 100.0 and mhsa[3] == "58.3"
    metrics = json.loads((tmp_path / "ablation" / "afa" / "eval_mhsa" / "metrics.json").read_text())
    assert metrics["propagate_with"] == "attention"
    # rows not run stay empty rather than inventing numbers
    assert rows["+ PAR"].split("|")[3].strip() == "–"
    assert os.path.isfile(tmp_path / "ablation" / "ablation.png")

    # a rerun finds every row finished and runs neither train.py nor evaluate.py again
    capsys.readouterr()
    assert ablation.main(argv) == 0
    assert "$ " not in capsys.readouterr().out


def test_bad_rows_and_reserved_flags_are_one_line_errors(capsys):
    assert ablation.main(["--rows", "nope"]) == 2
    assert "no such row" in capsys.readouterr().err
    assert ablation.main(["--resume", "auto"]) == 2
    assert "--work-dir and --resume" in capsys.readouterr().err


def test_built_in_data_is_evaluated_at_its_own_size_other_data_with_the_protocol():
    args, flags = ablation.parse_args([])
    assert flags == [] and args.eval_args == ablation.SYNTHETIC_EVAL_ARGS
    args, flags = ablation.parse_args(["--eval-args", "--long-side 256", "--iters", "10"])
    assert flags == ["--iters", "10"] and args.eval_args == "--long-side 256"
    args, flags = ablation.parse_args(["--data", "VOC2012", "--iters", "10"])
    assert flags == ["--data", "VOC2012", "--iters", "10"] and args.eval_args == ""


# What each row must switch, whatever the preset: (seg_label, AFA head trained, L_reg on).
ROW_MEANS = {"baseline": ("cam", False, False), "par": ("par", False, False),
             "afa": ("afa", True, False), "reg": ("afa", True, True)}


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_every_row_runs_on_every_preset_and_switches_what_it_names(preset):
    """The row's flags come after the user's and the preset's: COCO's --aff-from-afa goes with
    the AFA head, and L_reg is on in the full-system row though COCO's preset leaves it off."""
    assert {row.name for row in ablation.ROWS} == set(ROW_MEANS)
    for row in ablation.ROWS:
        cfg = config.parse_config(["--data", preset, *row.flags])  # passes the config checks
        seg_label, afa_head, reg = ROW_MEANS[row.name]
        assert cfg.seg_label == seg_label, row.name
        assert (cfg.aff_weight > 0) == afa_head, row.name
        assert not cfg.aff_from_afa or afa_head, row.name
        assert (cfg.reg_weight > 0) == reg, row.name
        if reg:
            assert cfg.reg_weight == config.Config.reg_weight  # the paper's weight

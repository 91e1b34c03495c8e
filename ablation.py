"""The paper's ablation tables (§4.3, Tables 3 and 4), rerun on your data as ordinary train.py runs.

    python ablation.py                                  # built-in synthetic data, CPU
    python ablation.py --data VOC2012 --data-root data/VOCdevkit/VOC2012 --pretrained mit_b1.pth
    python ablation.py --rows baseline par afa          # some rows only
    python ablation.py --iters 300                      # any other flag goes to train.py

On the built-in data each row runs the synthetic preset's whole schedule (a few minutes of a
2-core CPU each) and is evaluated at the images' own size (`SYNTHETIC_EVAL_ARGS`;
flags you give win): the table takes about an hour. Each row is one `train.py` run in its own work dir,
`<work-dir>/<row>`, with the switches that the paper's row changes (`ROWS` below), then `evaluate.py` on its final checkpoint: the seg branch on
val (with dense CRF as well where `pydensecrf2` is installed) and the pseudo-label table on train.
Rows already finished are skipped, so Ctrl-C and rerunning continues where it stopped (train.py
itself resumes a row from its last checkpoint). At the end `<work-dir>/ablation.md` puts our
numbers beside the paper's and `<work-dir>/ablation.png` draws them as bars.

How the paper's rows map onto runs (VOC numbers from the paper; segmentation = seg branch on val,
pseudo labels = PAR-refined training labels on train):

| row        | train.py switches                               | paper, seg | paper, pseudo label     |
|------------|-------------------------------------------------|------------|-------------------------|
| baseline   | --seg-label cam --aff-weight 0 --reg-weight 0   | 46.7       |                         |
| par        | --seg-label par --aff-weight 0 --reg-weight 0   | 56.2       | w/o AFA (CAM+PAR) 54.4  |
| afa        | --seg-label afa --reg-weight 0                  | 62.6       | AFA 68.7; w/o prop. 66.3|
| reg        | (the full system: L_reg on)                     | 63.8; +CRF 66.0 |                    |

"Propagation with MHSA" (paper: 58.3) changes only how the trained `afa` model's labels are made,
so it is measured on that row's checkpoint: `evaluate.py --pseudo --propagate-with attention`
(the random walk with the raw attention instead of the learned affinity; no extra training run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Row:
    name: str           # folder name and --rows key
    title: str          # the paper's name of the row
    flags: tuple        # train.py switches that make this row
    paper_seg: float | None = None        # paper, VOC val, seg branch (mIoU %)
    paper_seg_crf: float | None = None    # the same with dense CRF
    extra_evals: tuple = ()               # (folder, evaluate.py flags): more tables of this run


# A row's flags set everything it switches, whatever the preset implies: without the AFA head
# there are no AFA labels to learn the affinity from (COCO's --aff-from-afa), and the full
# system has L_reg at the paper's weight (the COCO preset, like the release's script, has none).
NO_AFA = ("--aff-weight", "0", "--no-aff-from-afa")
ROWS = (
    Row("baseline", "baseline: CAM label", ("--seg-label", "cam", *NO_AFA, "--reg-weight", "0"),
        46.7),
    Row("par", "+ PAR", ("--seg-label", "par", *NO_AFA, "--reg-weight", "0"), 56.2),
    Row("afa", "+ AFA", ("--seg-label", "afa", "--reg-weight", "0"), 62.6,
        extra_evals=(("eval_mhsa", ("--pseudo", "--propagate-with", "attention")),)),
    Row("reg", "+ L_reg (full system)", ("--seg-label", "afa", "--reg-weight", "0.01"), 63.8,
        66.0),
)

# The paper's pseudo-label table: (title, row whose run measures it, evaluate.py key, paper mIoU)
PSEUDO_ROWS = (
    ("w/o AFA (CAM + PAR)", "par", "par_miou", 54.4),
    ("AFA w/o propagation (CAM + PAR)", "afa", "par_miou", 66.3),
    ("AFA, propagation with MHSA", "afa", "eval_mhsa/afa_miou", 58.3),
    ("AFA", "afa", "afa_miou", 68.7),
)


# On the built-in data each row is evaluated at the images' own size (128 px) rather than with the
# long side at 512; --eval-args overrides it. The rows keep the preset's whole schedule: a shorter
# one leaves the affinity too few iterations before the AFA label takes over, which measures the
# schedule rather than the method (docs/demo_study.md, "switch timing").
SYNTHETIC_EVAL_ARGS = "--long-side 0"


class AblationError(Exception):
    """A mistake the user can fix; printed as one line."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Every other flag (e.g. --data, --data-root, --pretrained, --iters, --device) is "
               "passed to each train.py run unchanged; see python train.py --help.")
    parser.add_argument("--rows", nargs="+", default=[r.name for r in ROWS],
                        help=f"rows to run (default: all of {', '.join(r.name for r in ROWS)})")
    parser.add_argument("--work-dir", default="work_dirs/ablation",
                        help="one folder per row below this, and ablation.md / ablation.png")
    parser.add_argument("--crf", choices=("auto", "on", "off"), default="auto",
                        help="evaluate with dense CRF too (auto: where pydensecrf2 is installed)")
    parser.add_argument("--eval-args", default=None,
                        help="extra flags for every evaluate.py run, quoted as one string "
                             f"(default: none; on the built-in data \"{SYNTHETIC_EVAL_ARGS}\")")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args, train_flags = parser.parse_known_args(argv)
    names = {r.name for r in ROWS}
    unknown = [r for r in args.rows if r not in names]
    if unknown:
        raise AblationError(f"--rows {' '.join(unknown)}: no such row; choose from "
                            f"{', '.join(sorted(names))}")
    reserved = [f for f in train_flags if f.split("=")[0] in ("--work-dir", "--resume")]
    if reserved:
        raise AblationError(f"{reserved[0]}: ablation.py sets each row's --work-dir and --resume "
                            "itself; use ablation.py --work-dir for the parent folder")
    if on_synthetic_data(train_flags) and args.eval_args is None:
        args.eval_args = SYNTHETIC_EVAL_ARGS
    args.eval_args = args.eval_args or ""
    return args, train_flags


def on_synthetic_data(train_flags: list) -> bool:
    """True unless the flags for train.py choose another data set than the built-in one."""
    data = "synthetic"
    for i, flag in enumerate(train_flags):
        if flag == "--data" and i + 1 < len(train_flags):
            data = train_flags[i + 1]
        elif flag.startswith("--data="):
            data = flag.split("=", 1)[1]
    return data == "synthetic"


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401  (the optional extra of evaluate.py --crf)
    except ImportError:
        return False
    return True


def run(command: list, dry_run: bool) -> None:
    print("$ " + " ".join(command), flush=True)
    if dry_run:
        return
    done = subprocess.run(command, cwd=HERE)
    if done.returncode == 130:  # train.py saved a checkpoint on Ctrl-C / SIGTERM
        raise KeyboardInterrupt
    if done.returncode:
        raise AblationError(f"{' '.join(command[1:3])} ... failed (exit {done.returncode}); its "
                            "message is above. Fix it and rerun: finished rows are kept")


def final_checkpoint(row_dir: str) -> str | None:
    """The checkpoint of the last iteration, once the row's training has finished."""
    try:
        with open(os.path.join(row_dir, "config.json")) as f:
            iters = json.load(f)["iters"]
    except (OSError, ValueError, KeyError):
        return None
    path = os.path.join(row_dir, "checkpoints", f"iter_{iters}.pth")
    return path if os.path.isfile(path) else None


def read_metrics(folder: str, checkpoint: str, key: str) -> dict | None:
    """evaluate.py's metrics.json in `folder` if it holds `key` for this very checkpoint."""
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("checkpoint") == checkpoint and key in metrics else None


def run_row(row: Row, args, train_flags: list, use_crf: bool) -> dict:
    """Train (or finish training) one row, evaluate it; return its numbers (fractions)."""
    row_dir = os.path.join(args.work_dir, row.name)
    python = [sys.executable]
    if final_checkpoint(row_dir) is None:
        run(python + ["train.py", *train_flags, *row.flags, "--work-dir", row_dir,
                      "--resume", "auto"], args.dry_run)
    checkpoint = final_checkpoint(row_dir)
    if checkpoint is None:
        if args.dry_run:
            return {}
        raise AblationError(f"{row_dir}: training ended without its final checkpoint")
    result = {}
    # "walk_miou": a pseudo-label table with the labels' present names (before them, "afa_miou"
    # named the walk), so that an older table is made again rather than misread
    evaluations = [("eval", ["--pseudo"], "walk_miou"), ("eval_seg", [], "mIoU")]
    if use_crf:
        evaluations.append(("eval_crf", ["--crf"], "mIoU"))
    evaluations += [(folder, list(flags), "walk_miou") for folder, flags in row.extra_evals]
    for folder, flags, key in evaluations:
        out = os.path.join(row_dir, folder)
        metrics = read_metrics(out, checkpoint, key)
        if metrics is None:
            run(python + ["evaluate.py", "--checkpoint", checkpoint, "--out", out, *flags,
                          *args.eval_args.split()], args.dry_run)
            metrics = read_metrics(out, checkpoint, key) or {}
        if folder == "eval":
            result.update({k: v for k, v in metrics.items() if k.endswith("_miou")})
        elif folder == "eval_seg":
            result["seg_val"] = metrics.get("mIoU")
        elif folder == "eval_crf":
            result["seg_val_crf"] = metrics.get("mIoU")
        else:  # another pseudo-label table of the same run, e.g. with the MHSA walk
            result.update({f"{folder}/{k}": v for k, v in metrics.items() if k.endswith("_miou")})
    return result


def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def paper(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def write_report(results: dict, work_dir: str, train_flags: list) -> str:
    """ablation.md: the paper's two tables with our numbers beside them."""
    lines = ["# Ablation: the paper's Tables 3 and 4, rerun", "",
             f"train.py flags of every row: `{' '.join(train_flags) or '(none)'}`; numbers are "
             "mIoU (%). Ours are on the data the runs used; the paper's are PASCAL VOC 2012.", "",
             "## Segmentation (seg branch, val)", "",
             "| row | switches | ours | ours + CRF | paper | paper + CRF |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        r = results.get(row.name, {})
        if row.name in results or row.paper_seg is not None:
            lines.append(f"| {row.title} | `{' '.join(row.flags) or '(defaults)'}` | "
                         f"{percent(r.get('seg_val'))} | {percent(r.get('seg_val_crf'))} | "
                         f"{paper(row.paper_seg)} | {paper(row.paper_seg_crf)} |")
    lines += ["", "## Pseudo labels (train)", "",
              "| pseudo label | measured on row | ours | paper |", "|---|---|---|---|"]
    for title, row_name, key, paper_value in PSEUDO_ROWS:
        value = results.get(row_name, {}).get(key)
        lines.append(f"| {title} | {row_name} | {percent(value)} | {paper(paper_value)} |")
    lines += ["", "Every pseudo label of every row (cam: CAM, par: CAM + PAR, walk: AFA random walk, "
              "afa: AFA + PAR; seg branch at one scale):", "", "| row | cam | par | walk | afa | seg |",
              "|---|---|---|---|---|---|"]
    for row in ROWS:
        if row.name in results:
            r = results[row.name]
            lines.append(f"| {row.name} | " + " | ".join(
                percent(r.get(k)) for k in ("cam_miou", "par_miou", "walk_miou",
                                            "afa_miou", "seg_miou")) + " |")
    path = os.path.join(work_dir, "ablation.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path


def draw_bars(results: dict, work_dir: str) -> str:
    """ablation.png: per row, our seg mIoU (dark) beside the paper's (light), 0–100 %."""
    rows = [r for r in ROWS if r.name in results]
    bar, gap, height, left, top = 28, 36, 240, 40, 20
    width = left + len(rows) * (2 * bar + gap) + gap
    image = Image.new("RGB", (width, top + height + 60), "white")
    draw = ImageDraw.Draw(image)
    for tick in range(0, 101, 20):
        y = top + height - tick * height // 100
        draw.line([(left - 4, y), (width - 4, y)], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{tick}", fill="black")
    for i, row in enumerate(rows):
        x = left + gap + i * (2 * bar + gap)
        for j, (value, colour) in enumerate(((results[row.name].get("seg_val"), (40, 90, 160)),
                                             ((row.paper_seg or 0) / 100, (170, 200, 235)))):
            if value:
                y = top + height - int(value * height)
                draw.rectangle([x + j * bar, y, x + (j + 1) * bar - 2, top + height], fill=colour)
        draw.text((x, top + height + 6), row.name, fill="black")
    draw.text((left, top + height + 30), "seg mIoU %: ours (dark), paper VOC (light)",
              fill="black")
    path = os.path.join(work_dir, "ablation.png")
    image.save(path)
    return path


def main(argv=None) -> int:
    try:
        args, train_flags = parse_args(argv)
        use_crf = {"on": True, "off": False, "auto": None}[args.crf]
        if use_crf is None:
            use_crf = crf_available()
        elif use_crf and not crf_available():
            raise AblationError("--crf on needs the optional extra: pip install pydensecrf2")
        os.makedirs(args.work_dir, exist_ok=True)
        results = {}
        for row in ROWS:
            if row.name in args.rows:
                print(f"\n=== {row.name}: {row.title}", flush=True)
                results[row.name] = run_row(row, args, train_flags, use_crf)
        if args.dry_run:
            return 0
        print(f"\nreport: {write_report(results, args.work_dir, train_flags)}")
        print(f"figure: {draw_bars(results, args.work_dir)}")
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue (finished rows are kept)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""train.py as a command: every user mistake gets a one-line error, nothing is lost on a crash,
a resumed run is exact, and degenerate crops give finite losses.

Runs go through `train.main(argv)` in this process (the same code as `python train.py`, without
paying torch's start-up for each one) on a tiny synthetic set in VOC layout; the bad inputs are
built by copying that set and breaking one thing. Checkpoint kills and Ctrl-C use real processes.
"""
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import pipeline
import runner
import train
import train_step
from model import AFANet, mit_b0
from par import PAR
from synthetic import make_synthetic

PROJECT = Path(__file__).resolve().parent.parent
BROKEN = "syn_000001"  # the item a bad-input case breaks; it is in the first training batch


# --- a tiny data set and run -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_train=16, num_val=2, size=64)


def tiny(root, work_dir, *extra):
    """A few CPU seconds: cls-only step 0–1, PAR label from step 2, AFA label after step 2.
    Later flags override earlier ones, so `extra` may change any of these."""
    return ["--data-root", str(root), "--work-dir", str(work_dir), "--backbone", "mit_b0",
            "--crop", "64", "--batch-size", "2", "--iters", "4", "--cam-iters", "1",
            "--switch-iters", "2", "--eval-every", "2", "--warmup-iters", "1", "--workers", "0",
            "--val-batch-size", "2", "--num-figures", "0", "--log-every", "1", *map(str, extra)]


VOC = ["--data", "VOC2012", "--num-classes", "6", "--train-split", "train"]


@pytest.fixture
def voc(synthetic, tmp_path):
    """A copy of the synthetic set read as VOC 2012; its training split is two images, so the
    first batch reads both."""
    root = tmp_path / "voc"
    shutil.copytree(synthetic, root)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(f"syn_000000\n{BROKEN}\n")
    return root


def run(argv, capsys):
    """Exit code and stderr of `python train.py argv`."""
    code = train.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err):
    """The one error message printed (None when there is none)."""
    found = re.findall(r"error: (.*)", err)
    assert len(found) <= 1, err
    return found[0] if found else None


def log_lines(work_dir):
    with open(Path(work_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --- bad input: one line naming the file or flag, exit code 2 -----------------------------------------
def remove(path):
    os.remove(path)
    return []


def write(path, content: bytes):
    Path(path).write_bytes(content)
    return []


def truncate(path):
    return write(path, Path(path).read_bytes()[:Path(path).stat().st_size // 2])


def save_mask(path, ids, mode="P"):
    mask = Image.fromarray(np.asarray(ids, dtype=np.uint8))
    if mode == "P":
        mask.putpalette(data.voc_palette())
    mask.save(path)
    return []


def mask_with_id(path, class_id):
    ids = np.asarray(Image.open(path)).copy()
    ids[:4, :4] = class_id
    return save_mask(path, ids)


def checkpoint(path, backbone="mit_b0", num_classes=6, cut=False):
    torch.save({"model": {"w": torch.zeros(10_000)}, "optimizer": {}, "step": 2,
                "config": {"backbone": backbone, "num_classes": num_classes}}, path)
    if cut:
        truncate(path)
    return ["--resume", path]


def image(root):
    return root / "JPEGImages" / f"{BROKEN}.jpg"


def mask(root):
    return root / "SegmentationClassAug" / f"{BROKEN}.png"


def split(root):
    return root / "ImageSets" / "Segmentation" / "train.txt"


BAD_INPUTS = [  # id, setup(root, tmp) -> extra flags, what the message must say
    ("root missing", lambda r, t: ["--data-root", t / "nowhere"],
     r"dataset root \S*/nowhere does not exist .*make_synthetic"),
    ("split list missing", lambda r, t: remove(split(r)),
     r"split list \S*/ImageSets/Segmentation/train\.txt not found; splits available: \['train_aug', 'val'\]"),
    ("split list empty", lambda r, t: write(split(r), b"\n"),
     r"split list \S*/ImageSets/Segmentation/train\.txt is empty: it must hold one image name per line"),
    ("image missing", lambda r, t: remove(image(r)),
     rf"image \S*/JPEGImages/{BROKEN}\.jpg listed in split 'train' is missing: extract .*split list"),
    ("jpeg truncated", lambda r, t: truncate(image(r)),
     rf"cannot decode image \S*/JPEGImages/{BROKEN}\.jpg: image file is truncated.* extract it again"),
    ("jpeg corrupt", lambda r, t: write(image(r), b"\xff\xd8 not a jpeg"),
     rf"cannot decode image \S*/JPEGImages/{BROKEN}\.jpg: .* corrupt or truncated"),
    ("jpeg truncated, in a loader worker", lambda r, t: truncate(image(r)) + ["--workers", 1],
     rf"cannot decode image \S*/JPEGImages/{BROKEN}\.jpg: image file is truncated.* extract it again"),
    ("mask missing", lambda r, t: remove(mask(r)),
     rf"mask \S*/SegmentationClassAug/{BROKEN}\.png listed in split 'train' is missing: extract .*split list"),
    ("mask size", lambda r, t: save_mask(mask(r), np.zeros((64, 63)) + 2),
     rf"mask \S*/{BROKEN}\.png is 63×64 \(W×H\) but its image \S*/{BROKEN}\.jpg is 64×64: .*resized"),
    ("mask ids", lambda r, t: mask_with_id(mask(r), 9),
     rf"mask \S*/{BROKEN}\.png has class ids \[9\] outside 0\.\.5 .*num_classes=6"),
    ("mask in colour", lambda r, t: Image.open(mask(r)).convert("RGB").save(mask(r)) or [],
     rf"mask \S*/{BROKEN}\.png has mode RGB: masks must be index masks"),
    ("checkpoint missing", lambda r, t: ["--resume", t / "none.pth"],
     r"checkpoint \S*/none\.pth does not exist"),
    ("checkpoint truncated", lambda r, t: checkpoint(t / "cut.pth", cut=True),
     r"checkpoint \S*/cut\.pth cannot be read .*corrupt"),
    ("checkpoint of another backbone", lambda r, t: checkpoint(t / "b1.pth", backbone="mit_b1"),
     r"checkpoint \S*/b1\.pth was made with backbone=mit_b1 .*--backbone mit_b1"),
    ("checkpoint of another class count", lambda r, t: checkpoint(t / "coco.pth", num_classes=81),
     r"checkpoint \S*/coco\.pth was made with num_classes=81 .*--num-classes 81"),
    ("checkpoint that is encoder weights",
     lambda r, t: torch.save({"patch_embed1.proj.weight": torch.zeros(1)}, t / "mit.pth")
     or ["--resume", t / "mit.pth"],
     r"checkpoint \S*/mit\.pth was not written by train\.py .*--pretrained"),
    ("pretrained with wrong keys",
     lambda r, t: torch.save({**mit_b0().state_dict(), "block9.wrong.weight": torch.zeros(3)},
                             t / "wrong.pth") or ["--pretrained", t / "wrong.pth"],
     r"--pretrained: \S*/wrong\.pth does not fit this encoder .*unexpected keys \(block9\.wrong\.weight\)"),
    ("pretrained of another model",
     lambda r, t: torch.save({"encoder.wrong.weight": torch.zeros(3)}, t / "other.pth")
     or ["--pretrained", t / "other.pth"],
     r"--pretrained: \S*/other\.pth does not fit this encoder \(mit_b0\): it does not look like a "
     r"SegFormer MiT or ViT checkpoint"),
    ("pretrained is a text file", lambda r, t: write(t / "notes.txt", b"mit_b1 weights: see the README\n")
     + ["--pretrained", t / "notes.txt"],
     r"--pretrained: cannot read MiT weights from \S*/notes\.txt: it is a text file, not a checkpoint "
     r"\(it begins 'mit_b1 weights: see the README'\)$"),
    ("pretrained missing", lambda r, t: ["--pretrained", t / "none.pth"],
     r"--pretrained: .*not found: \S*/none\.pth"),
    ("work dir under a file", lambda r, t: write(t / "file.txt", b"") + ["--work-dir", t / "file.txt/wd"],
     r"work dir \S*/file\.txt/wd is not writable .*--work-dir"),
    ("switch before the CAM phase ends", lambda r, t: ["--cam-iters", 3, "--switch-iters", 2],
     r"--cam-iters 3 > --switch-iters 2"),
    ("no CUDA device", lambda r, t: ["--device", "cuda"], r"--device cuda: no CUDA device here"),
]


@pytest.mark.parametrize("setup, expected", [(s, e) for _, s, e in BAD_INPUTS],
                         ids=[i for i, _, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_naming_the_file_or_flag(setup, expected, voc, tmp_path, capsys):
    if "CUDA" in expected and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    extra = setup(voc, tmp_path)
    code, err = run(tiny(voc, tmp_path / "wd", *VOC, *extra), capsys)
    assert code == 2
    assert "Traceback" not in err
    message = error_line(err)
    assert message is not None and re.search(expected, message), err


def test_batch_not_divisible_by_processes(synthetic, tmp_path, capsys, monkeypatch):
    """torchrun's variables, no process group: the check comes before one is started."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, err = run(tiny(synthetic, tmp_path / "wd", "--batch-size", 3), capsys)
    assert code == 2 and not torch.distributed.is_initialized()
    assert re.fullmatch(r"--batch-size 3 is not divisible by the 2 processes; .*", error_line(err))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(data.DatasetError, match="nowhere"):
        train.main(tiny(tmp_path / "nowhere", tmp_path / "wd", *VOC, "--debug"))


def test_command_line_prints_only_the_error(tmp_path):
    """The real entry point: exit code 2 and a single stderr line, nothing from deep inside
    (--device cpu: on a machine without a GPU, --device auto adds its warning line first)."""
    result = subprocess.run(
        [sys.executable, "train.py", *tiny(tmp_path / "nowhere", tmp_path / "wd", *VOC),
         "--device", "cpu"],
        cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: dataset root ") and result.stderr.count("\n") == 1


def test_error_is_the_last_line_and_a_line_of_its_own(voc, tmp_path, capsys):
    truncate(image(voc))
    code, err = run(tiny(voc, tmp_path / "wd", *VOC), capsys)
    assert code == 2
    screen = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]
    assert screen[-1].startswith("error: cannot decode image "), screen[-3:]


def test_odd_images_are_converted_and_empty_masks_skipped(voc, tmp_path, capsys, caplog):
    """Grayscale, RGBA, CMYK and 16-bit images train; an image without foreground is skipped,
    counted in one warning, not an error."""
    names = [f"syn_{i:06d}" for i in range(6)]
    rgb = [Image.open(voc / "JPEGImages" / f"{n}.jpg").convert("RGB") for n in names[:4]]
    rgb[0].convert("L").save(voc / "JPEGImages" / f"{names[0]}.jpg", format="JPEG")
    rgb[1].convert("RGBA").save(voc / "JPEGImages" / f"{names[1]}.jpg", format="PNG")
    rgb[2].convert("CMYK").save(voc / "JPEGImages" / f"{names[2]}.jpg", format="JPEG")
    gray16 = np.asarray(rgb[3].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray16).save(voc / "JPEGImages" / f"{names[3]}.jpg", format="PNG")
    save_mask(voc / "SegmentationClassAug" / f"{names[4]}.png", np.zeros((64, 64)))
    split(voc).write_text("".join(n + "\n" for n in names))
    modes = [Image.open(voc / "JPEGImages" / f"{n}.jpg").mode for n in names[:4]]
    assert modes == ["L", "RGBA", "CMYK", "I;16"]
    # 2 steps × 4 images read the whole epoch of 5 kept images; classification only (cheap).
    argv = tiny(voc, tmp_path / "wd", *VOC, "--iters", 2, "--batch-size", 4, "--cam-iters", 2)
    with caplog.at_level("WARNING", logger="data"):
        code, err = run(argv, capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("1 of 6 images of split 'train'")
    assert [line["step"] for line in log_lines(tmp_path / "wd")] == [1, 2]


# --- one run per work dir ---------------------------------------------------------------------------
def test_a_new_run_refuses_a_work_dir_that_holds_one(synthetic, tmp_path, capsys):
    """Without --resume, a second run would mix its files with the first's: one line instead,
    nothing touched; --overwrite starts over, --resume auto continues."""
    work_dir = tmp_path / "wd"
    argv = tiny(synthetic, work_dir, "--iters", 2, "--cam-iters", 2, "--switch-iters", 2)
    code, err = run(argv, capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in work_dir.rglob("*") if p.is_file()}
    assert work_dir / "checkpoints" / "iter_2.pth" in before
    code, err = run(argv + ["--iters", 1], capsys)
    assert code == 2
    assert re.fullmatch(rf"work dir {re.escape(str(work_dir))} already holds a run \(.*\); "
                        r"continue it with --resume auto, start it over with --overwrite, .*",
                        error_line(err)), err
    assert {p: p.read_bytes() for p in work_dir.rglob("*") if p.is_file()} == before

    code, err = run(argv + ["--iters", 1, "--overwrite"], capsys)
    assert code == 0, err
    assert [line["step"] for line in log_lines(work_dir)] == [1]
    assert sorted(os.listdir(work_dir / "checkpoints")) == ["iter_1.pth"]
    assert json.loads((work_dir / "metrics.json").read_text())["history"][-1]["step"] == 1

    code, err = run(argv + ["--resume", "auto"], capsys)       # 1 → 2 in the same folder
    assert code == 0, err
    assert [line["step"] for line in log_lines(work_dir)] == [1, 2]


@pytest.mark.parametrize("bad", [["--data-root", "missing"], ["--resume", "missing.pth"],
                                 ["--pretrained", "missing.pth"]],
                         ids=["no data", "bad --resume", "bad --pretrained"])
def test_a_failed_start_writes_no_run_and_the_corrected_retry_runs(bad, voc, tmp_path, capsys):
    work_dir = tmp_path / "wd"
    bad = [str(tmp_path / b) if b.startswith("missing") else b for b in bad]
    code, err = run([*VOC, *tiny(voc, work_dir, "--iters", 1), *bad], capsys)
    assert code == 2 and error_line(err)
    assert not work_dir.exists()                       # no file, no folder (not even the cache)
    code, err = run([*VOC, *tiny(voc, work_dir, "--iters", 1)], capsys)
    assert code == 0, err
    assert (work_dir / "config.json").exists() and log_lines(work_dir)


def test_a_config_json_alone_is_no_run(voc, tmp_path, capsys):
    """A failed start of an earlier version left config.json only: the folder is free."""
    work_dir = tmp_path / "wd"
    work_dir.mkdir()
    (work_dir / "config.json").write_text("{}")
    code, err = run([*VOC, *tiny(voc, work_dir, "--iters", 1)], capsys)
    assert code == 0, err


def test_a_data_root_typo_on_the_built_in_data_says_where_it_builds(tmp_path, capsys,
                                                                     monkeypatch):
    class Built(Exception):
        pass

    def make_synthetic(root, *args, **kwargs):
        raise Built(root)
    monkeypatch.setattr(train.synthetic, "make_synthetic", make_synthetic)
    typo = tmp_path / "data" / "synthtic"
    with pytest.raises(Built):
        train.main(["--data-root", str(typo), "--work-dir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert f"building the built-in synthetic data set in {typo}: the --data-root given does " \
           "not exist (a typo?" in err


def test_resuming_a_finished_run_prints_no_empty_speed_line(synthetic, tmp_path, capsys):
    work_dir = tmp_path / "wd"
    assert train.main(tiny(synthetic, work_dir, "--iters", 2)) == 0
    assert "speed on this machine: classification-only steps" in capsys.readouterr().out
    assert train.main(tiny(synthetic, work_dir, "--iters", 2, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "nothing to do: the checkpoint is at iteration 2 of 2" in out
    assert "speed on this machine" not in out


def test_training_voc_from_random_weights_warns(voc, tmp_path, capsys):
    # --device cpu: on a machine without a GPU, --device auto adds the warning that says so
    code, err = run(tiny(voc, tmp_path / "wd", *VOC, "--iters", 1, "--cam-iters", 1, "--device",
                         "cpu"), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "--data VOC2012 without --pretrained" in warnings[0]
    assert "--pretrained mit_b1.pth" in warnings[0]
    code, err = run(tiny(voc, tmp_path / "wd2", "--iters", 1, "--cam-iters", 1), capsys)
    assert code == 0 and "warning: " not in err                  # the synthetic preset: no warning


def test_class_id_error_with_the_synthetic_preset_suggests_data_voc(voc, tmp_path, capsys):
    """A VOC tree given as --data-root while --data was forgotten: the error says why."""
    mask_with_id(mask(voc), 15)
    code, err = run(tiny(voc, tmp_path / "wd"), capsys)
    assert code == 2
    message = error_line(err)
    assert "class ids [15]" in message
    assert message.endswith("the synthetic preset is active; did you mean --data VOC2012?")
    code, err = run(tiny(voc, tmp_path / "wd2", *VOC), capsys)   # the VOC preset: no such hint
    assert code == 2 and "synthetic preset" not in error_line(err)


# --- crash safety ---------------------------------------------------------------------------------
SAVE_LOOP = """
import sys
import torch
import runner
path, weights = sys.argv[1], torch.empty(2_000_000)  # 8 MB: most of the loop is spent saving
step = 0
while True:
    step += 1
    weights.fill_(step)
    runner.save_checkpoint(path, {"model": {"w": weights}, "step": step,
                                 "config": {"backbone": "mit_b0", "num_classes": 6}})
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_the_last_checkpoint_loadable(tmp_path):
    work_dir = tmp_path / "wd"
    os.makedirs(work_dir / "checkpoints")
    path = str(work_dir / "checkpoints" / "iter_7.pth")
    moments = random.Random(0)
    for when in ("any moment", "while a save is written", "while a save is written"):
        process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, path], cwd=PROJECT,
                                   stdout=subprocess.PIPE, text=True)
        first = process.stdout.readline()  # at least one save is complete
        if when == "any moment":
            time.sleep(moments.uniform(0, 0.3))
        else:  # the temporary of the next save exists: kill somewhere inside writing it
            temporary = Path(path).parent / f".iter_7.pth.tmp{process.pid}"
            deadline = time.time() + 30
            while not temporary.exists() and time.time() < deadline:
                time.sleep(0.0005)
            time.sleep(moments.uniform(0, 0.01))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        printed = [int(s) for s in (first + process.stdout.read()).split()]
        ckpt = runner.load_checkpoint(path)
        # The save after the last printed one may have finished before the kill; none is torn.
        assert ckpt["step"] in (printed[-1], printed[-1] + 1), when
        assert torch.equal(ckpt["model"]["w"], torch.full((2_000_000,), float(ckpt["step"])))
    assert runner.latest_checkpoint(str(work_dir)) == path
    leftovers = set(os.listdir(work_dir / "checkpoints")) - {"iter_7.pth"}
    assert all(name.startswith(".") for name in leftovers), leftovers  # temporaries, never iter_*


def start_run(argv, tmp_path, **popen):
    """`python train.py argv` as a process of its own (its own process group), output in files;
    returns once the run has logged a step."""
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    process = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=PROJECT,
                               stdout=out, stderr=err, start_new_session=True, **popen)
    log = Path(argv[argv.index("--work-dir") + 1]) / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().strip()) and process.poll() is None:
        assert time.time() < deadline, "no log line"
        time.sleep(0.1)
    return process


def finish(process, tmp_path):
    """Exit code, stdout and stderr of a run started by `start_run`."""
    process.wait(timeout=240)
    return (process.returncode, (tmp_path / "out.txt").read_text(),
            (tmp_path / "err.txt").read_text())


def interrupted_checkpoint(work_dir):
    saved = [n for n in os.listdir(work_dir / "checkpoints") if n.startswith("interrupted_iter_")]
    assert len(saved) == 1, saved
    done = int(saved[0][len("interrupted_iter_"):-len(".pth")])
    path = work_dir / "checkpoints" / saved[0]
    assert runner.load_checkpoint(str(path))["step"] == done
    return done


def without_time(work_dir):
    return [{k: v for k, v in line.items() if k != "time"} for line in log_lines(work_dir)]


@pytest.mark.parametrize("signum, whom", [
    pytest.param(signal.SIGINT, "process", marks=pytest.mark.slow),
    (signal.SIGTERM, "process"),
    (signal.SIGTERM, "group"),
    pytest.param(signal.SIGINT, "group", marks=pytest.mark.slow),
], ids=["Ctrl-C", "SIGTERM", "SIGTERM to the group", "Ctrl-C to the group"])
def test_first_signal_saves_and_exits_then_resume_auto_continues(signum, whom, synthetic,
                                                                 tmp_path, capsys):
    """Ctrl-C, or SIGTERM (a cluster's time limit): the step ends, a checkpoint is saved, exit
    128 + signal; --resume auto in the same work dir continues from it, its log cut there, to
    the same losses as a run that was never stopped. `timeout`, SLURM and a terminal's Ctrl-C
    signal the whole process group, the data-loading workers too."""
    work_dir = tmp_path / "wd"
    # In warm-up the learning rate does not depend on --iters: runs of any length compare.
    flags = ["--eval-every", 100, "--warmup-iters", 1000, "--workers", 2 if whom == "group" else 0]
    process = start_run(tiny(synthetic, work_dir, "--iters", 50, *flags), tmp_path)
    if whom == "group":
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    code, out, err = finish(process, tmp_path)
    assert code == 128 + signum, err
    assert "Traceback" not in err and "error" not in err
    done = interrupted_checkpoint(work_dir)
    assert 1 <= done < 50 and f"interrupted after iteration {done}" in out
    assert "--resume auto" in out
    code, err = run(tiny(synthetic, work_dir, "--resume", "auto", "--iters", done + 2, *flags),
                    capsys)
    assert code == 0, err
    assert [line["step"] for line in log_lines(work_dir)] == list(range(1, done + 3))
    if whom == "group":  # bit for bit the run that was never stopped
        straight = tmp_path / "straight"
        assert train.main([str(a) for a in tiny(synthetic, straight, "--iters", done + 2,
                                                *flags)]) == 0
        assert without_time(work_dir) == without_time(straight)


def test_a_worker_killed_by_the_system_ends_in_one_line_and_a_checkpoint(synthetic, tmp_path,
                                                                          capsys):
    """A data-loading worker killed by the system (SIGKILL, as the out-of-memory killer sends):
    one error line that says what happened and where the last completed step is saved."""
    work_dir = tmp_path / "wd"
    process = start_run(tiny(synthetic, work_dir, "--iters", 200, "--eval-every", 1000,
                             "--workers", 2), tmp_path)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 2, children  # the two workers
    os.kill(int(children[0]), signal.SIGKILL)
    code, out, err = finish(process, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    message = error_line(err)
    assert message.startswith("a data-loading worker died (DataLoader worker"), message
    assert "out of memory" in message and "--resume auto" in message
    done = interrupted_checkpoint(work_dir)
    assert f"the state after iteration {done} is saved in " in message
    assert [line["step"] for line in log_lines(work_dir)][-1] == done
    code, err = run(tiny(synthetic, work_dir, "--resume", "auto", "--iters", done + 1), capsys)
    assert code == 0, err


# --- exact resume -----------------------------------------------------------------------------------
N = 3  # resume at step 3 of 6: step 3 uses the PAR label, steps 4 and 5 the AFA label


def resume_flags(root, work_dir):
    return tiny(root, work_dir, "--iters", 2 * N, "--eval-every", N, "--switch-iters", N)


SIGINT_HANDLERS = {}


@pytest.fixture(scope="module")
def straight_run(synthetic, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("straight")
    SIGINT_HANDLERS["before"] = signal.getsignal(signal.SIGINT)
    assert train.main(resume_flags(synthetic, work_dir)) == 0
    SIGINT_HANDLERS["after"] = signal.getsignal(signal.SIGINT)
    return work_dir


def test_ctrl_c_handler_is_the_callers_again_after_a_run(straight_run):
    assert SIGINT_HANDLERS["after"] is SIGINT_HANDLERS["before"]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_exact(straight_run, synthetic, tmp_path, workers):
    """2n steps in one go == n steps, resume, n steps: same losses to the bit, same weights;
    data order does not depend on the number of loader workers."""
    resumed = tmp_path / "resumed"
    start = straight_run / "checkpoints" / f"iter_{N}.pth"
    assert train.main(resume_flags(synthetic, resumed) + ["--resume", str(start),
                                                          "--workers", str(workers)]) == 0

    expected = without_time(straight_run)[N:]
    assert [line["step"] for line in expected] == list(range(N + 1, 2 * N + 1))
    assert {"cls", "seg", "aff"} <= set(expected[0])
    assert without_time(resumed) == expected
    final = f"checkpoints/iter_{2 * N}.pth"
    a, b = model_state(straight_run / final), model_state(resumed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- numerical safety ------------------------------------------------------------------------------
def poison_seg_loss(monkeypatch):
    real = pipeline.seg_loss
    monkeypatch.setattr(train_step, "seg_loss", lambda logits, label: real(logits, label) * math.nan)


@pytest.fixture(scope="module", params=[
    (["--lr", 1e30], None, 1),  # the weights blow up in one step: the next forward is NaN
    ([], poison_seg_loss, 2),   # L_seg is NaN at its first step, the forward is finite
], ids=["huge lr", "nan seg loss"])
def nonfinite_run(request, synthetic, tmp_path_factory):
    """A run stopped by a non-finite loss, validating (and checkpointing) every step, keeping 1."""
    flags, poison, bad_step = request.param
    work_dir = tmp_path_factory.mktemp("nonfinite")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stderr(err):
        if poison:
            poison(monkeypatch)
        code = train.main(tiny(synthetic, work_dir, "--eval-every", 1, "--keep-ckpts", 1, *flags))
    return code, err.getvalue(), work_dir / "checkpoints", bad_step


def test_nonfinite_loss_stops_with_the_weights_from_before(nonfinite_run):
    """Also: only the last --keep-ckpts periodic checkpoints stay; the special ones are kept."""
    code, err, folder, bad_step = nonfinite_run
    assert code == 2
    path = folder / f"nonfinite_iter_{bad_step}.pth"
    assert re.fullmatch(rf"non-finite loss at iteration {bad_step}: .* saved in {re.escape(str(path))};"
                        r" lower --lr .*", error_line(err)), err
    assert sorted(os.listdir(folder)) == [f"iter_{bad_step}.pth", path.name]
    assert runner.load_checkpoint(str(path))["step"] == bad_step
    before, saved = model_state(folder / f"iter_{bad_step}.pth"), model_state(path)
    weights = [k for k in saved if not re.search(r"running_|num_batches_tracked", k)]
    assert all(torch.isfinite(saved[k]).all() and torch.equal(saved[k], before[k]) for k in weights)


def test_nonfinite_checkpoint_has_the_norm_statistics_from_before(nonfinite_run):
    _, _, folder, bad_step = nonfinite_run
    before = model_state(folder / f"iter_{bad_step}.pth")
    saved = model_state(folder / f"nonfinite_iter_{bad_step}.pth")
    assert all(torch.equal(saved[k], before[k]) for k in saved)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return AFANet(6, backbone="mit_b0"), PAR()


def ignore_all(monkeypatch):
    def all_ignored(model, par, batch, *args, **kwargs):
        images = batch["image"]
        label = torch.full((images.shape[0], *images.shape[-2:]), 255, dtype=torch.long)
        return pipeline.PseudoLabels(par=label, afa=label)
    monkeypatch.setattr(train_step, "make_pseudo_labels", all_ignored)


@pytest.mark.parametrize("case, step", [  # step 1 trains on the PAR label, step 3 on the AFA label
    (case, step) for case in ("no foreground class", "tiny valid box", "all pseudo labels ignored")
    for step in (1, 3)])
def test_degenerate_crops_give_finite_losses_and_gradients(case, step, small_net, monkeypatch):
    model, par = small_net
    cfg = config.Config(backbone="mit_b0", num_classes=6, crop=64, cam_iters=0, switch_iters=2)
    torch.manual_seed(1)
    B = 2
    batch = {"image": torch.randn(B, 3, 64, 64), "cls_labels": torch.zeros(B, 5),
             "valid_box": torch.tensor([[0, 64, 0, 64]] * B)}
    if case == "tiny valid box":
        batch["valid_box"] = torch.tensor([[0, 1, 0, 1], [10, 11, 5, 7]])
        batch["cls_labels"][:, 2] = 1
    if case == "all pseudo labels ignored":
        batch["cls_labels"][:, 0] = 1
        ignore_all(monkeypatch)
    model.zero_grad(set_to_none=True)
    out = train_step.compute_losses(model, model, par, batch, step, cfg, contextlib.nullcontext)
    assert set(out.terms) == {"cls", "seg", "aff", "reg"}
    assert all(math.isfinite(v.item()) for v in out.terms.values()), out.terms
    if case == "all pseudo labels ignored":  # the terms without a labelled pixel or pair add 0
        assert out.terms["seg"].item() == 0.0 and out.terms["aff"].item() == 0.0
        # L_reg needs no label: unlabelled pixels enter its energy ungated (paper §3.4)
        assert out.terms["reg"].item() < 0
        assert out.loss.item() == pytest.approx(out.terms["cls"].item()
                                                + cfg.reg_weight * out.terms["reg"].item())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

"""How train.py, evaluate.py and ablation.py end while data-loading workers are alive: every way
ends the whole process tree within seconds, with its exit code and its one message, and leaves no
process behind (a worker ignores SIGINT / SIGTERM, so nothing but the program itself ends it).

Each case runs the real program as a process of its own session under a timeout; where a case
needs a fault that flags cannot make (a non-finite loss, a bug in the step, a slow step), the
program's `main` runs behind a two-line patch.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from synthetic import make_synthetic

PROJECT = Path(__file__).resolve().parent.parent
HUNG = 120            # seconds after which a program that has not ended counts as hung
GONE = 5              # seconds its processes may take to disappear once it has ended
BROKEN = "syn_000001"  # in the first training batch
VAL = "syn_000016"     # the first validation image


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_train=16, num_val=2,
                          size=64)


def flags(root, work_dir, *extra):
    """A tiny VOC-layout run with two data-loading workers; `extra` overrides."""
    return ["--data", "VOC2012", "--num-classes", "6", "--train-split", "train",
            "--data-root", root, "--work-dir", work_dir, "--backbone", "mit_b0", "--crop", "64",
            "--batch-size", "2", "--iters", "4", "--cam-iters", "1", "--switch-iters", "2",
            "--eval-every", "2", "--warmup-iters", "1", "--workers", "2", "--val-batch-size", "1",
            "--num-figures", "0", "--log-every", "1", *extra]


def tagged(tag: str) -> list:
    """The live (not zombie) processes whose environment holds AFA_TEST_TAG=tag: a program and
    every process it started, in whatever session (torchrun starts each rank in one of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"AFA_TEST_TAG={tag}".encode() in environ and state != "Z":
            found.append(int(entry))
    return found


class Program:
    """A program started in a session of its own, stdout and stderr in files."""

    def __init__(self, command, tmp_path, env=None):
        self.out, self.err = tmp_path / "out.txt", tmp_path / "err.txt"
        self.tag = str(tmp_path)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([str(c) for c in command], cwd=PROJECT, stdout=out,
                                            stderr=err, start_new_session=True,
                                            env={**os.environ, **(env or {}),
                                                 "AFA_TEST_TAG": self.tag})

    def wait_for(self, text: str, where="out"):
        """Until `text` is printed (the program still running)."""
        path = self.out if where == "out" else self.err
        deadline = time.time() + HUNG
        while text not in path.read_text():
            assert self.process.poll() is None, f"ended before {text!r}: {self.err.read_text()}"
            assert time.time() < deadline, f"never printed {text!r}"
            time.sleep(0.05)

    def end(self) -> tuple:
        """(exit code, stdout, stderr) once the program has ended, asserting that it ended
        within HUNG seconds and that none of its processes outlived it."""
        try:
            self.process.wait(timeout=HUNG)
        except subprocess.TimeoutExpired:
            for pid in tagged(self.tag):
                os.kill(pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"hung: still running after {HUNG} s\n{self.err.read_text()[-2000:]}")
        deadline = time.time() + GONE
        while tagged(self.tag) and time.time() < deadline:
            time.sleep(0.1)
        left = tagged(self.tag)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left}"
        return self.process.returncode, self.out.read_text(), self.err.read_text()


def patched(patch: str, script="train"):
    """python -c: `script`.main behind `patch` (Python run after importing train, pipeline,
    train_step and time)."""
    return [sys.executable, "-c", f"import sys, time, train, pipeline, train_step\n{patch}\n"
            f"import {script}\nsys.exit({script}.main(sys.argv[1:]))"]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# --- a data error inside a worker -----------------------------------------------------------------
def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def smaller_mask(path: Path):
    from PIL import Image
    mask = Image.open(path)
    mask.resize((mask.width // 2, mask.height // 2)).save(path)


DATA_ERRORS = [  # id, what breaks, the file the message names
    ("truncated training image", lambda root: truncate(root / "JPEGImages" / f"{BROKEN}.jpg"),
     f"{BROKEN}.jpg"),
    ("truncated validation image", lambda root: truncate(root / "JPEGImages" / f"{VAL}.jpg"),
     f"{VAL}.jpg"),
]


@pytest.fixture
def broken(synthetic, tmp_path, request):
    """A copy of the synthetic set, read as VOC, with one file broken; (root, the file's name)."""
    root = tmp_path / "voc"
    shutil.copytree(synthetic, root)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(f"syn_000000\n{BROKEN}\n")
    _, breaks, name = request.param
    breaks(root)
    return root, name


@pytest.mark.parametrize("broken", DATA_ERRORS, ids=[d[0] for d in DATA_ERRORS], indirect=True)
def test_a_data_error_in_a_worker_ends_train_py(broken, tmp_path):
    root, name = broken
    code, _, err = Program([sys.executable, "train.py", *flags(root, tmp_path / "wd")],
                           tmp_path).end()
    assert code == 2 and name in error_line(err)


MASK_OF_ANOTHER_SIZE = ("mask of another size",
                        lambda root: smaller_mask(root / "SegmentationClassAug" / f"{BROKEN}.png"),
                        f"{BROKEN}.png")


@pytest.mark.parametrize("broken", [MASK_OF_ANOTHER_SIZE], ids=["mask of another size"],
                         indirect=True)
def test_a_mask_of_another_size_ends_train_py_before_its_first_step(broken, tmp_path, capsys):
    """Training reads no mask: a mask's size is checked against its image's where the image-level
    labels are derived, at start-up, before any worker runs or anything is written."""
    root, name = broken
    assert train.main([str(f) for f in flags(root, tmp_path / "wd")]) == 2
    line = error_line(capsys.readouterr().err)
    assert name in line and "32×32 (W×H) but its image" in line
    assert not os.path.exists(tmp_path / "wd" / "config.json")  # written once the data loaded


@pytest.mark.parametrize("broken", DATA_ERRORS[1:], ids=["truncated validation image"],
                         indirect=True)
def test_a_data_error_in_a_worker_ends_evaluate_py(broken, synthetic, tmp_path):
    root, name = broken
    work_dir = tmp_path / "wd"              # a checkpoint trained on the healthy set
    assert train.main([str(f) for f in flags(synthetic, work_dir, "--iters", 1, "--eval-every", 1,
                                             "--workers", 0)]) == 0
    code, _, err = Program([sys.executable, "evaluate.py", "--checkpoint",
                            work_dir / "checkpoints" / "iter_1.pth", "--data-root", root,
                            "--workers", 2, "--long-side", 0], tmp_path).end()
    assert code == 2 and name in error_line(err)


@pytest.mark.parametrize("broken", DATA_ERRORS[:1], ids=["truncated training image"],
                         indirect=True)
def test_a_data_error_in_a_worker_ends_ablation_py(broken, tmp_path):
    root, name = broken
    train_flags = flags(root, "unused")
    del train_flags[train_flags.index("--work-dir"):train_flags.index("--work-dir") + 2]
    code, _, err = Program([sys.executable, "ablation.py", "--rows", "baseline",
                            "--work-dir", tmp_path / "ablation", *train_flags], tmp_path).end()
    assert code == 2 and name in err and "failed (exit 2)" in err, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("broken", DATA_ERRORS[:1], ids=["truncated training image"],
                         indirect=True)
def test_a_data_error_in_a_worker_ends_torchrun(broken, tmp_path):
    root, name = broken
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "train.py", *flags(root, tmp_path / "wd", "--batch-size", 4)]
    code, _, err = Program(command, tmp_path, env={"OMP_NUM_THREADS": "1"}).end()
    assert code != 0 and "error: " in err and name in err, err[-3000:]


# --- faults in the loop -----------------------------------------------------------------------------
NAN_SEG_LOSS = ("real = pipeline.seg_loss\n"
                "train_step.seg_loss = lambda logits, label: real(logits, label) * float('nan')")
BUG_AT_STEP_2 = ("real = train.compute_losses\n"
                 "def compute_losses(net, model, par, batch, step, *args):\n"
                 "    if step == 2: raise RuntimeError('a bug in the step')\n"
                 "    return real(net, model, par, batch, step, *args)\n"
                 "train.compute_losses = compute_losses")


def test_a_non_finite_loss_ends_the_run(synthetic, tmp_path):
    code, _, err = Program([*patched(NAN_SEG_LOSS), *flags(synthetic, tmp_path / "wd",
                                                            "--data", "synthetic")],
                           tmp_path).end()
    assert code == 2 and "non-finite loss at iteration 2" in error_line(err)


def test_an_exception_in_the_step_ends_the_run_with_its_traceback(synthetic, tmp_path):
    code, _, err = Program([*patched(BUG_AT_STEP_2), *flags(synthetic, tmp_path / "wd",
                                                             "--data", "synthetic")],
                           tmp_path).end()
    assert code == 1 and err.strip().splitlines()[-1] == "RuntimeError: a bug in the step", err


# --- signals ------------------------------------------------------------------------------------------
SLOW_STEPS = ("real = train.compute_losses\n"
              "def compute_losses(*args):\n"
              "    out = real(*args); print('step', flush=True); time.sleep(2); return out\n"
              "train.compute_losses = compute_losses")
SLOW_VALIDATION = ("def validate(*args, **kwargs):\n"
                   "    print('validating', flush=True); time.sleep(100)\n"
                   "train.validate = validate")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
@pytest.mark.parametrize("whom", ["process", "group"])
def test_a_stop_signal_saves_and_ends_every_process(signum, whom, synthetic, tmp_path):
    work_dir = tmp_path / "wd"
    program = Program([*patched(SLOW_STEPS), *flags(synthetic, work_dir, "--data", "synthetic",
                                                     "--iters", 50, "--eval-every", 100)],
                      tmp_path)
    program.wait_for("step")
    if whom == "group":
        os.killpg(program.process.pid, signum)
    else:
        program.process.send_signal(signum)
    code, out, err = program.end()
    assert code == 128 + signum and "Traceback" not in err, err
    assert "interrupted after iteration 1" in out
    assert (work_dir / "checkpoints" / "interrupted_iter_1.pth").is_file()


def test_a_second_ctrl_c_stops_at_once_in_one_line(synthetic, tmp_path):
    work_dir = tmp_path / "wd"
    program = Program([*patched(SLOW_STEPS), *flags(synthetic, work_dir, "--data", "synthetic",
                                                     "--iters", 50, "--eval-every", 2)],
                      tmp_path)
    deadline = time.time() + HUNG
    while not (work_dir / "checkpoints" / "iter_2.pth").is_file():  # in the step after it
        assert program.process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(program.process.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(program.process.pid, signal.SIGINT)
    started = time.time()
    code, out, err = program.end()
    assert time.time() - started < 10
    assert code == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped at once by a second Ctrl-C after iteration 2; "), last
    assert f"kept: {work_dir}/checkpoints/iter_2.pth (iteration 2)" in last, last
    assert "--resume auto" in last
    assert not [n for n in os.listdir(work_dir / "checkpoints") if n.startswith("interrupted")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stop_signal_during_validation_saves_at_once_and_resume_validates_first(
        signum, synthetic, tmp_path):
    work_dir = tmp_path / "wd"
    run_flags = flags(synthetic, work_dir, "--data", "synthetic", "--iters", 3)
    program = Program([*patched(SLOW_VALIDATION), *run_flags], tmp_path)
    program.wait_for("validating")
    started = time.time()
    os.killpg(program.process.pid, signum)
    code, out, err = program.end()
    assert time.time() - started < 30      # not the 100 s the validation would take
    assert code == 128 + signum and "Traceback" not in err, err
    assert "interrupted after iteration 2" in out and "validation was cut short" in out, out
    assert (work_dir / "checkpoints" / "interrupted_iter_2.pth").is_file()
    assert torch.load(work_dir / "checkpoints" / "interrupted_iter_2.pth",
                      weights_only=True)["history"] == []
    assert train.main([str(f) for f in run_flags + ["--resume", "auto", "--workers", 0]]) == 0
    history = json.loads((work_dir / "metrics.json").read_text())["history"]
    assert [m["step"] for m in history] == [2, 3]


@pytest.mark.slow
def test_sigterm_to_the_group_ends_torchrun_and_every_worker(synthetic, tmp_path):
    work_dir = tmp_path / "wd"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "train.py", *flags(synthetic, work_dir, "--data", "synthetic", "--iters", 200,
                                       "--eval-every", 1000, "--batch-size", 4)]
    program = Program(command, tmp_path, env={"OMP_NUM_THREADS": "1"})
    deadline = time.time() + HUNG
    while not ((work_dir / "log.jsonl").exists() and (work_dir / "log.jsonl").read_text()):
        assert program.process.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.1)
    os.killpg(program.process.pid, signal.SIGTERM)
    code, out, err = program.end()
    assert "interrupted after iteration" in out, err[-3000:]
    assert [n for n in os.listdir(work_dir / "checkpoints") if n.startswith("interrupted_iter_")]

"""Under torchrun (2 CPU processes, gloo) every stop ends every process within seconds, with a
checkpoint of the last completed step: a failed read on one process, a stop signal during
validation; and a run resumed from such a checkpoint continues each process's own numbers."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from processes import PROJECT, TORCHRUN_ENV, torchrun_command
from synthetic import make_synthetic

pytestmark = pytest.mark.slow
ENV = TORCHRUN_ENV
FAIL_AT = 3  # the step whose read fails on process 1

# train.py behind a patch: each process logs its own losses (losses_rank<r>.jsonl); with
# AFA_STEP_BUG set, process 1's step 2 raises; with AFA_FAIL_READ set, process 1's read for step FAIL_AT fails as a broken file would; with
# AFA_SLOW_VALIDATION, validation takes its time and says when it starts.
SCRIPT = f"""
import json, os, sys, time
import data, metrics, runner, train
rank, real_losses = int(os.environ["RANK"]), train.compute_losses
work_dir = sys.argv[sys.argv.index("--work-dir") + 1]
def compute_losses(net, model, par, batch, step, *args):
    if os.environ.get("AFA_STEP_BUG") and rank == 1 and step == 2:
        raise RuntimeError("a bug in the step")
    out = real_losses(net, model, par, batch, step, *args)
    with open(os.path.join(work_dir, f"losses_rank{{rank}}.jsonl"), "a") as f:
        f.write(json.dumps({{"step": step, **{{k: float(v) for k, v in out.terms.items()}}}}) + "\\n")
    return out
train.compute_losses = compute_losses
real_item = runner.TrainStream.__getitem__
def item(self, k):
    if os.environ.get("AFA_FAIL_READ") and rank == 1 and k >= {FAIL_AT} * 4:
        raise data.DatasetError("image broken.jpg cannot be read: it is truncated")
    return real_item(self, k)
runner.TrainStream.__getitem__ = item
real_labels = metrics.validation_labels
def slow_labels(*args):
    if os.environ.get("AFA_SLOW_VALIDATION"):
        open(os.path.join(work_dir, f"validating{{rank}}"), "w").close()
        time.sleep(2)
    return real_labels(*args)
metrics.validation_labels = slow_labels
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_train=16, num_val=8,
                          size=64)


def flags(root, work_dir, *extra):
    return [str(f) for f in ["--data-root", root, "--work-dir", work_dir, "--backbone", "mit_b0",
                             "--crop", 64, "--batch-size", 4, "--iters", 6, "--cam-iters", 1,
                             "--switch-iters", 3, "--eval-every", 6, "--warmup-iters", 100,
                             "--workers", 0, "--val-batch-size", 1, "--num-figures", 0,
                             "--log-every", 1, *extra]]


def torchrun(script, argv, env):
    return subprocess.Popen(torchrun_command(script, *argv), cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def losses(work_dir, rank):
    lines = (Path(work_dir) / f"losses_rank{rank}.jsonl").read_text().splitlines()
    return {line["step"]: line for line in map(json.loads, lines)}  # a resumed step: its last


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train_patched.py"
    path.write_text(SCRIPT)
    return path


def test_a_failed_read_on_one_process_stops_all_saves_and_resumes_exactly(synthetic, script,
                                                                          tmp_path):
    straight = tmp_path / "straight"
    done = torchrun(script, flags(synthetic, straight), env=ENV)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]

    work_dir = tmp_path / "wd"
    started = time.time()
    failing = torchrun(script, flags(synthetic, work_dir), env={**ENV, "AFA_FAIL_READ": "1"})
    assert failing.wait(timeout=600) != 0
    err = failing.stderr.read()
    saved = work_dir / "checkpoints" / f"interrupted_iter_{FAIL_AT}.pth"
    assert saved.is_file(), err[-3000:]
    assert (f"error: image broken.jpg cannot be read: it is truncated; the state after iteration "
            f"{FAIL_AT} is saved in {saved}") in err
    assert "error: process 1 of 2 stopped the run with an error" in err
    assert time.time() - started < 120  # nobody waited for a collective's timeout

    resumed = torchrun(script, ["--work-dir", str(work_dir), "--resume", "auto"], env=ENV)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    for rank in (0, 1):                  # steps FAIL_AT … 5 of each process, as never stopped
        assert losses(work_dir, rank) == losses(straight, rank), rank
    assert losses(straight, 0) != losses(straight, 1)  # each process has its own batches


def test_a_stop_signal_during_validation_under_torchrun_saves_within_seconds(synthetic, script,
                                                                             tmp_path):
    work_dir = tmp_path / "wd"
    process = torchrun(script, flags(synthetic, work_dir, "--eval-every", 2),
                       env={**ENV, "AFA_SLOW_VALIDATION": "1"})
    marker = work_dir / "validating1"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.05)
    signalled = time.time()
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM and `timeout` do: every process at once
    process.wait(timeout=120)
    assert time.time() - signalled < 20    # 4 validation images of 2 s each per process: cut short
    out = process.stdout.read()
    assert "interrupted after iteration 2 (SIGTERM)" in out and "validation was cut short" in out
    assert (work_dir / "checkpoints" / "interrupted_iter_2.pth").is_file()


def test_an_error_in_one_processs_step_ends_all_with_one_line_naming_it(synthetic, script, tmp_path):
    """A bug (or an out-of-memory error) inside one process's step: that process shows its
    traceback; the other, whose collective broke, ends with one line naming the failed process,
    its error and the newest checkpoint, within seconds."""
    work_dir = tmp_path / "wd"
    started = time.time()
    process = torchrun(script, flags(synthetic, work_dir, "--eval-every", 1),
                       env={**ENV, "AFA_STEP_BUG": "1"})
    assert process.wait(timeout=600) != 0
    assert time.time() - started < 120
    err = process.stderr.read()
    assert "[rank1]: RuntimeError: a bug in the step" in err
    assert "[rank0]: Traceback" not in err, err[-3000:]
    newest = work_dir / "checkpoints" / "iter_2.pth"
    assert (f"error: process 1 of 2 failed (RuntimeError: a bug in the step), so this one "
            f"stopped; the newest checkpoint is {newest}") in err

"""A resumed run continues the run it resumes: its saved settings, its own RNG streams on every
process, one line per setting a typed flag changes; a preset's schedule follows a typed --iters.

The programs run through `train.main(argv)` (the same code as `python train.py`) on a tiny
synthetic set; a stop is a real Ctrl-C to a real process, as a user makes it.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import runner
import train
from processes import every_process_ok, run_script
from synthetic import make_synthetic

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_train=16, num_val=2, size=64)


def tiny(root, work_dir, *extra):
    """A run of 12 steps: classification only up to 3, the PAR label up to 7, then the AFA label."""
    return [str(a) for a in ["--data-root", root, "--work-dir", work_dir, "--backbone", "mit_b0",
                             "--crop", 64, "--batch-size", 2, "--iters", 12, "--cam-iters", 3,
                             "--switch-iters", 7, "--eval-every", 6, "--warmup-iters", 100,
                             "--workers", 0, "--val-batch-size", 2, "--num-figures", 0,
                             "--log-every", 1, *extra]]


def log_lines(work_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (Path(work_dir) / "log.jsonl").read_text().splitlines()]


def settings(work_dir):
    return json.loads((Path(work_dir) / "config.json").read_text())


ALONE = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run of a comparison with the same threads


def run_alone(argv) -> subprocess.CompletedProcess:
    """`python train.py argv`, one thread, as the interrupted run ran."""
    return subprocess.run([sys.executable, "train.py", *argv], cwd=PROJECT, capture_output=True,
                          text=True, timeout=600, env=ALONE)


def interrupt(argv, tmp_path):
    """`python train.py argv` stopped by a Ctrl-C once it has logged a step: (iteration saved,
    what it printed)."""
    out = tmp_path / "out.txt"
    with open(out, "w") as stdout:
        process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=PROJECT, stdout=stdout,
                                   stderr=subprocess.DEVNULL, start_new_session=True, env=ALONE)
        log = Path(argv[argv.index("--work-dir") + 1]) / "log.jsonl"
        while not (log.exists() and log.read_text().strip()):
            assert process.poll() is None, "ended before its first log line"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=240) == 130
    done = max(json.loads(line)["step"] for line in log.read_text().splitlines())
    return done, out.read_text()


def test_resume_auto_with_the_printed_command_continues_the_same_run(synthetic, tmp_path):
    """The user's case: a run stopped by Ctrl-C, then the command it printed, which names no
    setting of the run: it continues that run to its own end, number for number as the run that
    was never stopped, and config.json keeps its settings."""
    work_dir = tmp_path / "wd"
    argv = tiny(synthetic, work_dir)
    done, out = interrupt(argv, tmp_path)
    assert done < 12
    command = f"python train.py --work-dir {work_dir} --resume auto"
    assert f"continue with: {command}" in out
    resumed = run_alone(command.split()[2:])
    assert resumed.returncode == 0 and "override" not in resumed.stdout + resumed.stderr
    assert settings(work_dir)["iters"] == 12 and settings(work_dir)["overrides"] == []
    assert settings(work_dir)["data_root"] == str(synthetic)
    straight = tmp_path / "straight"
    assert run_alone(tiny(synthetic, straight)).returncode == 0
    assert log_lines(work_dir) == log_lines(straight)


def test_a_flag_typed_on_resume_overrides_that_setting_alone_and_is_recorded(synthetic, tmp_path,
                                                                             capsys):
    work_dir = tmp_path / "wd"
    assert train.main(tiny(synthetic, work_dir, "--iters", 6)) == 0
    assert train.main(["--work-dir", str(work_dir), "--resume", "auto", "--iters", "8"]) == 0
    out = capsys.readouterr().out
    assert "override: --iters 8 (the run had 6) from iteration 6 on" in out
    saved = settings(work_dir)
    assert saved["iters"] == 8 and saved["cam_iters"] == 3 and saved["backbone"] == "mit_b0"
    assert saved["overrides"] == [{"iteration": 6, "setting": "iters", "was": 6, "now": 8}]
    assert [line["step"] for line in log_lines(work_dir)] == list(range(1, 9))
    # the record is kept in the checkpoints, so a later resume adds to it
    assert train.main(["--work-dir", str(work_dir), "--resume", "auto", "--iters", "9"]) == 0
    assert [o["now"] for o in settings(work_dir)["overrides"]] == [8, 9]


def test_resume_path_of_another_work_dir_continues_that_run_in_the_given_one(synthetic, tmp_path,
                                                                             capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(tiny(synthetic, first, "--iters", 6)) == 0
    checkpoint = first / "checkpoints" / "iter_6.pth"
    assert train.main(["--resume", str(checkpoint), "--work-dir", str(second), "--iters", "7"]) == 0
    out = capsys.readouterr().out
    assert f"override: --work-dir {second} (the run had {first})" in out
    assert settings(second)["cam_iters"] == 3 and settings(second)["crop"] == 64
    assert [line["step"] for line in log_lines(second)] == [7]
    assert sorted(os.listdir(first / "checkpoints")) == ["iter_6.pth"]  # the other run untouched


def test_a_presets_default_never_replaces_a_saved_setting():
    saved = config.Config(data="synthetic", iters=300, cam_iters=100, switch_iters=200,
                          eval_every=100, crop=64).__dict__
    cfg, overrides = config.resumed_config(saved, {"resume": "auto", "work_dir": "x"})
    assert (cfg.iters, cfg.cam_iters, cfg.switch_iters, cfg.crop) == (300, 100, 200, 64)
    assert overrides == {"work_dir": (config.Config.work_dir, "x")}


# --- a typed --iters scales the preset's schedule --------------------------------------------------
def test_iters_alone_scales_the_presets_phases_with_one_line(capsys):
    cfg = config.parse_config(["--iters", "60"])           # the synthetic preset: 600 iterations
    assert (cfg.cam_iters, cfg.switch_iters, cfg.warmup_iters, cfg.eval_every) == (20, 40, 5, 20)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--iters 60 scales the preset's schedule" in err
    voc = config.parse_config(["--data", "VOC2012", "--iters", "2000"])
    assert (voc.cam_iters, voc.switch_iters, voc.warmup_iters, voc.eval_every) == (200, 600, 150, 200)


def test_phase_flags_typed_beside_iters_are_kept():
    cfg = config.parse_config(["--iters", "50", "--cam-iters", "20", "--switch-iters", "35"])
    assert (cfg.cam_iters, cfg.switch_iters) == (20, 35)
    assert config.parse_config(["--iters", "600"]).cam_iters == 200   # the preset's own length


def test_a_run_that_never_leaves_the_classification_phase_says_so(capsys):
    train.warn_if_classification_only(config.Config(iters=50, cam_iters=200))
    assert "trains the classifier alone" in capsys.readouterr().err
    train.warn_if_classification_only(config.Config(iters=300, cam_iters=200))
    assert capsys.readouterr().err == ""


# --- each process's own RNG streams ----------------------------------------------------------------
class FakeCuda:
    """torch.cuda's RNG calls, recorded: `count` GPUs, each with its own state."""

    def __init__(self, monkeypatch, count):
        self.count, self.set = count, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": torch.tensor([torch.device(device).index or 0]))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: [torch.tensor([i]) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_state(self, state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= self.count:
            raise IndexError(f"no GPU {index}")
        self.set.append((index, int(state[0])))

    def set_all(self, states):
        for i, state in enumerate(states):
            self.set_state(state, f"cuda:{i}")


def test_a_checkpoint_holds_this_gpus_stream_only(monkeypatch):
    FakeCuda(monkeypatch, count=4)
    state = runner.rng_state(torch.device("cuda:2"))
    assert int(state["cuda"][0]) == 2
    assert "cuda" not in runner.rng_state(torch.device("cpu"))


@pytest.mark.parametrize("saved_on, resumed_on", [(4, 1), (1, 4), (4, 2)])
def test_resuming_on_another_gpu_count_works_and_says_exactness_needs_the_same(saved_on, resumed_on,
                                                                               monkeypatch):
    """A run saved by `saved_on` processes (one GPU each) resumed by `resumed_on` processes on a
    node with `resumed_on` visible GPUs: no error; each process restores one stream onto its own
    GPU; one line names what exactness needs."""
    states = [runner.rng_state() | {"cuda": torch.tensor([10 + r])} for r in range(saved_on)]
    for rank in range(resumed_on):
        fake, lines = FakeCuda(monkeypatch, count=resumed_on), []
        runner.restore_rng_states(states, rank, resumed_on, torch.device(f"cuda:{rank}"),
                                  lines.append)
        assert fake.set == [(rank, 10 + rank % saved_on)]
        assert len(lines) == 1 and f"needs {saved_on} process(es)" in lines[0]


def test_a_checkpoint_of_every_visible_gpus_streams_resumes_on_fewer_gpus(monkeypatch):
    """The layout an earlier version wrote (one process, every visible GPU's stream)."""
    fake = FakeCuda(monkeypatch, count=1)
    old = runner.rng_state() | {"cuda": [torch.tensor([10 + i]) for i in range(4)]}
    runner.restore_rng_states(old, 0, 1, torch.device("cuda:0"), print)
    assert fake.set == [(0, 10)]


def test_each_process_saves_and_restores_its_own_streams(tmp_path):
    """Two gloo processes with different streams save one checkpoint; each restores its own."""
    script = f"""
import os, random, torch, torch.distributed as dist
import numpy as np, runner, config
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank); random.seed(rank); np.random.seed(rank)
model = torch.nn.Linear(2, 2)
cfg = config.Config(work_dir={str(tmp_path)!r}, keep_ckpts=1)
os.makedirs(os.path.join(cfg.work_dir, "checkpoints"), exist_ok=True)
run = runner.Run(cfg, rank, 2, torch.device("cpu"), model, model, None,
                 torch.optim.SGD(model.parameters(), lr=0.1), None, None, [])
path = runner.save(run, 1)
dist.barrier()
expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
torch.manual_seed(0); random.seed(0); np.random.seed(0)
runner.restore_rng_states(runner.load_checkpoint(path)["rng"], rank, 2, torch.device("cpu"), print)
assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected, rank
print(f"ok {{rank}}\\n", end="", flush=True)
dist.destroy_process_group()
"""
    done = run_script(tmp_path, script)
    assert every_process_ok(done), done.stderr[-3000:]

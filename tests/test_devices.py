"""What the scripts set up on the device they run on: the precision of --amp, TF32 and cuDNN's
autotuner on a GPU, the line that names the device. No GPU is needed: the CUDA queries are
replaced, and what is checked is the choice made from their answers."""
import pytest
import torch

import evaluate
import runner
import train
import train_step
from config import Config, ConfigError, parse_config


def fake_gpu(monkeypatch, capability: tuple) -> None:
    """A CUDA GPU of this compute capability, as torch's queries would describe it; bf16 counts
    as supported on every one of them, emulated below 8.0, as torch.cuda.is_bf16_supported()
    answers by default."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
@pytest.mark.parametrize("capability, dtype, scaled", [((7, 0), torch.float16, True),    # V100
                                                       ((7, 5), torch.float16, True),    # T4
                                                       ((8, 0), torch.bfloat16, False),  # A100
                                                       ((9, 0), torch.bfloat16, False)])  # H100
def test_amp_runs_bf16_only_where_the_gpu_has_it_else_fp16_with_loss_scaling(
        monkeypatch, capability, dtype, scaled):
    fake_gpu(monkeypatch, capability)
    autocast, scaler = train_step.make_autocast(Config(amp=True), torch.device("cuda:0"))
    assert autocast().fast_dtype == dtype
    assert isinstance(scaler, torch.amp.GradScaler) if scaled else scaler is None


def test_amp_on_a_cpu_is_bf16_without_a_scaler_and_off_without_amp():
    autocast, scaler = train_step.make_autocast(Config(amp=True), torch.device("cpu"))
    assert autocast().fast_dtype == torch.bfloat16 and scaler is None
    autocast, scaler = train_step.make_autocast(Config(amp=False), torch.device("cpu"))
    assert not isinstance(autocast(), torch.autocast) and scaler is None


# --- TF32 and cuDNN's autotuner on a GPU; nothing on a CPU ------------------------------------
@pytest.fixture
def backend_flags():
    """The three process-wide flags set_cuda_math sets, put back after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                   torch.backends.cudnn.benchmark)
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = saved


def test_on_a_gpu_matmuls_and_convolutions_run_in_tf32_unless_no_tf32(backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = False          # torch's default since 1.12
    runner.set_cuda_math(torch.device("cuda:0"), tf32=True, benchmark=True)
    assert backend_flags() == (True, True, True)
    runner.set_cuda_math(torch.device("cuda:0"), tf32=False, benchmark=False)
    assert backend_flags() == (False, False, False)


def test_on_a_cpu_set_cuda_math_changes_nothing(backend_flags):
    before = backend_flags()
    runner.set_cuda_math(torch.device("cpu"), tf32=not before[0], benchmark=not before[2])
    assert backend_flags() == before


def test_tf32_is_on_by_default_and_no_tf32_turns_it_off():
    assert parse_config([]).tf32 and not parse_config(["--no-tf32"]).tf32


class Stop(Exception):
    pass


def test_train_sets_the_gpu_math_before_anything_runs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train, "setup_distributed", lambda cfg: (0, 1, torch.device("cuda:0")))
    monkeypatch.setattr(train, "set_cuda_math", lambda *args, **kwargs: calls.append((args, kwargs)))

    def check_new_run(cfg):
        raise Stop
    monkeypatch.setattr(train, "check_new_run", check_new_run)
    with pytest.raises(Stop):
        train.train(Config(tf32=False, work_dir=str(tmp_path)))
    assert calls == [((torch.device("cuda:0"), False), {"benchmark": True})]


def test_evaluate_sets_the_gpu_math_without_the_autotuner(monkeypatch):
    """Evaluation images have sizes of their own: the autotuner would search at each new size."""
    calls = []
    monkeypatch.setattr(evaluate, "pick_device", lambda name: torch.device("cuda:0"))
    monkeypatch.setattr(evaluate, "device_line", lambda device, processes: "device: cuda:0")
    monkeypatch.setattr(evaluate, "load_model",
                        lambda path, args, device: (None, Config(tf32=True), None))

    def set_cuda_math(*args, **kwargs):
        calls.append((args, kwargs))
        raise Stop
    monkeypatch.setattr(evaluate, "set_cuda_math", set_cuda_math)
    with pytest.raises(Stop):
        evaluate.run(evaluate.parse_args(["--checkpoint", "x.pth", "--device", "cuda"]))
    assert calls == [((torch.device("cuda:0"), True), {"benchmark": False})]


# --- which device runs, said first; a CPU fallback explained -----------------------------------
def test_the_device_line_names_the_device_the_gpu_and_the_processes(monkeypatch):
    assert runner.device_line(torch.device("cpu"), 1) == "device: cpu, 1 process"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert (runner.device_line(torch.device("cuda:0"), 4)
            == "device: cuda:0 (NVIDIA A100-SXM4-40GB), 4 processes")


def no_gpu(monkeypatch, cuda_version):
    """torch finds no GPU: a CPU-only build (`cuda_version` None) or a CUDA build without one."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("cuda_version, why", [(None, "CPU-only build"),
                                               ("12.6", "nvidia-smi and CUDA_VISIBLE_DEVICES")])
def test_train_on_voc_without_a_gpu_says_so_first_and_why(monkeypatch, capsys, tmp_path,
                                                          cuda_version, why):
    no_gpu(monkeypatch, cuda_version)

    def check_new_run(cfg):
        raise Stop
    monkeypatch.setattr(train, "check_new_run", check_new_run)
    with pytest.raises(Stop):
        train.train(parse_config(["--data", "VOC2012", "--work-dir", str(tmp_path)]))
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "device: cpu, 1 process"
    assert err.count("\n") == 1 and err.startswith("warning: no GPU was found") and why in err
    assert ("https://pytorch.org" in err) == (cuda_version is None)


@pytest.mark.parametrize("argv", [[], ["--data", "COCO", "--device", "cpu"]])
def test_no_warning_for_the_synthetic_preset_or_a_cpu_asked_for(monkeypatch, capsys, argv):
    no_gpu(monkeypatch, None)
    rank, world, device = runner.setup_distributed(parse_config(argv))
    out, err = capsys.readouterr()
    assert (device, out, err) == (torch.device("cpu"), "device: cpu, 1 process\n", "")


def test_evaluate_names_the_device_first(monkeypatch, capsys):
    no_gpu(monkeypatch, None)

    def load_model(path, args, device):
        raise Stop
    monkeypatch.setattr(evaluate, "load_model", load_model)
    with pytest.raises(Stop):
        evaluate.run(evaluate.parse_args(["--checkpoint", "x.pth"]))
    assert capsys.readouterr().out == "device: cpu, 1 process\n"


def test_evaluate_of_a_voc_checkpoint_without_a_gpu_warns(monkeypatch, capsys):
    no_gpu(monkeypatch, "12.6")
    monkeypatch.setattr(evaluate, "load_model",
                        lambda path, args, device: (None, Config(data="VOC2012"), None))

    def set_cuda_math(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(evaluate, "set_cuda_math", set_cuda_math)
    with pytest.raises(Stop):
        evaluate.run(evaluate.parse_args(["--checkpoint", "x.pth"]))
    err = capsys.readouterr().err
    assert err.startswith("warning: no GPU was found, so this VOC2012 run is on the CPU")


# --- data loading sized for the machine; page-locked batches for a GPU -------------------------
@pytest.mark.parametrize("device, pinned", [("cuda:0", True), ("cpu", False)])
def test_training_batches_are_page_locked_for_a_gpu(device, pinned):
    """Without page-locked memory, to_device's non_blocking copy is a synchronous one."""
    cfg = Config(workers=0, batch_size=2)
    loader, val_loader = train.make_loaders(cfg, [0, 1], [0, 1, 2], 0, 0, 1, torch.device(device))
    assert loader.pin_memory == val_loader.pin_memory == pinned


@pytest.mark.parametrize("cores, processes, workers", [(2, 1, 2), (16, 4, 4), (64, 1, 8),
                                                       (2, 4, 1), (96, 8, 8)])
def test_data_workers_default_to_the_cores_per_training_process(monkeypatch, cores, processes,
                                                                 workers):
    monkeypatch.setattr(runner, "usable_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert runner.data_workers(-1) == workers
    assert runner.data_workers(3) == 3 and runner.data_workers(0) == 0  # as given


def test_workers_flag_defaults_per_preset_and_refuses_nonsense():
    assert parse_config(["--data", "VOC2012"]).workers == parse_config(["--data", "COCO"]).workers == -1
    assert parse_config([]).workers == 0                     # synthetic: in the training process
    with pytest.raises(ConfigError, match="--workers -2"):
        parse_config(["--workers", "-2"])


@pytest.mark.parametrize("cores, pool", [(1, 1), (2, 1), (10, 8), (64, 51)])
def test_the_crf_pool_is_80_percent_of_the_cores_apart_from_the_data_workers(monkeypatch, cores,
                                                                             pool):
    monkeypatch.setattr(runner, "usable_cores", lambda: cores)
    monkeypatch.setattr(evaluate, "usable_cores", lambda: cores)
    assert evaluate.crf_workers() == pool
    args = evaluate.parse_args(["--checkpoint", "x.pth"])
    assert (args.crf_workers, args.workers) == (pool, -1)


@pytest.mark.parametrize("device, pinned", [("cuda:0", True), ("cpu", False)])
def test_evaluate_pins_batches_for_a_gpu_and_gives_the_crf_its_own_pool(monkeypatch, tmp_path,
                                                                       device, pinned):
    seen = {}
    monkeypatch.setattr(evaluate, "pick_device", lambda name: torch.device(device))
    monkeypatch.setattr(evaluate, "device_line", lambda device, processes: "device: ...")
    monkeypatch.setattr(evaluate, "load_model",
                        lambda path, args, device: (None, Config(data="VOC2012"), None))
    monkeypatch.setattr(evaluate, "set_cuda_math", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate, "load_split", lambda cfg, split, cache_dir: [0, 1])

    def segmentation_report(model, cfg, loader, device, names, scales, long_side, crf, workers,
                            save_dir):
        seen.update(pinned=loader.pin_memory, data_workers=loader.num_workers, crf_workers=workers)
        return {}
    monkeypatch.setattr(evaluate, "segmentation_report", segmentation_report)
    evaluate.run(evaluate.parse_args(["--checkpoint", "x.pth", "--out", str(tmp_path),
                                      "--workers", "0", "--crf-workers", "3", "--crf"]))
    assert seen == {"pinned": pinned, "data_workers": 0, "crf_workers": 3}

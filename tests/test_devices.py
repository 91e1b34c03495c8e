"""What the scripts set up on the device they run on: the precision of --amp, TF32 and cuDNN's
autotuner on a GPU, the line that names the device. No GPU is needed: the CUDA queries are
replaced, and what is checked is the choice made from their answers."""
import pytest
import torch

import train_step
from config import Config


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

"""Tests marked `cuda` run on a GPU only: without one (torch.cuda.is_available() False) those
whose `device` parameter is a CUDA device, or that have none, are skipped, so that
`python -m pytest -q -m cuda` collects them everywhere and runs them where they can run."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is None:
            continue
        params = getattr(item, "callspec", None)
        device = str(params.params.get("device", "cuda")) if params else "cuda"
        if device.startswith("cuda"):
            item.add_marker(skip)

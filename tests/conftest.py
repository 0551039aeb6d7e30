"""Shared test helpers. Everything runs offline on CPU; fixtures come from the official code (tests/fixtures/README.md)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name):
    return load_file(FIXTURES / name)


def assert_close_to_ref(actual, ref, rel, what=""):
    """The fixtures README bar: max |actual - ref| <= rel * max(1, max |ref|)."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(ref.shape)}"
    err = (actual.float() - ref.float()).abs().max().item()
    bound = rel * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


def make_stats(H, keys, seed=0):
    """Statistics in the released JSON layout (per chunk step: (H, d); percentiles (1001, H, d))."""
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for key, d in zip(keys, (3, 6, 1)):
        data = torch.randn(500, H, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, H)[None, :, None] + 0.3
        if "gripper" in key:
            data[:, 0] = 1.0  # a constant column: std 0 -> scale 1
        pct = torch.quantile(data, torch.linspace(0, 1, 1001, dtype=torch.float64), dim=0)
        mean = data.mean(0)
        lo, hi = mean + 1.5 * (pct[20] - mean), mean + 1.5 * (pct[980] - mean)
        clamped = torch.maximum(torch.minimum(data, hi), lo)
        stats[key] = {"min": data.min(0).values.tolist(), "max": data.max(0).values.tolist(), "mean": mean.tolist(),
                      "std": data.std(0).tolist(), "percentiles": pct.tolist(), "clamp_min": lo.tolist(),
                      "clamp_max": hi.tolist(), "mean_clamped": clamped.mean(0).tolist(), "std_clamped": clamped.std(0).tolist()}
    return stats


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

"""Shared test helpers. Everything runs offline on CPU; fixtures come from the official code
(tests/fixtures/README.md)."""

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
        data = torch.randn(500, H, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, H)[None, :,
                                                                                                      None] + 0.3
        if "gripper" in key:
            data[:, 0] = 1.0  # a constant column: std 0 -> scale 1
        pct = torch.quantile(data, torch.linspace(0, 1, 1001, dtype=torch.float64), dim=0)
        mean = data.mean(0)
        lo, hi = mean + 1.5 * (pct[20] - mean), mean + 1.5 * (pct[980] - mean)
        clamped = torch.maximum(torch.minimum(data, hi), lo)
        stats[key] = {"min": data.min(0).values.tolist(), "max": data.max(0).values.tolist(), "mean": mean.tolist(),
                      "std": data.std(0).tolist(), "percentiles": pct.tolist(), "clamp_min": lo.tolist(),
                      "clamp_max": hi.tolist(), "mean_clamped": clamped.mean(0).tolist(),
                      "std_clamped": clamped.std(0).tolist()}
    return stats


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the checks that take minutes (marked slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a check that takes minutes; runs with --slow")


def pytest_collection_modifyitems(config, items):
    """The suite stays within 10 minutes on 2 cores: the minutes-long checks run only when asked for (--slow)."""
    if not config.getoption("--slow"):
        skip = pytest.mark.skip(reason="takes minutes: run with --slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# ------------------------------ tiny stand-ins for the real encoders (optional packages) ------------------------------

def tiny_wan_vae(seed=0):
    """A randomly initialised small diffusers `AutoencoderKLWan` (the Wan2.1 architecture, fewer channels)."""
    diffusers = pytest.importorskip("diffusers", reason="optional: pip install diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]).eval()


TINY_T5_WORDS = "go to the red one blue green square pick up bowl and place it on plate".split()


def tiny_t5(d_model=24, seed=0):
    """A tiny random `T5EncoderModel` and a word-level tokenizer built in memory (T5's sentencepiece model cannot be
    downloaded here): "</s>" ends every instruction, "<pad>" pads, as T5's own tokenizer does."""
    transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=3)
    return transformers.T5EncoderModel(cfg).eval(), tokenizer

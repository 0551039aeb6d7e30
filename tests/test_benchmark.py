"""sample.py --benchmark at tiny shapes: every part of the latency benchmark runs end to end on the code path the
GPU run takes (the same functions; only the shapes and the dtype differ)."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402


def test_the_benchmark_runs_every_phase_at_tiny_shapes(capsys):
    rows = sample.main(["--benchmark=true", "--bench_shapes=tiny", "--bench_runs=1", "--device=cpu"])
    out = capsys.readouterr().out
    assert [r["k"] for r in rows] == [0, 1, 5, 35]
    for r in rows:
        assert r["ms"] > 0 and r["floor ms"] > 0 and r["TFLOP"] > 0
    assert rows[3]["TFLOP"] > rows[0]["TFLOP"]  # 35 more video forwards
    assert "TINY shapes" in out
    for stage in ("activation checkpointing off", "activation checkpointing on", "stage 2 (decoder, frozen video)"):
        assert f"training step, batch 1, stage {'2' if 'decoder' in stage else '1'}" in out and stage in out
    assert "decoder, 10 steps: context keys/values once" in out
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert "diffusers not installed" in out
        return
    # the side by side with diffusers' CosmosTransformer3DModel runs the same network: outputs agree
    agree = float(re.search(r"outputs agree to ([0-9.e+-]+)", out).group(1))
    assert agree < 1e-3
    assert re.search(r"context encode: reduced Wan2.1 VAE, 5 frames at 16 x 16: \d+ ms", out)


def test_benchmark_shapes_are_validated():
    with pytest.raises(SystemExit, match="--bench_shapes must be"):
        sample.main(["--benchmark=true", "--bench_shapes=huge"])

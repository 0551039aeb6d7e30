"""sample.py --benchmark at tiny shapes: every part of the latency benchmark runs end to end on the code path the
GPU run takes (the same functions; only the shapes and the dtype differ). And the README's stage-1 memory table,
worked out from what autograd saves on real-width blocks: `python -m pytest tests/test_benchmark.py -k memory -s`
prints it."""

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mimic_video as mv  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def test_the_benchmark_runs_every_query_at_tiny_shapes(capsys):
    rows = sample.main(["--benchmark=true", "--bench_shapes=tiny", "--bench_runs=1", "--device=cpu"])
    out = capsys.readouterr().out
    assert [r["k"] for r in rows] == [0, 1, 5, 35]
    for r in rows:
        assert r["ms"] > 0 and r["floor ms"] > 0 and r["TFLOP"] > 0
    assert rows[3]["TFLOP"] > rows[0]["TFLOP"]  # 35 more video forwards
    assert "TINY shapes" in out and "per extra video step" in out
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert "diffusers not installed" in out
        return
    # the side by side with diffusers' CosmosTransformer3DModel runs the same network: outputs agree
    agree = float(re.search(r"outputs agree to ([0-9.e+-]+)", out).group(1))
    assert agree < 1e-3


def test_benchmark_shapes_are_validated():
    with pytest.raises(SystemExit, match="--bench_shapes must be"):
        sample.main(["--benchmark=true", "--bench_shapes=huge"])


def test_a_failing_phase_is_reported_on_its_row_and_the_rest_run(capsys, monkeypatch):
    """An out-of-memory error (raised here in the k = 5 query and in the comparison with diffusers, as on a GPU that
    is too small) is printed on its row; every other phase still runs."""
    sample_actions = mv.VideoActionModel.sample_actions

    def oom_query(self, *a, stop_after_step=None, **k):
        if stop_after_step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sample_actions(self, *a, stop_after_step=stop_after_step, **k)

    def oom_diffusers(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(mv.VideoActionModel, "sample_actions", oom_query)
    monkeypatch.setattr(sample, "bench_against_diffusers", oom_diffusers)
    rows = sample.main(["--benchmark=true", "--bench_shapes=tiny", "--bench_runs=1", "--device=cpu"])
    out = capsys.readouterr().out
    assert [r["k"] for r in rows] == [0, 1, 5, 35] and rows[2].get("failed") and not rows[3].get("failed")
    assert "query k = 5: FAILED (OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)" in out
    assert re.search(r"^  5 FAILED \(above\)$", out, re.M) and re.search(r"^ 35 +\d", out, re.M)
    assert "our DiT vs diffusers: FAILED (OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB)" in out


def test_compile_runs_the_compiled_sampling_path():
    """sample.compile_model compiles in place: the decoder's own sample() (and the video sampler) run compiled
    graphs. A counting backend counts the calls of compiled code."""
    model, x, latent, text = sample.bench_setup(torch.device("cpu"), "tiny")
    calls = []

    def counting(gm, example_inputs):
        return lambda *args: calls.append(1) or gm.forward(*args)

    sample.compile_model(model, backend=counting)
    ctx = torch.randn(1, 16, model.video.cfg.model_channels)
    model.decoder.sample(x["proprio"], ctx, torch.full((1,), 80.0), torch.randn(1, model.decoder.cfg.num_actions,
                                                                                model.decoder.cfg.out_channels))
    assert len(calls) >= 10, len(calls)  # at least one compiled call per Euler step
    calls.clear()
    model.sample_actions(x["context"], x["text"], x["proprio"], stop_after_step=1)
    assert len(calls) >= 12, len(calls)  # and the video forwards
    torch._dynamo.reset()


def stage1_memory(device=torch.device("cpu")):
    """Memory of one stage-1 step at the real LIBERO shapes (2B DiT, 16 latent frames of 60 x 80 = 19,200 tokens),
    estimated from measurements on a CPU: the bytes autograd saves for the backward pass, counted on 1- and 2-block
    models of the real width under bf16 autocast at two token counts (so one block's share per token is exact),
    plus the weights (frozen bf16: 2 B/param) and what trains (fp32 weight, gradient, AdamW m and v: 16 B/param)."""
    cfg, lora = mv.VIDEO_DIT_PRESETS["cosmos-predict2-2b"], mv.LORA_PRESETS["mimic-video-stage1"]
    with torch.device("meta"):
        full = mv.inject_lora(mv.VideoDiT(cfg), lora)
    n_train = sum(p.numel() for p in full.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in full.parameters() if not p.requires_grad)
    fixed_gb = (2 * n_frozen + 16 * n_train) / 2**30

    def build(blocks):  # what autograd saves does not depend on the values: fill, do not initialise (15 s saved)
        with torch.device("meta"):
            video = train.fp32_trainable(mv.inject_lora(mv.VideoDiT(mv.replace(cfg, num_blocks=blocks)), lora))
        video = video.to_empty(device=device)
        for p in video.parameters():
            p.data.normal_(0, 0.02, generator=g)
        return video

    g = torch.Generator(device).manual_seed(0)
    models = {n: build(n) for n in (1, 2)}

    def saved_bytes(blocks, tokens_hw, checkpointing):
        video = models[blocks]
        video.activation_checkpointing = checkpointing
        H, W = tokens_hw
        x = torch.randn(1, cfg.in_channels, 1, 2 * H, 2 * W, device=device)  # 1 latent frame, H x W tokens
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type,
                                                                                         dtype=torch.bfloat16):
            video(x, torch.full((1, 1), 0.5, device=device),
                  torch.randn(1, 512, cfg.crossattn_emb_channels, device=device),
                  torch.zeros(1, 1, 1, 2 * H, 2 * W, device=device))
        return sum(storages.values())

    small, big = (8, 8), (8, 16)  # 64 and 128 tokens
    per_token, per_block = {}, {}
    for ckpt in (False, True):
        (a, b), (c, d) = [[saved_bytes(n, s, ckpt) for s in (small, big)] for n in (1, 2)]
        per_token[ckpt] = ((d - c) - (b - a)) / 64  # one block's bytes per token
        per_block[ckpt] = (c - a) - per_token[ckpt] * 64  # one block's bytes per sample, whatever the tokens (the text)
    tokens, blocks = 16 * 30 * 40, cfg.num_blocks
    print(f"  stage 1 memory at the real shapes (estimate; {n_frozen / 1e9:.2f}B frozen params in bf16, "
          f"{n_train / 1e6:.0f}M trained in fp32 with AdamW: {fixed_gb:.1f} GiB; activations saved per token per "
          f"block: {per_token[False] / 1024:.0f} KiB, with activation checkpointing {per_token[True] / 1024:.1f} KiB)")
    print(f"  {'batch per GPU':>14} {'checkpointing':>14} {'GiB':>6}  fits in")
    for batch in (1, 4):
        for ckpt in (False, True):
            act = batch * blocks * (per_token[ckpt] * tokens + per_block[ckpt])
            if ckpt:  # the backward pass recomputes one block at a time and keeps its activations meanwhile
                act += batch * (per_token[False] * tokens + per_block[False])
            gib = fixed_gb + act / 2**30
            # 10% allocator slack + context
            fits = [f"{g} GB" for g in (24, 40, 80) if gib * 1.1 + 1 <= g * 1e9 / 2**30]
            fits = ", ".join(fits) or "none of 24/40/80 GB"
            print(f"  {batch:>14} {'on' if ckpt else 'off':>14} {gib:>6.1f}  {fits}")


def test_the_stage1_memory_estimate(capsys):
    """The README's memory table: one stage-1 step at the real shapes, from the bytes autograd saves per block and
    token (measured on real-width blocks) and the parameter and optimizer bytes."""
    stage1_memory()
    out = capsys.readouterr().out
    with capsys.disabled():  # the table, shown with -s
        print("\n" + out)
    rows = re.findall(r"^\s+([14])\s+(on|off)\s+([0-9.]+)  (.*)$", out, re.M)
    gib = {(int(b), c): float(g) for b, c, g, _ in rows}
    assert len(gib) == 4 and gib[(1, "on")] < gib[(1, "off")] and gib[(4, "on")] < gib[(4, "off")]
    # at least the bf16 weights; activations scale
    assert 3.9 < gib[(1, "on")] and gib[(4, "off")] > 3 * (gib[(1, "off")] - 4)

"""LoRA: identity at init, the official stage-1 targets, merge/unmerge, fused and PEFT-layout export."""

import json

import pytest
import torch
from conftest import FIXTURES, fixture
from safetensors.torch import load_file

import mimic_video as mv


def tiny_dit():
    return mv.load_video_dit(FIXTURES / "video_dit_weights.safetensors", filename=None, config="tiny").eval()


@pytest.fixture(scope="module")
def io():
    return fixture("video_dit_io.safetensors")


def run(model, io):
    with torch.no_grad():
        return model(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"])


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mv.lora_layers(model):
            layer.lora_B.weight.copy_(0.3 * torch.randn(layer.lora_B.weight.shape, generator=g))


def test_fresh_adapter_is_bit_identical(io):
    ref = run(tiny_dit(), io)
    wrapped = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    assert torch.equal(run(wrapped, io), ref)


def test_official_stage1_targets_and_trainable_set():
    cfg = mv.LORA_PRESETS["mimic-video-stage1"]
    assert (cfg.r, cfg.lora_alpha) == (256, 32.0)
    model = mv.inject_lora(mv.VideoDiT(mv.VIDEO_DIT_PRESETS["tiny"]), mv.replace(cfg, r=4))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, mv.LoRALinear)}
    per_block = {f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")}
    per_block |= {"mlp.layer1", "mlp.layer2"}
    expected = {"x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2"}
    expected |= {f"blocks.{i}.{n}" for i in range(3) for n in per_block}
    assert wrapped == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "adaln_modulation" in n for n in trainable)
    assert "blocks.0.adaln_modulation_self_attn.1.weight" in trainable
    assert "final_layer.adaln_modulation.2.weight" in trainable
    assert "blocks.0.self_attn.q_proj.base_layer.weight" not in trainable
    assert "final_layer.linear.weight" not in trainable and "t_embedding_norm.weight" not in trainable
    # PEFT init: A random (Kaiming), B zero; scaling alpha / r
    layer = model.blocks[0].self_attn.q_proj
    assert layer.lora_A.weight.abs().sum() > 0 and torch.all(layer.lora_B.weight == 0)
    assert layer.scaling == 32.0 / 4


def test_merge_equals_unmerged_and_unmerge_restores(io):
    model = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    randomize_adapters(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    unmerged = run(model, io)
    assert not torch.allclose(unmerged, run(tiny_dit(), io), atol=1e-3)  # the adapters do something
    mv.merge_lora(model)
    torch.testing.assert_close(run(model, io), unmerged, atol=1e-4, rtol=1e-4)
    mv.unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, io), unmerged, atol=1e-5, rtol=1e-5)


def test_fused_export_loads_back_strictly(io, tmp_path):
    model = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    randomize_adapters(model)
    expected = run(model, io)
    for name in ("fused.pt", "fused.safetensors"):
        mv.save_video_dit_checkpoint(model, tmp_path / name)
        sd = torch.load(tmp_path / name, weights_only=True) if name.endswith(".pt") else load_file(tmp_path / name)
        assert all(k.startswith("net.") and "lora" not in k and "base_layer" not in k for k in sd)
        fused = mv.load_video_dit(tmp_path / name, filename=None, config="tiny")
        torch.testing.assert_close(run(fused, io), expected, atol=1e-4, rtol=1e-4)


def test_fused_weight_is_w_plus_scaled_ba():
    model = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    randomize_adapters(model)
    layer = model.blocks[1].mlp.layer1
    W, A, B = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    sd = mv.fused_state_dict(model)
    torch.testing.assert_close(sd["net.blocks.1.mlp.layer1.weight"], W + (4.0 / 8) * B @ A)


def test_peft_adapter_round_trip(io, tmp_path):
    model = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        model.blocks[0].adaln_modulation_mlp[2].weight.add_(0.1)  # fully trained modules travel too
    expected = run(model, io)
    mv.save_lora_adapter(model, tmp_path / "adapter", base_model_name_or_path="nvidia/Cosmos-Predict2-2B-Video2World")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 4.0
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.blocks.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.blocks.0.adaln_modulation_mlp.2.weight" in keys
    assert all(k.startswith("base_model.model.") for k in keys)
    restored = mv.load_lora_adapter(tiny_dit(), tmp_path / "adapter")
    assert torch.equal(run(restored, io), expected)


def test_gradients_reach_only_trainable_parameters(io):
    model = mv.inject_lora(tiny_dit(), mv.LORA_PRESETS["tiny"])
    randomize_adapters(model)
    v = model(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"])
    v.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n

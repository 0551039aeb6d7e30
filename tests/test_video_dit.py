"""The Cosmos-Predict2 video DiT against the official fixtures (A: forward, B: sampler) and the 2B key list."""

import json

import pytest
import torch
from conftest import FIXTURES, assert_close_to_ref, fixture

import mimic_video as mv

TOL = 1e-5  # fixtures README: video velocity, hidden states and sampler tensors


@pytest.fixture(scope="module", params=["video_dit_weights.pt", "video_dit_weights.safetensors"])
def tiny_dit(request):
    """The tiny official model, loaded through the real loader from both file formats."""
    return mv.load_video_dit(FIXTURES / request.param, filename=None, config="tiny").eval()


@pytest.fixture(scope="module")
def io():
    return fixture("video_dit_io.safetensors")


def test_fixture_a_velocity(tiny_dit, io):
    with torch.no_grad():
        v = tiny_dit(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"], io["padding_mask"])
    assert_close_to_ref(v, io["velocity"], TOL, "velocity")


def test_fixture_a_padding_mask_channel(tiny_dit, io):
    with torch.no_grad():
        v = tiny_dit(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"], io["padding_mask_nonzero"])
    assert_close_to_ref(v, io["velocity_padding_mask_nonzero"], TOL, "velocity with padding mask")


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_fixture_a_hidden_states(tiny_dit, io, n):
    with torch.no_grad():
        h = tiny_dit(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"], io["padding_mask"],
                     stop_after_block=n)
    assert_close_to_ref(h, io[f"hidden_{n}"], TOL, f"hidden_{n}")


def test_truncated_forward_skips_later_blocks(tiny_dit, io):
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(tiny_dit.blocks)]
    try:
        with torch.no_grad():
            tiny_dit(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"], stop_after_block=2)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]


def test_two_b_keys_and_shapes_match_official():
    ref = json.loads((FIXTURES / "arch_video_dit_2b_keys.json").read_text())
    with torch.device("meta"):
        model = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["cosmos-predict2-2b"])
    ours = [("net." + k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, list(s)) for k, s in ref["parameters"].items()]
    assert sum(v.numel() for v in model.parameters()) == ref["total_parameters"] == 1_956_413_440
    # the official non-parameter entries are exactly what the loader drops
    for k in ref["buffers"]:
        assert mv.official_keys({k: torch.zeros(1)}) == {}


def test_fixture_b_input_assembly():
    s = fixture("rf_ab2_sampler.safetensors")
    cond = s["condition_mask"][:, 0, :, 0, 0].bool()
    tau0 = mv.sigma_to_tau(torch.tensor(80.0))
    net_in, tau_BT, cmask = mv.video2world_inputs((1 - tau0) * (s["eps"] * 80.0), tau0, s["gt_latent"], cond)
    assert_close_to_ref(net_in, s["net_in_step0"], 1e-6, "net_in_step0")
    assert torch.equal(tau_BT, s["timesteps_step0"])
    assert torch.equal(cmask, s["condition_mask"])


@pytest.fixture(scope="module")
def sampler():
    s = fixture("rf_ab2_sampler.safetensors")
    s["cond"] = s["condition_mask"][:, 0, :, 0, 0].bool()
    return s


def test_fixture_b_x0_predictions(tiny_dit, sampler):
    s = sampler
    xs = [s["eps"] * 80.0] + [s[f"x_after_step{i}"] for i in range(1, 4)]
    for i in range(4):
        tau = mv.sigma_to_tau(torch.tensor(float(s["sigmas"][i]), dtype=torch.float32))
        with torch.no_grad():
            x0 = mv.video2world_x0(tiny_dit, (1 - tau) * xs[i], tau, s["gt_latent"], s["cond"], s["crossattn_emb"])
        assert_close_to_ref(x0, s[f"x0_pred_step{i}"], TOL, f"x0_pred_step{i}")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 35])
def test_fixture_b_samples_after_k_steps(tiny_dit, sampler, k):
    """Our own sampler chain (each step fed our previous step) stays on the official trajectory."""
    s = sampler

    def x0_fn(x, i):
        tau = mv.sigma_to_tau(torch.tensor(float(s["sigmas"][i]), dtype=torch.float32))
        return mv.video2world_x0(tiny_dit, (1 - tau) * x, tau, s["gt_latent"], s["cond"], s["crossattn_emb"])

    with torch.no_grad():
        x = mv.rf_ab2_sample(x0_fn, s["eps"], mv.karras_sigmas(35), num_steps=k)
    assert_close_to_ref(x, s[f"x_after_step{k}"], TOL, f"x_after_step{k}")


def test_fixture_b_stop_after_step_and_final_pass(tiny_dit, sampler):
    s = sampler
    args = (tiny_dit, s["eps"], s["gt_latent"], s["cond"], s["crossattn_emb"])
    with torch.no_grad():
        h4, sigma4 = mv.cosmos_sample(*args, stop_after_step=4, hidden_block=2)
        h35, sigma35 = mv.cosmos_sample(*args, stop_after_step=35, hidden_block=2)
        x0 = mv.cosmos_sample(*args)
    assert_close_to_ref(h4, s["hidden_stop4_layer2"], TOL, "hidden_stop4_layer2")
    assert torch.equal(sigma4, s["sigma_stop4"])
    assert_close_to_ref(h35, s["hidden_stop35_layer2"], TOL, "hidden_stop35_layer2")
    # official returns a 0-dim sigma for k = 35 (a bug that crashes its pipeline); ours is (B,) as for every k
    assert sigma35.shape == (2,) and torch.all(sigma35 == s["sigma_stop35"])
    assert_close_to_ref(x0, s["final_x0"], TOL, "final_x0")


def test_stop_after_step_zero_is_one_forward_at_sigma_max(tiny_dit, sampler):
    s = sampler
    calls = []
    handle = tiny_dit.register_forward_hook(lambda m, a, kw, o: calls.append(1), with_kwargs=True)
    try:
        with torch.no_grad():
            h, sigma = mv.cosmos_sample(tiny_dit, s["eps"], s["gt_latent"], s["cond"], s["crossattn_emb"],
                                        stop_after_step=0, hidden_block=2)
    finally:
        handle.remove()
    assert len(calls) == 1 and torch.all(sigma == 80.0)


def test_bf16_autocast_close_to_fp32(tiny_dit, io):
    args = (io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        v = tiny_dit(*args)
    assert torch.isfinite(v).all()
    assert_close_to_ref(v, io["velocity"], 5e-2, "bf16 autocast velocity")


def test_bf16_weights(io):
    model = mv.load_video_dit(FIXTURES / "video_dit_weights.safetensors", filename=None, config="tiny",
                              dtype=torch.bfloat16)
    with torch.no_grad():
        v = model(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"])
    assert v.dtype == torch.bfloat16
    assert_close_to_ref(v, io["velocity"], 5e-2, "bf16 weights velocity")


def test_torch_compile_fullgraph(tiny_dit, io):
    """The forward traces as one graph (no Python loops over tokens, no graph breaks)."""
    compiled = torch.compile(tiny_dit, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        v = compiled(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"], io["padding_mask"])
    assert_close_to_ref(v, io["velocity"], TOL, "compiled velocity")


def test_input_errors_name_the_problem(tiny_dit, io):
    x, tau, ctx, cm = io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"]
    with pytest.raises(ValueError, match=r"x must be \(B, 16"):
        tiny_dit(x[:, :8], tau, ctx, cm)
    with pytest.raises(ValueError, match="divisible by the patch"):
        tiny_dit(x[..., :7], tau, ctx, cm[..., :7])
    with pytest.raises(ValueError, match="condition_mask"):
        tiny_dit(x, tau, ctx, cm[:, :, :2])
    with pytest.raises(ValueError, match="crossattn_emb"):
        tiny_dit(x, tau, ctx[..., :8], cm)
    with pytest.raises(ValueError, match="tau"):
        tiny_dit(x, tau[:, :3], ctx, cm)


def test_config_presets_and_unknown_fields():
    cfg = mv.make_config(mv.VideoDiTConfig, "tiny", mv.VIDEO_DIT_PRESETS, num_blocks=2)
    assert cfg.num_blocks == 2 and cfg.model_channels == 64
    with pytest.raises(ValueError, match="unknown VideoDiTConfig field"):
        mv.make_config(mv.VideoDiTConfig, "tiny", mv.VIDEO_DIT_PRESETS, num_block=2)
    with pytest.raises(ValueError, match="unknown VideoDiTConfig preset"):
        mv.make_config(mv.VideoDiTConfig, "huge", mv.VIDEO_DIT_PRESETS)
    with pytest.raises(ValueError, match="model_channels=64 does not split into num_heads=3 heads"):
        mv.VideoDiT(mv.replace(cfg, num_heads=3))

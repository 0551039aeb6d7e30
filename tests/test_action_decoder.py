"""The action decoder against the official fixture C, the real-size key lists, normalization and rotations."""

import json
import math

import pytest
import torch
from conftest import FIXTURES, assert_close_to_ref, fixture, make_stats

import mimic_video as mv

TOL = 1e-4  # fixtures README: decoder outputs within 1e-4 * max(1, max|ref|)


@pytest.fixture(scope="module", params=["action_decoder_weights.pt", "action_decoder_weights.safetensors"])
def decoder(request):
    return mv.load_action_decoder(FIXTURES / request.param, config="tiny").eval()


@pytest.fixture(scope="module")
def io():
    return fixture("action_decoder_io.safetensors")


def test_raw_network_output(decoder, io):
    with torch.no_grad():
        out = decoder(io["state"], io["xt_scaled"], io["timesteps"], io["context_sigma"], io["crossattn_emb"])
    assert_close_to_ref(out, io["dit_out"], TOL, "dit_out")


def test_bf16_sinusoid_rounding_is_what_the_fixture_needs(decoder, io):
    """Without the official bf16 rounding of the time features the output moves by ~3e-3 relative:
    far outside the tolerance, so this check can tell the two apart."""
    assert (io["dit_out"] - io["dit_out_nobf16sin"]).abs().max() > 10 * TOL * io["dit_out"].abs().max()


def test_masked_proprio_output(decoder, io):
    with torch.no_grad():
        out = decoder(io["state"], io["xt_scaled"], io["timesteps"], io["context_sigma"], io["crossattn_emb"],
                      obs_dropout=1.0)
    assert_close_to_ref(out, io["dit_out_obs_masked"], TOL, "dit_out_obs_masked")


def test_denoise_rescale_and_proprio_time(decoder, io):
    with torch.no_grad():
        v = decoder.denoise(io["x_tau"], io["tau_actions"], io["state"], io["crossattn_emb"], io["context_sigma"])
    assert_close_to_ref(v, io["denoise_out"], TOL, "denoise_out")
    tau = io["tau_actions"][..., None]
    assert_close_to_ref(io["x_tau"] / torch.sqrt((1 - tau) ** 2 + tau ** 2), io["xt_scaled"], 1e-6, "xt_scaled")
    assert torch.all(io["timesteps"][:, 0] == mv.TAU_PROPRIO)


def test_every_euler_iterate_and_the_sampled_chunk(decoder, io):
    noise = mv.numpy_randn((2, 4, 10), seed=3)  # official arch_invariant_rand
    assert torch.equal(noise, io["init_noise"])
    seen = []
    kv = decoder.context_kv(io["crossattn_emb"])

    def v_fn(x, tau):
        v = decoder.denoise(x, tau, io["state"], None, io["context_sigma"], context_kv=kv)
        seen.append((x, tau, v))
        return v

    with torch.no_grad():
        actions = mv.euler_integrate(v_fn, noise, num_steps=10)
    assert len(seen) == 10
    for k, (x, tau, v) in enumerate(seen):
        assert_close_to_ref(x, io["euler_x"][:, k], TOL, f"euler_x[{k}]")
        assert torch.equal(tau, io["euler_tau"][:, k]), f"euler_tau[{k}]"
        assert_close_to_ref(v, io["euler_v"][:, k], TOL, f"euler_v[{k}]")
    assert_close_to_ref(actions, io["euler_x"][:, 10], TOL, "euler_x[10]")
    assert_close_to_ref(actions, io["sampled_actions"], TOL, "sampled_actions")
    with torch.no_grad():
        assert_close_to_ref(decoder.sample(io["state"], io["crossattn_emb"], io["context_sigma"], noise),
                            io["sampled_actions"], TOL, "decoder.sample")


def test_chained_video_sampler_to_decoder(decoder, io):
    """Fixture B's video sampler (stop after 4 steps, block 2) feeds the decoder (official Video2World2Action)."""
    video = mv.load_video_dit(FIXTURES / "video_dit_weights.safetensors", filename=None, config="tiny").eval()
    s = fixture("rf_ab2_sampler.safetensors")
    cond = s["condition_mask"][:, 0, :, 0, 0].bool()
    with torch.no_grad():
        hidden, sigma = mv.cosmos_sample(video, s["eps"], s["gt_latent"], cond, s["crossattn_emb"],
                                         stop_after_step=4, hidden_block=2)
        assert torch.equal(sigma[:, None], io["e2e_context_sigma"])
        actions = decoder.sample(io["state"], hidden.flatten(1, 3), sigma, mv.numpy_randn((2, 4, 10), seed=3))
    assert_close_to_ref(actions, io["e2e_sampled_actions"], TOL, "e2e_sampled_actions")


@pytest.mark.parametrize("preset,file",
                         [("libero", "arch_decoder_libero_keys.json"), ("bridge", "arch_decoder_bridge_keys.json")])
def test_real_size_keys_and_shapes(preset, file):
    ref = json.loads((FIXTURES / file).read_text())
    with torch.device("meta"):
        model = mv.ActionDecoder(mv.ACTION_DECODER_PRESETS[preset])
    ours = [("net." + k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, list(s)) for k, s in ref["parameters"].items()]
    assert sum(p.numel() for p in model.parameters()) == ref["total_parameters"]
    widths = [m.out_features for m in model.obs_embedder.layers if isinstance(m, torch.nn.Linear)]
    assert widths == [47, 220, 1024]


def test_decoder_rank_must_equal_width():
    with pytest.raises(ValueError, match="pair_timestep_feature_rank"):
        mv.ActionDecoder(mv.replace(mv.ACTION_DECODER_PRESETS["tiny"], pair_timestep_feature_rank=32))


def test_decoder_shape_errors(decoder, io):
    with pytest.raises(ValueError, match="state must be"):
        decoder(io["state"][..., :9], io["xt_scaled"], io["timesteps"], io["context_sigma"], io["crossattn_emb"])
    with pytest.raises(ValueError, match="actions must be"):
        decoder(io["state"], torch.zeros(2, 9, 10), io["timesteps"], io["context_sigma"], io["crossattn_emb"])


def test_fresh_decoder_init_is_official():
    d = mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["tiny"])
    assert torch.all(d.t_embedder.pair.B.bias == 0.382050174) and torch.all(d.t_embedder.pair.C.bias == 0.382050174)
    assert torch.all(d.blocks[0].adaln_modulation_cross_attn[2].weight == 0)
    assert torch.all(d.final_layer.adaln_modulation[2].weight == 0)
    std = d.pos_embedding.std().item()
    assert 0.5 / 8 < std < 1.5 / 8  # trunc normal, std 1/sqrt(64)


# ------------------------------ normalization and rotations ------------------------------


def test_normalizer_round_trip_per_timestep_and_clamp():
    groups = mv.NORMALIZATION_GROUPS["libero"]["action"]
    keys = [k for k, _ in groups]
    stats = make_stats(6, keys)
    norm = mv.Normalizer(stats, groups)
    assert norm.shift.shape == (6, 10)
    # stats are per chunk step: step 0 and step 5 have different scales
    assert not torch.allclose(norm.scale[0, :3], norm.scale[5, :3])
    # rotation columns are identity
    assert torch.all(norm.shift[:, 3:9] == 0) and torch.all(norm.scale[:, 3:9] == 1)
    assert torch.isinf(norm.clamp_min[:, 3:9]).all()
    # a constant column (std 0) gets scale 1
    assert norm.scale[0, 9] == 1
    x = torch.tensor(stats[keys[0]]["mean_clamped"], dtype=torch.float32)  # (6, 3)
    grip = torch.tensor(stats[keys[2]]["mean_clamped"], dtype=torch.float32)  # (6, 1), in range (step 0 constant)
    x = torch.cat([x, torch.randn(6, 6), grip], dim=-1)[None].repeat(4, 1, 1)  # (4, 6, 10)
    y = norm.normalize(x)
    assert torch.allclose(y[..., :3], torch.zeros(4, 6, 3), atol=1e-5)
    torch.testing.assert_close(norm.unnormalize(y), x, atol=1e-5, rtol=1e-5)
    # far outliers are clipped to the 1.5x percentile range (and so do not round-trip)
    big = x.clone()
    big[..., 0] = 1e6
    yb = norm.normalize(big)
    torch.testing.assert_close(yb[..., 0], norm.clamp_max[:, 0].expand(4, 6).float())
    pos = stats[keys[0]]
    mean, p98 = torch.tensor(pos["mean"]), torch.tensor(pos["percentiles"])[980]
    expected_hi = (mean + 1.5 * (p98 - mean) - torch.tensor(pos["mean_clamped"])) / torch.tensor(pos["std_clamped"])
    torch.testing.assert_close(norm.clamp_max[:, :3], expected_hi.float())


def test_normalizer_missing_key():
    with pytest.raises(KeyError, match="obs/eef_pos_lowdim"):
        mv.Normalizer({}, mv.NORMALIZATION_GROUPS["bridge"]["obs"])


def random_rotations(n, seed=0):
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def test_rotation_6d_round_trip():
    R = random_rotations(100)
    r6 = mv.rotation_to_6d(R)
    assert torch.equal(r6[:, :3], R[:, 0]) and torch.equal(r6[:, 3:], R[:, 1])  # rows, row-major
    torch.testing.assert_close(mv.rotation_from_6d(r6), R)
    # a noisy 6-D vector (what a network outputs) still gives a proper rotation
    R2 = mv.rotation_from_6d(r6 + 0.1 * torch.randn(100, 6, dtype=torch.float64) + torch.tensor([0.5, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(R2 @ R2.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(100, 3, 3))
    assert torch.allclose(torch.linalg.det(R2), torch.ones(100, dtype=torch.float64))
    assert math.isclose(torch.linalg.det(R[0]).item(), 1.0, abs_tol=1e-9)

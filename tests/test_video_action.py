"""The video-action model: stage-1/2 losses and gradients, partial-denoising sampling, released checkpoints."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, make_stats

import mimic_video as mv

B, C, T, H, W = 2, 16, 4, 4, 6  # tiny window: 2 context + 2 future latent frames


def tiny_model(lora=False):
    video = mv.load_video_dit(FIXTURES / "video_dit_weights.safetensors", filename=None, config="tiny")
    decoder = mv.load_action_decoder(FIXTURES / "action_decoder_weights.safetensors", config="tiny")
    if lora:
        mv.inject_lora(video, mv.LORA_PRESETS["tiny"])
    else:
        video.requires_grad_(False)
    return mv.VideoActionModel(video, decoder, mv.VIDEO_ACTION_PRESETS["tiny"])


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return dict(context=torch.randn(B, C, 2, H, W, generator=g), future=torch.randn(B, C, 2, H, W, generator=g),
                text=torch.randn(B, 7, 24, generator=g), proprio=torch.randn(B, 1, 10, generator=g),
                actions=torch.randn(B, 4, 10, generator=g))


def test_video_features_are_the_truncated_forward(batch):
    model = tiny_model()
    sigma = torch.tensor([3.0, 50.0])
    eps = torch.randn(B, C, T, H, W)
    ctx = model.video_features(batch["context"], batch["future"], batch["text"], sigma, eps=eps)
    assert ctx.shape == (B, T * (H // 2) * (W // 2), 64) and not ctx.requires_grad
    latents = torch.cat([batch["context"], batch["future"]], dim=2)
    cond = mv.first_frames_mask(B, T, 2)
    tau = mv.sigma_to_tau(sigma)
    net_in, tau_BT, cm = mv.video2world_inputs(mv.interpolate(latents, eps, tau), tau, latents, cond)
    assert torch.equal(net_in[:, :, :2], batch["context"])  # context frames are clean
    assert torch.allclose(tau_BT[:, :2], mv.conditional_tau())
    hidden = model.video(net_in, tau_BT, batch["text"], cm, stop_after_block=2)
    torch.testing.assert_close(ctx, hidden.reshape(B, -1, 64))  # (t, h, w) order


def test_stage2_trains_the_decoder_only(batch):
    model = tiny_model()
    video_before = {k: v.clone() for k, v in model.video.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model.action_loss(**batch, generator=torch.Generator().manual_seed(1))
    assert out["per_sample"].shape == (B,) and out["tau_a"].shape == (B,) and out["tau_v"].shape == (B,)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.video.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    opt.step()
    for k, v in model.video.state_dict().items():
        assert torch.equal(v, video_before[k]), k
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_stage2_loss_is_ten_times_velocity_mse_with_proprio_dropout(batch, monkeypatch):
    model = tiny_model()
    seen = {}
    real = model.decoder.denoise

    def spy(x_tau, tau_a, state, ctx, sigma, obs_dropout=0.0, **kw):
        seen["obs_dropout"], seen["v"] = obs_dropout, real(x_tau, tau_a, state, ctx, sigma, obs_dropout, **kw)
        seen["x_tau"], seen["tau_a"] = x_tau, tau_a
        return seen["v"]

    monkeypatch.setattr(model.decoder, "denoise", spy)
    out = model.action_loss(**batch, generator=torch.Generator().manual_seed(2))
    assert seen["obs_dropout"].dtype == torch.bool and seen["obs_dropout"].shape == (B,)
    noise = model.draw_noise("action", 20_000, (C, T, H, W), (4, 10), torch.Generator().manual_seed(0))
    assert noise["obs_mask"].float().mean().item() == pytest.approx(0.2, abs=0.01)  # proprio masked 20% of the time
    tau = seen["tau_a"][:, None, None]
    eps = (seen["x_tau"] - (1 - tau) * batch["actions"]) / tau  # recover eps from x_tau
    u = eps - batch["actions"]
    torch.testing.assert_close(out["loss"], 10 * ((seen["v"] - u) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_stage1_trains_only_lora_and_adaln(batch):
    model = tiny_model(lora=True)
    frozen = {n: p.clone() for n, p in model.video.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.video.parameters() if p.requires_grad], lr=1e-2)
    out = model.video_loss(batch["context"], batch["future"], batch["text"], generator=torch.Generator().manual_seed(3))
    out["loss"].backward()
    for n, p in model.video.named_parameters():
        assert (p.grad is not None) == (".lora_" in n or "adaln_modulation" in n), n
    opt.step()
    for n, p in model.video.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


class PerfectVideo(torch.nn.Module):
    """Predicts the exact velocity on future frames and nonsense on context frames."""

    def __init__(self, x0):
        super().__init__()
        self.cfg, self.x0 = mv.VIDEO_DIT_PRESETS["tiny"], x0

    def forward(self, net_in, tau_BT, text, condition_mask, stop_after_block=None):
        tau = tau_BT[:, None, :, None, None]
        eps = (net_in - (1 - tau) * self.x0) / tau
        return torch.where(condition_mask.bool(), torch.full_like(net_in, 1e3), eps - self.x0)


def test_stage1_loss_ignores_the_context_frames(batch):
    latents = torch.cat([batch["context"], batch["future"]], dim=2)
    model = mv.VideoActionModel(PerfectVideo(latents), tiny_model().decoder, mv.VIDEO_ACTION_PRESETS["tiny"])
    out = model.video_loss(batch["context"], batch["future"], batch["text"], generator=torch.Generator().manual_seed(4))
    assert out["loss"].item() < 1e-6


def test_sampling_is_deterministic_per_seed(batch):
    model = tiny_model().eval()
    args = (batch["context"], batch["text"], batch["proprio"])
    a = model.sample_actions(*args, stop_after_step=2, seed=5)
    b = model.sample_actions(*args, stop_after_step=2, seed=5)
    c = model.sample_actions(*args, stop_after_step=2, seed=6)
    assert a.shape == (B, 4, 10) and torch.equal(a, b) and not torch.allclose(a, c)
    n1 = model.sample_actions(*args, stop_after_step=2, seed=5, numpy_noise=True)
    assert torch.equal(n1, model.sample_actions(*args, stop_after_step=2, seed=5, numpy_noise=True))


def test_stop_after_step_and_tau_v_agree(batch):
    model = tiny_model().eval()
    args = (batch["context"], batch["text"], batch["proprio"])
    sigmas = mv.karras_sigmas(35)
    for k in (0, 3, 20):
        tau_v = float(mv.sigma_to_tau(sigmas[k]))
        a = model.sample_actions(*args, stop_after_step=k, seed=1)
        b = model.sample_actions(*args, tau_v=tau_v, seed=1)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # between schedule points tau_v ends exactly at its own level
    sched = mv.partial_schedule(35, tau_v=0.9)
    assert sched[-1] == pytest.approx(9.0) and torch.all(sched[:-1] > 9.0)
    assert len(mv.partial_schedule(35, tau_v=0.995)) == 1  # above tau(80): one forward from noise
    with pytest.raises(ValueError, match="exactly one"):
        model.sample_actions(*args)


def test_context_cache_matches_uncached(batch):
    model = tiny_model().eval()
    ctx = model.video_features(batch["context"], batch["future"], batch["text"], torch.tensor([5.0, 5.0]))
    sigma, noise = torch.tensor([5.0, 5.0]), torch.randn(B, 4, 10)
    calls = []
    handle = model.decoder.blocks[0].cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        cached = model.decoder.sample(batch["proprio"], ctx, sigma, noise)
    handle.remove()
    assert len(calls) == 1  # keys once per query, not once per Euler step
    with torch.no_grad():
        uncached = mv.euler_integrate(lambda x, tau: model.decoder.denoise(x, tau, batch["proprio"], ctx, sigma), noise)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


def test_oracle_conditions_on_the_noised_ground_truth(batch):
    model = tiny_model().eval()
    args = (batch["context"], batch["text"], batch["proprio"])
    oracle = model.sample_actions(*args, stop_after_step=10, seed=0, oracle_future=batch["future"])
    plan = model.sample_actions(*args, stop_after_step=10, seed=0)
    assert not torch.allclose(oracle, plan)
    # by hand: the same noise, the ground truth at sigma_10, then the decoder
    g = torch.Generator().manual_seed(0)
    eps, noise = torch.randn(B, C, T, H, W, generator=g), torch.randn(B, 4, 10, generator=g)
    sigma = torch.full((B,), float(mv.karras_sigmas(35)[10]))
    ctx = model.video_features(batch["context"], batch["future"], batch["text"], sigma, eps=eps)
    torch.testing.assert_close(oracle, model.decoder.sample(batch["proprio"], ctx, sigma, noise))


# ------------------------------ released checkpoints ------------------------------


def write_release(root, task="libero_spatial_full"):
    """A copy of the released repo's layout with tiny weights (official `net.` keys, bf16 like the release)."""
    files = mv.released_files(task)
    for kind, fixture_file in (("video", "video_dit_weights.pt"), ("decoder", "action_decoder_weights.pt")):
        sd = torch.load(FIXTURES / fixture_file, weights_only=True)
        (root / files[kind]).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, root / files[kind])
    groups = mv.NORMALIZATION_GROUPS["libero"]
    stats = {**make_stats(4, [k for k, _ in groups["action"]], seed=1),
             **make_stats(1, [k for k, _ in groups["obs"]], seed=2)}
    (root / files["statistics"]).parent.mkdir(parents=True, exist_ok=True)
    (root / files["statistics"]).write_text(json.dumps(stats))
    return files


def test_released_file_names():
    f = mv.released_files("libero_spatial_full")
    assert f["video"] == ("video_backbone/v2w_libero_spatial_agentview_lora_rank256_lr1.778e-04_bsz32_"
                          "iter_000007540_fused.pt")
    assert f["decoder"] == ("action_decoder/w2a_libero_spatial_full_v2w_libero_spatial_agentview_lora_rank256_"
                            "lr1.778e-04_bsz32_iter_000007540_fused_lr1.000e-04_layer20_bsz128_iter_000051212.pt")
    assert f["statistics"] == "dataset_statistics/libero_spatial_full.json"
    b = mv.released_files("bridge_ptcosmos")
    assert b["decoder"] == ("action_decoder/w2a_bridge_v2w_pretrained_cosmos_lr1.000e-04_layer20_bsz256_"
                            "iter_000014112.pt")
    with pytest.raises(ValueError, match="unknown released task"):
        mv.released_files("libero_goal_full")


def tiny_policy(source, **kw):
    return mv.load_released_model("libero_spatial_full", source, video_config="tiny", decoder_config="tiny",
                                  config="tiny", **kw)


def test_load_policy_from_a_local_folder(tmp_path, batch):
    write_release(tmp_path)
    policy = tiny_policy(tmp_path, dtype=torch.float32)
    ref = torch.load(FIXTURES / "action_decoder_weights.pt", weights_only=True)
    torch.testing.assert_close(policy.decoder.pos_embedding, ref["net.pos_embedding"].bfloat16().float())
    assert policy.action_normalizer.shift.shape == (4, 10) and policy.obs_normalizer.shift.shape == (1, 10)
    assert not any(p.requires_grad for p in policy.parameters())
    raw = policy.sample_actions(batch["context"], batch["text"], batch["proprio"], stop_after_step=5, raw=True)
    norm = policy.sample_actions(batch["context"], batch["text"], policy.obs_normalizer.normalize(batch["proprio"]),
                                 stop_after_step=5)
    torch.testing.assert_close(raw, policy.action_normalizer.unnormalize(norm))


def test_load_policy_by_repo_id_from_the_hub_cache(tmp_path):
    snapshot = tmp_path / "models--jonpai--mimic-video" / "snapshots" / "f28339034831e3c2374be075e622e1ff38ebe0f8"
    snapshot.mkdir(parents=True)
    write_release(snapshot)
    (tmp_path / "models--jonpai--mimic-video" / "refs").mkdir()
    (tmp_path / "models--jonpai--mimic-video" / "refs" / "main").write_text(snapshot.name)
    policy = tiny_policy("jonpai/mimic-video", cache_dir=tmp_path)
    assert policy.video.t_embedding_norm.weight.dtype == torch.bfloat16  # the released dtype, untouched


def test_load_policy_errors(tmp_path):
    files = write_release(tmp_path)
    (tmp_path / files["statistics"]).unlink()
    with pytest.raises(FileNotFoundError, match="libero_spatial_full.json"):
        tiny_policy(tmp_path)
    write_release(tmp_path)
    sd = torch.load(tmp_path / files["decoder"], weights_only=True)
    del sd["net.ctx_norm.bias"]
    torch.save(sd, tmp_path / files["decoder"])
    with pytest.raises(mv.CheckpointMismatchError, match="missing keys.*\\n\\s+ctx_norm.bias"):
        tiny_policy(tmp_path)
    shutil.rmtree(tmp_path / "action_decoder")
    with pytest.raises(FileNotFoundError, match="w2a_libero_spatial_full"):
        tiny_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="hf download jonpai/mimic-video"):
        tiny_policy("jonpai/mimic-video", cache_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="'libero_goal_full' was not released"):
        mv.load_policy("libero_goal_full", tmp_path)

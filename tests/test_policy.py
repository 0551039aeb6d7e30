"""The Policy: representations, LeRobot observations in, actions out, frame history, action queue, one folder format."""

import json
import shutil
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_stats, tiny_t5, tiny_wan_vae

import mimic_video as mv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402

# ------------------------------ rotations and representations ------------------------------


def random_axis_angles(n, seed=0, max_angle=math.pi - 1e-3):
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    return axis * torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle


def test_quaternion_axis_angle_and_6d_agree():
    v = random_axis_angles(200)
    angle = v.norm(dim=-1, keepdim=True)
    q_xyzw = torch.cat([v / angle * torch.sin(angle / 2), torch.cos(angle / 2)], dim=-1)  # the same rotations
    R = mv.axis_angle_to_matrix(v)
    torch.testing.assert_close(mv.quaternion_to_matrix(q_xyzw), R)
    torch.testing.assert_close(mv.quaternion_to_matrix(q_xyzw.roll(1, -1), scalar_first=True), R)  # (w, x, y, z)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(200, 3, 3))
    torch.testing.assert_close(mv.rotation_from_6d(mv.rotation_to_6d(R)), R)  # 6-D keeps the rotation
    torch.testing.assert_close(mv.matrix_to_axis_angle(R), v)  # and back to the rotation vector
    # a quarter turn about z by hand: x -> y
    Rz = mv.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(Rz @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1, 0], dtype=torch.float64))
    # near zero and near pi: no NaN, and the identity is the zero vector
    assert torch.equal(mv.matrix_to_axis_angle(torch.eye(3)[None]), torch.zeros(1, 3))
    flip = mv.matrix_to_axis_angle(mv.axis_angle_to_matrix(torch.tensor([[0.0, math.pi, 0.0]], dtype=torch.float64)))
    assert torch.allclose(flip.abs(), torch.tensor([[0.0, math.pi, 0.0]], dtype=torch.float64), atol=1e-6)
    assert torch.isfinite(mv.axis_angle_to_matrix(torch.full((1, 3), 1e-9))).all()


def test_libero_representation_round_trip():
    rep = mv.Representation("libero")
    g = torch.Generator().manual_seed(0)
    gripper = torch.where(torch.rand(50, 1, generator=g) < 0.5, -1.0, 1.0)
    # (50, 7)
    a = torch.cat([torch.rand(50, 3, generator=g) * 2 - 1, random_axis_angles(50, 1).float(), gripper], dim=-1)
    y = rep.action_to_model(a)
    assert y.shape == (50, 10)
    torch.testing.assert_close(y[:, 3:9], mv.rotation_to_6d(mv.axis_angle_to_matrix(a[:, 3:6].double())).float())
    torch.testing.assert_close(rep.action_from_model(y), a, atol=1e-5, rtol=1e-5)
    # what the decoder outputs is not exactly a rotation or a +-1 gripper: Gram-Schmidt and the sign take care of it
    noisy = y + 0.05 * torch.randn(50, 10, generator=g)
    back = rep.action_from_model(noisy)
    assert torch.all(back[:, 6].abs() == 1) and torch.isfinite(back).all()
    s = torch.cat([torch.rand(4, 3), random_axis_angles(4, 2).float(), torch.tensor([[0.03, -0.03]]).expand(4, 2)],
                  dim=-1)
    m = rep.state_to_model(s)  # (4, 10): xyz, 6-D rows, first finger joint
    assert m.shape == (4, 10) and torch.equal(m[:, 9], s[:, 6]) and torch.equal(m[:, :3], s[:, :3])
    with pytest.raises(ValueError, match="observation.state must have 8 values"):
        rep.state_to_model(torch.zeros(4, 7))
    assert [k for k, _, _ in rep.action_groups] == [k for k, _ in mv.NORMALIZATION_GROUPS["libero"]["action"]]


def test_identity_representation_any_dimension_and_explicit_modes():
    rep = mv.Representation("identity", state_dim=5, action_dim=3)
    x = torch.randn(2, 3)
    assert rep.action_from_model(rep.action_to_model(x)) is x and rep.model_state_dim == 5
    states, chunks = np.random.randn(300, 1, 5), np.random.randn(300, 4, 3)
    stats = rep.stats(states, chunks)
    action = stats["action/action_lowdim"]
    assert action["normalization"] == "variance" and np.shape(action["mean"]) == (4, 3)
    obs_norm, act_norm = rep.normalizers(stats)
    assert act_norm.shift.shape == (4, 3) and obs_norm.shift.shape == (1, 5)
    with pytest.raises(ValueError, match="unknown representation kind"):
        mv.Representation("quaternion", 3, 3)
    with pytest.raises(ValueError, match="needs state_dim and action_dim"):
        mv.Representation("identity")


def test_normalizer_modes_are_explicit_and_it_saves_and_loads(tmp_path):
    stats = make_stats(3, ["action/a", "action/rotation_6d", "action/b"])
    norm = mv.Normalizer(stats,
                         [("action/a", "variance"), ("action/rotation_6d", "variance"), ("action/b", "identity")])
    assert not torch.all(norm.scale[:, 3:9] == 1)  # no name guessing: a "rot" key is normalized when it says variance
    assert torch.all(norm.scale[:, 9] == 1) and torch.isinf(norm.clamp_min[:, 9]).all()
    mv.save_stats(norm, tmp_path / "n.json")
    back = mv.load_stats(tmp_path / "n.json")
    assert back.groups == norm.groups
    for name in ("shift", "scale", "clamp_min", "clamp_max"):
        assert torch.equal(getattr(back, name), getattr(norm, name)), name
    with pytest.raises(ValueError, match="normalization mode"):
        mv.Normalizer(stats, [("action/a", "zscore")])
    (tmp_path / "released.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="do not say their normalization mode"):
        mv.load_stats(tmp_path / "released.json")


def test_episode_chunks_pads_the_tail():
    v = np.arange(5)[:, None].astype(np.float32)  # an episode of 5 steps
    assert episode(v, [3], "repeat") == [3, 4, 4, 4]
    assert episode(v, [3], "zero") == [3, 4, 0, 0]
    assert episode(v, [0], "repeat", length=2) == [0, 1, 1, 1]


def episode(v, starts, pad, length=None):
    return mv.episode_chunks(v, starts, 4, pad=pad, length=length)[0, :, 0].tolist()


# ------------------------------ the Policy on a tiny random model ------------------------------

B_ENV, H_IMG = 3, 32


def tiny_policy_parts(tmp_path):
    """A tiny random model with the real encoders' kinds (Wan VAE, T5) and the LIBERO representation."""
    vae = tiny_wan_vae()
    vae.save_pretrained(tmp_path / "vae")
    model, tokenizer = tiny_t5(d_model=24)
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    video = mv.load_video_dit(FIXTURES / "video_dit_weights.safetensors", None, "tiny")
    decoder = mv.load_action_decoder(FIXTURES / "action_decoder_weights.safetensors", config="tiny")
    rep = mv.Representation("libero")
    g = np.random.RandomState(0)
    stats = rep.stats(g.randn(500, 1, 10) * 0.3, g.randn(500, 4, 10) * 0.2)
    obs_norm, act_norm = rep.normalizers(stats)
    # frozen, as a deployed policy is (mv.load_policy): parameters that require grad take other CPU kernel paths
    va = mv.VideoActionModel(video.requires_grad_(False), decoder.requires_grad_(False),
                             mv.VIDEO_ACTION_PRESETS["tiny"],
                             obs_norm, act_norm)
    cfg = mv.make_config(mv.PolicyConfig, "libero", mv.POLICY_PRESETS, image_size=(H_IMG, H_IMG), n_action_steps=3,
                         stop_after_step=2,
                         video_encoder={"kind": "wan", "source": str(tmp_path / "vae"), "subfolder": None},
                         text_encoder={"kind": "t5", "source": str(tmp_path / "t5"), "max_length": 12})
    return va, cfg


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    va, cfg = tiny_policy_parts(tmp_path_factory.mktemp("parts"))
    return mv.Policy(va, cfg, mv.build_video_encoder(cfg.video_encoder), mv.build_text_encoder(cfg.text_encoder))


def observation(t, batch=B_ENV, seed=0):
    g = np.random.RandomState(seed + t)
    return {"observation.images.image": torch.from_numpy(g.randint(0, 256, (batch, 48, 40, 3), dtype=np.uint8)),
            "observation.images.image2": torch.zeros(batch, 8, 8, 3, dtype=torch.uint8),
            "observation.state": torch.from_numpy(g.randn(batch, 8).astype(np.float32) * 0.1),
            "task": ["pick up the bowl", "go to the red one", "place it on the plate"][:batch]}


def test_policy_end_to_end_from_raw_frames_and_strings(policy):
    policy.reset()
    action = policy.select_action(observation(0))
    assert action.shape == (B_ENV, 7) and torch.isfinite(action).all()
    assert set(action[:, 6].tolist()) <= {-1.0, 1.0}  # LIBERO gripper: sign of the decoder's gripper value
    single = {k: (v[0] if k != "task" else v[0]) for k, v in observation(0).items()}
    policy.reset()
    assert policy.select_action(single).shape == (7,)  # one environment, no batch dimension
    policy.reset()
    chunk = policy.predict_action_chunk(observation(0))
    assert chunk.shape == (B_ENV, 4, 7) and not policy.queue


def test_to_moves_the_model_and_the_encoders_as_lerobot_does(tmp_path):
    """policy.eval() and policy.to(device), as a LeRobot eval loop calls them (the meta device stands in for cuda)."""
    va, cfg = tiny_policy_parts(tmp_path)
    p = mv.Policy(va, cfg, mv.build_video_encoder(cfg.video_encoder), mv.build_text_encoder(cfg.text_encoder))
    p.select_action(observation(0))
    assert p.eval() is p and p.to("meta") is p and p.history is None and not p.text_encoder.cache
    assert p.device.type == "meta" and next(p.video_encoder.parameters()).device.type == "meta"
    assert next(p.text_encoder.model.parameters()).device.type == "meta"


def test_history_is_padded_with_the_first_frame_and_strided(policy):
    policy.reset()
    policy.select_action(observation(0))
    first = mv.resize_frames(mv.images_to_frames(observation(0)["observation.images.image"]), (H_IMG, H_IMG))
    assert policy.history.shape == (B_ENV, 17, 3, H_IMG, H_IMG)  # (5 - 1) * 4 + 1 steps at 20 Hz
    assert all(torch.equal(policy.history[:, i], first) for i in range(17))
    for t in range(1, 6):
        policy.select_action(observation(t))
    ctx = policy.context_frames()  # every 4th frame, ending now: t = -11 (padding) .. 5
    assert ctx.shape == (B_ENV, 3, 5, H_IMG, H_IMG)
    frame = lambda t: mv.resize_frames(mv.images_to_frames(observation(t)["observation.images.image"]),
                                       (H_IMG, H_IMG))  # noqa: E731
    for i, t in enumerate((-11, -7, -3, 1, 5)):
        assert torch.equal(ctx[:, :, i], frame(max(t, 0))), (i, t)


def test_action_queue_queries_every_n_action_steps(policy):
    calls = []
    query = policy.query
    policy.query = lambda *a, **k: calls.append(1) or query(*a, **k)
    try:
        policy.reset()
        actions = [policy.select_action(observation(t)) for t in range(7)]
    finally:
        del policy.query
    assert len(calls) == 3  # steps 0, 3 and 6 with n_action_steps = 3
    policy.reset()
    chunk = policy.predict_action_chunk(observation(0))
    torch.testing.assert_close(torch.stack(actions[:3], 1), chunk[:, :3])  # the executed actions are the chunk's first


def test_the_batch_is_checked(policy):
    policy.reset()
    policy.select_action(observation(0))
    with pytest.raises(ValueError, match="call reset"):
        policy.select_action(observation(1, batch=2))
    policy.reset()
    with pytest.raises(KeyError, match="observation.images.image"):
        policy.select_action({k: v for k, v in observation(0).items() if k != "observation.images.image"})
    bad = observation(0)
    bad["observation.state"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.select_action(bad)
    bad = observation(0)
    bad["task"] = ["only two", "tasks"]
    with pytest.raises(ValueError, match="one string or 3 strings"):
        policy.select_action(bad)
    policy.reset()


def test_save_load_gives_identical_actions(policy, tmp_path):
    policy.save(tmp_path / "policy")
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == [
        "action_decoder.safetensors", "config.json", "stats.json", "video_backbone.safetensors"]
    assert not list(tmp_path.glob(".*"))  # the temp folder was renamed into place
    stats = json.loads((tmp_path / "policy" / "stats.json").read_text())
    assert "action/eef_rot_ref_delta_lowdim" in stats
    assert np.shape(stats["action/eef_pos_ref_delta_lowdim"]["mean"]) == (4, 3)
    loaded = mv.load_policy(tmp_path / "policy")
    a, b = [], []
    for p, out in ((policy, a), (loaded, b)):
        p.reset()
        out.extend(p.select_action(observation(t)) for t in range(4))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # overrides of the policy config at load time
    assert mv.load_policy(tmp_path / "policy", n_action_steps=1).n_action_steps == 1
    policy.save(tmp_path / "policy")  # saving over an existing folder replaces it whole
    assert mv.load_policy(tmp_path / "policy").config == policy.config


def test_a_model_file_carries_its_config(tmp_path):
    video = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"])
    mv.save_video_dit_checkpoint(video, tmp_path / "v.safetensors")
    assert mv.load_video_dit(tmp_path / "v.safetensors", None).cfg == video.cfg  # no config needed
    with pytest.raises(mv.CheckpointMismatchError,
                       match="holds 4 blocks of width 64; the config has 28 blocks of width 2048"):
        mv.load_video_dit(tmp_path / "v.safetensors", None, "cosmos-predict2-2b")
    torch.save(mv.fused_state_dict(video), tmp_path / "v.pt")  # an official-style .pt has no config
    with pytest.raises(mv.CheckpointMismatchError, match="carries no config"):
        mv.load_video_dit(tmp_path / "v.pt", None)
    decoder = mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"])
    mv.save_action_decoder(decoder, tmp_path / "d.safetensors")
    back = mv.load_action_decoder(tmp_path / "d.safetensors")
    assert back.cfg == decoder.cfg and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                             decoder.state_dict().values()))


def test_window_and_normalizer_checks():
    video = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"])
    model = mv.VideoActionModel(video, mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"]),
                                mv.VIDEO_ACTION_PRESETS["toy"])
    ctx, text = torch.zeros(1, 5, 1, 8, 8), torch.zeros(1, 3, 32)
    with pytest.raises(ValueError,
                       match="context has 2 latent frames; this model was configured for context_latents=1"):
        model.sample_actions(torch.zeros(1, 5, 2, 8, 8), text, torch.zeros(1, 1, 2), stop_after_step=0)
    with pytest.raises(ValueError, match=r"future must be \(1, 5, 4, 8, 8\)"):
        model.action_loss(ctx, torch.zeros(1, 5, 6, 8, 8), text, torch.zeros(1, 1, 2), torch.zeros(1, 8, 2))
    with pytest.raises(ValueError, match="raw=True needs the policy's obs and action normalizers"):
        model.sample_actions(ctx, text, torch.zeros(1, 1, 2), stop_after_step=0, raw=True)
    with pytest.raises(ValueError, match="loss must be 'video'"):
        model("stage2")
    assert model.cfg.video_sigma_multiplier == pytest.approx(math.sqrt(5))  # derived from the window, sqrt(T)


# ------------------------------ the toy world through the same Policy ------------------------------


def test_toy_policy_queries_once_per_execute_steps(tmp_path):
    video = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"])
    decoder = mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"])
    cfg = mv.POLICY_PRESETS["toy"]
    rep = mv.Representation.from_config(cfg.representation)
    stats = rep.stats(np.random.rand(100, 1, 2), np.random.randn(100, 8, 2) * 0.05)
    policy = mv.Policy(mv.VideoActionModel(video, decoder, mv.VIDEO_ACTION_PRESETS["toy"], *rep.normalizers(stats)),
                       cfg,
                       mv.build_video_encoder(cfg.video_encoder), mv.build_text_encoder(cfg.text_encoder))
    sample.timed(policy)
    result = mv.toy_rollout(policy, [1, 2, 3], mv.ToyWorldConfig())
    assert result["success"].shape == (3,) and result["images"].shape == (3, 25, 8, 8, 3)  # uint8 camera frames
    assert policy.queries == 6  # 24 steps, 4 executed per chunk


# ------------------------------ released tasks and LIBERO ------------------------------


def test_load_policy_for_a_released_task_from_a_local_copy(tmp_path):
    from test_video_action import write_release

    write_release(tmp_path)  # the released layout, with the fixtures' tiny weights (so: the tiny model configs)
    policy = mv.load_policy("libero_spatial_full", tmp_path, video_encoder=mv.WanVAE(tiny_wan_vae()),
                            text_encoder=mv.T5TextEncoder(*tiny_t5(), max_length=12), video_config="tiny",
                            decoder_config="tiny", model_config="tiny", image_size=(H_IMG, H_IMG), n_action_steps=3)
    cfg = policy.config  # the official LIBERO eval: 17 frames of history, every 4th, 5 actions per query
    assert (cfg.history_length, cfg.frame_stride, cfg.history_padding) == (17, 4, "first")
    assert cfg.text_replacements == (("black bowl", "bowl"),) and mv.POLICY_PRESETS["libero"].n_action_steps == 5
    obs = observation(0, batch=1)
    obs["task"] = "pick up the black bowl"
    assert policy.select_action(obs).shape == (1, 7)
    assert policy.tasks == ["pick up the bowl"]  # the released policies were trained without "black"
    with pytest.raises(FileNotFoundError, match="neither a policy folder"):
        mv.load_policy("libero_spatial_fulll")


class FakeLiberoEnv:
    """Stand-in for LIBERO's OffScreenRenderEnv: its observation keys, the robosuite step API, success when the
    gripper has been closed 4 times."""

    def __init__(self):
        self.closed, self.steps = 0, 0

    def seed(self, s):
        self.rng = np.random.RandomState(s)

    def reset(self):
        self.closed, self.steps = 0, 0

    def set_init_state(self, state):
        return self.obs()

    def obs(self):
        return {"agentview_image": self.rng.randint(0, 256, (48, 40, 3), dtype=np.uint8),
                "robot0_eye_in_hand_image": np.zeros((8, 8, 3), np.uint8), "robot0_eef_pos": np.zeros(3),
                "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]), "robot0_gripper_qpos": np.array([0.02, -0.02])}

    def step(self, action):
        assert len(action) == 7
        self.steps += 1
        self.closed += action[6] > 0
        return self.obs(), 0.0, self.closed >= 4, {}

    def close(self):
        pass


def test_libero_eval_loop_on_a_stand_in_env(policy):
    envs = []

    def make():
        envs.append(FakeLiberoEnv())
        return envs[-1]

    lines = []
    rates = sample.libero_eval(policy, "libero_spatial", trials=2, tasks=[("pick up the bowl", make, [0, 1])],
                               log=lines.append)
    assert set(rates) == {"pick up the bowl"} and 0 <= rates["pick up the bowl"] <= 1
    assert "mean over 1 tasks" in lines[-1]
    assert envs[0].steps > sample.LIBERO_SETTLE_STEPS  # settled, then the policy acted


def test_libero_observation_keys():
    env = FakeLiberoEnv()
    env.seed(0)
    raw = env.obs()
    obs = sample.libero_observation(raw, "put the bowl on the plate")
    assert np.array_equal(obs["observation.images.image"], raw["agentview_image"][::-1, ::-1])  # upright
    # identity quaternion
    assert obs["observation.state"].shape == (8,) and np.allclose(obs["observation.state"][3:6], 0)


def test_gif_of_a_vae_based_policy_in_the_toy_world(tmp_path):
    """A policy reading Wan-VAE latents (16 x 16 frames: the toy's 8 x 8 camera resized) drives the toy world through
    sample.py, and --gif shows its decoded imagined frames."""
    pytest.importorskip("PIL", reason="optional: pip install pillow")
    tiny_wan_vae().save_pretrained(tmp_path / "vae")
    video = mv.VideoDiT(mv.replace(mv.VIDEO_DIT_PRESETS["tiny"], crossattn_emb_channels=16))
    decoder = mv.ActionDecoder(mv.replace(mv.ACTION_DECODER_PRESETS["toy"], crossattn_emb_channels=64))
    rep = mv.Representation("identity", state_dim=2, action_dim=2)
    stats = rep.stats(np.random.rand(100, 1, 2), np.random.randn(100, 8, 2) * 0.05)
    model = mv.VideoActionModel(video, decoder, mv.VideoActionConfig(tap_block=2, latent_frames=2, context_latents=1),
                                *rep.normalizers(stats))
    cfg = mv.replace(mv.POLICY_PRESETS["toy"], image_size=(16, 16),
                     video_encoder={"kind": "wan", "source": str(tmp_path / "vae"), "subfolder": None},
                     text_encoder={"kind": "hashed_words", "width": 16, "max_tokens": 6})
    policy = mv.Policy(model, cfg, mv.build_video_encoder(cfg.video_encoder), mv.build_text_encoder(cfg.text_encoder))
    policy.save(tmp_path / "policy")
    sample.main([f"--policy={tmp_path / 'policy'}", "--episodes=2", f"--gif={tmp_path / 'vae.gif'}"])
    from PIL import Image

    gif = Image.open(tmp_path / "vae.gif")
    assert gif.n_frames == mv.ToyWorldConfig().episode_steps and gif.size == (4 * 8 * 8, 2 * 8 * 8)
    world = mv.ToyWorldConfig()
    state = mv.toy_reset([1, 2], world)
    policy.select_action(mv.toy_observation(state, world, mv.toy_instructions(state)))
    plan = policy.imagine()  # 1 + 4 decoded frames: the context frame, then the imagined future
    assert plan.shape == (2, 3, 5, 16, 16) and plan.abs().max() <= 1


def test_a_step_is_recorded_once(policy):
    """predict_action_chunk, then select_action, with the same observation in one step: its frame is recorded
    once; a new observation (or a value replaced in the same dict) is a new step."""
    policy.reset()
    obs = observation(0)
    chunk = policy.predict_action_chunk(obs)
    action = policy.select_action(obs)
    assert policy.seen == 1 and torch.equal(action, chunk[:, 0]) and action.device == policy.device
    obs["observation.state"] = observation(1)["observation.state"]  # the same dict, a new value: a new step
    policy.select_action(obs)
    policy.select_action(observation(2))
    assert policy.seen == 3
    policy.reset()


def test_inputs_at_the_edges(policy):
    image = np.random.RandomState(0).randint(0, 256, (48, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got values in \[.*, 25\d\]"):
        mv.images_to_frames(torch.from_numpy(image).permute(2, 0, 1).float())  # 0..255 as floats
    flipped = image[::-1, ::-1]  # negative strides, as a camera flip gives
    assert torch.equal(mv.images_to_frames(flipped), mv.images_to_frames(np.ascontiguousarray(flipped)))
    obs = {k: (v[0] if k != "task" else v[0]) for k, v in observation(0).items()}
    obs["observation.images.image"] = flipped
    policy.reset()
    assert policy.select_action(obs).shape == (7,)
    m = policy.model
    context = torch.zeros(1, m.video.cfg.in_channels, m.cfg.context_latents, 4, 4)
    proprio = torch.full((1, 1, m.state_dim), float("nan"))
    with pytest.raises(ValueError, match="proprio contains NaN"):
        m.sample_actions(context, torch.zeros(1, 3, m.video.cfg.crossattn_emb_channels), proprio, stop_after_step=2)
    policy.reset()


def test_a_broken_policy_folder_names_the_file(policy, tmp_path):
    folder = tmp_path / "policy"
    for broken, error, message in (
            (lambda: (folder / "stats.json").unlink(), FileNotFoundError, "incomplete: stats.json missing"),
            (lambda: (folder / "action_decoder.safetensors").unlink(), FileNotFoundError,
             "action_decoder.safetensors missing"),
            (lambda: (folder / "config.json").write_text('{"format": "mimic-vid'), mv.CheckpointReadError,
             "cannot read .*config.json"),
            (lambda: (folder / "video_backbone.safetensors").write_bytes(b"\x10\x00"), mv.CheckpointReadError,
             "cannot read .*video_backbone.safetensors")):
        policy.save(folder)
        broken()
        with pytest.raises(error, match=message):
            mv.load_policy(folder)
        with pytest.raises(SystemExit, match="^error: .*" + message):  # sample.py: one line
            sample.main([f"--policy={folder}"])
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: config.json missing"):
        mv.load_policy(folder)


def test_push_to_hub_then_load_by_repo_id(policy, tmp_path, monkeypatch):
    """Policy.push_to_hub uploads the folder Policy.save writes; load_policy("owner/name") loads it (offline: from
    the cache, laid out here as huggingface_hub lays it out)."""
    import huggingface_hub

    cache = tmp_path / "hub"
    calls = []

    def upload_folder(self, repo_id, folder_path, commit_message):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder_path, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id,
                        **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    policy.push_to_hub("someone/my-policy")
    assert calls == [("create", "someone/my-policy"), ("upload", "someone/my-policy", [
        "action_decoder.safetensors", "config.json", "stats.json", "video_backbone.safetensors"])]
    loaded = mv.load_policy("someone/my-policy", cache_dir=cache)
    assert loaded.config == policy.config
    for p in (policy, loaded):
        p.reset()
    assert torch.equal(policy.select_action(observation(0)), loaded.select_action(observation(0)))
    with pytest.raises(FileNotFoundError, match="hf download someone/other"):
        mv.load_policy("someone/other", cache_dir=cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # sample.py reads the default cache
    with pytest.raises(SystemExit, match=r"someone/my-policy reads observation.images.image and 8-D states.*--env=toy"):
        sample.main(["--policy=someone/my-policy", "--episodes=1"])  # loaded from the Hub; a LIBERO policy, not toy
    with pytest.raises(SystemExit, match="^error: could not get the policy 'someone/other' from the Hub"):
        sample.main(["--policy=someone/other"])


def test_load_policy_builds_the_encoders_in_the_requested_dtype(policy, tmp_path):
    policy.save(tmp_path / "policy")
    loaded = mv.load_policy(tmp_path / "policy", dtype=torch.bfloat16)
    assert next(loaded.text_encoder.model.parameters()).dtype == torch.bfloat16  # T5 too, not only the VAE
    assert next(loaded.video_encoder.vae.parameters()).dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16

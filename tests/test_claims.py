"""The claims experiment's pieces: the VLA-style baseline, the VideoVLA-style joint model, and a shortened run of
the whole experiment (one tiny point per method)."""

import csv
import sys
from pathlib import Path

import numpy as np
import torch

import mimic_video as mv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

B = 3


def toy_batch():
    g = torch.Generator().manual_seed(0)
    return dict(context=torch.randn(B, 5, 1, 8, 8, generator=g), future=torch.randn(B, 5, 4, 8, 8, generator=g),
                text=torch.randn(B, 6, 32, generator=g), proprio=torch.randn(B, 1, 2, generator=g),
                actions=torch.randn(B, 8, 2, generator=g))


def vla_model():
    return mv.VLAModel(mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"]), mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"]),
                       mv.VIDEO_ACTION_PRESETS["toy"])


def test_the_vla_baseline_is_the_same_network_trained_end_to_end_without_the_future():
    vla = vla_model()
    mimic = mv.VideoActionModel(mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"]),
                                mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"]),
                                mv.VIDEO_ACTION_PRESETS["toy"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(vla) == count(mimic)  # the same parameters (within 10% is the bar; it is exact)
    batch = toy_batch()
    out = vla("action", **batch, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    tapped = [f"blocks.{i}." for i in range(vla.cfg.tap_block)]
    assert all(p.grad is not None for n, p in vla.video.named_parameters() if any(n.startswith(t) for t in tapped))
    assert torch.allclose(out["tau_v"], mv.sigma_to_tau(torch.tensor(80.0)))  # always the k = 0 noise level
    # the future never reaches it: another future gives the same loss
    other = dict(batch, future=torch.randn_like(batch["future"]))
    again = vla("action", **other, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["loss"], again["loss"])
    frozen = mv.VideoActionModel(mimic.video, mimic.decoder, mv.VIDEO_ACTION_PRESETS["toy"])
    frozen("action", **batch, generator=torch.Generator().manual_seed(1))["loss"].backward()
    assert all(p.grad is None for p in frozen.video.parameters())  # mimic-video's backbone stays frozen in stage 2


def test_the_vla_pretraining_is_an_image_model_of_the_same_frames(tmp_path):
    """--method=vla pretrains the network on the observed frames as still images with their instructions (no
    future frame reaches it, every block and the output layer learn), then trains end to end from those weights;
    --method=scratch starts from random ones."""
    vla, batch = vla_model(), toy_batch()
    video_batch = {k: batch[k] for k in ("context", "future", "text")}
    out = vla("image", **video_batch, generator=torch.Generator().manual_seed(1))
    assert out["per_sample"].shape == (B,) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in vla.video.parameters())
    again = vla("image", **dict(video_batch, future=torch.randn_like(batch["future"])),
                generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["loss"], again["loss"])  # the future is never read
    other = vla("image", **dict(video_batch, context=torch.randn_like(batch["context"])),
                generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out["loss"], other["loss"])  # the present is what it models
    small = ["--num_demos=16", "--num_pretrain=16", "--batch_size=8", "--eval_episodes=2", "--log_every=1"]
    for method in ("vla", "scratch"):
        run = [f"--out_dir={tmp_path / method}", *small, f"--method={method}"]
        if method == "vla":
            train.main([*run, "--stage=pretrain", "--pretrain_steps=2"])
            assert train.read_train_state(tmp_path / "vla" / "pretrain")["step"] == 2
        train.main([*run, "--stage=2", "--stage1_steps=1", "--stage2_steps=1", "--stage2_lr=1e-12"])
    image = mv.load_video_dit(tmp_path / "vla" / "pretrain" / "image.safetensors", None).state_dict()
    for method, starts_there in (("vla", True), ("scratch", False)):
        trained = mv.load_policy(tmp_path / method / "policy").model.video.state_dict()
        block0 = [k for k in trained if k.startswith("blocks.0.")]
        assert all(torch.allclose(trained[k], image[k], atol=1e-6) for k in block0) == starts_there, method


def test_the_joint_model_denoises_video_and_actions_together():
    jcfg = mv.JointConfig(num_steps=4)
    model = mv.JointVideoActionModel(mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"]), jcfg, mv.VIDEO_ACTION_PRESETS["toy"])
    batch = toy_batch()
    calls = []
    real = model.velocities
    model.velocities = lambda *a: calls.append(1) or real(*a)
    out = model("action", **batch, generator=torch.Generator().manual_seed(0))
    assert out["per_sample"].shape == (B,) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.action_head.linear.weight.grad is not None and model.video.final_layer.linear.weight.grad is not None
    with torch.no_grad():
        a = model.sample_actions(batch["context"], batch["text"], batch["proprio"], seed=3)
    assert a.shape == (B, 8, 2) and len(calls) == 1 + 4  # one training forward, then 4 joint steps at inference
    # its own time: the action tokens' time changes the video velocity only through attention, and the video's time
    # is per frame; two different action times give different action velocities for the same video state
    latents, cond = model.window(batch["context"], batch["future"])
    net_in, tau_BT, mask = mv.video2world_inputs(latents, torch.full((B,), 0.5), latents, cond)
    with torch.no_grad():
        _, v1 = real(net_in, tau_BT, batch["text"], mask, batch["proprio"], batch["actions"], torch.full((B,), 0.2))
        _, v2 = real(net_in, tau_BT, batch["text"], mask, batch["proprio"], batch["actions"], torch.full((B,), 0.9))
    assert not torch.allclose(v1, v2)


def test_a_shortened_experiment_writes_every_result(tmp_path, capsys, monkeypatch):
    """One tiny point per method: the pipeline of the full experiment (CSV, plots, latency), in seconds."""
    out = tmp_path / "exp"
    latency = train.experiment_latency
    monkeypatch.setattr(train, "experiment_latency", lambda *a: latency(*a, rounds=3))  # 30 rounds take 20 s
    train.main(["--stage=experiment", f"--out_dir={out}", "--experiment_demos=6", "--experiment_seeds=1",
                "--experiment_convergence=6", "--experiment_eval_every=2", "--experiment_patience=2",
                "--pretrain_steps=2", "--num_pretrain=8", "--stage1_steps=2", "--experiment_steps=8", "--batch_size=8",
                "--eval_episodes=4", "--quick_eval_episodes=4", "--experiment_workers=2"])
    rows = list(csv.DictReader(open(out / "efficiency.csv")))
    assert sorted(r["method"] for r in rows) == ["joint", "mimic-video", "scratch", "vla"]
    assert all(0 <= float(r["success"]) <= 1 and r["demos"] == "6" for r in rows)
    # each stopped within the shared cap of 8 steps on the demonstrations, at or after its best checkpoint
    assert all(int(r["best_step"]) <= int(r["stopped_step"]) <= 8 for r in rows)
    conv = list(csv.DictReader(open(out / "convergence.csv")))
    assert {r["method"] for r in conv} == set(train.EXPERIMENT_METHODS)
    latency = {r["method"]: float(r["ms_per_query"]) for r in csv.DictReader(open(out / "latency.csv"))}
    assert set(latency) == set(train.EXPERIMENT_METHODS) and latency["joint"] > latency["mimic-video"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out
    else:
        assert (out / "efficiency.png").stat().st_size > 0 and (out / "convergence.png").stat().st_size > 0
    joint = mv.load_policy(out / "seed0" / "6demos" / "joint" / "policy")
    assert joint.method == "joint" and isinstance(joint.model, mv.JointVideoActionModel)
    for kind in ("vla", "scratch"):
        policy = mv.load_policy(out / "seed0" / "6demos" / kind / "policy")
        assert policy.method == kind and isinstance(policy.model, mv.VLAModel)
    # the two pretrainings of a seed saw the same videos for the same steps, as a video and as an image model
    for what in ("video", "image"):
        state = train.read_train_state(out / "seed0" / f"pretrain_{what}" / "pretrain")
        assert state["step"] == 2 and state["train"]["num_pretrain"] == 8
    assert (out / "seed0" / "pretrain_image" / "pretrain" / "image.safetensors").exists()
    world = mv.ToyWorldConfig()
    assert mv.toy_rollout(joint, [1, 2], world)["success"].shape == (2,)
    assert np.isfinite(latency["vla"])

"""
Run a trained mimic-video policy in the toy world, in closed loop, and sweep how far the video is denoised.

    python sample.py                                  # the checkpoint train.py wrote, stop_after_step=0
    python sample.py --stop_after_step=0,5,10,20,35   # the paper's tau_v sweep: success per noise level
    python sample.py --tau_v=0.99,0.9,0.5             # the same by flow time
    python sample.py --oracle=true --stop_after_step=0,10,20,35   # condition on noised true futures
    python sample.py --wrong_instruction=true         # name another square: where does the policy go?
    python sample.py --gif=rollout.gif                # rollout beside the imagined future (needs Pillow)
    python sample.py --policy=libero_spatial_full     # released weights from jonpai/mimic-video (GPU)

A policy query = k steps of the Cosmos sampler (k = stop_after_step), one video forward truncated at the
tap block, then 10 Euler steps of the action decoder; 4 of the 8 actions run before the next query.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import mimic_video as mv
from train import baselines, parse_args


@dataclass
class SampleConfig:
    ckpt: str = "out/toy/stage2"  # a stage-2 checkpoint folder; the fused backbone is ../stage1/video_fused.safetensors
    episodes: int = 200  # held-out episodes per setting
    stop_after_step: str = "0"  # comma-separated list of k on the 35-step schedule
    tau_v: str = ""  # comma-separated list of video flow times (instead of stop_after_step)
    oracle: bool = False  # condition on the expert's true future, noised to the same level
    wrong_instruction: bool = False  # the instruction names another square (the decoder never reads it: only
    #                                  the video model can make the policy follow it)
    gif: str = ""  # write the first episodes' rollout next to the imagined futures to this GIF
    policy: str = ""  # a released task (e.g. libero_spatial_full): load jonpai/mimic-video and time a query
    device: str = "auto"
    seed: int = 0


def load_policy(ckpt, device="cpu"):
    """The VideoActionModel train.py wrote: stage-2 decoder + stats, stage-1 fused backbone."""
    import json

    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").exists():
        sys.exit(f"error: no checkpoint in {ckpt}; run `python train.py` first (or pass --ckpt=...)")
    meta = json.loads((ckpt / "config.json").read_text())
    video = mv.load_video_dit(ckpt.parent / "stage1" / "video_fused.safetensors", None, mv.VideoDiTConfig(**meta["video"]), device=device)
    decoder = mv.ActionDecoder(mv.ActionDecoderConfig(**meta["decoder"]))
    sd = {k.removeprefix("decoder."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    mv.load_state_dict_strict(decoder, sd, f"decoder checkpoint {ckpt}")
    stats = json.loads((ckpt / "stats.json").read_text())
    obs_norm = mv.Normalizer.from_stats(stats, ("obs/xy_lowdim",))
    act_norm = mv.Normalizer.from_stats(stats, ("action/xy_lowdim",))
    model = mv.VideoActionModel(video, decoder, mv.VideoActionConfig(**meta["model"]), obs_norm, act_norm)
    return model.to(device).eval().requires_grad_(False)


def timed(policy):
    """Wrap a policy to count its queries and their wall time."""
    def wrapped(obs):
        t0 = time.perf_counter()
        out = policy(obs)
        wrapped.seconds += time.perf_counter() - t0
        wrapped.calls += 1
        return out
    wrapped.seconds, wrapped.calls = 0.0, 0
    return wrapped


def save_gif(model, world, path, episodes=4, stop_after_step=0):
    """Top row per episode: the rollout; bottom row: the plan the decoder read at each query, i.e. the video
    model's x0 prediction at the noise level where partial denoising stopped (at k = 0 one forward from pure
    noise: a blurred average of the futures it considers likely), shown until the next query."""
    try:
        from PIL import Image
    except ImportError:
        sys.exit("error: --gif needs Pillow: pip install pillow")
    seeds = [10**9 + i for i in range(episodes)]
    imagined = []
    policy = mv.toy_policy(model, world, stop_after_step=stop_after_step)
    sigmas = mv.partial_schedule(model.cfg.num_video_steps, stop_after_step)

    def imagining(obs):
        latents, cond = model.window(obs["frame"][:, :, None], None)  # (N, 5, T, S, S)
        eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

        def x0_fn(x_sigma, i):  # as in mv.cosmos_sample
            tau = mv.sigma_to_tau(torch.tensor(float(sigmas[i])))
            return mv.video2world_x0(model.video, (1 - tau) * x_sigma, tau, latents, cond, obs["text"])

        with torch.no_grad():
            plan = x0_fn(mv.rf_ab2_sample(x0_fn, eps, sigmas, stop_after_step), stop_after_step)
        for j in range(world.execute):  # the planned frame shown for each executed step
            imagined.append(plan[:, :, 1 + min(j // world.future_stride, world.future_frames - 1)].numpy())
        return policy(obs)

    success, frames = mv.toy_rollout(imagining, seeds, world, record=True)
    real = frames[:, 1:, :3].clip(-1, 1)  # (N, steps, RGB, S, S); white where the agent covers a square
    fake = np.stack(imagined, axis=1)[:, : real.shape[1], :3].clip(-1, 1)
    pictures = []
    for t in range(real.shape[1]):
        rows = [np.concatenate([real[n, t], fake[n, t]], axis=1) for n in range(episodes)]  # (3, 2S, S) each
        grid = np.concatenate(rows, axis=2)  # (3, 2S, N*S)
        img = ((grid.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8).repeat(8, 0).repeat(8, 1)
        pictures.append(Image.fromarray(img))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=150, loop=0)
    print(f"wrote {path}: {episodes} episodes (success {success.mean():.0%}); top rollout, bottom the plan at k={stop_after_step}")


def released_policy_query(cfg, device):
    """Load a released policy and time one query on placeholder inputs of the real shapes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = mv.load_policy(cfg.policy, device=device, dtype=dtype)
    context = torch.zeros(1, 16, 2, 60, 80, device=device, dtype=dtype)  # Wan2.1 latents of 5 frames at 480x640
    text = torch.zeros(1, 512, 1024, device=device, dtype=dtype)  # T5-11B embeddings
    proprio = torch.zeros(1, 1, 10, device=device, dtype=dtype)
    for k in [int(k) for k in cfg.stop_after_step.split(",")]:
        t0 = time.perf_counter()
        model.sample_actions(context, text, proprio, stop_after_step=k, seed=cfg.seed, numpy_noise=True, raw=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"stop_after_step={k}: one query {time.perf_counter() - t0:.2f} s (placeholder inputs; real ones need the VAE and T5)")


def misinstructed(policy, seeds, world):
    """The policy told to go to the next colour instead of the goal. Returns the wrapped policy and a function
    giving the fraction of episodes whose final position is on the square the wrong instruction named."""
    state = mv.toy_reset(seeds, world)
    n = np.arange(len(seeds))
    named = (state["colours"][n, state["goal"]] + 1) % len(mv.TOY_COLOURS)  # another colour of this scene
    named_pos = state["targets"][n, (state["colours"] == named[:, None]).argmax(1)]  # (N, 2)
    text = mv.toy_text_embedding(named, state["template"], world)
    last = {}

    def wrapped(obs):
        last["agent"], last["chunk"] = obs["state"]["agent"], np.asarray(policy(dict(obs, text=text)), np.float32)
        return last["chunk"]

    def at_named():  # replay the executed part of the last chunk to get the final position
        agent = last["agent"]
        for j in range(world.execute):
            agent = mv.toy_step(agent, last["chunk"][:, j], world)
        return float((np.linalg.norm(agent - named_pos, axis=-1) < world.success_radius).mean())

    return wrapped, at_named


def main(argv):
    cfg = parse_args(argv, SampleConfig)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.policy:
        return released_policy_query(cfg, device)
    model = load_policy(cfg.ckpt, device)
    world = mv.ToyWorldConfig()
    seeds = [10**9 + i for i in range(cfg.episodes)]  # the held-out seeds train.py evaluates on
    if cfg.tau_v:
        settings = [("tau_v", float(v)) for v in cfg.tau_v.split(",")]
    else:
        settings = [("stop_after_step", int(k)) for k in cfg.stop_after_step.split(",")]
    random, expert = baselines(cfg.episodes, cfg.seed, world)
    print(f"{cfg.episodes} held-out episodes; random policy {random:.1%}, scripted expert {expert:.1%}"
          + ("; ORACLE: conditioned on the expert's noised future" if cfg.oracle else ""))
    print(f"{'setting':>22} {'tau_v':>8} {'success':>8} {'ms/query':>9}")
    for name, value in settings:
        kw = {name: value}
        tau_v = value if name == "tau_v" else float(mv.sigma_to_tau(mv.karras_sigmas(35)[value]))
        policy = mv.toy_policy(model, world, oracle=cfg.oracle, seed=cfg.seed, **kw)
        if cfg.wrong_instruction:
            policy, named = misinstructed(policy, seeds, world)
        policy = timed(policy)
        rate = mv.toy_rollout(policy, seeds, world).mean()
        ms = 1000 * policy.seconds / policy.calls / cfg.episodes  # per query of one episode (batched)
        print(f"{name + '=' + str(value):>22} {tau_v:>8.4f} {rate:>8.1%} {ms:>9.2f}"
              + (f"   ends at the named square: {named():.1%}" if cfg.wrong_instruction else ""))
    if cfg.gif:
        save_gif(model, world, cfg.gif, stop_after_step=settings[0][1] if settings[0][0] == "stop_after_step" else 0)


if __name__ == "__main__":
    main(sys.argv[1:])

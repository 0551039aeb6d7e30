"""
Train mimic-video: the whole recipe, on the toy world in minutes on a CPU.

    python train.py                              # demos, pretrain, stage 1, stage 2, closed-loop eval
    python train.py --stage=2 --stage2_steps=500 # one stage alone (reads the previous stage's checkpoint)
    python train.py --stage=2 --resume=true      # continue exactly where the last checkpoint stopped
    torchrun --nproc_per_node=2 train.py         # DistributedDataParallel (gloo on CPU, nccl on GPU)

Stages (mimic_video.py holds the model; this file is the training loop):
    pretrain  a video model learns how the toy world moves from videos of other episodes (stands in
              for Cosmos' pretraining on internet video; --pretrain_data=play: the expert at random speeds)
    1         LoRA on that backbone with the expert's demonstrations (official stage-1 recipe, scaled down:
              adapters on q/k/v/output/x_embedder/t-MLP/MLP, adaLN trained fully, constant lr)
    2         the action decoder on the frozen, LoRA-fused backbone, reading block-2-of-4 hidden states of
              a partially denoised video (official stage 2: tau_v and tau_a independent, loss x10,
              proprio masked 20%, lr warmup then linear decay)
Optimiser as in the paper (AdamW, weight decay 0.1, betas (0.9, 0.99), gradient clip 10) with learning
rates scaled up for models of 0.1-0.4M parameters. bf16 autocast on CUDA, fp32 on CPU.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import mimic_video as mv


@dataclass
class TrainConfig:
    stage: str = "all"  # "all" = pretrain, 1, 2 and eval; or one of "pretrain", "1", "2", "eval"
    out_dir: str = "out/toy"  # checkpoints: <out_dir>/{pretrain,stage1,stage2}/
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False  # torch.compile the model
    # data: the toy world
    num_demos: int = 2000  # expert demonstrations (stages 1 and 2)
    num_pretrain: int = 4000  # pretraining videos (other episodes than the demonstrations)
    eval_episodes: int = 200  # held-out seeds for the closed-loop evaluation
    # models: presets of mimic_video.py
    video_preset: str = "toy"
    decoder_preset: str = "toy"
    model_preset: str = "toy"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    # optimisation
    batch_size: int = 64  # global batch (split across DDP ranks)
    pretrain_steps: int = 4000
    pretrain_lr: float = 1e-3  # cosine decay to 0.1 x (stands in for Cosmos' own pretraining)
    pretrain_data: str = "expert"  # "expert": the expert in other episodes; "play": the expert at random speeds
    stage1_steps: int = 300
    stage1_lr: float = 1e-3  # constant
    stage2_steps: int = 6000
    stage2_lr: float = 1e-3  # peak; the paper: 1e-4 at 0.5B
    stage2_warmup: int = 100  # linear warmup, then linear decay to 0.2 x peak (official LambdaLinearScheduler)
    weight_decay: float = 0.1
    grad_clip: float = 10.0
    # logging, evaluation, checkpoints
    log_every: int = 100
    ckpt_every: int = 500  # checkpoint (and, in stage 2, a quick closed-loop eval) every this many steps
    resume: bool = False  # continue the stage from its checkpoint (weights, optimizer, step)
    stop_after_step: int = 0  # the policy query of the eval: k = 0 is one video forward at sigma = 80

    def validate(self):
        if self.stage not in ("all", "pretrain", "1", "2", "eval"):
            raise ValueError(f"--stage must be all, pretrain, 1, 2 or eval, got {self.stage!r}")
        if self.pretrain_data not in ("play", "expert"):
            raise ValueError(f"--pretrain_data must be play or expert, got {self.pretrain_data!r}")


# ----------------------------------------------------------------------------------------------
# setup: distributed, device, precision

def setup(cfg):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        rank, world = 0, 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    if cfg.batch_size % world:
        sys.exit(f"error: --batch_size={cfg.batch_size} must be divisible by the {world} processes")
    return rank, world, device, autocast


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def barrier(world):
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# data: cached demonstrations, normalization statistics

def load_demos(kind, cfg, world_cfg, rank, world):
    """Expert demos or pretraining videos, made once and cached under out_dir (rank 0 writes, atomically)."""
    if kind == "demos":
        n, seed, speeds = cfg.num_demos, cfg.seed, None
    else:  # pretraining videos, of other episodes: the expert ("expert") or the expert at random speeds ("play")
        n, seed = cfg.num_pretrain, cfg.seed + 1
        speeds = (0.3 * world_cfg.max_speed, world_cfg.max_speed) if kind == "play" else None
    path = Path(cfg.out_dir) / f"{kind}_{n}_seed{seed}.npz"
    if rank == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = mv.make_toy_demos(n, seed, world_cfg, speeds)
        mv.atomic_write(path, lambda p: np.savez(open(p, "wb"), **data))
    barrier(world)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def toy_stats(demos, world_cfg, representation):
    """Per-chunk-step statistics of the proprio and the action chunks over every training sample (each episode up to
    its arrival), with the same end-of-episode padding as the training batches (`mv.episode_chunks`)."""
    lengths = mv.toy_demo_lengths(demos)
    chunks = np.concatenate([mv.episode_chunks(demos["actions"][e], np.arange(n), world_cfg.chunk, pad="zero")
                             for e, n in enumerate(lengths)])  # (samples, chunk, 2)
    states = np.concatenate([demos["agent"][e, :n] for e, n in enumerate(lengths)])[:, None]  # (samples, 1, 2)
    return representation.stats(states, chunks)


def model_inputs(batch, model, encoders, representation):
    """Raw samples -> what the model trains on: encoded context and future latents, text embeddings, and (when the
    model has normalizers) normalized proprio and action chunks in the decoder's representation."""
    video_encoder, text_encoder = encoders
    latents = video_encoder.encode(torch.cat([batch["context"], batch["future"]], dim=2))  # (B, C, T, h, w)
    Tc = model.cfg.context_latents
    out = {"context": latents[:, :, :Tc], "future": latents[:, :, Tc:], "text": text_encoder(batch["task"])}
    if model.obs_normalizer is not None:
        out["proprio"] = model.obs_normalizer.normalize(representation.state_to_model(batch["state"]))[:, None]
        out["actions"] = model.action_normalizer.normalize(representation.action_to_model(batch["actions"]))
    return out


# ----------------------------------------------------------------------------------------------
# models

def build_model(cfg, device, video=None, stats=None, representation=None):
    video = video if video is not None else mv.VideoDiT(mv.make_config(mv.VideoDiTConfig, cfg.video_preset, mv.VIDEO_DIT_PRESETS))
    if video.cfg.in_channels != 5:
        sys.exit("error: the toy world's frames become 5-channel latents (RGB + x, y); real presets need a latent "
                 "dataset, which plugs into the same seam (mimic_video.toy_batch)")
    decoder = mv.ActionDecoder(mv.make_config(mv.ActionDecoderConfig, cfg.decoder_preset, mv.ACTION_DECODER_PRESETS))
    obs_norm, act_norm = representation.normalizers(stats) if stats is not None else (None, None)
    va_cfg = mv.make_config(mv.VideoActionConfig, cfg.model_preset, mv.VIDEO_ACTION_PRESETS)
    return mv.VideoActionModel(video, decoder, va_cfg, obs_norm, act_norm).to(device)


# ----------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, optimizer and step beside them, each file written atomically

def save_checkpoint(directory, tensors, opt, step, meta):
    directory.mkdir(parents=True, exist_ok=True)
    mv.atomic_write(directory / "model.safetensors", lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, p))
    mv.atomic_write(directory / "optim.pt", lambda p: torch.save({"optimizer": opt.state_dict(), "step": step}, p))
    mv.atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def resume_from(directory, model, opt):
    """Load the trainable weights and the optimizer; return the step to continue from."""
    params = trainable(model)
    sd = load_file(directory / "model.safetensors")
    mv.check_state_dict(params, sd, f"checkpoint {directory}")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)
    state = torch.load(directory / "optim.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


# ----------------------------------------------------------------------------------------------
# the training loop, shared by all stages

def lr_schedule(stage, cfg, steps):
    if stage == 0:  # pretraining: cosine decay to 0.1 x
        return lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
    if stage == 1:
        return lambda step: 1.0  # LoRA stage 1 trains at a constant lr, as in the paper
    warm = max(1, cfg.stage2_warmup)
    return lambda step: (step + 1) / warm if step < warm else 0.2 + 0.8 * (steps - step) / max(1, steps - warm)


def train_stage(name, stage, model, demos, steps, lr, cfg, world_cfg, env, encoders, representation, on_checkpoint=None):
    """AdamW over the trainable parameters; per-step randomness from (seed, stage, step) alone."""
    rank, world, device, autocast = env
    params = list(trainable(model).values())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=cfg.weight_decay)
    directory = Path(cfg.out_dir) / name
    start = resume_from(directory, model, opt) if cfg.resume and (directory / "optim.pt").exists() else 0
    if start:
        log(rank, f"{name}: resuming at step {start}")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    sched = lr_schedule(stage, cfg, steps)
    B, b = cfg.batch_size, cfg.batch_size // world
    shard = slice(rank * b, (rank + 1) * b)
    S, F = world_cfg.image_size, world_cfg.future_frames
    latent_shape = (model.video.cfg.in_channels, model.cfg.latent_frames, S, S)
    action_shape = (world_cfg.chunk, model.decoder.cfg.out_channels)
    bins, window, t0 = np.linspace(0, 1, 5), [], time.perf_counter()
    lengths = mv.toy_demo_lengths(demos)  # steps are drawn from each episode up to its arrival
    loss = "action" if stage == 2 else "video"  # pretraining (stage 0) and stage 1 train the video model
    bar = tqdm(range(start, steps), desc=name, disable=rank != 0 or not sys.stderr.isatty(), initial=start, total=steps)
    model.train()
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 100_003 + step)
        episodes = torch.randint(len(demos["agent"]), (B,), generator=g).numpy()
        t = (torch.rand(B, generator=g).numpy() * lengths[episodes]).astype(np.int64)[shard]
        episodes = episodes[shard]
        inputs = model_inputs(mv.toy_batch(demos, episodes, t, world_cfg), model, encoders, representation)
        if loss == "video":
            inputs = {k: inputs[k] for k in ("context", "future", "text")}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        noise = {k: v[shard].to(device) for k, v in model.draw_noise(loss, B, latent_shape, action_shape, g).items()}
        for group in opt.param_groups:
            group["lr"] = lr * sched(step)
        with autocast:
            out = net(loss, **inputs, noise=noise)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"{name} step {step}: loss is {out['loss'].item()} (NaN/inf); lower the learning rate")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tau = out["tau_a"] if stage == 2 else out["tau_v"]
        window.append((tau.detach().cpu().numpy(), out["per_sample"].cpu().numpy()))
        bar.set_postfix(loss=f"{out['loss'].item():.4f}")
        last = step + 1 == steps
        if (step + 1) % cfg.log_every == 0 or last:
            taus, losses = map(np.concatenate, zip(*window))
            which = np.clip(np.digitize(taus, bins) - 1, 0, len(bins) - 2)
            binned = " ".join(f"{losses[which == i].mean():.3f}" if (which == i).any() else "-" for i in range(len(bins) - 1))
            ms = 1000 * (time.perf_counter() - t0) / len(window)
            log(rank, f"{name} step {step + 1}/{steps} | loss {losses.mean():.4f} | by {'tau_a' if stage == 2 else 'tau_v'} "
                      f"[0,.25,.5,.75,1]: {binned} | lr {lr * sched(step):.2e} | {ms:.0f} ms/step")
            window, t0 = [], time.perf_counter()
        if (step + 1) % cfg.ckpt_every == 0 or last:  # eval + checkpoint, in one block
            if rank == 0:
                meta = {"train": asdict(cfg), "world": asdict(world_cfg), "video": asdict(model.video.cfg),
                        "decoder": asdict(model.decoder.cfg), "model": asdict(model.cfg), "stage": name}
                save_checkpoint(directory, trainable(model), opt, step + 1, meta)
                if on_checkpoint is not None:
                    on_checkpoint(step + 1)
            barrier(world)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# evaluation

def evaluate(policy, episodes, world_cfg):
    """Closed-loop success of a policy on held-out toy episodes."""
    seeds = [mv.TOY_EVAL_SEEDS + i for i in range(episodes)]
    return float(mv.toy_rollout(policy, seeds, world_cfg)["success"].mean())


# ----------------------------------------------------------------------------------------------
# the recipe

def main(argv):
    cfg = mv.parse_config(argv, TrainConfig)
    env = rank, world, device, autocast = setup(cfg)
    torch.manual_seed(cfg.seed)
    world_cfg = mv.ToyWorldConfig()
    out = Path(cfg.out_dir)
    log(rank, "config:", json.dumps(asdict(cfg)))
    log(rank, f"device {device}, {world} process(es), {torch.get_num_threads()} thread(s) each")
    stages = ("pretrain", "1", "2", "eval") if cfg.stage == "all" else (cfg.stage,)
    t_start = time.perf_counter()
    # the policy around the model: the toy world's camera, encoders (pixels, hashed words) and representation
    policy_cfg = mv.make_config(mv.PolicyConfig, "toy", mv.POLICY_PRESETS, stop_after_step=cfg.stop_after_step)
    encoders = (mv.build_video_encoder(policy_cfg.video_encoder, device), mv.build_text_encoder(policy_cfg.text_encoder))
    representation = mv.Representation.from_config(policy_cfg.representation)

    if "pretrain" in stages:
        videos = load_demos(cfg.pretrain_data, cfg, world_cfg, rank, world)
        model = build_model(cfg, device)
        model.decoder.requires_grad_(False)
        train_stage("pretrain", 0, model, videos, cfg.pretrain_steps, cfg.pretrain_lr, cfg, world_cfg, env, encoders, representation)
        if rank == 0:
            mv.save_video_dit_checkpoint(model.video, out / "pretrain" / "video.safetensors")
        barrier(world)

    if "1" in stages:
        demos = load_demos("demos", cfg, world_cfg, rank, world)
        video = mv.load_video_dit(out / "pretrain" / "video.safetensors", None, device=device)
        mv.inject_lora(video, mv.LoRAConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha))
        model = build_model(cfg, device, video)
        model.decoder.requires_grad_(False)
        train_stage("stage1", 1, model, demos, cfg.stage1_steps, cfg.stage1_lr, cfg, world_cfg, env, encoders, representation)
        if rank == 0:  # the released-backbone layout (LoRA fused, `net.` keys) and a PEFT adapter
            mv.save_video_dit_checkpoint(model.video, out / "stage1" / "video_fused.safetensors")
            mv.save_lora_adapter(model.video, out / "stage1" / "adapter")
        barrier(world)

    if "2" in stages:
        demos = load_demos("demos", cfg, world_cfg, rank, world)
        stats = toy_stats(demos, world_cfg, representation)
        video = mv.load_video_dit(out / "stage1" / "video_fused.safetensors", None, device=device)
        model = build_model(cfg, device, video.requires_grad_(False), stats, representation)
        policy = mv.Policy(model, policy_cfg, *encoders)

        def quick_eval(step):
            rate = evaluate(policy, 50, world_cfg)  # puts the model in eval mode
            model.train()
            log(rank, f"stage2 step {step}: closed-loop success {rate:.0%} on 50 held-out episodes")

        train_stage("stage2", 2, model, demos, cfg.stage2_steps, cfg.stage2_lr, cfg, world_cfg, env, encoders, representation,
                    on_checkpoint=None if cfg.stage2_steps < cfg.ckpt_every else quick_eval)
        if rank == 0:  # the policy folder: what mv.load_policy and sample.py read
            policy.save(out / "policy")
            log(rank, f"wrote the policy to {out / 'policy'}")
        barrier(world)

    if "eval" in stages and rank == 0:
        policy = mv.load_policy(out / "policy", device=device, stop_after_step=cfg.stop_after_step)
        seeds = [mv.TOY_EVAL_SEEDS + i for i in range(cfg.eval_episodes)]
        random, expert = mv.toy_baselines(seeds, world_cfg, cfg.seed)
        rate = evaluate(policy, cfg.eval_episodes, world_cfg)
        tau_v = float(mv.sigma_to_tau(mv.karras_sigmas(35)[cfg.stop_after_step]))
        print(f"\nclosed-loop success on {cfg.eval_episodes} held-out episodes:")
        print(f"  random policy     {random:6.1%}")
        print(f"  scripted expert   {expert:6.1%}")
        print(f"  mimic-video       {rate:6.1%}   (stop_after_step={cfg.stop_after_step}, tau_v={tau_v:.4f})")
    log(rank, f"done in {time.perf_counter() - t_start:.0f} s")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

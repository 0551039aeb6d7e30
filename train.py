"""
Train mimic-video: the whole recipe, on the toy world in minutes on a CPU, or on a LeRobot dataset.

    python train.py                              # demos, pretrain, stage 1, stage 2, closed-loop eval
    python train.py --stage=2 --stage2_steps=500 # one stage alone (reads the previous stage's output)
    python train.py --resume=true                # continue exactly where the last checkpoints stopped
    torchrun --nproc_per_node=2 train.py         # DistributedDataParallel (gloo on CPU, nccl on GPU)
    python train.py --data=PATH                  # a LeRobot dataset (v3.0 / v2.1): encode, pretrain, 1, 2 -> policy
    python train.py --stage=export --out_dir=data/toy   # the toy world's demonstrations as a LeRobot dataset
    python train.py --method=vla                 # a comparison: vla (image-pretrained), scratch or joint
    python train.py --stage=experiment           # the paper's claims in miniature: the four methods compared

Stages (mimic_video.py holds the model; this file is the training loop):
    pretrain  a video model learns how the toy world moves from videos of other episodes (stands in
              for Cosmos' pretraining on internet video; --pretrain_data=play: the expert at random speeds)
    1         LoRA on that backbone with the expert's demonstrations (official stage-1 recipe, scaled down:
              adapters on q/k/v/output/x_embedder/t-MLP/MLP, adaLN trained fully, constant lr)
    2         the action decoder on the frozen, LoRA-fused backbone, reading block-2-of-4 hidden states of
              a partially denoised video (official stage 2: tau_v and tau_a independent, loss x10,
              proprio masked 20%, lr warmup then linear decay); writes the policy folder <out_dir>/policy
Optimiser as in the paper (AdamW, weight decay 0.1, betas (0.9, 0.99), gradient clip 10) with learning
rates scaled up for models of 0.1-0.4M parameters. bf16 autocast on CUDA, fp32 on CPU.

Nothing is lost: a run holds its output folder (a second run into it stops), each checkpoint is one folder
swapped in whole, and --resume=true continues exactly or refuses, naming what changed.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import mimic_video as mv


@dataclass
class TrainConfig:
    # "all": every stage the method has (pretrain, 1, 2, then eval; with --data: encode, pretrain, 1, 2); or one of
    # "export", "encode", "pretrain", "1", "2", "eval", "benchmark", "experiment"
    stage: str = "all"
    # "mimic-video"; "vla": the same network, its backbone pretrained on the same frames as static images with their
    # instructions (no future), then trained end to end; "scratch": the same, not pretrained at all; "joint":
    # VideoVLA-style, video and actions denoised together by the pretrained video DiT
    method: str = "mimic-video"
    out_dir: str = "out/toy"  # <out_dir>/{pretrain,stage1,stage2}/ and the policy folder <out_dir>/policy
    seed: int = 0  # the data, the initialisation and every training draw
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"
    compile: bool = False  # torch.compile the model
    # data: the toy world
    num_demos: int = 2000  # expert demonstrations (stages 1 and 2)
    num_pretrain: int = 4000  # pretraining videos (other episodes than the demonstrations)
    eval_episodes: int = 200  # held-out seeds for the closed-loop evaluation
    # data: a LeRobot dataset instead of the toy world (encoded once into <out_dir>/cache by --stage=encode)
    data: str = ""  # a LeRobot dataset folder (v3.0 or v2.1) or Hub id; empty: the built-in toy world
    pretrain_videos: str = ""  # another LeRobot dataset to pretrain the video model on (default: --data's own videos)
    camera: str = ""  # the camera to read (e.g. "image" for observation.images.image; needed when there are several)
    state_key: str = "observation.state"  # the dataset feature holding the proprio state
    action_key: str = "action"  # the dataset feature holding the actions
    # window timing: "small" (toy-like: 1 frame, 4 future frames, 8 actions), "libero" (official), "bridge"
    timing: str = "small"
    image_size: str = "32x32"  # HxW every frame is resized to (the official LIBERO data: 480x640)
    video_encoder: str = "pixels"  # "pixels" (the pixel-patch stand-in, CPU) or "wan" (the Wan2.1 VAE, --vae_source)
    pixel_patch: int = 4  # pixels: each 4 x 4 pixel patch one latent pixel (32x32 frames -> 8x8 latents)
    # pixels: the lowest keep x keep DCT frequencies of each patch, 3 keep^2 channels (1: its average colour; 0: all,
    # space-to-depth). The default keeps the toy DiT's tokens (4 x 4 latent pixels) within its width: 48 numbers.
    pixel_keep: int = 1
    pixel_coords: bool = False  # pixels: two more channels, each latent pixel's x, y (the toy world's encoder has them)
    pixel_mean: float = 0.0  # pixels: latents = (frames - mean) / std, as the VAE normalizes its latents
    pixel_std: float = 1.0  # pixels: see pixel_mean
    vae_source: str = mv.COSMOS_HUB_REPO  # wan: a diffusers repo or folder holding the VAE (subfolder "vae")
    text_encoder: str = "hashed"  # "hashed" (hashed words, CPU) or "t5" (--t5_source)
    text_tokens: int = 16  # hashed words: instruction length after padding / truncation (T5: 512)
    t5_source: str = "google-t5/t5-11b"  # t5: a transformers repo or folder (the official text encoder)
    representation: str = "identity"  # "identity" (any state/action dims) or "libero" (8-D state, 7-D action -> 10-D)
    val_fraction: float = 0.1  # episodes held out for the validation loss (0: none)
    anchor_stride: int = 1  # a training window at every this-many frames of each episode
    cache_dtype: str = "float32"  # latents in the cache: float32, or float16 / bfloat16 for big datasets
    video_init: str = ""  # a pretrained backbone to start stage 1 from (file, folder or Hub repo id); empty: pretrain
    # with a Hub repo id: the file in it (e.g. model-480p-10fps.pt, what mimic-video started from)
    video_init_file: str = ""
    n_action_steps: int = 0  # actions executed per query by the trained policy (0: half the chunk; official 5 of 60)
    # models: presets of mimic_video.py
    video_preset: str = "toy"  # VIDEO_DIT_PRESETS: "toy", "tiny" or "cosmos-predict2-2b" (the released 2B)
    decoder_preset: str = "toy"  # ACTION_DECODER_PRESETS: "toy", "tiny", "libero", "bridge"
    model_preset: str = "toy"  # VIDEO_ACTION_PRESETS: the tap block and the window ("mimic-video": official)
    lora_rank: int = 16  # stage 1 LoRA rank (official 256)
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank (official 32 / 256)
    # optimisation
    batch_size: int = 64  # global batch (split across DDP ranks)
    # micro-batches per step on each rank (the same update in less memory: batch_size / (ranks x this))
    grad_accum: int = 1
    pretrain_steps: int = 4000  # optimiser steps of the video (vla: image) pretraining
    pretrain_lr: float = 1e-3  # cosine decay to 0.1 x (stands in for Cosmos' own pretraining)
    pretrain_data: str = "expert"  # "expert": the expert in other episodes; "play": the expert at random speeds
    stage1_steps: int = 300  # LoRA steps on the demonstrations' videos
    stage1_lr: float = 1e-3  # constant
    stage2_steps: int = 12000  # the toy decoder still improves after 6000 (two seeds: 92.5, 88.5% -> 96.5, 94.5%)
    stage2_lr: float = 1e-3  # peak; the paper: 1e-4 at 0.5B
    stage2_warmup: int = 100  # linear warmup, then linear decay to 0.2 x peak (official LambdaLinearScheduler)
    weight_decay: float = 0.1  # AdamW, every stage
    grad_clip: float = 10.0  # max global gradient norm
    # every stage that trains the video DiT: recompute its blocks in the backward
    activation_checkpointing: bool = False
    # logging, evaluation, checkpoints
    log_every: int = 100  # a loss line (binned by flow time) every this many steps
    ckpt_every: int = 500  # checkpoint (and, in stage 2, a quick closed-loop eval) every this many steps
    # stage 2: stop when the validation score (toy world: quick-eval success on validation episodes; a dataset: the
    # validation loss) has not improved for this many steps, and keep the best checkpoint's weights (0: train all)
    patience: int = 0
    quick_eval_episodes: int = 50  # toy world: episodes of each quick eval (also written to <stage>/quick_evals.csv)
    resume: bool = False  # continue each stage from its checkpoint (weights, optimizer, step), exactly
    overwrite: bool = False  # start the stages over, replacing the checkpoints they have in out_dir
    allow_config_change: str = ""  # on resume, fields that may differ from the checkpoint's (comma-separated, or "all")
    stop_after_step: int = 0  # the policy query of the eval: k = 0 is one video forward at sigma = 80
    # --stage=experiment: the four methods on nested demonstration sets, each to convergence within one cap
    experiment_demos: str = "25,100,500,2000"  # the nested demonstration counts
    experiment_seeds: int = 2  # seeds per point (each with its own pretraining)
    experiment_workers: int = 2  # training processes at once, one thread each
    experiment_steps: int = 3000  # the cap: optimiser steps on the demonstrations (mimic-video: stage 1 + stage 2)
    experiment_eval_every: int = 250  # a quick eval on the validation episodes every this many steps ...
    experiment_patience: int = 750  # ... and a stop when the best is this many steps old
    experiment_convergence: int = 100  # the convergence curve: these demonstrations, seed 0

    def validate(self):
        """Every value checked before any data is made or model built (mv.parse_config turns errors into one line)."""
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.data and self.stage in ("eval", "export", "experiment"):
            raise ValueError(f"--stage={self.stage} is for the toy world; with --data there is no simulator to "
                             f"evaluate in (load the policy folder with mv.load_policy and run it on your robot "
                             "or simulator)")
        if self.stage == "experiment":  # it sets its runs' methods, demonstrations, seeds and stage-2 steps itself
            given = [f for f in mv.changed_fields(self) if not f.startswith("experiment_")
                     and f not in EXPERIMENT_SHARED + ("stage", "out_dir", "eval_episodes")]
            if given:
                shared = ", ".join("--" + f for f in EXPERIMENT_SHARED)
                raise ValueError(f"--{given[0]} does not apply to --stage=experiment (its runs take --experiment_*, "
                                 f"--eval_episodes and {shared})")
        if self.data and self.video_preset == "toy" and self.video_encoder == "wan":
            raise ValueError("--video_encoder=wan makes 16-channel latents for the real video DiT: use "
                             "--video_preset=cosmos-predict2-2b")
        choices = {"timing": ("small", "libero", "bridge"), "video_encoder": ("pixels", "wan"),
                   "text_encoder": ("hashed", "t5"),
                   "representation": ("identity", "libero"), "cache_dtype": ("float32", "float16", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.image_hw()
        if self.pixel_std <= 0 or not 0 <= self.pixel_keep <= self.pixel_patch:
            raise ValueError(f"--pixel_std must be positive and --pixel_keep in [0, --pixel_patch], got "
                             f"{self.pixel_std}, {self.pixel_keep}")
        small = min(self.anchor_stride, self.pixel_patch, self.text_tokens)
        if not 0 <= self.val_fraction < 1 or small < 1 or self.n_action_steps < 0:
            raise ValueError("--val_fraction must be in [0, 1), --anchor_stride, --pixel_patch and --text_tokens at "
                             "least 1, --n_action_steps at least 0")
        # an option of the other data source would be ignored: say so
        other = TOY_FIELDS if self.data else DATASET_FIELDS
        given = mv.changed_fields(self, other)
        if given and self.data:
            raise ValueError(f"--{given[0]} applies to the toy world; with --data the dataset's episodes are used")
        if given:
            raise ValueError(f"--{given[0]} applies to a LeRobot dataset (--data=PATH); the toy world has its own "
                             "camera, encoders and timing")
        if self.data and not (Path(self.data).is_dir() or self.data.count("/") == 1):
            raise ValueError(f"--data={self.data}: no such folder (and not a Hub dataset id owner/name)")
        if self.pretrain_videos and not Path(self.pretrain_videos).is_dir():
            raise ValueError(f"--pretrain_videos={self.pretrain_videos}: no such folder")
        if self.pretrain_videos and (self.video_init or self.method == "scratch"):  # they would be encoded, unused
            raise ValueError("--pretrain_videos are what pretraining learns from; " +
                             ("--video_init starts from a pretrained backbone" if self.video_init else
                              "--method=scratch has no pretraining") + ": drop one of the two")
        if self.pretrain_data not in ("play", "expert"):
            raise ValueError(f"--pretrain_data must be play or expert, got {self.pretrain_data!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.stage == "1" and self.method != "mimic-video":  # the stages a method does not have (see stages_of)
            raise ValueError(f"--stage=1 is mimic-video's LoRA stage; --method={self.method} trains in stage 2 alone")
        if self.stage == "pretrain" and (self.method == "scratch" or self.video_init):
            raise ValueError("--method=scratch starts from random weights: it has no pretraining" if not self.video_init
                             else "--video_init is the pretrained backbone: there is no pretraining to run")
        if self.video_init and self.method in ("vla", "scratch"):
            raise ValueError(f"--video_init is a video backbone for mimic-video or joint; --method={self.method} "
                             "starts from its own image pretraining (vla) or from nothing (scratch)")
        if self.video_init_file and Path(self.video_init).is_file():
            raise ValueError(f"--video_init={self.video_init} is a file: --video_init_file={self.video_init_file!r} "
                             "names a file inside a folder or a Hub repo (drop one of the two)")
        if not self.out_dir.strip():
            raise ValueError("--out_dir must not be empty")
        out = Path(self.out_dir).absolute()
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out_dir={self.out_dir} is a file, not a folder")
        ancestor = existing_folder(out)  # where the run's folders will be made
        if not os.access(ancestor, os.W_OK):
            raise ValueError(f"--out_dir={self.out_dir}: {ancestor} is not writable")
        mv.check_device(self.device, self.compile)
        for name, presets in (("video_preset", mv.VIDEO_DIT_PRESETS), ("decoder_preset", mv.ACTION_DECODER_PRESETS),
                              ("model_preset", mv.VIDEO_ACTION_PRESETS)):
            if getattr(self, name) not in presets:
                raise ValueError(f"--{name}={getattr(self, name)!r} is not a preset; choose from {sorted(presets)}")
        for name in ("num_demos", "num_pretrain", "eval_episodes", "lora_rank", "batch_size", "grad_accum",
                     "pretrain_steps",
                     "stage1_steps", "stage2_steps", "log_every", "ckpt_every", "quick_eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("pretrain_lr", "stage1_lr", "stage2_lr", "lora_alpha", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if min(self.seed, self.stage2_warmup, self.patience) < 0 or not 0 <= self.weight_decay < math.inf:
            raise ValueError("--seed, --stage2_warmup, --patience and --weight_decay must be >= 0")
        if self.patience and self.data and self.val_fraction == 0:
            raise ValueError("--patience stops on the validation loss: it needs held-out episodes (--val_fraction > 0)")
        if not 0 <= self.stop_after_step <= 35:
            raise ValueError(f"--stop_after_step must be in [0, 35], got {self.stop_after_step}")
        try:
            ok = all(int(n) >= 1 for n in self.experiment_demos.split(","))
        except ValueError:
            ok = False
        if not ok or min(self.experiment_seeds, self.experiment_workers, self.experiment_eval_every,
                         self.experiment_convergence, self.experiment_steps, self.experiment_patience) < 1:
            raise ValueError("--experiment_demos must be comma-separated counts >= 1; the other --experiment_* "
                             "values at least 1")
        if self.resume and self.overwrite:
            raise ValueError("--resume=true and --overwrite=true contradict each other: choose one")
        unknown = set(self.changeable()) - {f for f in TrainConfig.__dataclass_fields__} - {"all"}
        if unknown:
            raise ValueError(f"--allow_config_change names unknown fields {sorted(unknown)}")

    def changeable(self):
        return [f for f in self.allow_config_change.split(",") if f]

    def image_hw(self):
        try:
            h, w = (int(v) for v in self.image_size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image_size must be HxW (e.g. 32x32 or 480x640), got {self.image_size!r}") from None
        if h < 1 or w < 1:
            raise ValueError(f"--image_size must be positive, got {self.image_size!r}")
        return h, w


STAGES = ("all", "export", "encode", "pretrain", "1", "2", "eval", "benchmark", "experiment")
METHODS = ("mimic-video", "vla", "scratch", "joint")


def existing_folder(path):
    """`path`, or the nearest folder above it that exists: where the run's folders will be made."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


# ----------------------------------------------------------------------------------------------
# setup: distributed, device, precision

def setup(cfg):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if ddp:  # the ranks wait for rank 0 while it writes a checkpoint (GBs at real scale): an hour, not NCCL's 10 min
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        rank, world = 0, 1
    index = int(os.environ.get("LOCAL_RANK", 0)) if ddp or ":" not in cfg.device else int(cfg.device[5:])
    device = torch.device(f"cuda:{index}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    if cfg.batch_size % (world * cfg.grad_accum):
        sys.exit(f"error: --batch_size={cfg.batch_size} must be divisible by the {world} process(es) x --grad_accum="
                 f"{cfg.grad_accum}")
    return rank, world, device, autocast


def frozen_dtype(autocast):
    """The dtype frozen weights load in: the file's own (the 2B backbone: bf16) under autocast, else float32 (a CPU
    without autocast cannot mix bf16 weights with fp32 activations). Trained weights are fp32 either way."""
    return None if isinstance(autocast, torch.autocast) else torch.float32


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def barrier(world):
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# the run's folder: one run at a time, checkpoints as one unit, resume exact or refused

class RunLock:
    """<out_dir>/.lock, created exclusively, names the run that holds the folder (host and pid). A second run into
    the folder stops with that name; a lock whose process is gone from this host is stale and is taken over, with
    a line in the log. (A pid reused by another process keeps the lock: delete it by hand, as the message says.)"""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.held = False

    @staticmethod
    def _alive(owner):
        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: cannot tell, so it is not taken over
        if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there, not ask about it
            return True
        try:
            os.kill(owner["pid"], 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        return True

    def acquire(self, log_fn=print):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner and self._alive(owner):
                    sys.exit(f"error: {self.path.parent} is in use by another run (pid {owner.get('pid')} on "
                             f"{owner.get('host')}, since {owner.get('since')}: {owner.get('command', '?')}); wait for "
                             f"it to finish or choose another --out_dir (if that run is surely gone, delete "
                             f"{self.path})")
                log_fn(f"taking over a stale lock of pid {owner.get('pid')} (no such process any more): {self.path}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        sys.exit(f"error: could not take the lock {self.path}")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


CHECKPOINT = "checkpoint"  # <out_dir>/<stage>/checkpoint/: model.safetensors, optim.pt, train_state.json

# The fields each stage's result depends on: changing one makes a continuation from its checkpoint inexact.
DATA_FIELDS = ("data", "pretrain_videos", "camera", "state_key", "action_key", "timing", "image_size", "video_encoder",
               "pixel_patch", "pixel_keep", "pixel_coords", "pixel_mean", "pixel_std", "text_encoder", "text_tokens",
               "representation", "val_fraction", "anchor_stride", "cache_dtype")
EXACT_FIELDS = {
    "pretrain": ("seed", "batch_size", "weight_decay", "grad_clip", "video_preset", "model_preset", "num_pretrain",
                 "pretrain_data", "pretrain_steps", "pretrain_lr"),
    "stage1": ("seed", "batch_size", "weight_decay", "grad_clip", "video_preset", "model_preset", "num_demos",
               "lora_rank", "lora_alpha", "stage1_steps", "stage1_lr", "video_init", "video_init_file"),
    "stage2": ("seed", "batch_size", "weight_decay", "grad_clip", "video_preset", "decoder_preset", "model_preset",
               "num_demos", "stage2_steps", "stage2_lr", "stage2_warmup"),
}
EXACT_FIELDS = {name: fields + DATA_FIELDS + ("method",) for name, fields in EXACT_FIELDS.items()}
DATASET_FIELDS = DATA_FIELDS[1:] + ("vae_source", "t5_source", "n_action_steps")  # what --data runs alone read
TOY_FIELDS = ("num_demos", "num_pretrain", "eval_episodes", "pretrain_data", "quick_eval_episodes")  # and the toy


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fp32_trainable(model):
    """Mixed precision: what trains (LoRA, adaLN, the decoder) in fp32, so AdamW's state and small updates are not
    rounded to bf16; frozen weights keep their dtype (the 2B backbone in bf16: 4 GB, not 8). Run under bf16 autocast."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def fingerprint(path):
    """A cheap identity of an input file (size and a hash of its head and tail): a changed input is detected."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def save_checkpoint(directory, model, opt, step, meta):
    """The trainable weights, the optimizer and the train state of step `step`, as one folder swapped in whole
    (mv.atomic_write_dir): it is either entirely step `step` or still the previous checkpoint."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainable(model).items()}

    def write(tmp):
        save_file(tensors, tmp / "model.safetensors")
        torch.save({"optimizer": opt.state_dict()}, tmp / "optim.pt")
        (tmp / "train_state.json").write_text(json.dumps({**meta, "step": step}, indent=2))

    try:
        mv.atomic_write_dir(directory / CHECKPOINT, write)
    except OSError as e:
        raise CheckpointWriteError(f"could not write the step {step} checkpoint to {directory / CHECKPOINT}: "
                                   f"{e}") from e


class CheckpointWriteError(RuntimeError):
    pass


def read_train_state(directory):
    """The train state of a stage's checkpoint, or None when it has none."""
    mv.recover_dir(directory / CHECKPOINT)
    path = directory / CHECKPOINT / "train_state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def same_setting(field, a, b):
    """Whether two values of a config field are the same setting: a dataset folder spelled another way (relative or
    absolute, through a link) is the same dataset."""
    if a == b:
        return True
    paths = field in ("data", "pretrain_videos") and a and b and Path(a).is_dir() and Path(b).is_dir()
    return bool(paths) and Path(a).resolve() == Path(b).resolve()


def check_resume(name, saved, cfg, steps, inputs, log_fn):
    """Refuse a continuation that would not be exact: a changed field this stage depends on, or a changed input
    file; a field named in --allow_config_change is let through, and the log says so."""
    changed = {f: (saved["train"].get(f), getattr(cfg, f)) for f in EXACT_FIELDS[name]
               if not same_setting(f, saved["train"].get(f), getattr(cfg, f))}
    changed.update({f"input {k}": (saved["inputs"].get(k), v) for k, v in inputs.items()
                    if saved["inputs"].get(k) != v})
    allowed = set(cfg.changeable())
    refused = {f: v for f, v in changed.items() if "all" not in allowed and f not in allowed}
    if refused:
        what = ", ".join(f"{f} (checkpoint {a!r}, now {b!r})" for f, (a, b) in refused.items())
        fields = [f for f in refused if not f.startswith("input ")]  # a changed input file is let through by "all"
        allow = ",".join(fields) if len(fields) == len(refused) else "all"
        sys.exit(f"error: cannot resume {name} exactly from its step {saved['step']} checkpoint: changed {what}. "
                 f"Restore the values, or allow the change with --allow_config_change={allow} (the continuation will "
                 f"not equal an uninterrupted run), or start over with --overwrite=true")
    if changed:
        log_fn(f"{name}: resuming with changed {', '.join(changed)} (allowed by --allow_config_change): the "
               f"continuation is not the run the checkpoint began")
    if saved["step"] > steps:
        sys.exit(f"error: the {name} checkpoint is at step {saved['step']}, beyond the requested {steps} steps")


def restore(directory, model, opt, device):
    """Load a checkpoint's trainable weights (strictly) and optimizer state onto this rank's `device` (the checkpoint
    may come from another GPU, or a GPU run resumed on a CPU); return its step."""
    ckpt = directory / CHECKPOINT
    load_trainable(model, ckpt / "model.safetensors", "checkpoint")
    opt.load_state_dict(torch.load(ckpt / "optim.pt", map_location=device, weights_only=True)["optimizer"])
    return json.loads((ckpt / "train_state.json").read_text())["step"]


# ----------------------------------------------------------------------------------------------
# data: the toy world's demonstrations, normalization statistics

TOY_VAL_DEMOS = 100


def load_demos(kind, cfg, world_cfg, rank, world):
    """Expert demos or pretraining videos, made once and cached under out_dir (rank 0 writes, atomically)."""
    if kind == "demos":
        n, seed, speeds = cfg.num_demos, cfg.seed, None
    elif kind == "val":  # validation demonstrations (--patience): other episodes, the same expert
        n, seed, speeds = TOY_VAL_DEMOS, cfg.seed + 2, None
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


class ToyData:
    """Training batches from toy-world episodes: (episode, step) pairs drawn from each episode up to its arrival,
    rendered, then encoded as the policy encodes its observations."""

    def __init__(self, demos, world_cfg, encoders, representation):
        self.demos, self.world_cfg, self.encoders, self.representation = demos, world_cfg, encoders, representation
        self.lengths = mv.toy_demo_lengths(demos)
        self.num_episodes, self.num_windows = len(self.lengths), int(self.lengths.sum())

    def stats(self):
        """Per-chunk-step statistics of the proprio and the action chunks over every training sample, with the same
        end-of-episode padding as the batches (`mv.episode_chunks`)."""
        chunk = self.world_cfg.chunk
        chunks = np.concatenate([mv.episode_chunks(self.demos["actions"][e], np.arange(n), chunk, pad="zero")
                                 for e, n in enumerate(self.lengths)])  # (samples, chunk, 2)
        # (samples, 1, 2)
        states = np.concatenate([self.demos["agent"][e, :n] for e, n in enumerate(self.lengths)])[:, None]
        return self.representation.stats(states, chunks)

    def batch(self, g, B, shard, model):
        """The model inputs of a global batch of B samples drawn with generator g, this rank's `shard` of them."""
        episodes = torch.randint(len(self.lengths), (B,), generator=g).numpy()
        t = (torch.rand(B, generator=g).numpy() * self.lengths[episodes]).astype(np.int64)[shard]
        raw = mv.toy_batch(self.demos, episodes[shard], t, self.world_cfg)
        video_encoder, text_encoder = self.encoders
        latents = video_encoder.encode(torch.cat([raw["context"], raw["future"]], dim=2))  # (B, C, T, h, w)
        Tc = model.cfg.context_latents
        out = {"context": latents[:, :, :Tc], "future": latents[:, :, Tc:], "text": text_encoder(raw["task"])}
        if model.obs_normalizer is not None:  # stage 2: proprio and actions in the decoder's normalized representation
            out["proprio"] = model.obs_normalizer.normalize(self.representation.state_to_model(raw["state"]))[:, None]
            out["actions"] = model.action_normalizer.normalize(self.representation.action_to_model(raw["actions"]))
        return out

    def shapes(self, model):
        """(latent shape, action chunk shape) of one sample."""
        S = self.world_cfg.image_size
        return (model.video.cfg.in_channels, model.cfg.latent_frames, S, S), (self.world_cfg.chunk, model.action_dim)


# ----------------------------------------------------------------------------------------------
# LeRobot datasets: v3.0 and v2.1 folders read with pyarrow and PyAV, windows with the official timing

# A LeRobot dataset is a folder: meta/info.json (fps, features, path templates), an episodes table, a tasks
# table, parquet files with the low-dimensional streams and one mp4 per camera. v3.0 puts many episodes in each
# parquet and each mp4 (an episode's frame at time t sits at its `from_timestamp` + t in the video); v2.1 has one
# file per episode. We read the format directly with pyarrow and PyAV (optional packages): the `lerobot` package
# pins torch and Python versions that conflict with ours.
class DatasetError(ValueError):
    """A corrupt or inconsistent dataset; the message names the file and the episode."""


@dataclass
class WindowTiming:
    """Where one training sample's frames and actions lie around its anchor time t (seconds of the episode);
    the defaults are the official LIBERO timing (`policy_io/libero.yaml`). Times past an episode's edges repeat
    its first or last value (official: interpolation clipped to the episode)."""

    context_frames: int = 5  # observed frames ending at t ...
    context_hz: float = 5.0  # ... at this rate: t - 0.8, ..., t - 0.2, t
    future_frames: int = 56  # frames the video model predicts ...
    future_hz: float = 5.0  # ... at this rate ...
    future_offset: float = 0.2  # ... from t + 0.2 s
    chunk: int = 60  # actions of a chunk ...
    chunk_hz: float = 20.0  # ... at this rate (the control rate) ...
    chunk_offset: float = 0.0  # ... from t + chunk_offset (Bridge: 0.2)

    def context_times(self, t):
        return t - (self.context_frames - 1 - np.arange(self.context_frames)) / self.context_hz

    def future_times(self, t):
        return t + self.future_offset + np.arange(self.future_frames) / self.future_hz

    def action_times(self, t):
        return t + self.chunk_offset + np.arange(self.chunk) / self.chunk_hz


def timing_preset(name, fps):
    """Named window timings; "small" (the default for small datasets on a CPU) is the toy world's, in the dataset's
    own time base: the current frame, 4 future frames every 2 steps from t + 2 steps, 8 actions at the control rate."""
    presets = {"libero": WindowTiming(),
               "bridge": WindowTiming(chunk=15, chunk_hz=5.0, chunk_offset=0.2),  # policy_io/bridge.yaml
               "small": WindowTiming(context_frames=1, context_hz=fps, future_frames=4, future_hz=fps / 2,
                                     future_offset=2 / fps, chunk=8, chunk_hz=fps)}
    if name not in presets:
        raise ValueError(f"unknown timing {name!r}; choose from {sorted(presets)}")
    return presets[name]


def interpolate_lowdim(times, values, query, rotvec_dims=()):
    """values (T, d) sampled at increasing `times` -> (n, d) at `query`: linear, slerp on each axis-angle triple
    starting at a dim in `rotvec_dims` (official `interpolate.py`), clipped to the first and last sample."""
    times, values, query = np.asarray(times, np.float64), np.asarray(values, np.float64), np.asarray(query, np.float64)
    q = np.clip(query, times[0], times[-1])
    out = np.stack([np.interp(q, times, values[:, j]) for j in range(values.shape[1])], axis=1)
    for d in rotvec_dims:  # slerp between the two neighbouring rotations, through the relative rotation
        i = np.clip(np.searchsorted(times, q, side="right") - 1, 0, len(times) - 1)
        j = np.minimum(i + 1, len(times) - 1)
        w = np.where(j > i, (q - times[i]) / np.maximum(times[j] - times[i], 1e-12), 0.0)
        R = mv.axis_angle_to_matrix(torch.from_numpy(values[:, d:d + 3]))  # (T, 3, 3)
        delta = mv.matrix_to_axis_angle(R[i].transpose(-1, -2) @ R[j])  # R_i^T R_j as a rotation vector
        Rq = R[i] @ mv.axis_angle_to_matrix(delta * torch.from_numpy(w)[:, None])
        out[:, d:d + 3] = mv.matrix_to_axis_angle(Rq).numpy()
    return out


class LeRobotDataset:
    """A LeRobot dataset (codebase v3.0 or v2.1) in a local folder, or a Hub repo id (downloaded by huggingface_hub).

    camera: the image stream to read ("observation.images.top" or just "top"; needed when there are several).
    state_key / action_key: the low-dimensional streams, vectors of any dimension.
    """

    def __init__(self, root, camera="", state_key="observation.state", action_key="action", revision=None):
        root = Path(root)
        if not root.is_dir():
            root = self._download(str(root), revision)
        self.root = root
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(f"{root} is not a LeRobot dataset: {info_path} does not exist")
        self.info = info = json.loads(info_path.read_text(encoding="utf-8"))
        self.version = info.get("codebase_version", "?")
        if self.version not in ("v3.0", "v2.1", "v2.0"):
            raise DatasetError(f"{info_path}: codebase_version {self.version!r} is not supported (v3.0, v2.1, v2.0)")
        self.fps = float(info["fps"])
        features = info["features"]
        self.cameras = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
        camera = mv.camera_key(camera) if camera else ""  # "top" is observation.images.top
        if not camera:
            if len(self.cameras) != 1:
                raise DatasetError(f"{root} has cameras {self.cameras}: choose one (--camera=...)")
            camera = self.cameras[0]
        if camera not in self.cameras:
            raise DatasetError(f"{root} has no camera {camera!r}; it has {self.cameras}")
        self.camera, self.camera_is_video = camera, features[camera]["dtype"] == "video"
        for key in (state_key, action_key):
            if key not in features or len(features[key].get("shape", ())) != 1:
                raise DatasetError(f"{info_path}: {key!r} is not a 1-D feature of this dataset (features: "
                                   f"{sorted(features)})")
        self.state_key, self.action_key = state_key, action_key
        self.state_dim, self.action_dim = features[state_key]["shape"][0], features[action_key]["shape"][0]
        self.episodes = self._read_episodes()
        self.tasks = self._read_tasks()
        self._table = (None, None)  # the last data parquet read: v3.0 keeps many episodes in one file

    def frame_size(self):
        """(H, W) of the camera's frames as meta/info.json states them (HWC, or CHW by its names), or None."""
        feature = self.info["features"][self.camera]
        shape, names = list(feature.get("shape") or []), feature.get("names")
        if len(shape) != 3:
            return None
        if isinstance(names, list) and "height" in names and "width" in names:
            return shape[names.index("height")], shape[names.index("width")]
        return tuple(shape[1:]) if shape[0] in (1, 3) and shape[2] not in (1, 3) else tuple(shape[:2])

    @staticmethod
    def _download(repo_id, revision):
        if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
            raise FileNotFoundError(f"{repo_id!r} is neither a folder nor a Hub dataset id (owner/name)")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
        except Exception as e:
            raise FileNotFoundError(f"could not get the dataset {repo_id!r} from the Hub ({mv.error_line(e)}); "
                                    f"download it where the Hub is reachable (`hf download {repo_id} "
                                    "--repo-type=dataset`) and pass its folder") from e

    def _parquet(self, path):
        pq = mv.require("pyarrow.parquet", "pyarrow")
        try:
            return pq.read_table(path)
        except Exception as e:
            raise DatasetError(f"cannot read {path}: {mv.error_line(e)}") from e

    def _read_episodes(self):
        """[{index, length, task, data file, rows, video file, from_timestamp}] in episode order."""
        meta = self.root / "meta"
        out = []
        if self.version == "v3.0":
            files = sorted((meta / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise DatasetError(f"{meta / 'episodes'} has no chunk-*/file-*.parquet episode tables")
            for f in files:
                for row in self._parquet(f).to_pylist():
                    ep = {"index": row["episode_index"], "length": row["length"], "tasks": row.get("tasks") or [],
                          "meta_file": f,
                          "data": self.info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                                file_index=row["data/file_index"]),
                          "rows": (row["dataset_from_index"], row["dataset_to_index"])}
                    if self.camera_is_video:
                        key = f"videos/{self.camera}/"
                        ep["video"] = self.info["video_path"].format(video_key=self.camera,
                                                                     chunk_index=row[key + "chunk_index"],
                                                                     file_index=row[key + "file_index"])
                        ep["from_timestamp"] = row[key + "from_timestamp"]
                    out.append(ep)
        else:
            path = meta / "episodes.jsonl"
            if not path.is_file():
                raise DatasetError(f"{path} does not exist")
            chunks = self.info.get("chunks_size", 1000)
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                i = row["episode_index"]
                ep = {"index": i, "length": row["length"], "tasks": row.get("tasks") or [], "meta_file": path,
                      "data": self.info["data_path"].format(episode_chunk=i // chunks, episode_index=i), "rows": None}
                if self.camera_is_video:
                    ep["video"] = self.info["video_path"].format(episode_chunk=i // chunks, video_key=self.camera,
                                                                 episode_index=i)
                    ep["from_timestamp"] = 0.0
                out.append(ep)
        out.sort(key=lambda e: e["index"])
        if not out:
            raise DatasetError(f"{self.root} has no episodes")
        empty = [e for e in out if e["length"] < 1]
        if empty:
            raise DatasetError(f"episode {empty[0]['index']} has length {empty[0]['length']} in "
                               f"{empty[0]['meta_file']} ({len(empty)} such episode(s)): every episode needs at "
                               "least one frame")
        return out

    def _read_tasks(self):
        meta = self.root / "meta"
        if (meta / "tasks.parquet").is_file():
            table = self._parquet(meta / "tasks.parquet").to_pydict()
            names = table.get("task") or table.get("__index_level_0__")
            return dict(zip(table["task_index"], names))
        if (meta / "tasks.jsonl").is_file():
            rows = [json.loads(line) for line in (meta / "tasks.jsonl").read_text("utf-8").splitlines() if line.strip()]
            return {r["task_index"]: r["task"] for r in rows}
        raise DatasetError(f"{meta} has neither tasks.parquet nor tasks.jsonl")

    def __len__(self):
        return len(self.episodes)

    def lowdim(self, n):
        """Episode n's {"timestamp" (T,), "state" (T, d_s), "action" (T, d_a), "task" str}, checked."""
        ep = self.episodes[n]
        path = self.root / ep["data"]
        if self._table[0] != path:
            if not path.is_file():
                raise DatasetError(f"episode {ep['index']}: its data file {path} does not exist")
            self._table = (path, self._parquet(path))
        table = self._table[1]
        pa, pc = mv.require("pyarrow", "pyarrow"), mv.require("pyarrow.compute", "pyarrow")
        rows = table.filter(pc.equal(table["episode_index"], ep["index"]))
        if rows.num_rows != ep["length"]:
            raise DatasetError(f"episode {ep['index']}: {path} holds {rows.num_rows} rows of it, its length is "
                               f"{ep['length']} ({ep['meta_file']})")
        order = np.argsort(rows["frame_index"].to_numpy())
        frame_index = rows["frame_index"].to_numpy()[order]
        if not np.array_equal(frame_index, np.arange(ep["length"])):
            raise DatasetError(f"episode {ep['index']}: frame_index in {path} is not 0..{ep['length'] - 1}")
        out = {"timestamp": rows["timestamp"].to_numpy().astype(np.float64)[order]}
        if np.any(np.diff(out["timestamp"]) <= 0):
            raise DatasetError(f"episode {ep['index']}: timestamps in {path} do not increase")
        for name, key, dim in (("state", self.state_key, self.state_dim), ("action", self.action_key, self.action_dim)):
            column = rows[key]  # LeRobot stores a feature of shape (1,) as one number per frame, the others as lists
            listed = pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)
            flat = (pc.list_flatten(column) if listed else column).to_numpy(zero_copy_only=False)
            if flat.size != ep["length"] * dim:
                raise DatasetError(f"episode {ep['index']}: {key} in {path} is not {dim} values per frame")
            values = flat.reshape(ep["length"], dim).astype(np.float32)[order]
            if not np.isfinite(values).all():
                raise DatasetError(f"episode {ep['index']}: {key} in {path} has NaN or infinite values")
            out[name] = values
        task_index = rows["task_index"].to_numpy()[order][0] if "task_index" in rows.column_names else None
        task = self.tasks.get(int(task_index)) if task_index is not None else (ep["tasks"][0] if ep["tasks"] else None)
        if task is None:
            raise DatasetError(f"episode {ep['index']}: task index {task_index} is not in the tasks table of "
                               f"{self.root / 'meta'}")
        out["task"] = task
        return out

    def frames(self, n, indices):
        """Episode n's camera frames at `indices` (frame numbers of the episode) -> (len(indices), H, W, 3) uint8.
        Decodes only the span the indices cover: a seek to the first, then frames up to the last."""
        ep = self.episodes[n]
        indices = np.asarray(indices, np.int64)
        if indices.min() < 0 or indices.max() >= ep["length"]:
            raise ValueError(f"episode {ep['index']} has frames 0..{ep['length'] - 1}, asked for "
                             f"{indices.min()}..{indices.max()}")
        first, last = int(indices.min()), int(indices.max())
        got = self._decode_video(ep, first, last) if self.camera_is_video else self._decode_images(n, first, last)
        return np.stack([got[int(i)] for i in indices])

    def _decode_video(self, ep, first, last):
        av = mv.require("av", "av")
        path = self.root / ep["video"]
        if not path.is_file():
            raise DatasetError(f"episode {ep['index']}: its video {path} does not exist")
        start = ep["from_timestamp"]
        got = {}
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                tb = stream.time_base
                container.seek(max(0, int((start + first / self.fps) / tb)), stream=stream, backward=True)
                for frame in container.decode(stream):
                    k = round((float(frame.pts * tb) - start) * self.fps)  # frame number within the episode
                    if k > last:
                        break
                    if k >= first:
                        got[k] = frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise DatasetError(f"episode {ep['index']}: cannot decode {path}: {mv.error_line(e)}") from e
        missing = [k for k in range(first, last + 1) if k not in got]
        if missing:
            raise DatasetError(f"episode {ep['index']}: {path} has no frame {missing[0]} of the episode (at "
                               f"{start + missing[0] / self.fps:.3f} s in the file; {len(missing)} missing)")
        return got

    def _decode_images(self, n, first, last):
        """Cameras stored as PNG/JPEG bytes in the data parquet (LeRobot `image` features)."""
        from io import BytesIO

        Image = mv.require("PIL.Image", "pillow")
        self.lowdim(n)  # loads the episode's table
        ep, table = self.episodes[n], self._table[1]
        pc = mv.require("pyarrow.compute", "pyarrow")
        rows = table.filter(pc.equal(table["episode_index"], ep["index"]))
        order = np.argsort(rows["frame_index"].to_numpy())
        cells = rows[self.camera].to_pylist()
        return {k: np.asarray(Image.open(BytesIO(cells[order[k]]["bytes"])).convert("RGB"))
                for k in range(first, last + 1)}

    def window_indices(self, timestamps, t, timing):
        """Nearest-frame numbers of the context and future frames of the window anchored at t (clipped to the
        episode)."""
        def nearest(times):
            return np.clip(np.rint((np.asarray(times) - timestamps[0]) * self.fps), 0,
                           len(timestamps) - 1).astype(np.int64)
        return nearest(timing.context_times(t)), nearest(timing.future_times(t))

    def fingerprint(self):
        """Identity of the dataset's content as the cache sees it: format, fps, episodes and their lengths, tasks."""
        h = hashlib.sha256(json.dumps([self.version, self.fps, self.camera, self.state_key, self.action_key,
                                       [(e["index"], e["length"]) for e in self.episodes],
                                       sorted(self.tasks.items())]).encode())
        return h.hexdigest()[:16]


def write_lerobot_dataset(root, episodes, fps, camera="observation.images.top", version="v3.0", codec="libx264",
                          robot_type="unknown"):
    """Write episodes as a LeRobot dataset (v3.0: all episodes in one parquet and one mp4; v2.1: a file each).

    episodes: [{"frames": (T, H, W, 3) uint8, "state": (T, d_s), "action": (T, d_a), "task": str}]. codec "libx264"
    (H.264, yuv444p, qp 0: lossless up to the RGB/YUV rounding) or "libsvtav1" (AV1, yuv420p, crf 30: LeRobot's
    default). Written to a temp folder and renamed into place.
    """
    pa, pq, av = mv.require("pyarrow", "pyarrow"), mv.require("pyarrow.parquet", "pyarrow"), mv.require("av", "av")
    if version not in ("v3.0", "v2.1"):
        raise ValueError(f"version must be v3.0 or v2.1, got {version!r}")
    tasks = list(dict.fromkeys(ep["task"] for ep in episodes))
    H, W = episodes[0]["frames"].shape[1:3]
    d_s, d_a = np.asarray(episodes[0]["state"]).shape[1], np.asarray(episodes[0]["action"]).shape[1]
    v3 = version == "v3.0"
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3 else \
        "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3 else \
        "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    pix_fmt, options = ("yuv444p", {"qp": "0"}) if codec == "libx264" else ("yuv420p", {"crf": "30"})
    info = {"codebase_version": version, "robot_type": robot_type, "total_episodes": len(episodes),
            "total_frames": int(sum(len(ep["frames"]) for ep in episodes)), "total_tasks": len(tasks),
            "chunks_size": 1000,
            "fps": fps, "splits": {"train": f"0:{len(episodes)}"}, "data_path": data_path, "video_path": video_path,
            "features": {
                camera: {"dtype": "video", "shape": [int(H), int(W), 3], "names": ["height", "width", "channels"],
                         "info": {"video.fps": fps, "video.codec": codec, "video.pix_fmt": pix_fmt}},
                "observation.state": {"dtype": "float32", "shape": [int(d_s)], "names": None},
                "action": {"dtype": "float32", "shape": [int(d_a)], "names": None},
                **{k: {"dtype": t, "shape": [1], "names": None}
                   for k, t in (("timestamp", "float32"), ("frame_index", "int64"),
                   ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64"))}}}
    if v3:
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=200)
    else:
        info.update(total_chunks=1, total_videos=len(episodes))

    def open_video(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(path), "w")
        # the exact rate (29.97 fps is 2997/100): a rounded one would put frame k at k / 30 s, not k / 29.97 s
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt, stream.options = int(W), int(H), pix_fmt, dict(options, g="2")
        return container, stream

    def add_frames(container, stream, frames, first_pts):
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img, dtype=np.uint8), format="rgb24")
            frame.pts = first_pts + k
            for packet in stream.encode(frame):
                container.mux(packet)

    def close_video(container, stream):
        for packet in stream.encode():
            container.mux(packet)
        container.close()

    def vectors(x, d):  # as LeRobot stores them: a feature of shape (1,) is one number per frame, others a list
        x = np.asarray(x, np.float32)
        return pa.array(x[:, 0]) if d == 1 else pa.array(list(x), pa.list_(pa.float32(), d))

    def table(ep, index, first_row):
        T = len(ep["frames"])
        return pa.table({"observation.state": vectors(ep["state"], d_s), "action": vectors(ep["action"], d_a),
                         "timestamp": pa.array(np.arange(T, dtype=np.float32) / np.float32(fps)),
                         "frame_index": pa.array(np.arange(T)), "episode_index": pa.array(np.full(T, index)),
                         "index": pa.array(first_row + np.arange(T)),
                         "task_index": pa.array(np.full(T, tasks.index(ep["task"])))})

    def write(tmp):
        (tmp / "meta").mkdir()
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=2))
        tables, meta_rows, first_row = [], [], 0
        if v3:
            container, stream = open_video(tmp / video_path.format(video_key=camera, chunk_index=0, file_index=0))
        for i, ep in enumerate(episodes):
            T = len(ep["frames"])
            tables.append(table(ep, i, first_row))
            if v3:
                add_frames(container, stream, ep["frames"], first_row)
                meta_rows.append({"episode_index": i, "tasks": [ep["task"]], "length": T, "data/chunk_index": 0,
                                  "data/file_index": 0, "dataset_from_index": first_row,
                                  "dataset_to_index": first_row + T,
                                  f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": 0,
                                  f"videos/{camera}/from_timestamp": first_row / fps,
                                  f"videos/{camera}/to_timestamp": (first_row + T) / fps,
                                  "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            else:
                path = tmp / data_path.format(episode_chunk=0, episode_index=i)
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(tables[-1], path)
                c, s = open_video(tmp / video_path.format(episode_chunk=0, video_key=camera, episode_index=i))
                add_frames(c, s, ep["frames"], 0)
                close_video(c, s)
                meta_rows.append({"episode_index": i, "tasks": [ep["task"]], "length": T})
            first_row += T
        if v3:
            close_video(container, stream)
            path = tmp / data_path.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(tables), path)
            (tmp / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(meta_rows),
                           tmp / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
            pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                           tmp / "meta" / "tasks.parquet")
        else:
            (tmp / "meta" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta_rows))
            (tmp / "meta" / "tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                              for i, t in enumerate(tasks)))

    return mv.atomic_write_dir(root, write)


# ----------------------------------------------------------------------------------------------
# data: a LeRobot dataset, encoded once (--stage=encode) into <out_dir>/cache, then read by every stage

CACHE_FORMAT = "mimic-video cache v1"
EPISODE_DECODE_BYTES = 2 << 30  # an episode's frames are decoded whole up to this size, longer ones window by window
# numbers (windows x frames x H x W x 3) sent to the video encoder at once, 16 windows at most: the Wan VAE holds
# several GB of activations for one 61-frame window at 480 x 640, so it takes those 4 at a time
ENCODE_VALUES = 2 << 27


def encoder_dtype(device):
    """The frozen encoders' precision: bf16 on CUDA (T5-11B: 9 GB instead of 18 GB, as the official code runs it),
    float32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def video_encoder_spec(cfg):
    """The video encoder the config names, as the spec a policy's config.json carries: the real Wan2.1 VAE, or the
    offline pixel stand-in (known without loading the VAE)."""
    if cfg.video_encoder == "wan":
        return mv.wan_spec(cfg.vae_source, "vae")
    pixels = mv.PixelEncoder(cfg.pixel_patch, cfg.pixel_coords, cfg.pixel_mean, cfg.pixel_std, cfg.pixel_keep or None)
    return pixels.spec


def text_encoder_spec(cfg):
    """The text encoder the config names: T5 (--t5_source; known without loading it: T5-11B takes minutes), or the
    offline hashed words."""
    return mv.t5_spec(cfg.t5_source) if cfg.text_encoder == "t5" else mv.HashedWordEncoder(32, cfg.text_tokens).spec


def make_video_encoder(cfg, device, dtype=None):
    """The video encoder, built from its spec on `device`, buffers included (the pixel encoder's DCT basis)."""
    return mv.build_video_encoder(video_encoder_spec(cfg), device, dtype)


def make_text_encoder(cfg, device, dtype=None):
    return mv.build_text_encoder(text_encoder_spec(cfg), device, dtype)


def text_width(cfg):
    """The text embedding width, from T5's config.json (d_model) without loading its weights."""
    if cfg.text_encoder != "t5":
        return 32
    transformers = mv.require("transformers", "transformers")
    try:
        return transformers.AutoConfig.from_pretrained(cfg.t5_source).d_model
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--t5_source={cfg.t5_source}: cannot read its config ({type(e).__name__}); pass a "
                                f"local folder, or download it first (`hf download {cfg.t5_source}`)") from e


def check_timing(timing, fps):
    """A window timing a policy can run at the dataset's control rate: one action per control step, and the context
    frames a whole number of control steps apart."""
    stride = fps / timing.context_hz
    if timing.context_frames > 1 and abs(stride - round(stride)) > 1e-6:
        raise ValueError(f"the context frames at {timing.context_hz:g} Hz are not a whole number of control steps at "
                         f"the dataset's {fps:g} fps: choose --timing to match (small fits any fps)")
    if abs(timing.chunk_hz - fps) > 1e-6:
        raise ValueError(f"the action chunk at {timing.chunk_hz:g} Hz is not at the dataset's control rate ({fps:g} "
                         f"fps): the policy executes one action per control step; choose --timing to match (small fits "
                         f"any fps, libero is 20 fps, bridge 5 fps)")
    return max(1, round(stride))


def check_dataset(cfg, stages):
    """Before any model, encoder or video is loaded: the dataset's meta/ files, the timing, the encoders' geometry and
    widths and --video_init must fit together. Each mismatch is one line naming the value and what would fit."""
    if not cfg.data or not set(stages) & {"encode", "pretrain", "1", "2", "benchmark"}:
        return
    video = mv.make_config(mv.VideoDiTConfig, cfg.video_preset, mv.VIDEO_DIT_PRESETS)
    H, W = cfg.image_hw()
    wan = cfg.video_encoder == "wan"
    pixels = None if wan else mv.PixelEncoder(cfg.pixel_patch, cfg.pixel_coords, keep=cfg.pixel_keep or None)
    factor, channels = (8, 16) if wan else (pixels.spatial_factor, pixels.channels)
    if H % factor or W % factor or (H // factor) % video.patch_spatial or (W // factor) % video.patch_spatial:
        raise ValueError(f"--image_size={cfg.image_size}: the {cfg.video_encoder} encoder divides frames by {factor} "
                         f"and the video DiT's patches by {video.patch_spatial}: height and width must be multiples of "
                         f"{factor * video.patch_spatial}")
    token = channels * video.patch_spatial ** 2 * video.patch_temporal
    if not wan and token > video.model_channels:  # measured: 800-number tokens, 64 wide: the loss stays near 1
        print(f"warning: --pixel_patch={cfg.pixel_patch} --pixel_keep={cfg.pixel_keep} make {channels}-channel "
              f"latents, so the video DiT's tokens carry {token} numbers into a {video.model_channels}-wide network: "
              "it cannot pass the noise it must predict through and its video loss stays near 1 (the default: "
              "--pixel_keep=1 --pixel_coords=false)",
              file=sys.stderr)
    if "encode" in stages:
        if wan:
            mv.require("diffusers", "diffusers")  # the VAE's package: said now, not when the encode starts
        width = text_width(cfg)
        if width != video.crossattn_emb_channels:
            raise ValueError(f"--text_encoder={cfg.text_encoder} gives {width}-wide embeddings; --video_preset="
                             f"{cfg.video_preset} reads {video.crossattn_emb_channels} (hashed: toy, t5-11b: "
                             "cosmos-predict2-2b)")
        ds = LeRobotDataset(cfg.data, cfg.camera, cfg.state_key, cfg.action_key)  # the camera, keys and episodes
        datasets = [ds] + ([LeRobotDataset(cfg.pretrain_videos, cfg.camera, cfg.state_key, cfg.action_key)]
                           if cfg.pretrain_videos else [])
        timing = timing_preset(cfg.timing, ds.fps)
        check_timing(timing, ds.fps)
        if wan:
            for n in (timing.context_frames, timing.context_frames + timing.future_frames):
                if (n - 1) % 4:
                    raise ValueError(f"--timing={cfg.timing}: the Wan VAE encodes 1 + 4k frames, the window has {n}")
        if cfg.n_action_steps > timing.chunk:
            raise ValueError(f"--n_action_steps={cfg.n_action_steps} is more than the {timing.chunk} actions of a "
                             f"chunk (--timing={cfg.timing})")
        # the latents the encode will write must fit on the disk (the paper's setup: 2.4 MB a window in bf16)
        frames = timing.context_frames + timing.future_frames
        latent_frames = 1 + (frames - 1) // 4 if wan else frames  # the VAE compresses time by 4
        window = channels * latent_frames * (H // factor) * (W // factor) * (4 if cfg.cache_dtype == "float32" else 2)
        windows = sum(-(-e["length"] // cfg.anchor_stride) for d in datasets for e in d.episodes)
        out = Path(cfg.out_dir).absolute()
        done = sum(f.stat().st_size for f in out.glob("cache*/episode_*.safetensors"))  # a resumed encode's
        free = shutil.disk_usage(existing_folder(out)).free
        if windows * window > free + done:
            raise ValueError(f"the cache of {windows} windows needs about {windows * window / 2**30:.1f} GiB of "
                             f"latents ({window / 2**20:.2f} MiB a window) and {free / 2**30:.1f} GiB are free under "
                             f"{out}: anchor a window every k frames (--anchor_stride=k), store bfloat16 "
                             "(--cache_dtype), or choose another --out_dir")
        if cfg.patience and "2" in stages and not validation_split(cfg, len(ds)):
            raise ValueError(f"--patience stops on the validation loss, and --val_fraction={cfg.val_fraction} of "
                             f"{len(ds)} episode(s) holds out none: raise --val_fraction, or drop --patience")
        if cfg.representation == "libero" and (ds.state_dim, ds.action_dim) != (8, 7):
            raise ValueError(f"--representation=libero takes 8-D states and 7-D actions; {cfg.data} has "
                             f"{ds.state_dim}-D {cfg.state_key} and {ds.action_dim}-D {cfg.action_key} (use "
                             "--representation=identity)")
    for source, cache in ((cfg.data, "cache"), (cfg.pretrain_videos, "cache_videos")):
        if "encode" not in stages and source and (Path(cfg.out_dir) / cache / "meta.json").is_file():
            check_cache_options(cfg, Path(cfg.out_dir) / cache)
    if cfg.video_init and "1" in stages:
        path = Path(cfg.video_init)
        if path.is_dir():
            has_file = cfg.video_init_file and (path / cfg.video_init_file).is_file()
            if not has_file and not mv.is_diffusers_folder(path):
                raise ValueError(f"--video_init={path} holds neither --video_init_file={cfg.video_init_file!r} nor "
                                 f"diffusers weights ({mv.DIFFUSERS_WEIGHTS})")
        elif not path.is_file():
            if not cfg.video_init_file:
                raise ValueError(f"--video_init={cfg.video_init} is no local file or folder; a Hub repo id needs "
                                 f"--video_init_file (e.g. {mv.COSMOS_DEFAULT_FILE})")
            # downloaded now (or found in the cache), not hours later
            mv.resolve_file(cfg.video_init, cfg.video_init_file)
        if cfg.video_preset != "toy" and channels != video.in_channels:  # the toy preset takes the encoder's channels
            raise ValueError(f"--video_init: the {cfg.video_encoder} encoder makes {channels}-channel latents; "
                             f"--video_preset={cfg.video_preset} reads {video.in_channels} (a pretrained Cosmos "
                             f"backbone: --video_encoder=wan)")


# The options each entry of a cache's plan comes from: a stage that reads a cache refuses one given with a value
# the cache was not encoded with (it would be ignored); options left at their defaults take the cache's values.
CACHE_OPTIONS = {"camera": ("camera",), "timing": ("timing",), "image_size": ("image_size",),
                 "video_encoder": ("video_encoder", "pixel_patch", "pixel_keep", "pixel_coords", "pixel_mean",
                                   "pixel_std", "vae_source"),
                 "text_encoder": ("text_encoder", "text_tokens", "t5_source"), "representation": ("representation",),
                 "anchor_stride": ("anchor_stride",), "cache_dtype": ("cache_dtype",), "state_key": ("state_key",),
                 "action_key": ("action_key",)}
CACHE_KEYS = {"state_key": "observation.state", "action_key": "action"}  # a cache's plan before it named its keys


def check_cache_options(cfg, cache):
    """The options a run gives must be those `cache` was encoded with: else its stages would silently train on the
    cache as it is. Read from the cache's plan alone (a stage needs neither the dataset nor its keys again)."""
    meta = json.loads((cache / "meta.json").read_text())
    plan, given = meta["plan"], set(mv.changed_fields(cfg))
    now = {"camera": mv.camera_key(cfg.camera), "timing": asdict(timing_preset(cfg.timing, plan["fps"])),
           "image_size": list(cfg.image_hw()), "video_encoder": video_encoder_spec(cfg),
           "text_encoder": text_encoder_spec(cfg), "representation": cfg.representation,
           "anchor_stride": cfg.anchor_stride, "cache_dtype": cfg.cache_dtype, "state_key": cfg.state_key,
           "action_key": cfg.action_key}
    cached = {**CACHE_KEYS, **plan, "representation": plan["representation"]["kind"]}
    differ = [o for key, options in CACHE_OPTIONS.items() for o in options if o in given and now[key] != cached[key]]
    split = validation_split(cfg, len(meta["episodes"]))
    if "val_fraction" in given and cache.name == "cache" and split != meta["val"]:
        differ.append("val_fraction")
    if differ:
        raise ValueError(f"{cache} was encoded with other values of --{', --'.join(differ)}: the stages would train on "
                         f"it as it is. Drop the option(s) to use the cache's, or encode again into another --out_dir "
                         f"(--stage=encode)")


def cache_plan(cfg, ds, timing, video_spec, text_spec, representation):
    """What a cache holds; an existing cache must match it exactly (else it would mix two datasets or settings)."""
    return {"format": CACHE_FORMAT, "dataset": str(ds.root), "fingerprint": ds.fingerprint(), "camera": ds.camera,
            "fps": ds.fps, "timing": asdict(timing), "image_size": list(cfg.image_hw()), "video_encoder": video_spec,
            "text_encoder": text_spec, "representation": representation.to_config(),
            "anchor_stride": cfg.anchor_stride, "cache_dtype": cfg.cache_dtype, "state_key": ds.state_key,
            "action_key": ds.action_key}


def same_plan(a, b):
    """Whether two cache plans hold the same data: the dataset's path may be spelled otherwise (relative, absolute, a
    new Hub snapshot folder); its content is the fingerprint."""
    return ({k: v for k, v in {**CACHE_KEYS, **a}.items() if k != "dataset"} ==
            {k: v for k, v in {**CACHE_KEYS, **b}.items() if k != "dataset"})


def dataset_policy_config(cfg, plan, representation):
    """The PolicyConfig a dataset-trained policy runs with: the training window turned into control steps."""
    timing = WindowTiming(**plan["timing"])
    return mv.PolicyConfig(
        camera=plan["camera"].removeprefix("observation.images."), state_key={**CACHE_KEYS, **plan}["state_key"],
        image_size=tuple(plan["image_size"]), context_frames=timing.context_frames,
        frame_stride=check_timing(timing, plan["fps"]), history_padding="first",
        n_action_steps=cfg.n_action_steps or max(1, timing.chunk // 2), stop_after_step=cfg.stop_after_step,
        numpy_noise=False, video_encoder=plan["video_encoder"], text_encoder=plan["text_encoder"],
        representation=representation.to_config())


def encode_dataset(cfg, ds, cache, timing, representation, env, group=None, log_fn=print):
    """Every training window's latents (context + future frames, encoded together: the VAE is causal), the model-space
    state and action chunk of each anchor, and each distinct instruction's embedding, written once under `cache`.

    One safetensors file per episode, each written atomically: an interrupted run resumes where it stopped. Under
    torchrun each rank encodes its own episodes (rank r: episodes r, r + world, ...) and waits for the others on
    `group` (gloo, no 10-minute NCCL timeout); rank 0 alone then loads the text encoder and writes the rest. The
    cache is complete when meta.json exists. The encoders are released when this returns."""
    rank, world, device, _ = env
    if cache_is_complete(cfg, ds, cache, timing, representation):
        log_fn(f"{cache}: already encoded for these settings (meta.json): nothing to encode")
        return
    dtype = encoder_dtype(device)
    video_encoder = make_video_encoder(cfg, device, dtype)
    plan = cache_plan(cfg, ds, timing, video_encoder.spec, text_encoder_spec(cfg), representation)
    cache.mkdir(parents=True, exist_ok=True)
    plan_path = cache / "plan.json"
    if plan_path.exists() and not same_plan(json.loads(plan_path.read_text()), plan):
        sys.exit(f"error: {cache} was encoded from another dataset or with other settings ({plan_path}); use another "
                 f"--out_dir, or delete the cache to encode again")
    if rank == 0:
        mv.atomic_write(plan_path, lambda p: Path(p).write_text(json.dumps(plan, indent=2)))
    state_rot, action_rot = representation.rotvec_dims
    files = [cache / f"episode_{ep['index']:06d}.safetensors" for ep in ds.episodes]
    mine = [n for n in range(rank, len(ds), world) if not files[n].exists()]
    window_values = 3 * (timing.context_frames + timing.future_frames) * math.prod(cfg.image_hw())
    per_call = max(1, min(16, ENCODE_VALUES // window_values))
    for n in tqdm(mine, desc=f"encode (rank {rank})" if world > 1 else "encode", disable=not sys.stderr.isatty()):
        low = ds.lowdim(n)
        anchors, length = low["timestamp"][:: cfg.anchor_stride], ds.episodes[n]["length"]
        whole = length * math.prod(ds.info["features"][ds.camera].get("shape", [])) <= EPISODE_DECODE_BYTES
        frames = ds.frames(n, np.arange(length)) if whole else None  # the episode's frames, decoded once
        latents = []
        for i in range(0, len(anchors), per_call):  # a few windows at a time through the encoder
            ctx, fut = zip(*(ds.window_indices(low["timestamp"], t, timing) for t in anchors[i:i + per_call]))
            idx = np.concatenate([np.stack(ctx), np.stack(fut)], axis=1)  # (b, Tc + Tf) frame numbers
            if whole:
                pix = frames[idx]  # (b, Tc + Tf, H, W, 3)
            else:  # a long episode: the frames these windows span, decoded for them
                pix = ds.frames(n, idx.ravel())
                pix = pix.reshape(*idx.shape, *pix.shape[1:])  # (b * (Tc + Tf), H, W, 3) -> (b, Tc + Tf, H, W, 3)
            pix = mv.resize_frames(mv.images_to_frames(torch.from_numpy(pix)), cfg.image_hw())  # (b, T, 3, h, w)
            z = encode_windows(video_encoder, pix.transpose(1, 2).to(device))  # (b, C, T', h', w')
            latents.append(z.cpu().to(getattr(torch, cfg.cache_dtype)))
        state = representation.state_to_model(torch.from_numpy(interpolate_lowdim(
            low["timestamp"], low["state"], anchors, state_rot)).float())  # (n, d_s)
        times = np.concatenate([timing.action_times(t) for t in anchors])
        actions = interpolate_lowdim(low["timestamp"], low["action"], times, action_rot)  # (n * H, d_a)
        actions = representation.action_to_model(torch.from_numpy(actions).float())
        actions = actions.reshape(len(anchors), timing.chunk, -1)  # (n, H, d_a)
        tensors = {"latents": torch.cat(latents).contiguous(), "state": state.contiguous(),
                   "actions": actions.contiguous()}
        mv.atomic_write(files[n], lambda p, t=tensors: save_file(t, p, metadata={"task": low["task"]}))
    if world > 1:
        print(f"rank {rank} encoded {len(mine)} episodes", flush=True)
    context_latents = video_encoder.latent_frames(timing.context_frames)
    del video_encoder
    if world > 1:
        dist.barrier(group=group)
    if rank == 0:
        write_cache_meta(cfg, cache, plan, files, context_latents, device, dtype, log_fn)
    if world > 1:
        dist.barrier(group=group)


def encode_windows(encoder, frames):
    """The video encoder on a group of windows (b, 3, T, H, W); out of memory, on each half of the group (the same
    latents: every window is encoded on its own), down to one window."""
    try:
        return encoder.encode(frames)
    except torch.OutOfMemoryError:
        if len(frames) == 1:
            raise
        if frames.is_cuda:
            torch.cuda.empty_cache()
        return torch.cat([encode_windows(encoder, half) for half in frames.split((len(frames) + 1) // 2)])


def validation_split(cfg, n):
    """The validation episodes (sorted indices of n): a split by episode, fixed by the seed; one episode at least is
    left to train on."""
    n_val = min(n - 1, int(round(cfg.val_fraction * n)))
    return sorted(np.random.RandomState(cfg.seed).permutation(n)[:n_val].tolist())


def cache_is_complete(cfg, ds, cache, timing, representation):
    """Whether `cache` is finished (meta.json is written last) for this plan and this split: then a resumed or
    repeated run loads no encoder (T5-11B alone takes minutes). Any doubt answers no, and the encode checks all."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    plan = cache_plan(cfg, ds, timing, video_encoder_spec(cfg), text_encoder_spec(cfg), representation)
    files = [cache / f"episode_{ep['index']:06d}.safetensors" for ep in ds.episodes]
    return (same_plan(meta.get("plan") or {}, plan) and "context_latents" in meta and all(f.exists() for f in files)
            and meta.get("val") == validation_split(cfg, len(files)))


def write_cache_meta(cfg, cache, plan, files, context_latents, device, dtype, log_fn=print):
    """Rank 0, once every episode file exists: the instructions' embeddings, the split, the statistics, meta.json."""
    from safetensors import safe_open

    episodes, texts = [], {}
    for f in files:
        with safe_open(f, "pt") as h:  # the header only: no latents are read
            task, anchors = h.metadata()["task"], h.get_slice("state").get_shape()[0]
        texts.setdefault(task, len(texts))
        episodes.append({"index": int(f.stem.split("_")[1]), "file": f.name, "anchors": anchors, "text": texts[task]})
    names = list(texts)
    text_encoder = make_text_encoder(cfg, device, dtype)
    emb = torch.cat([text_encoder(names[i:i + 8]).float().cpu() for i in range(0, len(names), 8)])  # (n_texts, L, D)
    del text_encoder
    first = {}  # embedding -> the first instruction that has it: two that share one cannot be told apart
    same = [(first.setdefault(e.numpy().tobytes(), name), name) for e, name in zip(emb, names)]
    same = [pair for pair in same if pair[0] != pair[1]]
    if same:
        print(f"warning: {len(same)} instruction(s) get the same embedding as another, e.g. {same[0][0]!r} and "
              f"{same[0][1]!r}: the policy cannot tell them apart (--text_encoder={cfg.text_encoder} keeps "
              f"{cfg.text_tokens if cfg.text_encoder == 'hashed' else 512} tokens)", file=sys.stderr)
    mv.atomic_write(cache / "text.safetensors", lambda p: save_file({"embeddings": emb.contiguous()}, p))
    val = validation_split(cfg, len(episodes))
    meta = {"plan": plan, "episodes": episodes, "texts": names,
            "train": sorted(set(range(len(episodes))) - set(val)),
            "val": val, "context_latents": context_latents}
    data = CachedData(cache, meta=meta)
    meta["stats"] = mv.Representation.from_config(plan["representation"]).stats(*data.all_states_and_actions("train"))
    mv.atomic_write(cache / "meta.json", lambda p: Path(p).write_text(json.dumps(meta)))
    log_fn(f"encoded {len(episodes)} episodes ({sum(e['anchors'] for e in episodes)} windows, {len(names)} "
           f"instructions) into {cache}: {len(meta['train'])} train, {len(meta['val'])} validation episodes")
    return meta


class CachedData:
    """Training batches from an encoded cache: the training loop never runs the VAE or T5. Each episode's tensors are
    read through safetensors memory maps, one window at a time."""

    def __init__(self, cache, split="train", meta=None):
        self.cache = Path(cache)
        meta_path = self.cache / "meta.json"
        if meta is None:
            if not meta_path.is_file():
                raise FileNotFoundError(f"{self.cache} holds no finished cache (meta.json): run --stage=encode first")
            meta = json.loads(meta_path.read_text())
            if "context_latents" not in meta:
                raise FileNotFoundError(f"{meta_path} was written by an older train.py: run --stage=encode again (it "
                                        f"keeps the encoded episodes and rewrites meta.json)")
        self.meta, self.split = meta, split
        self.texts = load_file(self.cache / "text.safetensors")["embeddings"]
        self.files = [self.cache / e["file"] for e in meta["episodes"]]
        episodes = range(len(meta["episodes"])) if split == "all" else meta[split]  # "train", "val" or "all"
        self.index = np.array([(i, row) for i in episodes for row in range(meta["episodes"][i]["anchors"])], np.int64)
        self.num_episodes, self.num_windows = len(episodes), len(self.index)
        self.handles = {}
        if len(self.index) == 0:
            raise ValueError(f"the {split} split of {self.cache} has no windows")

    def _handle(self, i):
        if i not in self.handles:
            from safetensors import safe_open

            self.handles[i] = safe_open(self.files[i], "pt")
        return self.handles[i]

    def all_states_and_actions(self, split):
        """(N, 1, d_s) states and (N, H, d_a) action chunks of every window of a split: the statistics' input."""
        from safetensors import safe_open

        parts = []
        for i in self.meta[split]:
            with safe_open(self.files[i], "pt") as h:  # only these two tensors, not the episode's latents
                parts.append((h.get_tensor("state"), h.get_tensor("actions")))
        return torch.cat([p[0] for p in parts])[:, None].numpy(), torch.cat([p[1] for p in parts]).numpy()

    def stats(self):
        return self.meta["stats"]

    def windows(self, rows):
        """Latents, text embeddings, states and actions of the windows `rows` of the index."""
        out = {"latents": [], "state": [], "actions": [], "text": []}
        for i, row in self.index[rows]:
            h = self._handle(int(i))
            for key in ("latents", "state", "actions"):
                out[key].append(h.get_slice(key)[int(row)])
            out["text"].append(self.meta["episodes"][i]["text"])
        return {"latents": torch.stack(out["latents"]).float(), "state": torch.stack(out["state"]),
                "actions": torch.stack(out["actions"]), "text": self.texts[out["text"]]}

    def batch(self, g, B, shard, model):
        rows = torch.randint(len(self.index), (B,), generator=g).numpy()[shard]
        w = self.windows(rows)
        Tc = model.cfg.context_latents
        out = {"context": w["latents"][:, :, :Tc], "future": w["latents"][:, :, Tc:], "text": w["text"]}
        if model.obs_normalizer is not None:
            out["proprio"] = model.obs_normalizer.normalize(w["state"])[:, None]
            out["actions"] = model.action_normalizer.normalize(w["actions"])
        return out

    def shapes(self, model=None):
        """(latent shape, action chunk shape) of one window."""
        h = self._handle(int(self.index[0][0]))
        return tuple(h.get_slice("latents").get_shape()[1:]), tuple(h.get_slice("actions").get_shape()[1:])


def dataset_models(cfg, data, representation):
    """Model configs that fit a dataset: the presets, with the latent channels, latent grid, window and chunk of the
    data (the toy presets then train on a CPU; the real presets keep their released sizes)."""
    (C, T, h, w), (H, _) = data.shapes()
    video = mv.make_config(mv.VideoDiTConfig, cfg.video_preset, mv.VIDEO_DIT_PRESETS)
    if C != video.in_channels:  # the stand-in encoder's channels (the real DiT reads the VAE's 16)
        video = mv.replace(video, in_channels=C, out_channels=C)
    video = mv.replace(video, max_img_h=max(h, video.max_img_h), max_img_w=max(w, video.max_img_w))
    decoder = mv.replace(mv.make_config(mv.ActionDecoderConfig, cfg.decoder_preset, mv.ACTION_DECODER_PRESETS),
                         max_horizon=H + 1, in_channels=representation.model_state_dim,
                         out_channels=representation.model_action_dim)
    if data.texts.shape[-1] != video.crossattn_emb_channels:
        sys.exit(f"error: the cache's instructions are {data.texts.shape[-1]}-wide embeddings; --video_preset="
                 f"{cfg.video_preset} reads {video.crossattn_emb_channels}")
    context = data.meta["context_latents"]
    model = mv.make_config(mv.VideoActionConfig, cfg.model_preset, mv.VIDEO_ACTION_PRESETS, latent_frames=T,
                           context_latents=context)
    return video, decoder, model


def export_toy(cfg, world_cfg, out, log_fn=print):
    """The toy world's demonstrations (and its pretraining videos) as LeRobot v3.0 datasets: what a real robot's
    recordings look like. Frames from the toy camera (uint8), state = agent position, action = the motion, each
    episode up to the step it arrives (with the zero action it then sends), at 10 fps."""
    for kind, n, seed, name in (("demos", cfg.num_demos, cfg.seed, "demos"),
                                (cfg.pretrain_data, cfg.num_pretrain, cfg.seed + 1, "videos")):
        speeds = (0.3 * world_cfg.max_speed, world_cfg.max_speed) if kind == "play" else None
        demos = mv.make_toy_demos(n, seed, world_cfg, speeds)
        lengths = mv.toy_demo_lengths(demos)
        episodes = []
        for e in tqdm(range(n), desc=f"export {name}", disable=not sys.stderr.isatty()):
            L = int(lengths[e])  # states 0..L-1, the last on the goal
            images = mv.toy_render(demos["agent"][e, :L], np.repeat(demos["targets"][e:e + 1], L, 0),
                                   np.repeat(demos["colours"][e:e + 1], L, 0), world_cfg)
            episodes.append({"frames": mv.toy_camera(images), "state": demos["agent"][e, :L],
                             "action": demos["actions"][e, :L],
                             "task": mv.toy_instruction(demos["goal_colour"][e], demos["template"][e])})
        write_lerobot_dataset(out / name, episodes, fps=TOY_FPS, camera="observation.images.top", robot_type="toy")
        log_fn(f"wrote {n} episodes ({sum(len(e['frames']) for e in episodes)} frames) to {out / name}")


TOY_FPS = 10


# ----------------------------------------------------------------------------------------------
# the training loop, shared by all stages

def lr_schedule(stage, cfg, steps):
    if stage == 0:  # pretraining: cosine decay to 0.1 x
        return lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
    if stage == 1:
        return lambda step: 1.0  # LoRA stage 1 trains at a constant lr, as in the paper
    warm = max(1, cfg.stage2_warmup)
    return lambda step: (step + 1) / warm if step < warm else 0.2 + 0.8 * (steps - step) / max(1, steps - warm)


def step_noise(model, loss, B, latent_shape, action_shape, g, shard, device, on_device=None):
    """This rank's `shard` of the noise of one step, drawn for the global batch of B: every rank draws the same
    numbers, so DDP equals one process and a resume is exact. On a GPU they are drawn there, from a seed taken from
    g: at the paper's shapes eps_video is 629 MB for 128 windows, seconds of one CPU core at every step.
    on_device: draw on `device` whatever it is (default: on CUDA only; the tests run that path on the CPU)."""
    if not (device.type == "cuda" if on_device is None else on_device):
        return {k: v[shard].to(device) for k, v in model.draw_noise(loss, B, latent_shape, action_shape, g).items()}
    gen = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
    noise = model.draw_noise(loss, B, latent_shape, action_shape, gen, device)
    return {k: v[shard].clone() for k, v in noise.items()}  # the global tensors are freed


def all_samples(x, world):
    """Per-sample values (..., n) of every rank, concatenated along the last axis (all ranks call it)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def validation_loss(model, data, loss, cfg, env, batches=4):
    """The stage's loss on held-out episodes: fixed windows and noise (the same at every checkpoint), no gradients.
    Each rank runs its own slice of the windows, as training does, and the per-sample losses are summed over ranks."""
    rank, world, device, autocast = env
    latent_shape, action_shape = data.shapes(model)
    B = min(cfg.batch_size, data.num_windows)
    shard = slice(rank * B // world, (rank + 1) * B // world)  # this rank's windows of the B
    m = max(1, cfg.batch_size // world // cfg.grad_accum)  # a training micro-batch
    was_training, total = model.training, torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for k in range(batches):
            g = torch.Generator().manual_seed(999_983 + k)
            batch = data.batch(g, B, shard, model)
            noise = step_noise(model, loss, B, latent_shape, action_shape, g, shard, device)
            if shard.stop == shard.start:  # more ranks than windows: this rank has none
                continue
            if loss != "action":
                batch = {key: batch[key] for key in ("context", "future", "text")}
            for i in range(0, len(noise["sigma"]), m):  # in training's micro-batches: what fits there fits here
                part = {key: v[i:i + m].to(device) for key, v in batch.items()}
                with autocast:
                    out = model(loss, **part, noise={key: v[i:i + m] for key, v in noise.items()})
                total += out["per_sample"].double().sum()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / (batches * B)


def loss_levels(model, data, cfg, batches=4):
    """What the video loss is without learning how scenes move, on validation_loss's windows and noise: each future
    latent denoised by the Gaussian that knows only its mean and variance over these windows ("the mean"), or the
    same centred on the current frame ("nothing moves"). A video model near the first level has learned nothing;
    below the second, it predicts motion. The image objective has no future: its levels are not these.
    Two passes over the batches (the statistics, then the losses), one batch in memory at a time: at the paper's
    shapes a batch of 128 windows is 1.3 GB in float64."""
    B = min(cfg.batch_size, data.num_windows)
    latent_shape, _ = data.shapes(model)

    def windows():  # validation_loss's windows and noise, batch by batch, in float64: x0, eps, tau, context frames
        for k in range(batches):
            g = torch.Generator().manual_seed(999_983 + k)
            batch = data.batch(g, B, slice(0, B), model)
            noise = model.draw_noise("video", B, latent_shape, generator=g)
            x0 = torch.cat([batch["context"], batch["future"]], dim=2).double()  # (B, C, T, H, W)
            yield x0, noise["eps_video"].double(), mv.sigma_to_tau(noise["sigma"]).double(), batch["context"].shape[2]

    n, total, squares, moved = 0, 0.0, 0.0, 0.0
    for x0, _, _, Tc in windows():  # the statistics of the future latents, per position
        future, now = x0[:, :, Tc:], x0[:, :, Tc - 1:Tc]  # now: the current frame, at every future time
        n, total, squares = n + len(future), total + future.sum(0), squares + future.pow(2).sum(0)
        moved = moved + (future - now).pow(2).sum(0)
    mean, var, still = total / n, (squares - total ** 2 / n) / max(n - 1, 1), moved / n

    def level(m, s2, x_tau, u, b):  # the posterior mean of x0 under the prior N(m, s2), given x_tau = a x0 + b eps
        a = 1 - b
        x0_hat = m + a * s2 / (a ** 2 * s2 + b ** 2) * (x_tau - a * m)
        return mv.flow_loss((x_tau - x0_hat) / b, u).sum().item()  # v_hat = (x_tau - x0_hat) / tau

    levels = [0.0, 0.0]
    for x0, eps, tau, Tc in windows():
        x_tau, u = mv.interpolate(x0, eps, tau)[:, :, Tc:], mv.velocity_target(x0, eps)[:, :, Tc:]
        b = tau.reshape(-1, 1, 1, 1, 1)  # tau, broadcast over (C, T, H, W)
        levels[0] += level(mean, var, x_tau, u, b)
        levels[1] += level(x0[:, :, Tc - 1:Tc], still, x_tau, u, b)
    return levels[0] / n, levels[1] / n


def train_stage(name, stage, model, data, steps, lr, cfg, env, inputs=None, on_checkpoint=None, val_data=None,
                loss=None):
    """AdamW over the trainable parameters; per-step randomness from (seed, stage, step) alone, so a resumed run
    equals an uninterrupted one. `inputs`: fingerprints of the files the stage starts from; `val_data`: held-out
    episodes whose loss is logged at every checkpoint, and that --patience stops on; without them, on the score that
    `on_checkpoint(step)` (rank 0) returns, higher better. `loss`: the model's objective (default: the
    stage's: "video" for pretraining (0) and stage 1, "action" for stage 2)."""
    rank, world, device, autocast = env
    loss = loss or ("action" if stage == 2 else "video")
    params = list(trainable(fp32_trainable(model)).values())
    if cfg.activation_checkpointing and any(p.requires_grad for p in model.video.parameters()):
        model.video.activation_checkpointing = True  # every stage that trains the video DiT: pretrain, 1, vla, joint
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=cfg.weight_decay)
    directory, inputs = Path(cfg.out_dir) / name, inputs or {}
    saved = read_train_state(directory)
    start, best = 0, None  # best: [step, score] of the best checkpoint so far (--patience)
    if saved is not None and cfg.resume:
        check_resume(name, saved, cfg, steps, inputs, lambda *a: log(rank, *a))
        start, best = restore(directory, model, opt, device), saved.get("best")
        start = steps if saved.get("stopped") else start  # stopped early: the stage is complete
        log(rank,
            f"{name}: complete at step {saved['step']}, nothing to train" if start == steps
            else f"{name}: resuming at step {start}")
    elif cfg.resume:
        log(rank, f"{name}: no checkpoint in {directory}, starting at step 0")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    sched = lr_schedule(stage, cfg, steps)
    if stage == 2 and cfg.stage2_warmup >= steps > start:  # said, not left to be found in the lr column
        log(rank, f"{name}: --stage2_warmup={cfg.stage2_warmup} is not shorter than its {steps} steps: the learning "
                  f"rate peaks at {steps / max(1, cfg.stage2_warmup):.0%} of --stage2_lr")
    B, b = cfg.batch_size, cfg.batch_size // world
    shard = slice(rank * b, (rank + 1) * b)
    latent_shape, action_shape = data.shapes(model)
    bins, window, t0 = np.linspace(0, 1, 5), [], time.perf_counter()
    bar = tqdm(range(start, steps), desc=name, disable=rank != 0 or not sys.stderr.isatty(), initial=start, total=steps)
    model.train()
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 100_003 + step)
        batch = data.batch(g, B, shard, model)
        if loss != "action":  # the video and image objectives read no proprio and no actions
            batch = {k: batch[k] for k in ("context", "future", "text")}
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = step_noise(model, loss, B, latent_shape, action_shape, g, shard, device)
        for group in opt.param_groups:
            group["lr"] = lr * sched(step)
        opt.zero_grad(set_to_none=True)
        outs, m = [], b // cfg.grad_accum
        for i in range(cfg.grad_accum):  # micro-batches: gradients summed, each loss a 1/grad_accum share of the mean
            part = slice(i * m, (i + 1) * m)
            sync = nullcontext() if world == 1 or i + 1 == cfg.grad_accum else net.no_sync()  # all-reduce once
            try:
                with sync:
                    with autocast:
                        out = net(loss, **{k: v[part] for k, v in batch.items()},
                                  noise={k: v[part] for k, v in noise.items()})
                    if not torch.isfinite(out["loss"]):
                        raise FloatingPointError(f"{name} step {step}: loss is {out['loss'].item()} (NaN/inf); lower "
                                                 "the learning rate")
                    (out["loss"] / cfg.grad_accum).backward()
            except torch.OutOfMemoryError as e:  # a traceback from deep inside autograd would not say what to change
                raise StepOutOfMemory(out_of_memory_advice(name, step, m, world, cfg, model)) from e
            outs.append(out)
        out = {k: torch.cat([o[k].detach().reshape(-1) for o in outs])
               for k in ("per_sample", "tau_a" if stage == 2 else "tau_v")}
        out["loss"] = out["per_sample"].mean()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        tau = out["tau_a"] if stage == 2 else out["tau_v"]
        window.append(torch.stack([tau.float(), out["per_sample"].float()]))  # (2, b): this rank's samples
        if not bar.disable:
            bar.set_postfix(loss=f"{out['loss'].item():.4f}")  # this rank's samples
        last = step + 1 == steps
        if (step + 1) % cfg.log_every == 0 or last:  # the line is the global batch's, as one process logs it
            taus, losses = all_samples(torch.cat(window, dim=1).float(), world).cpu().numpy()
            which = np.clip(np.digitize(taus, bins) - 1, 0, len(bins) - 2)
            binned = " ".join(f"{losses[which == i].mean():.3f}" if (which == i).any() else "-"
                              for i in range(len(bins) - 1))
            ms = 1000 * (time.perf_counter() - t0) / len(window)
            log(rank, f"{name} step {step + 1}/{steps} | loss {losses.mean():.4f} | by "
                      f"{'tau_a' if stage == 2 else 'tau_v'} [0,.25,.5,.75,1]: {binned} | lr {lr * sched(step):.2e} | "
                      f"{ms:.0f} ms/step")
            window, t0 = [], time.perf_counter()
        if (step + 1) % cfg.ckpt_every == 0 or last:  # eval + checkpoint, in one block
            score = None
            if val_data is not None:
                val = validation_loss(model, val_data, loss, cfg, env)
                log(rank, f"{name} step {step + 1}: validation loss {val:.4f} ({val_data.num_episodes} held-out "
                          "episodes)")
            result = on_checkpoint(step + 1) if on_checkpoint is not None and rank == 0 else None
            score = -val if val_data is not None else result
            stop = False
            if cfg.patience and stage == 2:
                best, stop = keep_best(directory, model, best, step + 1, score, cfg.patience, rank, world)
                if stop:
                    log(rank, f"{name}: stopped at step {step + 1}: no better score since step {best[0]} "
                              f"({best[1]:.4f}; --patience={cfg.patience})")
            if rank == 0:
                joint = hasattr(model, "joint")
                head = {"joint": asdict(model.joint)} if joint else {"decoder": asdict(model.decoder.cfg)}
                meta = {"stage": name, "train": asdict(cfg), "inputs": inputs, "video": asdict(model.video.cfg),
                        "model": asdict(model.cfg), **head, "best": best, "stopped": stop}
                save_checkpoint(directory, model, opt, step + 1, meta)
            barrier(world)
            if stop:
                break
    if best is not None:  # --patience: the stage's result is its best checkpoint, not its last
        load_trainable(model, directory / "best.safetensors", "the best checkpoint")
        log(rank, f"{name}: kept the weights of step {best[0]} (score {best[1]:.4f})")
    model.eval()
    return model


class StepOutOfMemory(RuntimeError):
    pass


def out_of_memory_advice(name, step, micro_batch, world, cfg, model):
    """One line for a training step that does not fit in the device's memory: what there is to change."""
    fixes = []
    if not cfg.activation_checkpointing and any(p.requires_grad for p in model.video.parameters()):
        fixes.append("--activation_checkpointing=true (the video blocks recomputed in the backward pass)")
    if micro_batch > 1:
        fixes.append(f"--grad_accum={2 * cfg.grad_accum} (the same update in micro-batches of {micro_batch // 2}; "
                     "--batch_size must divide by it times the processes)")
    return (f"{name} step {step}: out of memory with {micro_batch} sample(s) per micro-batch in each of {world} "
            f"process(es); try {' or '.join(fixes) or 'a device with more memory'} (the README's memory table "
            "gives stage 1 at the real shapes)")


def keep_best(directory, model, best, step, score, patience, rank, world):
    """--patience: keep the trainable weights of the best score so far in <stage>/best.safetensors (rank 0 scores; the
    others follow its decision); return ([step, score] of the best, whether to stop)."""
    if world > 1:
        box = [score]
        dist.broadcast_object_list(box, src=0)
        score = box[0]
    if score is None:
        raise ValueError("--patience needs a validation score: held-out episodes (--val_fraction > 0) or the toy "
                         "world's quick evaluation")
    if best is None or score > best[1]:
        best = [step, score]
        if rank == 0:
            tensors = {k: v.detach().contiguous().cpu() for k, v in trainable(model).items()}
            directory.mkdir(parents=True, exist_ok=True)
            mv.atomic_write(directory / "best.safetensors", lambda p: save_file(tensors, p))
        barrier(world)
    return best, step - best[0] >= patience


def load_trainable(model, path, what):
    """Copy a file's tensors into the model's trainable parameters, strictly."""
    params, sd = trainable(model), load_file(path)
    mv.check_state_dict(params, sd, f"{what} {path}")
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


# ----------------------------------------------------------------------------------------------
# evaluation

TOY_VAL_SEEDS = mv.TOY_EVAL_SEEDS + 10**6  # validation episodes (quick evals, --patience), apart from the test's


def evaluate(policy, episodes, world_cfg, first=mv.TOY_EVAL_SEEDS):
    """Closed-loop success of a policy on held-out toy episodes (seeds first, first + 1, ...)."""
    seeds = [first + i for i in range(episodes)]
    return float(mv.toy_rollout(policy, seeds, world_cfg)["success"].mean())


def quick_eval(policy, model, cfg, rank, offset=0):
    """A closed-loop evaluation on validation episodes at each stage-2 checkpoint, logged and appended to
    <out_dir>/stage2/quick_evals.csv (steps counted on the demonstrations: `offset` = the steps of stage 1 before
    it); its success is the score --patience stops on."""
    if cfg.stage2_steps < cfg.ckpt_every and not cfg.patience:
        return None
    path = Path(cfg.out_dir) / "stage2" / "quick_evals.csv"

    def run(step):
        rate = evaluate(policy, cfg.quick_eval_episodes, mv.ToyWorldConfig(), TOY_VAL_SEEDS)  # sets eval mode
        model.train()
        log(rank, f"stage2 step {step}: closed-loop success {rate:.0%} on {cfg.quick_eval_episodes} validation "
                  "episodes")
        rows = path.read_text() if path.exists() else "method,demo_steps,episodes,success\n"
        rows += f"{cfg.method},{offset + step},{cfg.quick_eval_episodes},{rate:.4f}\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        mv.atomic_write(path, lambda p: Path(p).write_text(rows))
        return rate

    return run


# ----------------------------------------------------------------------------------------------
# the paper's claims in miniature (--stage=experiment): sample efficiency, convergence, latency

EXPERIMENT_METHODS = ("mimic-video", "vla", "scratch", "joint")


def experiment_job(kind, args, out, log_path, episodes):
    """One run in a worker process with one thread, its output in a log file. kind "pretrain": a seed's video (or,
    with --method=vla among the args, image) pretraining; otherwise a method's training on the demonstrations to its
    best checkpoint, then that checkpoint's closed-loop success on the test episodes."""
    import contextlib

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        if kind == "pretrain":
            main([*args, f"--out_dir={out}", "--stage=pretrain"])
            return {"seconds": time.perf_counter() - t0}
        if kind == "mimic-video":
            main([*args, f"--out_dir={out}", "--stage=1"])
        main([*args, f"--out_dir={out}", "--stage=2", f"--method={kind}"])
        seconds = time.perf_counter() - t0
        rate = evaluate(mv.load_policy(out / "policy"), episodes, mv.ToyWorldConfig())
    state = read_train_state(out / "stage2")
    return {"seconds": seconds, "success": rate, "stopped": state["step"], "best": state["best"][0]}


def run_experiment(cfg, env):
    """Train the four methods on nested sets of demonstrations, for several seeds, each until its validation success
    stops improving (within one cap of optimiser steps on the demonstrations, shared by all); evaluate each at its best
    checkpoint on the same held-out test episodes; write CSVs and plots; time one query of each on this CPU."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    out = Path(cfg.out_dir)
    demos = [int(n) for n in cfg.experiment_demos.split(",")]
    seeds = list(range(cfg.experiment_seeds))
    common = [f"--{k}={v}" for k, v in asdict(cfg).items() if k in EXPERIMENT_SHARED]
    # every method: at most experiment_steps on the demonstrations (mimic-video's include its stage1_steps of LoRA)
    runs = [f"--stage2_steps={cfg.experiment_steps - cfg.stage1_steps}", f"--ckpt_every={cfg.experiment_eval_every}",
            f"--patience={cfg.experiment_patience}"]
    t_start = time.perf_counter()
    rows, jobs = [], {}
    with ProcessPoolExecutor(cfg.experiment_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(kind, n, seed):
            run = out / f"seed{seed}" / f"{n}demos" / kind
            run.mkdir(parents=True, exist_ok=True)
            if kind != "scratch":  # the seed's pretrained image (vla) or video (mimic-video, joint) model
                pre = out / f"seed{seed}" / ("pretrain_image" if kind == "vla" else "pretrain_video") / "pretrain"
                shutil.copytree(pre, run / "pretrain", dirs_exist_ok=True)
            args = [*common, *runs, f"--seed={seed}", f"--num_demos={n}", "--overwrite=true"]  # a rerun redoes it
            jobs[pool.submit(experiment_job, kind, args, run, run / "log.txt", cfg.eval_episodes)] = (kind, n, seed)

        pre = {}
        for s in seeds:  # the same videos, steps and learning rate for both pretrainings of a seed
            for what, method in (("video", "mimic-video"), ("image", "vla")):
                folder = out / f"seed{s}" / f"pretrain_{what}"
                folder.mkdir(parents=True, exist_ok=True)
                args = [*common, f"--seed={s}", f"--method={method}", "--ckpt_every=1000000"]
                if read_train_state(folder / "pretrain") is not None:  # a rerun reuses it, exactly or refuses
                    args.append("--resume=true")
                pre[pool.submit(experiment_job, "pretrain", args, folder, folder / "log.txt", 0)] = (s, what)
        for s in seeds:
            for n in demos:
                submit("scratch", n, s)  # needs no pretraining: starts at once
        for done in pre:
            s, what = pre[done]
            log(0, f"experiment: {what} pretraining of seed {s} done in {done.result()['seconds']:.0f} s")
            for n in demos:
                for kind in (("mimic-video", "joint") if what == "video" else ("vla",)):
                    submit(kind, n, s)
        for done in list(jobs):
            kind, n, seed = jobs[done]
            r = done.result()
            rows.append({"method": kind, "demos": n, "seed": seed, "success": r["success"],
                         "best_step": r["best"] + (cfg.stage1_steps if kind == "mimic-video" else 0),
                         "stopped_step": r["stopped"] + (cfg.stage1_steps if kind == "mimic-video" else 0),
                         "train_seconds": round(r["seconds"])})
            log(0, f"experiment: {kind:12s} {n:5d} demos, seed {seed}: {r['success']:6.1%} at its best step "
                   f"{rows[-1]['best_step']} of {rows[-1]['stopped_step']} ({r['seconds']:.0f} s)")
    wall = time.perf_counter() - t_start
    eval_seeds = [mv.TOY_EVAL_SEEDS + i for i in range(cfg.eval_episodes)]
    random, expert = mv.toy_baselines(eval_seeds, mv.ToyWorldConfig(), 0)
    write_csv(out / "efficiency.csv", rows)
    convergence = []  # validation success against steps on the demonstrations, at one demonstration count, seed 0
    for kind in EXPERIMENT_METHODS:
        path = out / f"seed{seeds[0]}" / f"{cfg.experiment_convergence}demos" / kind / "stage2" / "quick_evals.csv"
        convergence += [dict(zip(("method", "demo_steps", "episodes", "success"), line.split(",")))
                        for line in path.read_text().splitlines()[1:]] if path.exists() else []
    write_csv(out / "convergence.csv", convergence)
    latency = experiment_latency(out, max(demos), seeds[0])
    write_csv(out / "latency.csv", latency)
    plot_experiment(out, rows, convergence, random, expert, cfg.experiment_convergence)
    log(0, f"\nsuccess on {cfg.eval_episodes} held-out episodes at each run's best checkpoint (mean over {len(seeds)} "
           f"seeds; random {random:.1%}, expert {expert:.1%}), {wall / 60:.0f} min for the whole experiment:")
    log(0, f"{'demos':>8} " + " ".join(f"{m:>12}" for m in EXPERIMENT_METHODS))
    for n in demos:
        cells = [np.mean([r["success"] for r in rows if r["method"] == m and r["demos"] == n])
                 for m in EXPERIMENT_METHODS]
        log(0, f"{n:>8} " + " ".join(f"{c:>12.1%}" for c in cells))
    for r in latency:
        log(0, f"latency {r['method']:>12}: {r['ms_per_query']:.1f} ms per query of one environment ({r['what']})")
    log(0, f"wrote {out}/efficiency.csv, convergence.csv, latency.csv, efficiency.png, convergence.png")


EXPERIMENT_SHARED = ("num_pretrain", "pretrain_steps", "pretrain_lr", "pretrain_data", "stage1_steps", "stage1_lr",
                     "stage2_lr", "stage2_warmup", "batch_size", "lora_rank", "lora_alpha", "log_every",
                     "weight_decay", "grad_clip", "quick_eval_episodes")


def write_csv(path, rows):
    if rows:
        lines = [",".join(rows[0])] + [",".join(str(r[k]) for k in rows[0]) for r in rows]
        mv.atomic_write(path, lambda p: Path(p).write_text("\n".join(lines) + "\n"))


def experiment_latency(out, n, seed, rounds=30):
    """Milliseconds per policy query of one environment, the four methods on this CPU in this run, interleaved
    (`mv.query_latency`): mimic-video at k = 0 (one truncated forward, 10 decoder steps), the VLA-style and scratch
    baselines (the same computation), the joint model's full denoising."""
    policies = {kind: mv.load_policy(out / f"seed{seed}" / f"{n}demos" / kind / "policy")
                for kind in EXPERIMENT_METHODS}
    ms = mv.query_latency(policies, mv.toy_probe_observation(), rounds)
    rows = []
    for kind, policy in policies.items():
        what = (f"{policy.model.joint.num_steps} joint denoising steps of the full DiT" if kind == "joint" else
                f"k = 0: one forward to block {policy.model.cfg.tap_block}, {policy.model.cfg.num_action_steps} "
                "decoder steps")
        rows.append({"method": kind, "ms_per_query": round(ms[kind], 2), "what": what})
    return rows


def plot_experiment(out, rows, convergence, random, expert, conv_demos):
    """efficiency.png (success vs demonstrations, one line per method, random and expert levels) and convergence.png
    (validation success vs steps on the demonstrations, one line per method, each until it stopped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(0, "matplotlib is not installed (pip install matplotlib): the CSVs were written, the plots were not")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in EXPERIMENT_METHODS:
        pts = sorted((r["demos"], r["success"]) for r in rows if r["method"] == kind)
        ns = sorted({n for n, _ in pts})
        ax.plot(ns, [np.mean([s for m, s in pts if m == n]) for n in ns], "o-", label=kind)
        ax.scatter([n for n, _ in pts], [s for _, s in pts], s=8, alpha=0.4)
    for level, name, style in ((expert, "scripted expert", ":"), (random, "random actions", "--")):
        ax.axhline(level, color="gray", linestyle=style, linewidth=1, label=name)
    ax.set(xscale="log", xlabel="demonstrations", ylabel=f"success ({len(set(r['seed'] for r in rows))}-seed mean)",
           ylim=(0, 1.02), title="toy world: success vs demonstrations")
    ns = sorted({r["demos"] for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=120)
    if convergence:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in EXPERIMENT_METHODS:
            pts = [(int(r["demo_steps"]), float(r["success"])) for r in convergence if r["method"] == kind]
            if pts:
                ax.plot(*zip(*pts), "o-", label=kind)
        ax.axhline(random, color="gray", linestyle="--", linewidth=1, label="random actions")
        episodes = convergence[0]["episodes"]
        ax.set(xlabel="optimiser steps on the demonstrations", ylabel=f"success ({episodes} validation episodes)",
               ylim=(0, 1.02), title=f"toy world, {conv_demos} demonstrations, seed 0: until each stopped")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=120)


# ----------------------------------------------------------------------------------------------
# the recipe

STAGE_DIRS = {"pretrain": "pretrain", "1": "stage1", "2": "stage2"}


def stages_of(cfg):
    """The stages a run does, in order."""
    if cfg.stage != "all":
        return (cfg.stage,)
    # the baselines have no LoRA stage; "scratch" no pretraining; "vla" pretrains on images, "joint" on video
    pretrain = () if cfg.method == "scratch" or (cfg.video_init and cfg.method != "vla") else ("pretrain",)
    lora = ("1",) if cfg.method == "mimic-video" else ()
    return ("encode", *pretrain, *lora, "2") if cfg.data else (*pretrain, *lora, "2", "eval")


def check_out_dir(cfg, stages):
    """Before any work: --resume needs a checkpoint to resume (a mistyped --out_dir is not a fresh start), a fresh
    run does not silently replace checkpoints already there, and a stage's input exists."""
    out, training = Path(cfg.out_dir), [STAGE_DIRS[s] for s in stages if s in STAGE_DIRS]
    found = {d: read_train_state(out / d) for d in training}
    found = {d: s["step"] for d, s in found.items() if s is not None}
    if cfg.resume and training and not found:
        sys.exit(f"error: --resume=true but {out} holds no checkpoint of {', '.join(training)} (is --out_dir right?)")
    if found and not cfg.resume and not cfg.overwrite:
        held = ", ".join(f"{d} (step {n})" for d, n in found.items())
        sys.exit(f"error: {out} already holds checkpoints: {held}. Continue them with --resume=true, or start over "
                 f"with --overwrite=true (they will be replaced), or choose another --out_dir")
    needs = {"1": ("pretrain", pretrained_file(cfg)),
             "2": ("1", out / "stage1" / "video_fused.safetensors"),
             "eval": ("2", out / "policy" / "config.json")}
    if cfg.method in ("vla", "joint"):  # start from the pretrained image or video model
        needs["2"] = ("pretrain", pretrained_file(cfg))
    fresh = cfg.method == "scratch" or (cfg.method == "joint" and cfg.video_init)  # stage 2 needs no pretraining
    if cfg.video_init:  # stage 1 starts from the given backbone
        needs.pop("1")
    if cfg.data:
        needs.update({s: ("encode", out / "cache" / "meta.json") for s in ("pretrain", "benchmark")})
        needs["2"] = ("encode", out / "cache" / "meta.json") if fresh else needs["2"]
    elif fresh:
        needs.pop("2")
    if cfg.method in ("vla", "joint") and not fresh:  # the comparison's network starts from the pretrained one
        needs["benchmark"] = ("pretrain", pretrained_file(cfg))
    for stage in stages:
        if stage in needs and needs[stage][0] not in stages and not needs[stage][1].exists():
            sys.exit(f"error: --stage={stage} reads {needs[stage][1]}, which does not exist: run "
                     f"--stage={needs[stage][0]} first (or check --out_dir)")


def main(argv):
    cfg = mv.parse_config(argv, TrainConfig)
    stages = stages_of(cfg)
    try:
        check_dataset(cfg, stages)
    except (ValueError, FileNotFoundError, ImportError) as e:  # DatasetError is a ValueError
        sys.exit(f"error: {e}")
    env = rank, world, device, autocast = setup(cfg)
    out = Path(cfg.out_dir)
    lock = RunLock(out)
    # a cluster's preemption (SIGTERM) ends the run as Ctrl-C does, through the `finally` that frees the folder (a
    # job requeued on another machine would find the lock held); checkpoints are whole either way
    terminate = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if rank == 0:
            check_out_dir(cfg, stages)
            lock.acquire(lambda *a: log(rank, *a))
        barrier(world)
        torch.manual_seed(cfg.seed)
        log(rank, "config:", json.dumps(asdict(cfg)))
        log(rank, f"device {device}, {world} process(es), {torch.get_num_threads()} thread(s) each")
        t_start = time.perf_counter()
        if stages == ("export",):
            if rank == 0:
                export_toy(cfg, mv.ToyWorldConfig(), out, lambda *a: log(rank, *a))
        elif stages == ("experiment",):
            run_experiment(cfg, env)
        elif cfg.data:
            run_dataset(cfg, stages, env)
        else:
            run_toy(cfg, stages, env)
        log(rank, f"done in {time.perf_counter() - t_start:.0f} s")
    except (CheckpointWriteError, StepOutOfMemory) as e:
        sys.exit(f"error: {e}")
    finally:
        lock.release()
        signal.signal(signal.SIGTERM, terminate)
        if world > 1:
            dist.destroy_process_group()


def benchmark_data(name, model, data, cfg, env, steps=20):
    """Is training data-bound? Samples per second of the data path next to the time of a training step, one run, as
    each rank trains: its share of the batch, in --grad_accum micro-batches (the whole batch at once would not fit
    where training needs micro-batches)."""
    rank, world, device, autocast = env
    g = torch.Generator().manual_seed(0)
    B, b = cfg.batch_size, cfg.batch_size // world  # the global batch, this rank's share
    m = b // cfg.grad_accum
    t0 = time.perf_counter()
    for _ in range(steps):
        data.batch(g, B, slice(0, b), model)
    data_s = (time.perf_counter() - t0) / steps
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-4)
    latent_shape, action_shape = data.shapes(model)
    batch = {k: v.to(device) for k, v in data.batch(g, B, slice(0, b), model).items()}
    noise = step_noise(model, "action", B, latent_shape, action_shape, g, slice(0, b), device)
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        opt.zero_grad()
        for j in range(0, b, m):  # training's micro-batches
            with autocast:
                out = model("action", **{k: v[j:j + m] for k, v in batch.items()},
                            noise={k: v[j:j + m] for k, v in noise.items()})
            (out["loss"] / cfg.grad_accum).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    log(rank, f"{name} data path: {b / data_s:,.0f} samples/s ({1000 * data_s:.1f} ms per batch of {b}"
              f"{' on each rank' if world > 1 else ''}); training step (stage 2, {cfg.grad_accum} x {m}): "
              f"{1000 * step_s:.1f} ms; the data path takes {data_s / step_s:.1%} of a step's time "
              f"({'data-bound' if data_s > step_s else 'not data-bound'}, measured in one run)")


def pretrained_file(cfg):
    """What the pretraining stage writes: the video model, or for --method=vla the image model."""
    return Path(cfg.out_dir) / "pretrain" / ("image.safetensors" if cfg.method == "vla" else "video.safetensors")


def pretrain_stage(model, videos, cfg, env, inputs=None, val_data=None):
    """Without a pretrained backbone: the video model learns to predict the videos (the decoder does not train).
    --method=vla: the same network learns the same frames as still images with their instructions (mv.VLAModel's
    image_loss), with the same data, steps and learning rate."""
    model.decoder.requires_grad_(False)
    if cfg.method != "vla" and env[0] == 0:  # a diagnostic: one rank computes it
        mean, still = loss_levels(model, val_data or videos, cfg)
        log(env[0], f"pretrain: the video loss of knowing only each future latent's mean is {mean:.4f}, of "
                    f"predicting that nothing moves {still:.4f} (on the {'validation' if val_data else 'training'} "
                    "windows): below these, the video model has learned how the scenes move")
    train_stage("pretrain", 0, model, videos, cfg.pretrain_steps, cfg.pretrain_lr, cfg, env, inputs, val_data=val_data,
                loss="image" if cfg.method == "vla" else "video")
    if env[0] == 0:
        mv.save_video_dit_checkpoint(model.video, pretrained_file(cfg))
    barrier(env[1])


def lora_stage(model, demos, cfg, env, inputs, val_data=None):
    """Stage 1: LoRA (and adaLN) on the video model, on the demonstrations' videos; the backbone is written fused
    (the released layout: LoRA merged, `net.` keys) and as a PEFT adapter."""
    model.decoder.requires_grad_(False)
    train_stage("stage1", 1, model, demos, cfg.stage1_steps, cfg.stage1_lr, cfg, env, inputs, val_data=val_data)
    if env[0] == 0:
        mv.save_video_dit_checkpoint(model.video, Path(cfg.out_dir) / "stage1" / "video_fused.safetensors")
        mv.save_lora_adapter(model.video, Path(cfg.out_dir) / "stage1" / "adapter")
    barrier(env[1])


def decoder_stage(model, demos, steps, cfg, env, inputs, policy_cfg, method="mimic-video", on_checkpoint=None,
                  val_data=None):
    """Stage 2 (a baseline's only stage): train, then write the policy folder that mv.load_policy and sample.py
    read."""
    train_stage("stage2", 2, model, demos, steps, cfg.stage2_lr, cfg, env, inputs, on_checkpoint, val_data)
    folder = Path(cfg.out_dir) / "policy"
    if env[0] == 0:
        model.requires_grad_(False)
        mv.save_policy_folder(folder, model, policy_cfg, method)
        log(0, f"wrote the {method} policy to {folder} (camera {policy_cfg.camera}, {policy_cfg.n_action_steps} of "
               f"{model.num_actions} actions per query)")
    barrier(env[1])


@dataclass
class Source:
    """What the stages need to know of where a run's data comes from: the toy world or an encoded dataset."""

    name: str  # how the benchmark names it
    videos: Callable  # () -> the pretraining videos (ToyData or CachedData)
    demos: Callable  # () -> the demonstrations
    val: Callable  # stage ("pretrain", "1", "2") -> the held-out data it logs and --patience stops on, or None
    configs: tuple  # the VideoDiTConfig, ActionDecoderConfig and VideoActionConfig that fit the data
    representation: mv.Representation  # environment vectors <-> the decoder's
    inputs: dict  # fingerprints of the data, checked on resume
    policy: Callable  # (model, offset) -> (the PolicyConfig the policy folder is written with, a quick eval or None)


def toy_source(cfg, env):
    """The toy world: episodes made on the fly, encoded as the policy encodes its observations; stage 2 evaluates the
    policy in closed loop at each checkpoint (and stops on that with --patience)."""
    rank, world, device, autocast = env
    world_cfg = mv.ToyWorldConfig()
    # the policy around the model: the toy world's camera, encoders (pixels, hashed words) and representation
    policy_cfg = mv.make_config(mv.PolicyConfig, "toy", mv.POLICY_PRESETS, stop_after_step=cfg.stop_after_step)
    encoders = (mv.build_video_encoder(policy_cfg.video_encoder, device),
                mv.build_text_encoder(policy_cfg.text_encoder))
    representation = mv.Representation.from_config(policy_cfg.representation)
    configs = (mv.make_config(mv.VideoDiTConfig, cfg.video_preset, mv.VIDEO_DIT_PRESETS),
               mv.make_config(mv.ActionDecoderConfig, cfg.decoder_preset, mv.ACTION_DECODER_PRESETS),
               mv.make_config(mv.VideoActionConfig, cfg.model_preset, mv.VIDEO_ACTION_PRESETS))
    if configs[0].in_channels != 5:
        sys.exit("error: the toy world's frames become 5-channel latents (RGB + x, y); the real presets need a latent "
                 "dataset")

    def episodes(kind):
        return ToyData(load_demos(kind, cfg, world_cfg, rank, world), world_cfg, encoders, representation)

    def policy(model, offset):
        p = mv.Policy(model, policy_cfg, *encoders, method=cfg.method)
        return p.config, quick_eval(p, model, cfg, rank, offset)

    return Source("toy world", lambda: episodes(cfg.pretrain_data), lambda: episodes("demos"),
                  lambda stage: episodes("val") if stage == "2" and cfg.patience else None, configs, representation,
                  {}, policy)


def dataset_source(cfg, env):
    """An encoded dataset (the cache --stage=encode wrote): windows read from memory maps; the validation episodes
    are logged in every stage."""
    out = Path(cfg.out_dir)
    data = CachedData(out / "cache")
    val = CachedData(out / "cache", "val") if data.meta["val"] else None
    if cfg.patience and val is None and cfg.stage in ("all", "2"):  # the encode held out none (without --patience)
        sys.exit(f"error: --patience stops on the validation loss, and {out / 'cache'} holds out no validation "
                 "episode: encode again with a larger --val_fraction (--stage=encode), or drop --patience")
    plan = data.meta["plan"]
    representation = mv.Representation.from_config(plan["representation"])
    videos = (lambda: CachedData(out / "cache_videos")) if cfg.pretrain_videos else (lambda: data)
    return Source(f"cache {out / 'cache'}", videos, lambda: data, lambda stage: val,
                  dataset_models(cfg, data, representation), representation, {"cache": plan["fingerprint"]},
                  lambda model, offset: (dataset_policy_config(cfg, plan, representation), None))


def run_stages(cfg, stages, env, src):
    """The recipe on any data source: pretraining (without a pretrained backbone), stage 1 (LoRA on the video model),
    stage 2 (the decoder on the frozen backbone), or a comparison's training on the demonstrations."""
    rank, world, device, autocast = env
    out = Path(cfg.out_dir)
    video_cfg, decoder_cfg, model_cfg = src.configs
    rep = src.representation

    def model_with(video, stats=None):
        """mimic-video's network around a video DiT (vla: with its image pretraining); stage 2 adds the statistics."""
        norms = rep.normalizers(stats) if stats is not None else (None, None)
        model_cls = mv.VLAModel if cfg.method == "vla" else mv.VideoActionModel
        return model_cls(video, mv.ActionDecoder(decoder_cfg), model_cfg, *norms).to(device)

    def load_frozen(source, filename=None, config=None):
        return mv.load_video_dit(source, filename, config, device=device, dtype=frozen_dtype(autocast))

    if "pretrain" in stages:  # no pretrained backbone: a small video (vla: image) model learns the frames
        videos = src.videos()
        pretrain_stage(model_with(mv.VideoDiT(video_cfg)), videos, cfg, env, src.inputs, src.val("pretrain"))

    if "1" in stages:
        demos = src.demos()
        if cfg.video_init:  # a pretrained backbone, e.g. Cosmos-Predict2-2B (the paper's setup)
            video = load_frozen(cfg.video_init, cfg.video_init_file or None, video_cfg)
            start = f"{cfg.video_init}:{cfg.video_init_file}"
        else:
            video = load_frozen(out / "pretrain" / "video.safetensors")
            start = fingerprint(out / "pretrain" / "video.safetensors")
        mv.inject_lora(video, mv.LoRAConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha))
        lora_stage(model_with(video), demos, cfg, env, {**src.inputs, "video": start}, src.val("1"))

    if "2" not in stages and "benchmark" not in stages:
        return
    demos = src.demos()
    if cfg.method == "mimic-video":  # the decoder on the frozen, LoRA-finetuned backbone
        source = out / "stage1" / "video_fused.safetensors"
        trained = source.exists()  # else --stage=benchmark times a fresh network: speed does not need weights
        video = load_frozen(source).requires_grad_(False) if trained else mv.VideoDiT(video_cfg)
        start = {"video": fingerprint(source)} if trained else {}
        model, steps = model_with(video, demos.stats()), cfg.stage2_steps
    else:  # a comparison, for as many steps on the demonstrations as mimic-video's stages 1 and 2 together
        norms, steps = rep.normalizers(demos.stats()), cfg.stage1_steps + cfg.stage2_steps
        if cfg.method == "joint":  # the pretrained (or given) video model with action tokens
            source = cfg.video_init or pretrained_file(cfg)
            video = mv.load_video_dit(source, cfg.video_init_file or None, video_cfg if cfg.video_init else None,
                                      device=device)
            jcfg = mv.JointConfig(state_dim=rep.model_state_dim, action_dim=rep.model_action_dim,
                                  chunk=decoder_cfg.num_actions)
            model = mv.JointVideoActionModel(video, jcfg, model_cfg, *norms).to(device)
            start = {"video": f"{cfg.video_init}:{cfg.video_init_file}" if cfg.video_init else fingerprint(source)}
        else:
            model, start = vla_model(cfg, video_cfg, decoder_cfg, model_cfg, norms, device)
    if "benchmark" in stages:
        if cfg.method == "mimic-video":
            return benchmark_data(src.name, freeze_video(model), demos, cfg, env)
        return benchmark_data(f"{src.name} ({cfg.method})", model, demos, cfg, env)
    policy_cfg, on_checkpoint = src.policy(model, cfg.stage1_steps if cfg.method == "mimic-video" else 0)
    decoder_stage(model, demos, steps, cfg, env, {**src.inputs, **start}, policy_cfg, cfg.method, on_checkpoint,
                  src.val("2"))


def vla_model(cfg, video_cfg, decoder_cfg, model_cfg, norms, device):
    """The VLA-style baselines: mimic-video's network (video DiT + decoder, a k = 0 query's inputs), trained end to
    end on the action loss, from the image-pretrained backbone ("vla") or from random initialisation ("scratch").
    The decoder reads block `tap_block`, so the blocks after it never run: they are dropped (DistributedDataParallel
    requires every trained parameter to get a gradient), and the output layer, kept so the policy folder has the
    VideoDiT layout, is frozen. The full network is drawn first and then cut, so the random initialisation is the one
    the recorded results were measured with. Returns the model and the fingerprint of the file it starts from."""
    video = mv.VideoDiT(video_cfg)
    decoder = mv.ActionDecoder(decoder_cfg)
    inputs = {}
    if cfg.method == "vla":
        source = pretrained_file(cfg)
        video, inputs = mv.load_video_dit(source, None, device=device), {"video": fingerprint(source)}
    tap = model_cfg.tap_block
    video.blocks, video.cfg = video.blocks[:tap], mv.replace(video.cfg, num_blocks=tap)
    video.final_layer.requires_grad_(False)
    return mv.VLAModel(video, decoder, model_cfg, *norms).to(device), inputs


def freeze_video(model):
    """Stage 2's trainable set: the decoder only."""
    model.video.requires_grad_(False)
    model.decoder.requires_grad_(True)
    return model


def run_toy(cfg, stages, env):
    """The toy world: the stages, then the closed-loop evaluation of the policy on held-out episodes."""
    run_stages(cfg, stages, env, toy_source(cfg, env))
    if "eval" in stages and env[0] == 0:
        world_cfg = mv.ToyWorldConfig()
        policy = mv.load_policy(Path(cfg.out_dir) / "policy", device=env[2], stop_after_step=cfg.stop_after_step)
        try:  # --stage=eval reads whatever policy the folder holds: one trained on a dataset does not fit
            mv.check_fits_env(policy, Path(cfg.out_dir) / "policy", "the toy world (--stage=eval)", *mv.TOY_ENV)
        except ValueError as e:
            sys.exit(f"error: {e}")
        seeds = [mv.TOY_EVAL_SEEDS + i for i in range(cfg.eval_episodes)]
        random, expert = mv.toy_baselines(seeds, world_cfg, cfg.seed)
        rate = evaluate(policy, cfg.eval_episodes, world_cfg)
        tau_v = float(mv.sigma_to_tau(mv.karras_sigmas(35)[cfg.stop_after_step]))
        method = policy.method  # the folder's (--stage=eval reads whatever policy it holds)
        how = (f"stop_after_step={cfg.stop_after_step}, tau_v={tau_v:.4f}" if method == "mimic-video" else
               "the same network, image-pretrained, end to end" if method == "vla" else
               "the same network from random initialisation, end to end" if method == "scratch"
               else f"{policy.model.joint.num_steps} joint denoising steps")
        print(f"\nclosed-loop success on {cfg.eval_episodes} held-out episodes:")
        print(f"  random policy     {random:6.1%}")
        print(f"  scripted expert   {expert:6.1%}")
        print(f"  {method:<17} {rate:6.1%}   ({how})")


def run_dataset(cfg, stages, env):
    """A LeRobot dataset: encode it once (and the pretraining videos), then the stages on the cache."""
    rank, world, device, autocast = env
    out = Path(cfg.out_dir)
    if "encode" in stages:
        # the ranks wait for each other on gloo, whose timeout we set: NCCL's 10 minutes would abort a long encode
        group = dist.new_group(backend="gloo", timeout=timedelta(days=1)) if world > 1 else None
        for source, folder in ((cfg.pretrain_videos, out / "cache_videos"), (cfg.data, out / "cache")):
            if source:
                ds = LeRobotDataset(source, cfg.camera, cfg.state_key, cfg.action_key)
                representation = (mv.Representation("libero") if cfg.representation == "libero" else
                                  mv.Representation("identity", ds.state_dim, ds.action_dim))
                size, hw = ds.frame_size(), cfg.image_hw()  # the frames as stored, and as the model sees them
                resized = "" if size in (None, hw) else (f" ({size[0]}x{size[1]} frames, resized to {hw[0]}x{hw[1]}: "
                                                         "--image_size)")
                log(rank, f"{source}: LeRobot {ds.version}, {len(ds)} episodes at {ds.fps:g} fps, camera {ds.camera}"
                          f"{resized}, state {ds.state_dim}-D, action {ds.action_dim}-D")
                encode_dataset(cfg, ds, folder, timing_preset(cfg.timing, ds.fps), representation, env, group,
                               lambda *a: log(rank, *a))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the encoders are gone: give their memory back before training
    if set(stages) & {"pretrain", "1", "2", "benchmark"}:
        run_stages(cfg, stages, env, dataset_source(cfg, env))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (DatasetError, mv.CheckpointReadError, mv.CheckpointMismatchError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")  # a user's file or dataset, or an optional package to install: one line

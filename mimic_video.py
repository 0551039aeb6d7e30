"""
mimic-video in one file: a video-action model that grounds robot control in a pretrained video DiT.

Paper: Pai et al., "Video-Action Models for Generalizable Robot Control Beyond VLAs", arXiv 2512.15692.
Official code: github.com/mimic-video/mimic-video (commit e3355dbc) on top of NVIDIA's
cosmos-predict2 (commit 661da477). Module and parameter names below mirror the official checkpoints,
so loading the released weights is a strict state-dict copy.

The recipe: a frozen Cosmos-Predict2-2B Video2World DiT (LoRA-finetuned on robot video in stage 1)
is run only up to a noise level tau_v ("partial denoising"); the hidden states of one of its middle
blocks condition a flow-matching action decoder (stage 2), a small DiT acting as an inverse-dynamics
model that outputs an action chunk.

One time convention everywhere (rectified flow):
    x_tau = (1 - tau) * x0 + tau * eps,   tau = 1 is pure noise, tau = 0 is data,
    u     = eps - x0                      (the velocity every network here predicts).
Cosmos samples in EDM noise levels sigma (x_sigma = x0 + sigma * eps); the two are tied by
tau = sigma / (1 + sigma) and x_tau = (1 - tau) * x_sigma.

Reading order: every name is defined before it is used.
Part I, the method (a reader can stop at its end and has all of it):
    1. flow matching: interpolation, target, loss, time samplers, Euler, the Cosmos RF-AB2 sampler
    2. building blocks: sinusoids, attention with q/k RMSNorm and 3D RoPE, AdaLN-LoRA DiT block
    3. the Cosmos-Predict2 video DiT, Video2World conditioning and partial denoising
    4. LoRA (PEFT-compatible names), merge and fuse
    5. checkpoint loading: the official key layout, a strict copy
    6. the action decoder and its normalizer
    7. the video-action model: stage-1/2 losses, partial-denoising sampling
Part II, around the model:
    8. checkpoint files: reading (local or Hugging Face Hub; .pt, .safetensors, diffusers' layout), saving
    9. rotations and state/action representations
   10. encoders: the Wan2.1 VAE and T5 (optional packages), and offline stand-ins
   11. the comparison models: VideoVLA-style joint denoising, the VLA-style baseline
   12. the policy: LeRobot's reset() / select_action(), frame history, one folder format, released checkpoints
   13. a toy world to run the whole recipe on a CPU
   14. command-line configs for train.py and sample.py
(LeRobot datasets, read and written, live in train.py: only it reads and writes them.)
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import importlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from einops.layers.torch import Rearrange


# ------------------------------------------------------------------------------------------------
# 1. Flow matching: the math, time samplers and integrators
# ------------------------------------------------------------------------------------------------


def _expand_like(tau, x):
    """(B,) or scalar time -> shape (B, 1, ..., 1) broadcastable against x."""
    tau = torch.as_tensor(tau, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return tau.reshape(tau.shape + (1,) * (x.dim() - tau.dim())) if tau.dim() else tau


def interpolate(x0, eps, tau):
    """x_tau on the straight path from data (tau = 0) to noise (tau = 1); tau broadcasts from the left."""
    tau = _expand_like(tau, x0)
    return (1 - tau) * x0 + tau * eps


def velocity_target(x0, eps):
    """The velocity d x_tau / d tau = eps - x0 that every network in this file predicts."""
    return eps - x0


def flow_loss(v_hat, u, mask=None):
    """Per-sample mean squared velocity error (B,); `mask` (broadcastable to u) selects the entries that count
    (stage 1: the future frames only, the given context frames are not predicted)."""
    err = (v_hat.float() - u.float()) ** 2
    dims = tuple(range(1, err.dim()))
    if mask is None:
        return err.mean(dim=dims)
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1)


def sigma_to_tau(sigma):
    """EDM noise level -> flow time (Cosmos `RectifiedFlowScaling`): tau = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def tau_to_sigma(tau):
    """Flow time -> EDM noise level: sigma = tau / (1 - tau)."""
    return tau / (1 - tau)


# Time samplers. The official configs and the paper disagree on both densities; we default to the
# released code (what produced the checkpoints) and keep the paper's version one argument away.
def sample_video_sigma(batch, generator=None, device=None, multiplier=4.0, p_high=0.05, high=(200.0, 1e5)):
    """Video noise level as the official stage-2 code draws it (`draw_video_sigma`).

    sigma = multiplier * exp(N(0, 1)) (multiplier = sqrt(state_t) = 4 for 16 latent frames), and with
    probability p_high a log-uniform sigma in [200, 1e5]. Returns sigma, shape (batch,); the flow time
    is tau_v = sigma / (1 + sigma), i.e. logit(tau_v) ~ N(ln 4, 1) plus a 5% tail near pure noise.
    """
    n = torch.randn(batch, generator=generator, device=device)
    sigma = multiplier * torch.exp(n)
    u_high = torch.rand(batch, generator=generator, device=device)
    log_high = math.log(high[0]) + u_high * (math.log(high[1]) - math.log(high[0]))
    use_high = torch.rand(batch, generator=generator, device=device) < p_high
    return torch.where(use_high, torch.exp(log_high), sigma)


def sample_tau_logit_normal(batch, generator=None, device=None, mean=0.0, std=1.0):
    """Video flow time as the paper states it: logit(tau) ~ N(mean, std^2)."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))


def sample_tau_action_uniform(batch, generator=None, device=None, tau_min=0.001):
    """Action flow time as released: BetaScheduler(alpha=1, beta=1), i.e. uniform on [0.001, 1]."""
    return tau_min + (1 - tau_min) * torch.rand(batch, generator=generator, device=device)


def sample_tau_action_beta(batch, generator=None, device=None, alpha=1.5, tau_min=0.001):
    """Action flow time as the paper states it: Beta(1.5, 1) * 0.999 + 0.001, p(tau) ~ sqrt(tau - 0.001).

    Beta(alpha, 1) has CDF x^alpha, so inverse-CDF sampling u^(1/alpha) is exact and seedable
    (the official class draws the same density through two Gamma variates). It favours the noise end.
    """
    u = torch.rand(batch, generator=generator, device=device)
    return u ** (1.0 / alpha) * (1 - tau_min) + tau_min


def euler_integrate(velocity_fn, x, num_steps=10, tau_start=1.0, tau_stop=0.0):
    """Fixed-step Euler from tau_start down to tau_stop: x <- x + dt * v(x, tau), dt < 0.

    Like the official BetaScheduler, each update and the time accumulation run in float64 and are
    cast back (x to its own dtype, tau to float32), so iterates match the released sampler exactly.
    """
    dt = (tau_stop - tau_start) / num_steps
    tau = torch.full((x.shape[0],), tau_start, dtype=torch.float32, device=x.device)
    for _ in range(num_steps):
        v = velocity_fn(x, tau)
        x = (x.double() + dt * v.double()).to(x.dtype)  # x_{tau + dt} = x_tau + dt * v
        tau = (tau.double() + dt).float()
    return x


# The Cosmos rectified-flow sampler (`RectifiedFlowAB2Scheduler`): Karras sigmas, an Euler first step,
# then 2nd-order Adams-Bashforth steps in exponential-integrator form, all on x0 predictions.
def karras_sigmas(num_steps=35, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """(num_steps + 1,) float64 EDM schedule from sigma_max down to sigma_min."""
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / num_steps * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def rf_ab2_step(x, x0, x0_prev, sigmas, i):
    """One sampler step from sigmas[i] to sigmas[i+1] given the current and previous x0 predictions.

    x is x_sigma (EDM space). Step 0 is Euler in x0 form; later steps are AB2 with lambda = -log sigma
    (official `reg_x0_euler_step` / `res_x0_rk2_step`). Math in float64, result in x's dtype.
    """
    s, t = float(sigmas[i]), float(sigmas[i + 1])
    x64, x0_64 = x.double(), x0.double()
    if i == 0:
        return (((s - t) / s) * x0_64 + (t / s) * x64).to(x.dtype)
    lam_prev, lam_s, lam_t = -math.log(float(sigmas[i - 1])), -math.log(s), -math.log(t)
    h = lam_t - lam_s
    c2 = (lam_prev - lam_s) / h  # negative: the previous point lies behind us
    phi1 = math.expm1(-h) / (-h)
    phi2 = (phi1 - 1) / (-h)
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    return (math.exp(-h) * x64 + h * (b1 * x0_64 + b2 * x0_prev.double())).to(x.dtype)


def rf_ab2_sample(x0_fn, eps, sigmas, num_steps=None):
    """Run `num_steps` sampler steps from x = sigma_0 * eps; return the sample x_sigma at sigmas[num_steps].

    x0_fn(x_sigma, i) -> x0 prediction at sigmas[i]. With num_steps = len(sigmas) - 1 this is the full
    loop; the official sampler then makes one last clean pass x0_fn(x, N) (see `cosmos_sample`).
    """
    num_steps = len(sigmas) - 1 if num_steps is None else num_steps
    x = eps * float(sigmas[0])  # initial sample x_sigma_max = 80 * eps
    x0_prev = None
    for i in range(num_steps):
        x0 = x0_fn(x, i)
        x = rf_ab2_step(x, x0, x0_prev, sigmas, i)
        x0_prev = x0
    return x


# ------------------------------------------------------------------------------------------------
# 2. Building blocks shared by the video DiT and the action decoder
# ------------------------------------------------------------------------------------------------


def timestep_sinusoid(tau, dim, max_period=10000.0):
    """Cosmos `Timesteps`: [cos | sin] of tau * exp(-ln(10000) i / (dim/2)). Raw tau in [0, 1], no x1000."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=tau.device) / half)
    angles = tau.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_axis_freqs(dim, extrapolation_ratio, device=None):
    """Frequencies theta^(-2k/dim) of one RoPE axis, with Cosmos' NTK-scaled base theta."""
    theta = 10000.0 * extrapolation_ratio ** (dim / (dim - 2))
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim)


def rope3d_angles(T, H, W, head_dim, ratios=(1.0, 3.0, 3.0), device=None):
    """Angles (T*H*W, head_dim) of Cosmos' 3D RoPE (`VideoRopePosition3DEmb`), tokens in (t, h, w) order.

    The head dim splits into t | h | w with h = w = head_dim // 6 * 2 (42 of 128) and t the rest (44);
    the 64 angles [t | h | w] are duplicated to 128 for the rotate-half convention. Positions are plain
    frame/row/column indices: the released models switch fps modulation off.
    """
    dim_hw = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_hw
    pos = lambda n: torch.arange(n, dtype=torch.float32, device=device)  # noqa: E731
    a_t = torch.outer(pos(T), rope_axis_freqs(dim_t, ratios[0], device))  # (T, dim_t/2)
    a_h = torch.outer(pos(H), rope_axis_freqs(dim_hw, ratios[1], device))  # (H, dim_hw/2)
    a_w = torch.outer(pos(W), rope_axis_freqs(dim_hw, ratios[2], device))  # (W, dim_hw/2)
    angles = torch.cat([
        a_t[:, None, None, :].expand(T, H, W, -1),
        a_h[None, :, None, :].expand(T, H, W, -1),
        a_w[None, None, :, :].expand(T, H, W, -1),
    ], dim=-1).reshape(T * H * W, head_dim // 2)  # (L, head_dim/2)
    return torch.cat([angles, angles], dim=-1)  # (L, head_dim)


def apply_rope(x, cos, sin):
    """Non-interleaved rotate-half RoPE in fp32 (TE fused RoPE): x (B, L, heads, hd), cos/sin (L, 1, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 and returned in the input dtype, like Transformer Engine's (eps 1e-6)."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with per-head q/k RMSNorm (eps 1e-6), no biases; self-attention when context is None."""

    def __init__(self, query_dim, context_dim, num_heads):
        super().__init__()
        if query_dim % num_heads:  # a config mistake, said here rather than as a reshape error in the first forward
            raise ValueError(f"model_channels={query_dim} does not split into num_heads={num_heads} heads")
        self.num_heads, self.head_dim = num_heads, query_dim // num_heads
        # registration order = official state-dict order
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.output_proj = nn.Linear(query_dim, query_dim, bias=False)

    def kv(self, context):
        """Normalized keys and values of a context (B, N, C) -> 2 x (B, heads, N, hd); cacheable."""
        k = self.k_norm(self.k_proj(context).unflatten(-1, (self.num_heads, self.head_dim)))  # (B, N, h, hd)
        v = self.v_proj(context).unflatten(-1, (self.num_heads, self.head_dim))  # (B, N, h, hd)
        return k, v

    def forward(self, x, context=None, rope=None, kv=None):
        """x (B, L, D); context (B, N, C) or None (self-attention); rope = (cos, sin) for self-attention;
        kv = precomputed `kv(context)`. Returns (B, L, D)."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))  # (B, L, h, hd)
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        if rope is not None:  # RoPE after the q/k norm, self-attention only
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, L, hd)
        return self.output_proj(out.transpose(1, 2).flatten(2))  # (B, L, D)


class MLP(nn.Module):
    """GPT-2 feed-forward (official `GPT2FeedForward`): layer2(GELU(layer1(x))), exact GELU, no biases."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


def adaln_lora_modulation(cond_dim, lora_dim, out_dim):
    """AdaLN-LoRA: SiLU -> Linear(cond, r) -> Linear(r, out). Keys `.1` and `.2` as in the checkpoints."""
    return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, lora_dim, bias=False), nn.Linear(lora_dim, out_dim, bias=False))


class DiTBlock(nn.Module):
    """Transformer block with AdaLN-LoRA modulation, shared by the video DiT and the action decoder.

    x has shape (B, T, S, D): T positions carrying their own time (latent frames for video, tokens for
    the decoder) times S tokens sharing it (the H'*W' patches of a frame; 1 for the decoder). Each
    sub-layer is  x <- x + gate * Op(LN(x) * (1 + scale) + shift)  with (shift, scale, gate) from
    adaln_modulation_<op>(emb) + adaln_lora, where adaln_lora is ONE vector shared by every block.
    The video DiT runs self -> cross -> MLP; the official action decoder runs cross -> self -> MLP.
    """

    def __init__(self, dim, context_dim, num_heads, mlp_ratio, cond_dim, adaln_lora_dim,
                 order=("self_attn", "cross_attn")):
        super().__init__()
        self.order = tuple(order) + ("mlp",)
        for name in order:
            setattr(self, name, Attention(dim, context_dim if name == "cross_attn" else dim, num_heads))
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        for name in self.order:
            setattr(self, f"adaln_modulation_{name}", adaln_lora_modulation(cond_dim, adaln_lora_dim, 3 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # parameter-free, shared by the 3 sub-layers

    def forward(self, x, emb, adaln_lora, context=None, rope=None, context_kv=None):
        """x (B, T, S, D); emb (B, T, cond_dim); adaln_lora (B, T, 3D); context (B, N, C). Returns (B, T, S, D)."""
        B, T, S, D = x.shape
        for name in self.order:
            m = getattr(self, f"adaln_modulation_{name}")(emb) + adaln_lora  # (B, T, 3D)
            shift, scale, gate = m[:, :, None, :].chunk(3, dim=-1)  # 3 x (B, T, 1, D)
            h = self.norm(x) * (1 + scale) + shift
            if name == "mlp":
                out = self.mlp(h)
            elif name == "self_attn":
                out = self.self_attn(h.reshape(B, T * S, D), rope=rope).view(B, T, S, D)
            else:
                out = self.cross_attn(h.reshape(B, T * S, D), context, kv=context_kv).view(B, T, S, D)
            x = x + gate * out
        return x


class FinalLayer(nn.Module):
    """Final AdaLN (shift, scale; no gate) + Linear to the output features; uses adaln_lora[..., :2D]."""

    def __init__(self, dim, cond_dim, adaln_lora_dim, out_features):
        super().__init__()
        self.linear = nn.Linear(dim, out_features, bias=False)
        self.adaln_modulation = adaln_lora_modulation(cond_dim, adaln_lora_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb, adaln_lora):
        """x (B, T, S, D); emb (B, T, cond_dim); adaln_lora (B, T, >= 2D). Returns (B, T, S, out)."""
        D = x.shape[-1]
        m = self.adaln_modulation(emb) + adaln_lora[..., : 2 * D]  # (B, T, 2D)
        shift, scale = m[:, :, None, :].chunk(2, dim=-1)  # 2 x (B, T, 1, D)
        return self.linear(self.norm(x) * (1 + scale) + shift)


def _init_linear(module, std=None):
    """Truncated normal (cut at 3 std) with std 1/sqrt(fan_in) unless given; biases to zero."""
    std = 1.0 / math.sqrt(module.weight.shape[1]) if std is None else std
    nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------
# 3. The Cosmos-Predict2 Video2World DiT
# ------------------------------------------------------------------------------------------------


@dataclass
class VideoDiTConfig:
    """Cosmos-Predict2 Video2World DiT (`MinimalV1LVGDiT`); defaults are the released 2B model."""

    in_channels: int = 16  # latent channels (Wan2.1 VAE); the net adds a condition-mask and a padding-mask channel
    out_channels: int = 16  # predicted velocity channels
    patch_spatial: int = 2  # patch height and width in latent pixels
    patch_temporal: int = 1  # patch length in latent frames
    model_channels: int = 2048  # transformer width D
    num_blocks: int = 28  # depth; mimic-video taps the output of block 20
    num_heads: int = 16  # attention heads (head dim D / heads = 128)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    crossattn_emb_channels: int = 1024  # text embedding width (T5-11B encoder: 1024)
    adaln_lora_dim: int = 256  # rank of the AdaLN-LoRA modulation
    max_img_h: int = 240  # RoPE table limit in latent pixels (H / patch <= 120)
    max_img_w: int = 240
    max_frames: int = 128  # RoPE table limit in latent frames
    rope_t_extrapolation_ratio: float = 1.0  # NTK base scaling of the RoPE axes
    rope_h_extrapolation_ratio: float = 3.0
    rope_w_extrapolation_ratio: float = 3.0


VIDEO_DIT_PRESETS = {
    # nvidia/Cosmos-Predict2-2B-Video2World (all four 480p/720p x 10/16 fps checkpoints share it)
    "cosmos-predict2-2b": VideoDiTConfig(),
    # the reference fixtures' tiny model: same code paths, 247k parameters
    "tiny": VideoDiTConfig(model_channels=64, num_blocks=3, num_heads=2, adaln_lora_dim=16, crossattn_emb_channels=24),
    # the toy world (Part II) on a CPU: 8 x 8 frames as 5-channel latents (RGB + x, y), 2 x 2 tokens a frame
    "toy": VideoDiTConfig(in_channels=5, out_channels=5, patch_spatial=4, model_channels=64, num_blocks=4, num_heads=2,
                          crossattn_emb_channels=32, adaln_lora_dim=16, max_img_h=8, max_img_w=8),
}


class PatchEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, T', H', W', D). Features are packed (c, r, m, n): channel outermost."""

    def __init__(self, in_channels, dim, p, pt):
        super().__init__()
        self.proj = nn.Sequential(
            Rearrange("b c (t r) (h m) (w n) -> b t h w (c r m n)", r=pt, m=p, n=p),
            nn.Linear(in_channels * pt * p * p, dim, bias=False),
        )

    def forward(self, x):
        return self.proj(x)


class TimestepEmbedding(nn.Module):
    """Cosmos `TimestepEmbedding` in AdaLN-LoRA mode: the MLP output is the global adaln_lora vector."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, s):
        return self.linear_2(F.silu(self.linear_1(s)))


class Timesteps(nn.Module):
    """Parameter-free sinusoid of the raw flow time (index 0 of the official `t_embedder`)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, tau):
        return timestep_sinusoid(tau, self.dim)


class VideoDiT(nn.Module):
    """Cosmos-Predict2 Video2World DiT. Input x_tau (clean on conditioning frames), output velocity eps - x0."""

    config_class = VideoDiTConfig

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p, pt = cfg.model_channels, cfg.patch_spatial, cfg.patch_temporal
        # 18 input channels: 16 latent + condition mask (MinimalV1LVGDiT) + padding mask (concat_padding_mask)
        self.x_embedder = PatchEmbed(cfg.in_channels + 2, D, p, pt)
        self.t_embedder = nn.Sequential(Timesteps(D), TimestepEmbedding(D))
        self.blocks = nn.ModuleList([
            DiTBlock(D, cfg.crossattn_emb_channels, cfg.num_heads, cfg.mlp_ratio, D, cfg.adaln_lora_dim,
                     order=("self_attn", "cross_attn"))
            for _ in range(cfg.num_blocks)
        ])
        self.final_layer = FinalLayer(D, D, cfg.adaln_lora_dim, p * p * pt * cfg.out_channels)
        self.t_embedding_norm = RMSNorm(D, eps=1e-6)  # normalizes the raw sinusoid, not the MLP output
        self.activation_checkpointing = False  # stage 1 at real scale: recompute each block in the backward pass
        self._rope_cache = {}  # (T', H', W', device) -> (cos, sin)
        self.initialize_weights()

    def initialize_weights(self):
        """From-scratch init (only for training a new model; released weights replace all of it)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        # zero the second AdaLN linear: a new block is modulated by the shared adaln_lora vector alone
        for block in self.blocks:
            for name in block.order:
                nn.init.zeros_(getattr(block, f"adaln_modulation_{name}")[2].weight)
        nn.init.zeros_(self.final_layer.adaln_modulation[2].weight)

    def forward(self, x, tau, crossattn_emb, condition_mask, padding_mask=None, stop_after_block=None):
        """Predict the velocity, or stop early and return a hidden state.

        x: (B, 16, T, H, W) network input (x_tau on generated frames, clean latents on conditioning frames)
        tau: (B, T) flow time per latent frame in [0, 1] (or (B,) for all frames)
        crossattn_emb: (B, N, 1024) T5 embeddings (no mask: zero padding tokens still get attention)
        condition_mask: (B, 1, T, H, W), 1 on conditioning frames
        padding_mask: (B, 1, H_pix, W_pix) or None (zeros, the inference value)
        stop_after_block: n -> return the hidden state after n blocks, (B, T, H/2, W/2, D), without running
            blocks n+1.. (n = 0 is the patch embedding; official `return_only_hidden_states_up_to`)
        returns: velocity (B, 16, T, H, W)
        """
        cfg = self.cfg
        self._check_inputs(x, tau, crossattn_emb, condition_mask)
        if stop_after_block is not None and not 0 <= stop_after_block <= cfg.num_blocks:
            raise ValueError(f"stop_after_block must be in [0, {cfg.num_blocks}] (this DiT has {cfg.num_blocks} "
                             f"blocks), got {stop_after_block}")
        # (B, T', H', W', D), (B, T', D), (B, T', 3D)
        x, emb, adaln_lora = self.embed(x, tau, condition_mask, padding_mask)
        B, Tp, Hp, Wp, D = x.shape
        rope = self.rope(Tp, Hp, Wp, x.device)  # computed once per forward
        context = crossattn_emb.to(emb.dtype)

        x = x.reshape(B, Tp, Hp * Wp, D)  # (B, T', S, D): blocks modulate per frame, attend over all tokens
        for block in self.blocks[:stop_after_block]:  # stopped after block n: blocks n+1.. never run
            x = self.run_block(block, x, emb, adaln_lora, context, rope)
        if stop_after_block is not None:
            return x.view(B, Tp, Hp, Wp, D)
        out = self.final_layer(x, emb, adaln_lora).view(B, Tp, Hp, Wp, -1)  # (B, T', H', W', p*p*pt*C)
        return self.unpatchify(out)

    def run_block(self, block, x, emb, adaln_lora, context, rope):
        """One block; with activation_checkpointing (training at real scale), recomputed in the backward pass instead
        of keeping its activations: memory for time."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, emb, adaln_lora, context, rope, use_reentrant=False)
        return block(x, emb, adaln_lora, context=context, rope=rope)

    def embed(self, x, tau, condition_mask, padding_mask=None):
        """Patch tokens and time embeddings: x (B, C, T, H, W), tau (B, T) or (B,) -> tokens (B, T', H', W', D),
        emb = RMSNorm(sinusoid) (B, T', D) for the blocks, adaln_lora = MLP(sinusoid) (B, T', 3D) shared by all
        blocks."""
        cfg = self.cfg
        B, C, T, H, W = x.shape
        dtype = self.t_embedding_norm.weight.dtype
        if padding_mask is None:
            padding_mask = x.new_zeros(B, 1, H, W)
        padding_mask = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")  # (B, 1, H, W)
        # (B, 18, T, H, W)
        x = torch.cat([x, condition_mask.to(x.dtype), padding_mask[:, :, None].expand(B, 1, T, H, W)], dim=1)
        x = self.x_embedder(x.to(dtype))  # (B, T', H', W', D)
        tau = tau.expand(B, T) if tau.dim() == 2 else tau[:, None].expand(B, T)
        tau = tau[:, :: cfg.patch_temporal]  # (B, T'): one time per temporal patch
        emb, adaln_lora = self.time_embedding(tau)
        return x, emb, adaln_lora

    def time_embedding(self, tau):
        """Flow times (B, L) -> (RMSNorm(sinusoid) (B, L, D), adaln_lora (B, L, 3D))."""
        s = self.t_embedder[0](tau).to(self.t_embedding_norm.weight.dtype)  # (B, L, D) raw sinusoid
        return self.t_embedding_norm(s), self.t_embedder[1](s)

    def rope(self, Tp, Hp, Wp, device):
        """(cos, sin) of the 3D RoPE angles of a T' x H' x W' token grid, each (L, 1, head_dim); built once per shape
        and device (a policy query runs the same shape k + 1 times)."""
        key = (Tp, Hp, Wp, str(device))
        if key not in self._rope_cache:
            cfg = self.cfg
            angles = rope3d_angles(Tp, Hp, Wp, cfg.model_channels // cfg.num_heads, (cfg.rope_t_extrapolation_ratio,
                                   cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio), device)
            self._rope_cache = {key: (angles.cos()[:, None, :], angles.sin()[:, None, :])}  # keep only the latest shape
        return self._rope_cache[key]

    def unpatchify(self, out):
        """(B, T', H', W', p*p*pt*C) -> (B, C, T, H, W): the output channel is INNERMOST (p1, p2, r, c), unlike the
        input."""
        p, pt = self.cfg.patch_spatial, self.cfg.patch_temporal
        return rearrange(out, "b t h w (p1 p2 r c) -> b c (t r) (h p1) (w p2)", p1=p, p2=p, r=pt)

    def _check_inputs(self, x, tau, crossattn_emb, condition_mask):
        """Shapes that fit this network, or a ValueError naming the argument."""
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        if T % pt or H % p or W % p:
            raise ValueError(f"latent (T, H, W) = {(T, H, W)} must be divisible by the patch ({pt}, {p}, {p})")
        if H > cfg.max_img_h or W > cfg.max_img_w or T > cfg.max_frames:
            raise ValueError(f"latent (T, H, W) = {(T, H, W)} exceeds the RoPE table "
                             f"({cfg.max_frames}, {cfg.max_img_h}, {cfg.max_img_w})")
        if tuple(condition_mask.shape) != (B, 1, T, H, W):
            raise ValueError(f"condition_mask must be {(B, 1, T, H, W)}, got {tuple(condition_mask.shape)}")
        if tau.shape not in ((B,), (B, T)):
            raise ValueError(f"tau must be ({B},) or ({B}, {T}), got {tuple(tau.shape)}")
        if crossattn_emb.dim() != 3 or tuple(crossattn_emb.shape[::2]) != (B, cfg.crossattn_emb_channels):
            raise ValueError(f"crossattn_emb must be ({B}, N, {cfg.crossattn_emb_channels}), got "
                             f"{tuple(crossattn_emb.shape)}")
        return B, C, T, H, W


# Video2World conditioning. The first latent frames are given (the observed past); the network sees
# them CLEAN with a tiny time (sigma_conditional = 1e-4) and a condition-mask channel of 1, and its x0
# prediction there is overwritten by the truth. There is no noise augmentation of the context.
SIGMA_CONDITIONAL = 1e-4


def conditional_tau(dtype=torch.float32, device=None):
    """Flow time of the conditioning frames: fp32(1e-4) / (fp32(1e-4) + 1) = 9.999e-5 (made on the device: no copy)."""
    return sigma_to_tau(torch.full((), SIGMA_CONDITIONAL, dtype=dtype, device=device))


def first_frames_mask(batch, num_frames, num_cond, device=None):
    """(B, T) boolean mask that is True on the first `num_cond` latent frames (int or (B,) tensor)."""
    num_cond = torch.as_tensor(num_cond, device=device).reshape(-1, 1)  # (B or 1, 1)
    return (torch.arange(num_frames, device=device)[None, :] < num_cond).expand(batch, num_frames)


def video2world_inputs(x_tau, tau, gt_latent, cond_frames):
    """Frame replacement: the DiT input, per-frame times and condition-mask channel.

    x_tau, gt_latent: (B, C, T, H, W); tau: (B,) or scalar; cond_frames: (B, T) bool.
    Returns net_in (B, C, T, H, W), tau_BT (B, T), condition_mask (B, 1, T, H, W).
    """
    B, C, T, H, W = x_tau.shape
    frame = cond_frames[:, None, :, None, None]  # (B, 1, T, 1, 1)
    net_in = torch.where(frame, gt_latent.to(x_tau.dtype), x_tau)
    tau = torch.as_tensor(tau, dtype=torch.float32, device=x_tau.device).reshape(-1, 1).expand(B, T)
    tau_BT = torch.where(cond_frames, conditional_tau(device=x_tau.device), tau)  # (B, T)
    condition_mask = frame.to(x_tau.dtype).expand(B, 1, T, H, W)
    return net_in, tau_BT, condition_mask


def video2world_x0(net, x_tau, tau, gt_latent, cond_frames, crossattn_emb, padding_mask=None):
    """x0 prediction with frame replacement: x0_hat = x_tau - tau * v_hat, truth on conditioning frames."""
    net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau, gt_latent, cond_frames)
    v_hat = net(net_in, tau_BT, crossattn_emb, condition_mask, padding_mask).float()
    tau = _expand_like(torch.as_tensor(tau, dtype=torch.float32, device=x_tau.device).reshape(-1), x_tau)
    x0_hat = x_tau - tau * v_hat
    return torch.where(cond_frames[:, None, :, None, None], gt_latent.to(x0_hat.dtype), x0_hat)


def partial_schedule(num_steps=35, stop_after_step=None, tau_v=None):
    """The Cosmos schedule cut where partial denoising stops: sigmas[0..k], its last entry the stopping level.

    stop_after_step = k keeps the first k + 1 levels. tau_v keeps every level above sigma_v = tau_v / (1 - tau_v)
    and ends exactly at sigma_v, so tau_v = tau(sigma_k) reproduces stop_after_step = k; tau_v at or above
    tau(80) = 0.98765 is a single forward from pure noise at sigma_v.
    """
    sigmas = karras_sigmas(num_steps)
    if (stop_after_step is None) == (tau_v is None):
        raise ValueError("give exactly one of stop_after_step and tau_v")
    if stop_after_step is not None:
        if not 0 <= stop_after_step <= num_steps:
            raise ValueError(f"stop_after_step must be in [0, {num_steps}], got {stop_after_step}")
        return sigmas[: stop_after_step + 1]
    if not 0 < tau_v < 1:
        raise ValueError(f"tau_v must be in (0, 1), got {tau_v}")
    sigma_v = tau_to_sigma(float(tau_v))
    near = torch.isclose(sigmas, torch.tensor(sigma_v, dtype=torch.float64), rtol=1e-6, atol=0)
    if near.any():  # a schedule point: snap to it exactly
        return sigmas[: int(near.nonzero()[0]) + 1]
    above = sigmas[sigmas > sigma_v]
    return torch.cat([above, torch.tensor([sigma_v], dtype=torch.float64)])


def cosmos_sample(net, eps, gt_latent, cond_frames, crossattn_emb, num_steps=35, stop_after_step=None, tau_v=None,
                  hidden_block=None, padding_mask=None, return_x0=False):
    """The official Video2World sampler (`Video2WorldPipeline.generate_video`, guidance 0).

    eps: (B, 16, T, H, W) initial noise (draw it with `numpy_randn` to reproduce official outputs).
    Full run (no stop given): 35 RF-AB2 steps, then a final clean x0 pass at sigma_min = 0.002;
    returns the generated latent x0 (B, 16, T, H, W).
    Partial denoising (mimic-video): stop_after_step = k runs k full steps, then one forward at sigma_k
    truncated after `hidden_block` blocks; returns (hidden (B, T, H/2, W/2, D), sigma_k (B,)).
    k = 0 is a single forward at sigma = 80; k = 35 taps the clean pass at sigma = 0.002.
    tau_v instead of k stops at that noise level (see `partial_schedule`).
    return_x0: with a stop, return the x0 prediction at sigma_k instead (a full forward): the plan the decoder
    reads, as latents one can decode into pictures.
    """
    partial = stop_after_step is not None or tau_v is not None
    sigmas = partial_schedule(num_steps, stop_after_step, tau_v) if partial else karras_sigmas(num_steps)

    def x_tau_at(x_sigma, i):
        # fp32, as official; no H2D copy
        sigma = torch.full((), float(sigmas[i]), dtype=torch.float32, device=eps.device)
        tau = sigma_to_tau(sigma)
        return (1 - tau) * x_sigma, tau  # x_tau = (1 - tau) x_sigma

    def x0_fn(x_sigma, i):
        x_tau, tau = x_tau_at(x_sigma, i)
        return video2world_x0(net, x_tau, tau, gt_latent, cond_frames, crossattn_emb, padding_mask)

    k = len(sigmas) - 1
    x = rf_ab2_sample(x0_fn, eps.float(), sigmas, k)
    if not partial or return_x0:
        return x0_fn(x, k)  # the full run's final clean pass, or the plan at the stopping level
    x_tau, tau = x_tau_at(x, k)
    net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau, gt_latent, cond_frames)
    hidden = net(net_in, tau_BT, crossattn_emb, condition_mask, padding_mask, stop_after_block=hidden_block)
    sigma_k = torch.full((eps.shape[0],), float(sigmas[k]), dtype=torch.float32, device=eps.device)
    return hidden, sigma_k


def numpy_randn(shape, seed, dtype=torch.float32, device=None):
    """The official noise (`arch_invariant_rand`): numpy RandomState(seed) normals in one batch-major draw."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32)).to(device, dtype)


# ------------------------------------------------------------------------------------------------
# 4. LoRA, written out (no peft dependency) but PEFT-compatible in names
# ------------------------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """Which Linear layers get a low-rank adapter, and which modules are trained fully."""

    r: int = 256  # adapter rank
    lora_alpha: float = 32.0  # the update is scaled by alpha / r (0.125 for the official recipe)
    lora_dropout: float = 0.0  # dropout on the adapter's input (training only)
    # PEFT semantics: a Linear matches when its name equals a target or ends with "." + target
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "output_proj", "x_embedder.proj.1",
                             "linear_1", "linear_2", "mlp.layer1", "mlp.layer2")
    # trained fully (not adapted): every parameter whose name contains one of these
    trainable_modules: tuple = ("adaln_modulation",)


LORA_PRESETS = {
    # stage 1 of mimic-video (configs/experiment/video2world.py): rank 256, alpha 32, adaLN trained fully
    "mimic-video-stage1": LoRAConfig(),
    "tiny": LoRAConfig(r=8, lora_alpha=4.0),
}


class LoRALinear(nn.Module):
    """y = base_layer(x) + (alpha / r) * lora_B(lora_A(dropout(x))); lora_B starts at zero, so at init y = base(x)."""

    def __init__(self, base_layer: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=base_layer.weight.device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=base_layer.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init (= nn.Linear default)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self):
        """(alpha / r) * B @ A in fp32: the update the adapter adds to W."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha / r) B A, computed in fp32 and cast back to W's dtype."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, cfg: LoRAConfig):
    """Wrap every matching nn.Linear in a LoRALinear and set requires_grad: adapters and trainable_modules only."""
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, cfg.target_modules)]
    if not targets:
        raise ValueError(f"no nn.Linear matches target_modules {cfg.target_modules}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.r, cfg.lora_alpha, cfg.lora_dropout))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name or any(t in name for t in cfg.trainable_modules))
    model.lora_config = cfg
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()


# ------------------------------------------------------------------------------------------------
# 5. Checkpoint loading: the official key layout, and a strict copy into our modules
# ------------------------------------------------------------------------------------------------
# Our module names are the official ones, so loading released weights is: normalize the checkpoint's keys (strip
# `net.`, drop the entries that are not parameters), check that keys and shapes are exactly the model's, and copy.
# Finding and reading the files (a Hub repo or a local path; .pt, .safetensors or diffusers' layout) is plumbing:
# `load_video_dit` and `load_action_decoder` in section 8, after the method.

# Entries of official checkpoints that are not parameters: RoPE tables (recomputed), training counters
# (`WeightTrainingStat`) and Transformer Engine metadata. The diffusers converter drops exactly these.
NON_PARAMETER_KEYS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range",
                      "accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration",
                      "accum_train_in_hours", "*._extra_state")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists the missing, unexpected and mis-shaped keys."""


def check_state_dict(expected, sd, what="checkpoint"):
    """Raise CheckpointMismatchError unless sd has exactly the keys and shapes of `expected` (name -> tensor)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        show = lambda xs: "\n    ".join(xs[:20]) + (f"\n    ... and {len(xs) - 20} more" if len(xs) > 20
                                                    else "")  # noqa: E731
        parts = [f"{name} ({len(xs)}):\n    {show(xs)}" for name, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if xs]
        raise CheckpointMismatchError(f"{what} does not match the model:\n  " + "\n  ".join(parts))


def official_keys(sd, prefix="net."):
    """Normalize a checkpoint to our (= official) module names: strip `net.` and drop the non-parameters.

    A training checkpoint may hold EMA weights (`net_ema.`) beside the regular ones (`net.`). We load `net.`, as the
    official pipeline does by default (`load_ema_to_reg=False`), and drop `net_ema.`; a file with only `net_ema.`
    weights loads those."""
    if not any(k.startswith(prefix) for k in sd) and any(k.startswith("net_ema.") for k in sd):
        prefix = "net_ema."
    sd = {k.removeprefix(prefix): v for k, v in sd.items() if not k.startswith("net_ema.") or prefix == "net_ema."}
    return {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, pat) for pat in NON_PARAMETER_KEYS)}


def load_state_dict_strict(model, sd, what="checkpoint", assign=False):
    """Check keys and shapes (clear error), then a plain strict load_state_dict."""
    check_state_dict(model.state_dict(), sd, what)
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


# ------------------------------------------------------------------------------------------------
# 6. The action decoder (official `World2ActionDIT`) and its normalizer
# ------------------------------------------------------------------------------------------------


@dataclass
class ActionDecoderConfig:
    """The flow-matching action decoder of mimic-video; defaults are the released LIBERO decoder."""

    max_horizon: int = 61  # tokens: 1 proprio token + HA action tokens (LIBERO 60 at 20 Hz, Bridge 15 at 5 Hz)
    in_channels: int = 10  # proprio dim: xyz (3) + 6-D rotation (6) + gripper (1)
    out_channels: int = 10  # action dim, same layout
    model_channels: int = 1024  # transformer width D
    num_blocks: int = 24  # depth
    num_heads: int = 8  # attention heads (head dim 128)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    crossattn_emb_channels: int = 2048  # width of the video hidden states it reads
    adaln_lora_dim: int = 128  # rank of the AdaLN-LoRA modulation
    # rank R of the bilinear (tau_a, tau_v) time embedding; official requires R = D
    pair_timestep_feature_rank: int = 1024

    @property
    def num_actions(self):
        return self.max_horizon - 1


ACTION_DECODER_PRESETS = {
    "libero": ActionDecoderConfig(),  # w2a_libero: 60-step chunks
    "bridge": ActionDecoderConfig(max_horizon=16),  # w2a_bridge: 15-step chunks
    # the reference fixtures' tiny decoder
    "tiny": ActionDecoderConfig(max_horizon=5, model_channels=64, num_blocks=2, num_heads=2, crossattn_emb_channels=64,
                                adaln_lora_dim=16, pair_timestep_feature_rank=64),
    # the toy world: 2-D positions and motions, 1 proprio token + 8 action tokens
    "toy": ActionDecoderConfig(max_horizon=9, in_channels=2, out_channels=2, model_channels=64, num_blocks=2,
                               num_heads=2, crossattn_emb_channels=64, adaln_lora_dim=16,
                               pair_timestep_feature_rank=64),
}

TAU_PROPRIO = 1e-3  # the proprio token always carries this (clean) action time


class ActionEmbedder(nn.Module):
    """MLP from a 10-D vector to D with geometric widths (10 -> 47 -> 220 -> 1024), output scaled by 1/sqrt(D).

    Official width rule: hops = round(log_4(D / in)), base = (D / in)^(1 / hops), and each hidden width is the
    previous rounded width times base, rounded.
    """

    def __init__(self, in_features, dim):
        super().__init__()
        hops = max(1, round(math.log(dim / in_features, 4)))
        base = (dim / in_features) ** (1 / hops)
        widths = [in_features]
        for _ in range(hops - 1):
            widths.append(round(widths[-1] * base))
        widths.append(dim)
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < hops - 1 else [])
        self.layers = nn.Sequential(*layers)  # keys layers.0, .2, .4 (GELUs at .1, .3)
        self.scaling_factor = 1 / math.sqrt(dim)

    def forward(self, x):
        return self.layers(x) * self.scaling_factor


def decoder_time_sinusoid(tau, dim, min_period=4e-3, max_period=4.0):
    """Official `ContinuousSinusoidalPosEmb`: [sin | cos](2 pi tau / P_j), periods P_j from 0.004 to 4.

    Computed in float64 and rounded to bf16 as the official code does even in an fp32 model: the released
    weights were trained on these rounded features (skipping the rounding moves outputs by ~3e-3 relative).
    """
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=tau.device)
    period = min_period * (max_period / min_period) ** fraction
    omega = 1.0 / period * 2 * math.pi
    angles = tau.double()[..., None] * omega  # (..., dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(torch.bfloat16)


class PairTimestepEmbedding(nn.Module):
    """Bilinear-affine embedding of the (action time, video time) pair (official `PairTimestepEmbedding`).

    z = B(SiLU(proj_x(e_a))) * C(SiLU(proj_c(e_v))) - B.bias * C.bias: a rank-R bilinear term plus the two
    cross terms with the biases, with the constant bias-bias product removed. adaln_lora = A(z) (raw z).
    """

    def __init__(self, dim, rank, adaln_dim):
        super().__init__()
        self.proj_x = nn.Linear(dim, dim)
        self.proj_c = nn.Linear(dim, dim)
        self.B = nn.Linear(dim, rank)
        self.C = nn.Linear(dim, rank)
        self.A = nn.Linear(rank, adaln_dim, bias=False)

    def forward(self, e_a, e_v):
        a = F.silu(self.proj_x(e_a))  # (B, T, D)
        c = F.silu(self.proj_c(e_v))  # (B, T, D)
        z = self.B(a) * self.C(c) - self.B.bias * self.C.bias  # (B, T, R)
        return z, self.A(z)  # (B, T, R), (B, T, 3D)


class PairTimeEmbedder(nn.Module):
    """One shared sinusoid for both times, then the pair embedding (official `t_embedder`)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.dim = dim
        self.pair = PairTimestepEmbedding(dim, rank, 3 * dim)

    def forward(self, tau_a, sigma_v, dtype):
        """tau_a (B, T) per-token action time; sigma_v (B, 1) video EDM sigma (NOT tau: converted here)."""
        tau_v = sigma_to_tau(sigma_v.float())  # the decoder receives sigma and maps it itself
        e_a = decoder_time_sinusoid(tau_a, self.dim).to(dtype)  # (B, T, D)
        e_v = decoder_time_sinusoid(tau_v, self.dim).to(dtype).expand_as(e_a)  # (B, 1, D) -> (B, T, D)
        return self.pair(e_a, e_v)


class ActionDecoder(nn.Module):
    """Flow-matching action decoder: an inverse-dynamics DiT reading the video model's hidden states."""

    config_class = ActionDecoderConfig

    def __init__(self, cfg: ActionDecoderConfig):
        super().__init__()
        if cfg.pair_timestep_feature_rank != cfg.model_channels:
            raise ValueError("pair_timestep_feature_rank must equal model_channels (the official final "
                             "layer assumes it)")
        self.cfg = cfg
        D, R = cfg.model_channels, cfg.pair_timestep_feature_rank
        self.obs_mask_token = nn.Parameter(torch.zeros(1, 1, D))  # replaces the proprio embedding when masked
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_horizon, D))  # learned, absolute; no RoPE
        self.ctx_norm = nn.LayerNorm(cfg.crossattn_emb_channels, eps=1e-6)  # affine, on the video context
        self.obs_embedder = ActionEmbedder(cfg.in_channels, D)
        self.action_embedder = ActionEmbedder(cfg.out_channels, D)
        self.t_embedder = PairTimeEmbedder(D, R)
        self.blocks = nn.ModuleList([
            DiTBlock(D, cfg.crossattn_emb_channels, cfg.num_heads, cfg.mlp_ratio, R, cfg.adaln_lora_dim,
                     order=("cross_attn", "self_attn"))  # cross first (the official docstring says otherwise)
            for _ in range(cfg.num_blocks)
        ])
        self.final_layer = FinalLayer(D, R, cfg.adaln_lora_dim, cfg.out_channels)
        self.t_embedding_norm = RMSNorm(R, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self):
        """Official init (`init_weights`): trunc-normal 1/sqrt(fan_in) Linears, zeroed AdaLN outputs."""
        D = self.cfg.model_channels
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)
        for p in (self.pos_embedding, self.obs_mask_token):
            nn.init.trunc_normal_(p, std=D ** -0.5, a=-3 * D ** -0.5, b=3 * D ** -0.5)
        for emb in (self.obs_embedder, self.action_embedder):
            linears = [m for m in emb.layers if isinstance(m, nn.Linear)]
            for i, m in enumerate(linears):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu" if i < len(linears) - 1 else "linear")
                nn.init.zeros_(m.bias)
        # the std of SiLU(N(0, 0.5)): the bilinear term starts at the scale of its inputs
        nn.init.constant_(self.t_embedder.pair.B.bias, 0.382050174)
        nn.init.constant_(self.t_embedder.pair.C.bias, 0.382050174)
        # zero the second AdaLN linear: a new block is driven by the shared adaln_lora alone
        for block in self.blocks:
            for name in block.order:
                nn.init.zeros_(getattr(block, f"adaln_modulation_{name}")[2].weight)
        nn.init.zeros_(self.final_layer.adaln_modulation[2].weight)
        nn.init.ones_(self.t_embedding_norm.weight)
        nn.init.ones_(self.ctx_norm.weight)
        nn.init.zeros_(self.ctx_norm.bias)

    def context_kv(self, crossattn_emb):
        """Keys and values of the normalized video context for every block: compute once per policy query."""
        ctx = self.ctx_norm(crossattn_emb.to(self.pos_embedding.dtype))
        return [block.cross_attn.kv(ctx) for block in self.blocks]

    def forward(self, state, x_scaled, timesteps, context_sigma, crossattn_emb=None, obs_dropout=0.0,
                context_kv=None, generator=None):
        """The raw network (official `World2ActionDIT.forward`).

        state: (B, 1, 10) normalized proprio; x_scaled: (B, HA, 10) rescaled noisy actions (see `denoise`);
        timesteps: (B, 1 + HA) action time per token (proprio token first); context_sigma: (B, 1) video sigma;
        crossattn_emb: (B, N, C) video hidden states, or context_kv from `context_kv`;
        obs_dropout: probability of replacing the proprio embedding by the mask token (0.2 in training),
            or a (B,) bool tensor saying which samples are masked.
        returns: (B, 1 + HA, 10), token 0 being the (discarded) proprio position.
        """
        B, HA, _ = x_scaled.shape
        dtype = self.pos_embedding.dtype
        if state.shape != (B, 1, self.cfg.in_channels):
            raise ValueError(f"state must be ({B}, 1, {self.cfg.in_channels}), got {tuple(state.shape)}")
        if HA + 1 > self.cfg.max_horizon or x_scaled.shape[-1] != self.cfg.out_channels:
            raise ValueError(f"actions must be ({B}, <= {self.cfg.num_actions}, {self.cfg.out_channels}), got "
                             f"{tuple(x_scaled.shape)}")
        obs = self.obs_embedder(state.to(dtype))  # (B, 1, D)
        if torch.is_tensor(obs_dropout):  # a given per-sample mask (B,) bool
            m = obs_dropout.reshape(B, 1, 1)
        else:  # a probability: draw the mask per sample
            m = torch.rand(B, 1, 1, generator=generator, device=obs.device) < obs_dropout
        if torch.is_tensor(obs_dropout) or obs_dropout > 0:
            obs = torch.where(m, self.obs_mask_token.to(obs.dtype), obs)
        x = torch.cat([obs, self.action_embedder(x_scaled.to(dtype))], dim=1)  # (B, T, D), proprio first
        x = x + self.pos_embedding[:, : HA + 1]

        if context_kv is None:
            context_kv = self.context_kv(crossattn_emb)
        z, adaln_lora = self.t_embedder(timesteps, context_sigma, dtype)  # (B, T, R), (B, T, 3D)
        emb = self.t_embedding_norm(z)  # blocks see RMSNorm(z); adaln_lora came from the raw z

        x = x[:, :, None, :]  # (B, T, 1, D): every token has its own time
        for block, kv in zip(self.blocks, context_kv):
            x = block(x, emb, adaln_lora, context_kv=kv)
        return self.final_layer(x, emb, adaln_lora)[:, :, 0]  # (B, T, 10)

    def denoise(self, x_tau, tau_a, state, crossattn_emb, context_sigma, obs_dropout=0.0, context_kv=None,
                generator=None):
        """Velocity of the noisy normalized action chunk (official `World2ActionPipeline.denoise`).

        x_tau: (B, HA, 10); tau_a: (B,) or (B, HA) action time; context_sigma: (B,) or (B, 1).
        returns v_hat (B, HA, 10), an estimate of eps - x0 for the action tokens only.
        """
        B, HA, _ = x_tau.shape
        tau_a = torch.as_tensor(tau_a, dtype=torch.float32, device=x_tau.device).reshape(B, -1).expand(B, HA)
        x_in = x_tau / torch.sqrt((1 - tau_a) ** 2 + tau_a ** 2)[..., None]  # unit variance along the path
        timesteps = torch.cat([torch.full((B, 1), TAU_PROPRIO, device=x_tau.device), tau_a], dim=1)  # (B, 1 + HA)
        out = self(state, x_in, timesteps, context_sigma.reshape(B, 1), crossattn_emb, obs_dropout, context_kv,
                   generator)
        return out[:, 1:]

    @torch.no_grad()
    def sample(self, state, crossattn_emb, context_sigma, noise, num_steps=10):
        """Normalized action chunk by Euler from tau_a = 1 (noise (B, HA, 10)) to 0; the video context's keys
        and values are computed once, not once per step."""
        kv = self.context_kv(crossattn_emb)
        return euler_integrate(lambda x, tau: self.denoise(x, tau, state, None, context_sigma, context_kv=kv),
                               noise, num_steps=num_steps)


# Normalization (official `StaticBatchNormalizer`). The stats are PER CHUNK TIMESTEP, shape (H, d), not per
# dimension: action k of a chunk has its own mean and std. Each group of dimensions names how it is normalized:
# "variance" (positions, grippers, any plain vector) is standardized with clamped stats and clipped to an outlier
# range; "identity" (6-D rotations) passes through unchanged. The modes are explicit, never guessed from key names.
NORMALIZATION_MODES = ("variance", "identity")


class Normalizer:
    """normalize(x) = clamp((x - shift) * scale, lo, hi); unnormalize(y) = y / scale + shift (no clamp).

    Built from statistics in the released JSON layout (key -> field -> nested lists, `array_to_stats`) and an
    explicit list of (key, mode) groups, concatenated along the last axis in that order.
    """

    def __init__(self, stats, groups, dtype=torch.float32):
        """VARIANCE: shift = mean_clamped, scale = 1 / std_clamped (1 where std < 1e-5), bounds =
        (mean + 1.5 (p2 - mean) - shift) * scale and likewise with p98. IDENTITY: shift 0, scale 1, no bounds.
        The official eval runs this in bf16 (pass dtype=torch.bfloat16 to match it bit for bit)."""
        self.groups = tuple((key, mode) for key, mode in groups)
        self.stats = {}
        parts = []
        for key, mode in self.groups:
            if key not in stats:
                raise KeyError(f"statistics have no entry {key!r}; found {sorted(stats)}")
            if mode not in NORMALIZATION_MODES:
                raise ValueError(f"normalization mode of {key!r} must be one of {NORMALIZATION_MODES}, got {mode!r}")
            self.stats[key] = {k: v for k, v in stats[key].items() if k != "normalization"}
            s = {k: torch.tensor(v, dtype=torch.float64) for k, v in stats[key].items()
                 if k in ("mean", "mean_clamped", "std_clamped", "percentiles")}
            if mode == "identity":
                z = torch.zeros_like(s["mean"])
                parts.append((z, z + 1, z - math.inf, z + math.inf))
                continue
            shift = s["mean_clamped"]
            scale = torch.where(s["std_clamped"] < 1e-5, torch.ones_like(shift), 1 / s["std_clamped"])
            p2, p98 = s["percentiles"][20], s["percentiles"][980]  # grid 0.0..100.0 in steps of 0.1
            mean = s["mean"]
            parts.append((shift, scale, (mean + 1.5 * (p2 - mean) - shift) * scale,
                          (mean + 1.5 * (p98 - mean) - shift) * scale))
        if not parts:
            raise ValueError("a Normalizer needs at least one (key, mode) group")
        self.shift, self.scale, self.clamp_min, self.clamp_max = (
            torch.cat([p[i] for p in parts], dim=-1).to(dtype) for i in range(4))  # 4 x (H, d)

    def normalize(self, x):
        if x.shape[-1] != self.shift.shape[-1]:
            raise ValueError(f"normalize: last dim of x must be {self.shift.shape[-1]}, got shape {tuple(x.shape)}")
        y = (x - self.shift.to(x)) * self.scale.to(x)
        if torch.isinf(self.clamp_min).all() and torch.isinf(self.clamp_max).all():
            return y
        return torch.maximum(torch.minimum(y, self.clamp_max.to(x)), self.clamp_min.to(x))

    def unnormalize(self, y):
        if y.shape[-1] != self.shift.shape[-1]:
            raise ValueError(f"unnormalize: last dim of y must be {self.shift.shape[-1]}, got shape {tuple(y.shape)}")
        return y / self.scale.to(y) + self.shift.to(y)

    def to_stats(self):
        """The statistics in the released layout, each entry also saying its mode ("normalization")."""
        return {key: {**self.stats[key], "normalization": mode} for key, mode in self.groups}


# ------------------------------------------------------------------------------------------------
# 7. The video-action model: partial denoising -> middle-block features -> action decoder
# ------------------------------------------------------------------------------------------------


@dataclass
class VideoActionConfig:
    """How the frozen video model and the decoder are coupled, trained and sampled (official stage 2)."""

    tap_block: int = 20  # the decoder reads the output of this video block (official xattn_layer_idx; 20 of 28)
    latent_frames: int = 16  # context + future latent frames in the window (61 pixel frames -> 2 + 14 latents)
    context_latents: int = 2  # observed latent frames at the start of the window (5 pixel frames -> 2 latents)
    num_video_steps: int = 35  # the Cosmos schedule that stop_after_step indexes
    num_action_steps: int = 10  # Euler steps of the decoder from tau_a = 1 to 0
    loss_scale: float = 10.0  # stage-2 loss = loss_scale * velocity MSE
    obs_dropout: float = 0.2  # stage-2 probability of masking the proprio token
    video_time: str = "official"  # stage 2: "official" sigma = sqrt(latent_frames) exp(N(0,1)) + 5% tail; "paper"
    #                               logit-normal tau_v
    action_time: str = "official"  # "official": uniform on [0.001, 1]; "paper": Beta(1.5, 1)

    @property
    def video_sigma_multiplier(self):
        """Official `video_noise_multiplier` = sqrt(state_t): 4 for 16 latent frames."""
        return math.sqrt(self.latent_frames)


VIDEO_ACTION_PRESETS = {
    "mimic-video": VideoActionConfig(),
    "tiny": VideoActionConfig(tap_block=2, latent_frames=4, context_latents=2),
    "toy": VideoActionConfig(tap_block=2, latent_frames=5, context_latents=1),  # the current frame + 4 future frames
}


def _check_finite(x, what):
    if not torch.isfinite(x).all():  # a NaN would spread through attention into every action of the chunk
        raise ValueError(f"{what} contains NaN or infinite values")


def latent_window(cfg: VideoActionConfig, channels, context, future):
    """(context, future) -> latents (B, C, T, H, W) and the conditioning-frame mask (B, T).

    The window must be the one a model was trained with: `context_latents` observed frames, then
    `latent_frames - context_latents` future frames (given in training, zeros when the model imagines them).
    """
    if context.dim() != 5 or context.shape[1] != channels:
        raise ValueError(f"context must be (B, {channels}, T, H, W) latents, got {tuple(context.shape)}")
    if context.shape[2] != cfg.context_latents:
        raise ValueError(f"context has {context.shape[2]} latent frames; this model was configured for "
                         f"context_latents={cfg.context_latents}")
    B, C, Tc, H, W = context.shape
    if future is None:  # inference: the future is what the video model imagines; official zero-pads
        future = context.new_zeros(B, C, cfg.latent_frames - Tc, H, W)
    elif tuple(future.shape) != (B, C, cfg.latent_frames - Tc, H, W):
        raise ValueError(f"future must be {(B, C, cfg.latent_frames - Tc, H, W)} (latent_frames="
                         f"{cfg.latent_frames} minus {Tc} context frames), got {tuple(future.shape)}")
    latents = torch.cat([context, future.to(context.dtype)], dim=2)  # (B, C, Tc + Tf, H, W)
    return latents, first_frames_mask(latents.shape[0], latents.shape[2], context.shape[2], latents.device)


def draw_training_noise(cfg: VideoActionConfig, loss, batch, latent_shape, action_shape=None, generator=None,
                        device=None):
    """Every random draw of one training step of `loss` ("video" or "action"), for `batch` samples: sigma (and
    tau_a, the proprio mask), eps for the video and the actions. Draw it for the global batch and slice it per
    rank, and the loss does not depend on how the batch is sharded (DDP equals one process; resume is exact)."""
    if loss not in ("video", "action"):
        raise ValueError(f"loss must be 'video' or 'action', got {loss!r}")
    if loss == "video" or cfg.video_time == "official":
        sigma = sample_video_sigma(batch, generator, device, multiplier=cfg.video_sigma_multiplier)
    elif cfg.video_time == "paper":
        sigma = tau_to_sigma(sample_tau_logit_normal(batch, generator, device))
    else:
        raise ValueError(f"video_time must be 'official' or 'paper', got {cfg.video_time!r}")
    noise = {"sigma": sigma,
             "eps_video": torch.randn((batch,) + tuple(latent_shape), generator=generator, device=device)}
    if loss == "video":
        return noise
    if cfg.action_time == "official":
        noise["tau_a"] = sample_tau_action_uniform(batch, generator, device)
    elif cfg.action_time == "paper":
        noise["tau_a"] = sample_tau_action_beta(batch, generator, device)
    else:
        raise ValueError(f"action_time must be 'official' or 'paper', got {cfg.action_time!r}")
    noise["eps_action"] = torch.randn((batch,) + tuple(action_shape), generator=generator, device=device)
    noise["obs_mask"] = torch.rand(batch, generator=generator, device=device) < cfg.obs_dropout
    return noise


def query_noise(shapes, seed, numpy_noise, device):
    """The noise of one policy query, one tensor per shape, from `seed` (torch, or numpy as the official code)."""
    if numpy_noise:  # official: the same seed for the video and the action noise
        return [numpy_randn(shape, seed, device=device) for shape in shapes]
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device) for shape in shapes]


class VideoActionModel(nn.Module):
    """The video DiT (frozen in stage 2) and the action decoder, with a policy's optional normalizers (two
    `Normalizer`s, which `sample_actions(raw=True)` maps proprio and actions through).

    Latents are (B, C, T, H, W) with the first `context_latents` frames the observed context; the text is
    (B, N, D_text). Proprio (B, 1, d_s) and actions (B, HA, d_a) are normalized unless a method says otherwise.
    """

    def __init__(self, video: VideoDiT, decoder: ActionDecoder, cfg: VideoActionConfig = VideoActionConfig(),
                 obs_normalizer=None, action_normalizer=None):
        super().__init__()
        if decoder.cfg.crossattn_emb_channels != video.cfg.model_channels:
            raise ValueError(f"decoder reads {decoder.cfg.crossattn_emb_channels}-d context, video width is "
                             f"{video.cfg.model_channels}")
        if not 0 <= cfg.tap_block <= video.cfg.num_blocks:
            raise ValueError(f"tap_block must be in [0, {video.cfg.num_blocks}], got {cfg.tap_block}")
        if not 1 <= cfg.context_latents < cfg.latent_frames:
            raise ValueError(f"context_latents must be in [1, latent_frames - 1] = [1, {cfg.latent_frames - 1}], got "
                             f"{cfg.context_latents}")
        for name, norm, dim in (("obs_normalizer", obs_normalizer, decoder.cfg.in_channels),
                                ("action_normalizer", action_normalizer, decoder.cfg.out_channels)):
            if norm is not None and norm.shift.shape[-1] != dim:
                raise ValueError(f"{name} has {norm.shift.shape[-1]} dimensions, the decoder {dim}")
        self.video, self.decoder, self.cfg = video, decoder, cfg
        self.obs_normalizer, self.action_normalizer = obs_normalizer, action_normalizer

    state_dim = property(lambda self: self.decoder.cfg.in_channels)  # model-space proprio dims
    action_dim = property(lambda self: self.decoder.cfg.out_channels)  # model-space action dims
    num_actions = property(lambda self: self.decoder.cfg.num_actions)  # actions per chunk

    def window(self, context, future):
        return latent_window(self.cfg, self.video.cfg.in_channels, context, future)

    def video_features(self, context, future, text, sigma, eps=None, generator=None):
        """Decoder context from ground-truth future latents noised to sigma (training; the paper's oracle).

        One video forward truncated after `tap_block`, no gradient to the frozen backbone. Returns (B, T'H'W', D)
        in (t, h, w) order; the clean context frames are among the tokens.
        """
        with torch.no_grad():
            return self.tapped_hidden(context, future, text, sigma, eps, generator)

    def tapped_hidden(self, context, future, text, sigma, eps=None, generator=None):
        """The output of block `tap_block` for the window with its future noised to sigma: (B, T'H'W', D)."""
        latents, cond = self.window(context, future)
        if eps is None:
            eps = torch.randn(latents.shape, generator=generator, device=latents.device)
        tau_v = sigma_to_tau(sigma.float())
        x_tau = interpolate(latents.float(), eps, tau_v)  # = (1 - tau_v) x_sigma
        net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau_v, latents, cond)
        hidden = self.video(net_in, tau_BT, text, condition_mask, stop_after_block=self.cfg.tap_block)
        return hidden.flatten(1, 3)  # (B, T, H', W', D) -> (B, L, D)

    def forward(self, loss, **batch):
        """`model("video", ...)` is `video_loss`, `model("action", ...)` is `action_loss`: one entry point, so
        DistributedDataParallel can wrap the model for either stage."""
        if loss == "video":
            return self.video_loss(**batch)
        if loss == "action":
            return self.action_loss(**batch)
        raise ValueError(f"loss must be 'video' (stage 1, pretraining) or 'action' (stage 2), got {loss!r}")

    def draw_noise(self, loss, batch, latent_shape, action_shape=None, generator=None, device=None):
        return draw_training_noise(self.cfg, loss, batch, latent_shape, action_shape, generator, device)

    def action_loss(self, context, future, text, proprio, actions, noise=None, generator=None):
        """Stage 2: the decoder's loss on the frozen backbone, tau_v and tau_a drawn independently per sample.

        Returns {"loss": scalar, "per_sample": (B,), "tau_a": (B,), "tau_v": (B,)} (per-sample values for
        logging the loss binned by time).
        """
        B = actions.shape[0]
        latent_shape = (context.shape[1], context.shape[2] + future.shape[2]) + tuple(context.shape[3:])
        if noise is None:
            noise = self.draw_noise("action", B, latent_shape, actions.shape[1:], generator, actions.device)
        sigma, tau_a = noise["sigma"], noise["tau_a"]
        ctx = self.video_features(context, future, text, sigma, eps=noise["eps_video"])
        x0, eps = actions.float(), noise["eps_action"]
        x_tau = interpolate(x0, eps, tau_a)
        u = velocity_target(x0, eps)
        v_hat = self.decoder.denoise(x_tau, tau_a, proprio, ctx, sigma, obs_dropout=noise["obs_mask"])
        per_sample = self.cfg.loss_scale * flow_loss(v_hat, u)
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "tau_a": tau_a,
                "tau_v": sigma_to_tau(sigma)}

    def video_loss(self, context, future, text, noise=None, generator=None):
        """Stage 1 (and pretraining): the video flow loss, future frames noised, context frames clean and excluded.

        Cosmos trains with the x0 loss weighted by (1 + sigma)^2 / sigma^2, which is exactly this velocity MSE.
        Returns {"loss", "per_sample", "tau_v"}.
        """
        latents, cond = self.window(context, future)
        if noise is None:
            noise = self.draw_noise("video", latents.shape[0], latents.shape[1:], generator=generator,
                                    device=latents.device)
        tau = sigma_to_tau(noise["sigma"])
        x0, eps = latents.float(), noise["eps_video"]
        x_tau = interpolate(x0, eps, tau)
        net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau, latents, cond)
        v_hat = self.video(net_in, tau_BT, text, condition_mask)
        per_sample = flow_loss(v_hat, velocity_target(x0, eps), (~cond)[:, None, :, None, None])  # future frames only
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "tau_v": tau}

    @torch.no_grad()
    def sample_actions(self, context, text, proprio, stop_after_step=None, tau_v=None, seed=0, numpy_noise=False,
                       oracle_future=None, raw=False):
        """One policy query: partial video denoising, then Euler on the decoder. Returns (B, HA, 10).

        stop_after_step = k on the 35-step schedule (k = 0: one forward at sigma = 80), or tau_v directly.
        seed: the video noise and the action noise are drawn from it (numpy_noise=True draws both the
        official way, numpy RandomState(seed), so released checkpoints reproduce official outputs).
        oracle_future: ground-truth future latents noised to the same level instead of the video model's
        own plan (the paper's case study).
        raw: proprio given and actions returned unnormalized through the policy's normalizers.
        """
        if (stop_after_step is None) == (tau_v is None):
            raise ValueError("give exactly one of stop_after_step and tau_v (mimic-video always stops early)")
        if raw and (self.obs_normalizer is None or self.action_normalizer is None):
            raise ValueError("raw=True needs the policy's obs and action normalizers; this model has none "
                             "(pass normalized proprio and use raw=False, or build the model with normalizers)")
        _check_finite(proprio, "proprio")
        if raw:
            proprio = self.obs_normalizer.normalize(proprio)
        latents, cond = self.window(context, oracle_future)
        B, HA = latents.shape[0], self.decoder.cfg.num_actions
        noise = query_noise(((B,) + tuple(latents.shape[1:]), (B, HA, self.decoder.cfg.out_channels)), seed,
                            numpy_noise, latents.device)
        if oracle_future is not None:
            sigma_v = float(partial_schedule(self.cfg.num_video_steps, stop_after_step, tau_v)[-1])
            sigma = torch.full((B,), sigma_v, dtype=torch.float32, device=latents.device)
            ctx = self.video_features(context, oracle_future, text, sigma, eps=noise[0])
        else:
            hidden, sigma = cosmos_sample(self.video, noise[0], latents, cond, text, self.cfg.num_video_steps,
                                          stop_after_step, tau_v, hidden_block=self.cfg.tap_block)
            ctx = hidden.flatten(1, 3)  # (B, L, D) in (t, h, w) order
        actions = self.decoder.sample(proprio, ctx, sigma, noise[1], self.cfg.num_action_steps)
        if raw:
            actions = self.action_normalizer.unnormalize(actions)
        return actions


# ================================================================================================
# Part II, around the model: checkpoint files, representations, encoders, the comparison models, the Policy and its
# folder with the released checkpoints, the toy world, the command line. Part I above is the whole method.
# ================================================================================================


# ------------------------------------------------------------------------------------------------
# 8. Checkpoint files: reading them (a local path or the Hub; .pt, .safetensors, diffusers folders), saving
#    them (atomic files, model checkpoints, LoRA adapters)
# ------------------------------------------------------------------------------------------------


# Reading. A checkpoint names its network by its keys and shapes only: configs come from a preset, a dict or (files
# this project wrote) the file's own metadata.
def make_config(cls, preset_or_dict, presets=None, **overrides):
    """Build a config dataclass from a preset name, a dict or an instance, then apply overrides.

    Unknown field names raise an error that lists the valid ones (no silent typos).
    """
    if isinstance(preset_or_dict, str):
        if presets is None or preset_or_dict not in presets:
            raise ValueError(f"unknown {cls.__name__} preset {preset_or_dict!r}; choose from {sorted(presets or {})}")
        cfg = presets[preset_or_dict]
    elif isinstance(preset_or_dict, dict):
        cfg, overrides = cls(), {**preset_or_dict, **overrides}
    else:
        cfg = preset_or_dict
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(valid)}")
    return replace(cfg, **overrides)


COSMOS_HUB_REPO = "nvidia/Cosmos-Predict2-2B-Video2World"  # gated: accept the license, then `hf auth login`

COSMOS_DEFAULT_FILE = "model-480p-10fps.pt"  # what mimic-video started from (also model-{480,720}p-{10,16}fps.pt)


def resolve_file(source, filename=None, revision=None, cache_dir=None):
    """A local path, or `filename` from the Hub repo `source` (cached by huggingface_hub).

    With HF_HUB_OFFLINE=1 only the local cache is used; a missing file raises FileNotFoundError
    that says how to get it.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None:
            raise FileNotFoundError(f"{source} is a folder: pass filename= (a file inside it)")
        if not (path / filename).exists():
            raise FileNotFoundError(f"{path / filename} does not exist")
        return path / filename
    if filename is None or source.count("/") != 1 or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source!r} is neither an existing file or folder nor a Hub repo id with a filename")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=revision, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(
            f"could not get {filename!r} from the Hub repo {source!r} ({type(e).__name__}). "
            f"Either download it on a machine with internet access (gated repos: accept the license on "
            f"huggingface.co, run `hf auth login`, then `hf download {source} {filename}`), unset "
            f"HF_HUB_OFFLINE if it is set, or pass the local path of the file instead of the repo id."
        ) from e


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read as it should (truncated, corrupt, inconsistent): names the file."""


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def error_line(e):
    """A library's exception as one line of our messages: its type and the first line of its text (torch's and the
    Hub's run over several lines, some with terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _read_tensor_file(path):
    """Tensors of a .pt (torch.load, weights_only) or .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            # Transformer Engine writes its `*._extra_state` as a uint8 tensor or, in some versions, as a pickled
            # io.BytesIO: let exactly that class through the weights-only unpickler (they are dropped below)
            with torch.serialization.safe_globals([io.BytesIO]):
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and torch raise their own types for truncated or corrupt files
        objects = " (it holds Python objects besides tensors: save the state dict alone)" * isinstance(
            e, pickle.UnpicklingError)
        raise CheckpointReadError(f"cannot read {path}: {error_line(e)}{objects}") from e
    if isinstance(sd, dict):
        sd = {k: v for k, v in sd.items() if not (k.endswith("._extra_state") and isinstance(v, io.BytesIO))}
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointReadError(f"{path} holds a {type(sd).__name__}, expected a flat dict of tensors")
    return sd


# official -> diffusers renames (diffusers scripts/convert_cosmos_to_diffusers.py, applied in order)
DIFFUSERS_RENAMES = (
    ("t_embedder.1", "time_embed.t_embedder"), ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"), ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"), ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"), ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"), ("cross_attn", "attn2"), ("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"),
    ("output_proj", "to_out.0"), ("q_norm", "norm_q"), ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2"), ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"), ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)


def to_diffusers_key(key):
    for old, new in DIFFUSERS_RENAMES:
        key = key.replace(old, new)
    return key


def from_diffusers_keys(sd):
    """A video DiT in diffusers' layout (`transformer_blocks.`, `patch_embed.`, ...) -> the official names; other
    checkpoints unchanged."""
    if not any(k.startswith(("transformer_blocks.", "patch_embed.", "time_embed.")) for k in sd):
        return sd
    n_blocks = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")), default=-1)
    with torch.device("meta"):  # the official names of a video DiT with as many blocks
        names = VideoDiT(replace(VIDEO_DIT_PRESETS["tiny"], num_blocks=n_blocks)).state_dict().keys()
    inverse = {to_diffusers_key(k): k for k in names}
    return {inverse.get(k, k): v for k, v in sd.items()}


def is_diffusers_folder(path):
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    return any((folder / name).is_file() for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json"))


def _read_diffusers_folder(path):
    """A diffusers folder, (transformer/)diffusion_pytorch_model.safetensors or the shards its index names: exactly
    the files the index lists, each holding exactly its keys. Stray files (an old shard, a precision variant such
    as *.fp16.safetensors) are never read."""
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    index, single = folder / (DIFFUSERS_WEIGHTS + ".index.json"), folder / DIFFUSERS_WEIGHTS
    if not index.is_file():
        if not single.is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors*"))
            raise FileNotFoundError(f"{folder} has neither {single.name} nor {index.name} (found: "
                                    f"{found or 'nothing'}); pass the file to load instead of the folder")
        return _read_tensor_file(single)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"cannot read the shard index {index}: {error_line(e)}") from e
    sd, origin = {}, {}
    for name in sorted(set(weight_map.values())):
        part = _read_tensor_file(folder / name)
        for key, value in part.items():
            if key in sd:
                raise CheckpointReadError(f"{key!r} is defined twice: in {origin[key]} and in {folder / name}")
            if weight_map.get(key) != name:
                raise CheckpointReadError(f"{folder / name} holds {key!r}, which {index.name} assigns to "
                                          f"{weight_map.get(key, 'no file')}")
            sd[key], origin[key] = value, folder / name
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointReadError(f"{index} lists {len(missing)} key(s) that its shards do not hold, e.g. "
                                  f"{missing[0]!r} in {weight_map[missing[0]]}")
    return sd


def read_state_dict(path):
    """Tensors of a .pt (torch.load, weights_only) or .safetensors file, or of a diffusers transformer folder."""
    path = Path(path)
    return _read_diffusers_folder(path) if path.is_dir() else _read_tensor_file(path)


def check_parameter_dtypes(sd, where):
    """Every parameter must be floating point, all of one dtype (a mix means a broken or half-converted file)."""
    bad = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if bad:
        raise CheckpointReadError(f"{where}: non-floating parameters, e.g. {bad[0]!r} ({sd[bad[0]].dtype})")
    dtypes = {}
    for k, v in sd.items():
        dtypes.setdefault(v.dtype, []).append(k)
    if len(dtypes) > 1:
        mix = ", ".join(f"{len(keys)} in {dt} (e.g. {keys[0]!r})" for dt, keys in dtypes.items())
        raise CheckpointReadError(f"{where}: mixed parameter dtypes: {mix}")


# Files this project writes carry the config of their model in the safetensors metadata, so a checkpoint is
# rebuilt without being told its shape; official .pt files do not, and take a preset (the released sizes).
CONFIG_METADATA_KEY = "mimic_video_config"


def read_config(path):
    """The model config (a dict) stored in a safetensors file's metadata, or None (official files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else None


def _shape_hint(sd):
    """One line on the size of a checkpoint's network, to tell a wrong config from a wrong file."""
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    width = sd["t_embedding_norm.weight"].shape[0] if "t_embedding_norm.weight" in sd else "?"
    return f"the checkpoint holds {len(blocks)} blocks of width {width}"


def load_official(model_cls, config, presets, default_preset, source, filename=None, revision=None, cache_dir=None,
                  device="cpu", dtype=None):
    """Build model_cls(cfg) on the meta device and assign a checkpoint's tensors strictly (one copy in memory).

    source: a Hub repo id (with filename), a local .pt / .safetensors file, or a folder (filename inside it;
    a diffusers folder when filename is None). config: a preset name, dict or config; None takes the config the
    file carries (files this project wrote) or else `default_preset` (the released model).
    """
    path = Path(source)
    missing = filename is None or not (path / filename).exists()
    diffusers_folder = path.is_dir() and (filename is None or (missing and is_diffusers_folder(path)))
    file = path if diffusers_folder else resolve_file(source, filename, revision, cache_dir)
    sd = official_keys(from_diffusers_keys(read_state_dict(file)))
    check_parameter_dtypes(sd, str(file))
    saved = None if file.is_dir() else read_config(file)
    cfg = make_config(model_cls.config_class, config if config is not None else (saved or default_preset), presets)
    with torch.device("meta"):
        model = model_cls(cfg)
    try:
        load_state_dict_strict(model, sd, f"{model_cls.__name__} checkpoint {file}", assign=True)
    except CheckpointMismatchError as e:
        hint = (f"\n  {_shape_hint(sd)}; the config has {getattr(cfg, 'num_blocks', '?')} blocks of width "
                f"{getattr(cfg, 'model_channels', '?')}")
        if saved is not None and config is not None:
            hint += f"; the file says it was saved with config {saved}: pass config=None to use it"
        elif saved is None:
            hint += " (the file carries no config: pass the config it was trained with, e.g. config='toy')"
        raise CheckpointMismatchError(str(e) + hint) from None
    model = model.to(device=device, dtype=dtype)
    # own, aligned memory: tensors still sliced from the file's buffer run other CPU kernel paths, so results would
    # depend on the file's layout
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu":
                t.data = t.data.clone()
    return model


def load_video_dit(source=COSMOS_HUB_REPO, filename=COSMOS_DEFAULT_FILE, config=None, revision=None, cache_dir=None,
                   device="cpu", dtype=None):
    """Load a Cosmos-Predict2 Video2World DiT, or a fused mimic-video backbone (same layout), strictly.

    config None: the config stored in the file (our safetensors files), else the released 2B preset."""
    return load_official(VideoDiT, config, VIDEO_DIT_PRESETS, "cosmos-predict2-2b", source, filename, revision,
                         cache_dir, device, dtype)


def load_action_decoder(source, filename=None, config=None, revision=None, cache_dir=None, device="cpu", dtype=None):
    """Load a mimic-video action decoder (`net.` keys; released .pt or our .safetensors) strictly.

    config None: the config stored in the file (our safetensors files), else the released LIBERO preset."""
    return load_official(ActionDecoder, config, ACTION_DECODER_PRESETS, "libero", source, filename, revision,
                         cache_dir, device, dtype)


# Saving. Everything written goes to a temp file or folder that is flushed and renamed into place: a crash
# or a full disk leaves the previous version, never half of a new one.


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(e):
    """Whether an exception (or one it came from) is a full disk or quota: serializers wrap the OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e) for m in ("No space left", "StorageFull", "os error 28", "Disk quota")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _write_error(e, what):
    """The error to raise when writing `what` failed: a full disk says so plainly (the serializers' messages do not)."""
    if _disk_full(e):
        return OSError(errno.ENOSPC, f"no space left on device while writing {what}; nothing there was changed "
                                     f"(the previous version, if any, is intact)")
    return e


def atomic_write(path, write_fn):
    """Write via write_fn(tmp_path) to a temp file in the same folder, flush it to disk, then rename: never a
    half-written file. The file gets the ordinary mode, as if created with open() (mkstemp's is owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        error = _write_error(e, path)
        if error is e:
            raise
        raise error from e


def recover_dir(folder):
    """Undo an interrupted `atomic_write_dir`: if the folder is missing but its previous version is still beside it
    (a crash between the two renames), put that back; drop leftovers of an unfinished write."""
    folder = Path(folder)
    old = folder.parent / f".{folder.name}.old"
    if old.exists():
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, folder)
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_dir(folder, write_fn):
    """Fill a temp folder beside `folder` with write_fn(tmp), flush it, then swap it into place: readers see the old
    folder or the new one, never a mix. The old one is removed only after the new one is in place; a crash between
    the two renames leaves it as .<name>.old, which `recover_dir` puts back."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = folder.parent / f".{folder.name}.old"
    try:
        write_fn(tmp)
        umask = _umask()
        for f in tmp.rglob("*"):  # flush, and the ordinary modes (some writers, safetensors among them, use 0600)
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.chmod(f, (0o666 if f.is_file() else 0o777) & ~umask)
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~umask)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException as e:
        if old.exists() and not folder.exists():
            os.replace(old, folder)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        error = _write_error(e, folder)
        if error is e:
            raise
        raise error from e
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_state_dict(sd, path, config=None):
    """Write `net.`-prefixed tensors atomically: .safetensors (with the model config in its metadata) or .pt."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = {CONFIG_METADATA_KEY: json.dumps(asdict(config))} if config is not None else None
        atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, p, metadata=meta))
    else:
        atomic_write(path, lambda p: torch.save(sd, p))


def fused_state_dict(model, prefix="net."):
    """The base model's state dict with every adapter fused, W + (alpha / r) B @ A (official [FUSE] layout).

    This is how the released mimic-video backbones are stored: no lora_* or base_layer keys.
    """
    sd = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if name.endswith("base_layer.weight"):
            layer = model.get_submodule(name[: -len(".base_layer.weight")])
            if not layer.merged:
                t = (t.float() + layer.delta_weight()).to(t.dtype)
            name = name.replace(".base_layer", "")
        sd[prefix + name] = t.detach().clone()
    return sd


def save_video_dit_checkpoint(model, path):
    """Save a video DiT (LoRA fused if wrapped) in the official layout: `net.` keys, .pt or .safetensors."""
    save_state_dict(fused_state_dict(model), path, model.cfg)


def save_action_decoder(decoder, path):
    """Save a decoder in the released layout (`net.` keys), with its config when the file is safetensors."""
    save_state_dict({"net." + k: v.detach() for k, v in decoder.state_dict().items()}, path, decoder.cfg)


def save_lora_adapter(model, directory, base_model_name_or_path=None):
    """Write a PEFT adapter folder: adapter_model.safetensors (`base_model.model.` keys) + adapter_config.json.

    Besides lora_A / lora_B it carries the fully trained modules (PEFT `modules_to_save`).
    """
    from safetensors.torch import save_file

    cfg: LoRAConfig = model.lora_config
    tensors = {f"base_model.model.{n}": p.detach().contiguous().clone()
               for n, p in model.named_parameters()
               if ".lora_A." in n or ".lora_B." in n or any(t in n for t in cfg.trainable_modules)}
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.target_modules), "modules_to_save": list(cfg.trainable_modules),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "adapter_model.safetensors", lambda p: save_file(tensors, p))
    atomic_write(directory / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))


def load_lora_adapter(model, directory):
    """Inject LoRA as described by a PEFT adapter folder and load its weights strictly."""
    from safetensors.torch import load_file

    directory = Path(directory)
    c = json.loads((directory / "adapter_config.json").read_text())
    cfg = LoRAConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=c.get("lora_dropout", 0.0),
                     target_modules=tuple(c["target_modules"]), trainable_modules=tuple(c.get("modules_to_save") or ()))
    inject_lora(model, cfg)
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()}
    sd = {k.replace(".default.", "."): v for k, v in sd.items()}  # in-memory PEFT names carry the adapter name
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_state_dict(expected, sd, f"LoRA adapter {directory}")
    with torch.no_grad():
        for k, v in sd.items():
            expected[k].copy_(v)
    return model


def save_stats(normalizer, path):
    """A normalizer's statistics as JSON (load_stats reads it back), written atomically."""
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(normalizer.to_stats())))


def load_stats(path, keys=None, dtype=torch.float32):
    """A Normalizer from a statistics JSON that `save_stats` wrote (every entry names its mode); `keys` picks and
    orders the groups."""
    stats = json.loads(Path(path).read_text())
    keys = list(stats) if keys is None else list(keys)
    missing = [k for k in keys if k in stats and "normalization" not in stats[k]]
    if missing:
        raise ValueError(f"{path}: entries {missing} do not say their normalization mode; build the Normalizer "
                         f"with explicit (key, mode) groups instead (e.g. NORMALIZATION_GROUPS)")
    return Normalizer(stats, [(k, stats[k]["normalization"]) if k in stats else (k, None) for k in keys], dtype)


# ------------------------------------------------------------------------------------------------
# 9. Rotations and state/action representations
# ------------------------------------------------------------------------------------------------


# Rotations. The decoder's 10-D vectors hold a rotation as the first two ROWS of its matrix (official
# `RotationMatrixTo6D`); datasets and simulators give quaternions or axis-angle vectors.
def rotation_to_6d(R):
    """(..., 3, 3) rotation matrix -> (..., 6): its first two ROWS, row-major (official `RotationMatrixTo6D`)."""
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


def rotation_from_6d(r6):
    """(..., 6) -> (..., 3, 3): Gram-Schmidt on the two rows, third row r1 x r2 (as the official LIBERO eval)."""
    a1, a2 = r6[..., :3], r6[..., 3:]
    r1 = F.normalize(a1, dim=-1)
    r2 = F.normalize(a2 - (r1 * a2).sum(-1, keepdim=True) * r1, dim=-1)
    r3 = torch.cross(r1, r2, dim=-1)
    return torch.stack([r1, r2, r3], dim=-2)


def quaternion_to_matrix(q, scalar_first=False):
    """(..., 4) quaternion -> (..., 3, 3). Default order (x, y, z, w), as scipy and robosuite (`robot0_eef_quat`)."""
    q = F.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1) if scalar_first else (q[..., 3], q[..., 0], q[..., 1], q[..., 2])
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def axis_angle_to_matrix(v):
    """(..., 3) rotation vector (axis * angle) -> (..., 3, 3) by Rodrigues' formula (scipy `from_rotvec`)."""
    angle = v.norm(dim=-1, keepdim=True)[..., None]  # (..., 1, 1)
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)  # cross-product matrix of v
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    K = K - K.transpose(-1, -2)
    small = angle < 1e-6  # Taylor terms near zero: sin(a)/a -> 1 - a^2/6, (1 - cos a)/a^2 -> 1/2 - a^2/24
    a = torch.where(small, torch.ones_like(angle), angle)
    s = torch.where(small, 1 - angle ** 2 / 6, torch.sin(a) / a)
    c = torch.where(small, 0.5 - angle ** 2 / 24, (1 - torch.cos(a)) / a ** 2)
    return torch.eye(3, dtype=v.dtype, device=v.device) + s * K + c * (K @ K)


def matrix_to_axis_angle(R):
    """(..., 3, 3) -> (..., 3) rotation vector with angle in [0, pi] (scipy `as_rotvec`), through the quaternion."""
    # quaternion by the numerically stable branch choice (Shepperd): pick the largest of w, x, y, z
    m = R
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([trace, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1)  # (..., 4)
    best = cands.argmax(-1)
    qw = torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]],
                     -1)
    qx = torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + 2 * m[..., 0, 0] - trace, m[..., 0, 1] + m[..., 1, 0],
                      m[..., 0, 2] + m[..., 2, 0]], -1)
    qy = torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 + 2 * m[..., 1, 1] - trace,
                      m[..., 1, 2] + m[..., 2, 1]], -1)
    qz = torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                      1 + 2 * m[..., 2, 2] - trace], -1)
    q = torch.stack([qw, qx, qy, qz], -2)  # (..., 4 candidates, (w, x, y, z))
    q = torch.gather(q, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    q = torch.where(q[..., :1] < 0, -q, q)  # w >= 0: angle in [0, pi]
    xyz_norm = q[..., 1:].norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(xyz_norm, q[..., :1])
    small = xyz_norm < 1e-7  # angle / sin(angle / 2) -> 2 near zero
    scale = torch.where(small, torch.full_like(angle, 2.0),
                        angle / torch.where(small, torch.ones_like(xyz_norm), xyz_norm))
    return q[..., 1:] * scale


def array_to_stats(x):
    """Statistics of (N, H, d) chunks in the released JSON layout (official `array_to_stats`), per chunk step."""
    x = np.asarray(x, np.float64)
    if x.ndim != 3 or len(x) == 0:
        raise ValueError(f"array_to_stats takes (N, H, d) chunks with N >= 1, got shape {x.shape}")
    pct = np.percentile(x, np.linspace(0, 100, 1001), axis=0)  # (1001, H, d)
    mean = x.mean(0)
    lo, hi = mean + 1.5 * (pct[20] - mean), mean + 1.5 * (pct[980] - mean)
    clamped = np.clip(x, lo, hi)
    return {k: v.tolist() for k, v in dict(min=x.min(0), max=x.max(0), mean=mean, std=x.std(0), percentiles=pct,
                                            clamp_min=lo, clamp_max=hi, mean_clamped=clamped.mean(0),
                                            std_clamped=clamped.std(0)).items()}


def episode_chunks(values, starts, horizon, pad="repeat", length=None):
    """Chunks values[t : t + horizon] of one episode for each start t -> (n, horizon, d).

    Past the episode's end (`length` steps, default all) the chunk is padded: "repeat" the last value (official
    chunk reader: interpolation clipped to the episode) or "zero" (relative motions: standing still). Training
    batches and normalization statistics both use this, so they agree on the tail.
    """
    values = np.asarray(values)
    length = len(values) if length is None else int(length)
    if length < 1:
        raise ValueError(f"episode_chunks needs an episode of at least 1 step, got {length}")
    if pad not in ("repeat", "zero"):
        raise ValueError(f"pad must be 'repeat' or 'zero', got {pad!r}")
    t = np.asarray(starts)[:, None] + np.arange(horizon)[None]  # (n, horizon)
    out = values[np.minimum(t, length - 1)]
    if pad == "zero":
        out = np.where((t < length)[..., None], out, 0)
    return out.astype(values.dtype)


# The released statistics' groups for the Normalizer (section 6): (key, mode) in concat order: position (3),
# 6-D rotation (6), gripper (1).
NORMALIZATION_GROUPS = {
    "libero": {"action": (("action/eef_pos_ref_delta_lowdim", "variance"),
                          ("action/eef_rot_ref_delta_lowdim", "identity"),
                          ("action/gripper_action_lowdim", "variance")),
               "obs": (("obs/eef_pos_lowdim", "variance"), ("obs/eef_rot_lowdim", "identity"),
                       ("obs/gripper_lowdim", "variance"))},
    "bridge": {"action": (("action/eef_pos_lowdim", "variance"), ("action/eef_rot_lowdim", "identity"),
                          ("action/gripper_action_lowdim", "variance")),
               "obs": (("obs/eef_pos_lowdim", "variance"), ("obs/eef_rot_lowdim", "identity"),
                       ("obs/gripper_state_lowdim", "variance"))},
}


# Representations: how a dataset's or simulator's state and action vectors become the decoder's vectors and back.
# "libero" is the LeRobot LIBERO layout (state: eef xyz, axis-angle, 2 finger joints; action: delta xyz, delta
# axis-angle, gripper -1/+1) mapped onto the official 10-D vectors [xyz, 6-D rotation rows, gripper] (official
# `process_libero.py` and LIBERO eval); "identity" passes vectors of any dimension through unchanged.
class Representation:
    """Maps environment state/action vectors to the decoder's proprio/action vectors and back.

    kind "identity": state (d_s,) and action (d_a,) pass through; each is one "variance" group unless `groups` says
        otherwise (e.g. the released Bridge 10-D layout).
    kind "libero": state (8,) = [xyz, axis-angle, finger_l, finger_r] -> [xyz, 6-D, finger_l] (10);
        action (7,) = [dxyz, axis-angle, gripper] <-> [dxyz, 6-D, gripper] (10), back through Gram-Schmidt, the
        rotation vector and sign(gripper), as the official LIBERO eval.
    """

    def __init__(self, kind="identity", state_dim=None, action_dim=None, state_groups=None, action_groups=None):
        if kind == "libero":
            g = NORMALIZATION_GROUPS["libero"]
            state_dim, action_dim = state_dim or 8, action_dim or 7
            if (state_dim, action_dim) != (8, 7):
                raise ValueError(f"the libero representation takes 8-D states and 7-D actions, got {state_dim} "
                                 f"and {action_dim}")
            state_groups = state_groups or [(k, d, m) for (k, m), d in zip(g["obs"], (3, 6, 1))]
            action_groups = action_groups or [(k, d, m) for (k, m), d in zip(g["action"], (3, 6, 1))]
        elif kind == "identity":
            if not state_dim or not action_dim or state_dim < 1 or action_dim < 1:
                raise ValueError(f"the identity representation needs state_dim and action_dim >= 1, got "
                                 f"{state_dim}, {action_dim}")
            state_groups = state_groups or [("obs/state_lowdim", state_dim, "variance")]
            action_groups = action_groups or [("action/action_lowdim", action_dim, "variance")]
        else:
            raise ValueError(f"unknown representation kind {kind!r}; choose 'identity' or 'libero'")
        self.kind, self.state_dim, self.action_dim = kind, int(state_dim), int(action_dim)
        self.state_groups = [(k, int(d), m) for k, d, m in state_groups]
        self.action_groups = [(k, int(d), m) for k, d, m in action_groups]
        for name, groups, dim in (("state", self.state_groups, self.model_state_dim),
                                  ("action", self.action_groups, self.model_action_dim)):
            if sum(d for _, d, _ in groups) != dim:
                raise ValueError(f"{name} groups {groups} do not add up to the model's {dim} dimensions")

    @property
    def rotvec_dims(self):
        """Where axis-angle triples start in (state, action): interpolated by slerp, not linearly."""
        return ((3,), (3,)) if self.kind == "libero" else ((), ())

    @property
    def model_state_dim(self):
        return 10 if self.kind == "libero" else self.state_dim

    @property
    def model_action_dim(self):
        return 10 if self.kind == "libero" else self.action_dim

    def to_config(self):
        return {"kind": self.kind, "state_dim": self.state_dim, "action_dim": self.action_dim,
                "state_groups": [list(g) for g in self.state_groups],
                "action_groups": [list(g) for g in self.action_groups]}

    @classmethod
    def from_config(cls, c):
        return cls(c["kind"], c.get("state_dim"), c.get("action_dim"), c.get("state_groups"), c.get("action_groups"))

    def _check(self, x, dim, what):
        if x.shape[-1] != dim:
            raise ValueError(f"{what} must have {dim} values in its last dimension ({self.kind} representation), "
                             f"got shape {tuple(x.shape)}")

    @staticmethod
    def _to_10d(x):
        """[xyz, axis-angle, g, ...] -> [xyz, 6-D rows, g]: the official 10-D layout (g: a finger joint or the
        gripper)."""
        r6 = rotation_to_6d(axis_angle_to_matrix(x[..., 3:6].double())).to(x.dtype)
        return torch.cat([x[..., :3], r6, x[..., 6:7]], dim=-1)

    def state_to_model(self, s):
        """(..., state_dim) -> (..., model_state_dim)."""
        self._check(s, self.state_dim, "observation.state")
        return s if self.kind == "identity" else self._to_10d(s)

    def action_to_model(self, a):
        """(..., action_dim) -> (..., model_action_dim)."""
        self._check(a, self.action_dim, "action")
        return a if self.kind == "identity" else self._to_10d(a)

    def action_from_model(self, y):
        """(..., model_action_dim) -> (..., action_dim): what the environment executes."""
        self._check(y, self.model_action_dim, "decoder action")
        if self.kind == "identity":
            return y
        rotvec = matrix_to_axis_angle(rotation_from_6d(y[..., 3:9].double())).to(y.dtype)
        return torch.cat([y[..., :3], rotvec, torch.sign(y[..., 9:10])], dim=-1)

    def normalizers(self, stats, dtype=torch.float32):
        """(proprio normalizer, action normalizer) from statistics in the released layout."""
        return (Normalizer(stats, [(k, m) for k, _, m in self.state_groups], dtype),
                Normalizer(stats, [(k, m) for k, _, m in self.action_groups], dtype))

    def stats(self, states, action_chunks):
        """Statistics in the released layout of (N, 1, d_s) model states and (N, H, d_a) model action chunks."""
        out = {}
        for groups, x in ((self.state_groups, states), (self.action_groups, action_chunks)):
            i = 0
            for key, d, mode in groups:
                out[key] = {**array_to_stats(np.asarray(x[..., i:i + d])), "normalization": mode}
                i += d
        return out


# ------------------------------------------------------------------------------------------------
# 10. Encoders: camera frames -> video latents, instructions -> text embeddings
# ------------------------------------------------------------------------------------------------


# The released models read Wan2.1-VAE latents of the camera frames and T5-11B embeddings of the instruction.
# Both are large (the VAE has 127M parameters, the T5-11B encoder 4.9B) and come from optional packages
# (diffusers, transformers), imported only here. Offline stand-ins with the same contracts let small models
# train and run on a CPU: a pixel encoder (space-to-depth) and a hashed word embedding.
def require(module, package):
    """Import an optional dependency, or raise ImportError with the one-line command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed; it is needed here: pip install {package}") from e


def as_tensor(x, dtype=None):
    """torch.as_tensor that also takes a numpy view with negative strides (a flipped camera image): copied."""
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, dtype=dtype)


def images_to_frames(images):
    """Camera images -> model frames in [-1, 1], channels first: (..., H, W, 3) uint8, or (..., 3, H, W) float in
    [0, 1] (LeRobot's two conventions), mapped by 2 x - 1 (official `CosmosProcessImage`: 2 (x / 255 - 0.5))."""
    images = as_tensor(images)
    if images.dtype == torch.uint8:
        if images.dim() < 3 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (..., H, W, 3), got {tuple(images.shape)}")
        images = images.movedim(-1, -3).float() / 255  # (..., 3, H, W)
    elif images.is_floating_point():
        if images.dim() < 3 or images.shape[-3] != 3:
            raise ValueError(f"float images must be (..., 3, H, W) in [0, 1], got {tuple(images.shape)}")
        images = images.float()
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:  # e.g. 0..255 in a float array: it would pass as a blown-out frame
            raise ValueError(f"float images must be in [0, 1], got values in [{lo:g}, {hi:g}]: pass uint8 (H, W, 3) or "
                             f"divide by 255")
    else:
        raise ValueError(f"images must be uint8 (H, W, 3) or float (3, H, W), got dtype {images.dtype}")
    return images * 2 - 1


def resize_frames(frames, size):
    """(..., 3, H, W) -> (..., 3, size[0], size[1]) by antialiased bilinear resizing (torchvision's `Resize`);
    frames already of that size are returned as they are."""
    size = tuple(int(s) for s in size)
    if tuple(frames.shape[-2:]) == size:
        return frames
    lead = frames.shape[:-3]
    out = F.interpolate(frames.reshape(-1, *frames.shape[-3:]).float(), size=size, mode="bilinear", antialias=True,
                        align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def _check_frames(frames, spatial_factor):
    if frames.dim() != 5 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (B, 3, T, H, W) in [-1, 1], got {tuple(frames.shape)}")
    if frames.shape[3] % spatial_factor or frames.shape[4] % spatial_factor:
        raise ValueError(f"frame height and width must be multiples of {spatial_factor}, got {tuple(frames.shape[3:])}")
    if not torch.isfinite(frames).all():
        raise ValueError("frames contain NaN or infinite values")


class WanVAE(nn.Module):
    """The Wan2.1 VAE (diffusers `AutoencoderKLWan`, the Cosmos-Predict2 tokenizer) with Cosmos' latent normalization.

    encode: frames (B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, 16, 1 + k, H/8, W/8)
    = (mode - latents_mean[c]) / latents_std[c], the posterior MODE (the official code takes the mean; diffusers'
    Cosmos pipeline samples, which we do not).
    Causal in time: the first 1 + 4j frames' latents do not depend on later frames, so encoding the context alone is
    exact. decode inverts it, for pictures.
    """

    def __init__(self, vae, spec=None):
        super().__init__()
        self.vae = vae
        c = vae.config
        self.channels = c.z_dim
        self.temporal_factor = c.scale_factor_temporal or 4
        self.spatial_factor = c.scale_factor_spatial or 8
        self.spec = spec or {"kind": "wan"}
        self.register_buffer("latents_mean", torch.tensor(c.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(c.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1),
                             persistent=False)

    def latent_frames(self, num_frames):
        """1 + 4k pixel frames -> 1 + k latent frames; other counts are refused."""
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"the Wan VAE encodes 1 + {self.temporal_factor}k frames (1, 5, 9, ..., 61), "
                             f"got {num_frames}")
        return 1 + (num_frames - 1) // self.temporal_factor

    @torch.no_grad()
    def encode(self, frames):
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> normalized latents (B, 16, 1 + k, H/8, W/8), float32."""
        _check_frames(frames, self.spatial_factor)
        self.latent_frames(frames.shape[2])
        dtype = next(self.vae.parameters()).dtype
        mode = self.vae.encode(frames.to(dtype)).latent_dist.mode()
        return (mode.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents):
        """(B, 16, 1 + k, h, w) normalized latents -> frames (B, 3, 1 + 4k, 8h, 8w) in [-1, 1]."""
        dtype = next(self.vae.parameters()).dtype
        x = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(x.to(dtype)).sample.float().clamp(-1, 1)


def wan_spec(source=COSMOS_HUB_REPO, subfolder="vae"):
    """The spec a Wan VAE carries in a policy's config.json (and a cache's plan); known without loading it."""
    return {"kind": "wan", "source": str(source), "subfolder": subfolder}


def load_vae(source=COSMOS_HUB_REPO, subfolder="vae", device="cpu", dtype=None, revision=None, cache_dir=None):
    """The Wan2.1 VAE from a diffusers layout: the Cosmos repo's `vae` subfolder, `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`
    (subfolder "vae"), or a local folder (the VAE folder itself, or one with a `vae` subfolder).
    The official code runs it in bf16 (about 2x faster, also on a CPU)."""
    diffusers = require("diffusers", "diffusers")
    path = Path(source)
    if path.is_dir() and subfolder and not (path / subfolder).is_dir():
        subfolder = None  # a local folder that is the VAE itself
    try:
        vae = diffusers.AutoencoderKLWan.from_pretrained(source, subfolder=subfolder, revision=revision,
                                                         cache_dir=cache_dir,
                                                         torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load the Wan VAE from {source!r} (subfolder {subfolder!r}): "
                                f"{error_line(e)}. Pass a local diffusers folder, or download it first (`hf download "
                                f"{source}`)") from e
    return WanVAE(vae.eval().requires_grad_(False), wan_spec(source, subfolder)).to(device)


def dct_basis(n, keep):
    """The first `keep` rows of the orthonormal DCT-II of length n, times sqrt(n): row 0 is all ones (the sum),
    the rows are orthogonal with squared norm n. (keep, n)."""
    k, i = torch.arange(keep, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    basis = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2)
    basis[0] = 1.0
    return basis.float()


class PixelEncoder(nn.Module):
    """Offline stand-in for the VAE: frames become small multi-channel "latents", each p x p pixel patch one latent
    pixel, without temporal compression (T frames -> T latents), normalized like the VAE's ((x - mean) / std),
    optionally with two coordinate channels.

    (B, 3, T, H, W) in [-1, 1] -> (B, 3 keep^2 (+ 2), T, H/p, W/p). keep = p is space-to-depth (lossless); keep < p
    compresses as the VAE does, keeping each patch's keep x keep lowest 2-D DCT frequencies (keep = 1: the patch's
    average colour). Why compress: the video DiT predicts a velocity that contains the noise it was given, so each
    token's numbers (channels x patch^2) must pass through its width; 32 x 32 frames space-to-depth by 4 with
    coordinates make 800-number tokens for the 64-wide toy DiT, which then learns almost nothing (the real DiT: 64
    numbers into 2048). The coordinate channels (x, y in [-1, 1]) put each token's location into its content: the
    video DiT's hidden states carry no absolute position (RoPE acts inside attention only) and the decoder reads
    them as an unordered set, while a real VAE latent of a real scene has its location in its content anyway (the
    toy world keeps them; they cost numbers a token). mean / std set the contrast the DiT sees, as the VAE's
    per-channel statistics do (the toy: -0.5 / 0.5 undo its half-exposure camera, whose frames stay in [-1, 1]:
    latents in [-1, 3]).
    """

    temporal_factor = 1

    def __init__(self, patch=1, coords=True, mean=0.0, std=1.0, keep=None):
        super().__init__()
        keep = patch if keep is None else keep
        if patch < 1 or std <= 0 or not 1 <= keep <= patch:
            raise ValueError(f"patch must be >= 1, std > 0 and keep in [1, patch], got {patch}, {std}, {keep}")
        self.patch, self.coords, self.keep = int(patch), bool(coords), int(keep)
        self.mean, self.std = float(mean), float(std)
        self.spatial_factor = self.patch
        self.channels = 3 * self.keep ** 2 + 2 * self.coords
        self.spec = {"kind": "pixels", "patch": self.patch, "coords": self.coords, "mean": self.mean, "std": self.std}
        if self.keep < self.patch:
            self.spec["keep"] = self.keep
        self.register_buffer("basis", dct_basis(self.patch, self.keep), persistent=False)  # (keep, p)

    def latent_frames(self, num_frames):
        return num_frames

    def encode(self, frames):
        _check_frames(frames, self.patch)
        p = self.patch
        # (B, 3, T, h, w, p, p): each latent pixel's patch
        x = rearrange((frames.float() - self.mean) / self.std, "b c t (h p) (w q) -> b c t h w p q", p=p, q=p)
        if self.keep < p:  # the patch's lowest frequencies, rows then columns, each divided by p^2 (row 0: the mean)
            x = torch.einsum("kp,lq,bcthwpq->bcthwkl", self.basis, self.basis, x) / p ** 2
        x = rearrange(x, "b c t h w p q -> b (c p q) t h w")  # (B, 3 keep^2, T, h, w)
        if not self.coords:
            return x
        B, _, T, h, w = x.shape
        gx = (torch.arange(w, dtype=torch.float32, device=x.device) + 0.5) / w * 2 - 1  # token centres in [-1, 1]
        gy = (torch.arange(h, dtype=torch.float32, device=x.device) + 0.5) / h * 2 - 1
        xy = torch.stack([gx[None, :].expand(h, w), gy[:, None].expand(h, w)])  # (2, h, w)
        return torch.cat([x, xy[None, :, None].expand(B, 2, T, h, w)], dim=1)

    def decode(self, latents):
        """Inverse of encode (the coordinate channels dropped; keep < p: the kept frequencies only):
        (B, C, T, h, w) -> (B, 3, T, h p, w p)."""
        p, k = self.patch, self.keep
        x = rearrange(latents[:, : 3 * k * k].float(), "b (c p q) t h w -> b c t h w p q", p=k, q=k)
        if k < p:  # basis basis^T = p I: the transpose inverts encode on the kept frequencies
            x = torch.einsum("kp,lq,bcthwkl->bcthwpq", self.basis, self.basis, x)
        return rearrange(x, "b c t h w p q -> b c t (h p) (w q)") * self.std + self.mean


def _check_texts(texts):
    texts = [texts] if isinstance(texts, str) or not hasattr(texts, "__iter__") else list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad or not texts:
        raise ValueError(f"instructions must be a string or a non-empty list of strings, got {bad[:3] or texts!r}")
    return texts


class T5TextEncoder:
    """T5 encoder embeddings as Cosmos uses them: tokens padded and truncated to `max_length` (512), the last hidden
    state with every row past the instruction's tokens set to exactly zero -> (B, max_length, d_model) float32.
    Embeddings are cached per distinct instruction (LIBERO has 40)."""

    def __init__(self, model, tokenizer, max_length=512, spec=None):
        self.model, self.tokenizer, self.max_length = model.eval().requires_grad_(False), tokenizer, int(max_length)
        self.width = model.config.d_model
        self.spec = spec or {"kind": "t5", "max_length": self.max_length}
        self.cache = {}

    @torch.no_grad()
    def __call__(self, texts):
        texts = _check_texts(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            device = next(self.model.parameters()).device
            enc = self.tokenizer(new, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            mask = enc.attention_mask.to(device)
            h = self.model(input_ids=enc.input_ids.to(device), attention_mask=mask).last_hidden_state.float()
            # (n, L, D): exact zeros past the tokens
            h = torch.where(mask[..., None].bool(), h, torch.zeros((), device=device))
            self.cache.update(zip(new, h))
        return torch.stack([self.cache[t] for t in texts])


def t5_spec(source="google-t5/t5-11b", subfolder=None, max_length=512):
    """The spec a T5 encoder carries in a policy's config.json; known without loading the 4.9B weights."""
    return {"kind": "t5", "source": str(source), "subfolder": subfolder, "max_length": int(max_length)}


def load_text_encoder(source="google-t5/t5-11b", subfolder=None, max_length=512, device="cpu", dtype=None,
                      revision=None, cache_dir=None):
    """The T5 encoder and tokenizer through transformers: `google-t5/t5-11b` (what Cosmos-Predict2 uses), the
    released `jonpai/mimic-video` (subfolder "text_encoder/t5-11b"), or a local folder. 4.9B parameters: 9 GB in bf16,
    minutes per instruction on a CPU; precompute on a GPU (train.py caches embeddings per instruction)."""
    transformers = require("transformers", "transformers")
    kw = dict(subfolder=subfolder or "", revision=revision, cache_dir=cache_dir)
    try:
        model = transformers.T5EncoderModel.from_pretrained(source, dtype=dtype, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load a T5 encoder from {source!r} (subfolder {subfolder!r}): "
                                f"{error_line(e)}. Pass a local folder, or download it first (`hf download "
                                f"{source}`)") from e
    return T5TextEncoder(model.to(device), tokenizer, max_length, t5_spec(source, subfolder, max_length))


class HashedWordEncoder:
    """Offline stand-in for T5: each word (lower case, letters and digits of any script) gets a fixed N(0, 1) vector
    seeded by a hash of the word, the same on every machine and run; zero-padded or truncated to `max_tokens` ->
    (B, max_tokens, width). Any instruction works; unlike T5, a word carries nothing beyond its identity."""

    def __init__(self, width=32, max_tokens=16):
        if width < 1 or max_tokens < 1:
            raise ValueError(f"width and max_tokens must be >= 1, got {width}, {max_tokens}")
        self.width, self.max_tokens = int(width), int(max_tokens)
        self.spec = {"kind": "hashed_words", "width": self.width, "max_tokens": self.max_tokens}
        self.cache = {}

    def word_vector(self, word):
        # not hash(): salted per run
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
        return np.random.RandomState(seed).standard_normal(self.width).astype(np.float32)

    def __call__(self, texts):
        texts = _check_texts(texts)
        for t in texts:
            if t not in self.cache:
                out = np.zeros((self.max_tokens, self.width), np.float32)
                for i, word in enumerate(re.findall(r"[^\W_]+", t.lower())[: self.max_tokens]):  # "größe", "杯子"
                    out[i] = self.word_vector(word)
                self.cache[t] = torch.from_numpy(out)
        return torch.stack([self.cache[t] for t in texts])


def build_video_encoder(spec, device="cpu", dtype=None):
    """An encoder from its spec in a policy's config.json: {"kind": "wan", "source", "subfolder"} or
    {"kind": "pixels", "patch", "coords", "mean", "std", "keep"}."""
    kind = spec.get("kind")
    if kind == "pixels":
        return PixelEncoder(spec.get("patch", 1), spec.get("coords", True), spec.get("mean", 0.0), spec.get("std", 1.0),
                            spec.get("keep")).to(device)
    if kind == "wan":
        return load_vae(spec.get("source", COSMOS_HUB_REPO), spec.get("subfolder", "vae"), device, dtype)
    raise ValueError(f"unknown video encoder kind {kind!r} in {spec}; choose 'wan' or 'pixels'")


def build_text_encoder(spec, device="cpu", dtype=None):
    """A text encoder from its spec: {"kind": "t5", "source", "subfolder", "max_length"} or
    {"kind": "hashed_words", "width", "max_tokens"}."""
    kind = spec.get("kind")
    if kind == "hashed_words":
        return HashedWordEncoder(spec.get("width", 32), spec.get("max_tokens", 16))
    if kind == "t5":
        return load_text_encoder(spec.get("source", "google-t5/t5-11b"), spec.get("subfolder"),
                                 spec.get("max_length", 512),
                                 device, dtype)
    raise ValueError(f"unknown text encoder kind {kind!r} in {spec}; choose 't5' or 'hashed_words'")


# ------------------------------------------------------------------------------------------------
# 11. The comparison models: VideoVLA-style joint denoising, the VLA-style baseline
# ------------------------------------------------------------------------------------------------


# VideoVLA-style joint denoising (Shen et al., arXiv 2512.06963), the other seed approach, for comparison. There is
# no separate decoder: the action chunk becomes extra tokens of the video DiT, with its own embedder, its own output
# head and its own flow time, and video and actions are denoised together by the one network. At inference the
# future video and the actions are denoised fully, jointly. VideoVLA builds on CogVideoX, whose sampler takes 50
# DDIM steps; here the joint sampler is 50 Euler steps of flow matching (our one time convention).
@dataclass
class JointConfig:
    """The joint model's action tokens, sampler and loss weights."""

    state_dim: int = 2  # a clean proprio token, embedded like the decoder's
    action_dim: int = 2  # per action token
    chunk: int = 8  # action tokens
    num_steps: int = 50  # joint Euler steps from tau = 1 to 0 at inference
    action_loss_scale: float = 10.0  # joint loss = video flow MSE + this x action flow MSE (the decoder's scale)


class JointVideoActionModel(nn.Module):
    """One DiT for video and actions: [video tokens | proprio token | action tokens], each token with its own time."""

    def __init__(self, video: VideoDiT, jcfg: JointConfig, cfg: VideoActionConfig, obs_normalizer=None,
                 action_normalizer=None):
        super().__init__()
        D = video.cfg.model_channels
        self.video, self.joint, self.cfg = video, jcfg, cfg
        self.obs_normalizer, self.action_normalizer = obs_normalizer, action_normalizer
        self.state_embedder = ActionEmbedder(jcfg.state_dim, D)
        self.action_embedder = ActionEmbedder(jcfg.action_dim, D)
        self.action_pos = nn.Parameter(torch.zeros(1, 1 + jcfg.chunk, D))  # learned positions; the tokens get no RoPE
        self.action_head = FinalLayer(D, D, video.cfg.adaln_lora_dim, jcfg.action_dim)
        nn.init.trunc_normal_(self.action_pos, std=D ** -0.5, a=-3 * D ** -0.5, b=3 * D ** -0.5)
        for m in (*self.state_embedder.layers, *self.action_embedder.layers, self.action_head.linear,
                  self.action_head.adaln_modulation[1]):
            if isinstance(m, nn.Linear):
                _init_linear(m)
        nn.init.zeros_(self.action_head.adaln_modulation[2].weight)  # a new head starts modulated by adaln_lora alone

    state_dim = property(lambda self: self.joint.state_dim)
    action_dim = property(lambda self: self.joint.action_dim)
    num_actions = property(lambda self: self.joint.chunk)

    def window(self, context, future):
        return latent_window(self.cfg, self.video.cfg.in_channels, context, future)

    def draw_noise(self, loss, batch, latent_shape, action_shape=None, generator=None, device=None):
        return draw_training_noise(self.cfg, loss, batch, latent_shape, action_shape, generator, device)

    def velocities(self, net_in, tau_BT, text, condition_mask, proprio, x_a, tau_a):
        """One joint forward: video velocity (B, C, T, H, W) and action velocity (B, HA, d_a).

        net_in, tau_BT, condition_mask: the Video2World inputs; proprio (B, 1, d_s); x_a (B, HA, d_a) noisy actions
        at flow time tau_a (B,)."""
        video = self.video
        x, emb, adaln = video.embed(net_in, tau_BT, condition_mask)  # (B, T', H', W', D), (B, T', D), (B, T', 3D)
        B, Tp, Hp, Wp, D = x.shape
        S, HA = Hp * Wp, x_a.shape[1]
        tau_a = tau_a.reshape(B, 1).float()
        # unit variance along the path, as the decoder
        a_in = x_a / torch.sqrt((1 - tau_a) ** 2 + tau_a ** 2)[..., None]
        a = torch.cat([self.state_embedder(proprio.to(x.dtype)), self.action_embedder(a_in.to(x.dtype))],
                      1) + self.action_pos[:, : 1 + HA]
        # (B, 1 + HA)
        tau_tok = torch.cat([torch.full((B, 1), TAU_PROPRIO, device=x.device), tau_a.expand(B, HA)], dim=1)
        emb_a, adaln_a = video.time_embedding(tau_tok)  # (B, 1 + HA, D), (B, 1 + HA, 3D)
        # every token its own "frame" (S = 1), so each carries its own time: video tokens their frame's, actions theirs
        tokens = torch.cat([x.reshape(B, Tp * S, D), a], dim=1)[:, :, None]  # (B, L, 1, D)
        emb_all = torch.cat([emb.repeat_interleave(S, dim=1), emb_a], dim=1)  # (B, L, D)
        adaln_all = torch.cat([adaln.repeat_interleave(S, dim=1), adaln_a], dim=1)  # (B, L, 3D)
        cos, sin = video.rope(Tp, Hp, Wp, x.device)  # (Lv, 1, hd); the action tokens are not rotated (angle 0)
        rope = (torch.cat([cos, torch.ones_like(cos[:1 + HA])]), torch.cat([sin, torch.zeros_like(sin[:1 + HA])]))
        context = text.to(emb.dtype)
        for block in video.blocks:
            tokens = video.run_block(block, tokens, emb_all, adaln_all, context, rope)
        v_video = video.final_layer(tokens[:, : Tp * S, 0].reshape(B, Tp, S, D), emb, adaln).view(B, Tp, Hp, Wp, -1)
        v_action = self.action_head(tokens[:, Tp * S + 1:], emb_a[:, 1:], adaln_a[:, 1:])[:, :, 0]  # (B, HA, d_a)
        return video.unpatchify(v_video), v_action

    def forward(self, loss, **batch):
        """`model("action", ...)`: the joint training loss (video + actions); the video model alone is not trained
        here."""
        if loss != "action":
            raise ValueError(f"the joint model trains with its joint loss ('action'), got {loss!r}")
        return self.joint_loss(**batch)

    def joint_loss(self, context, future, text, proprio, actions, noise=None, generator=None):
        """Video flow loss on the future frames + scaled action flow loss; tau_v and tau_a independent per sample."""
        latents, cond = self.window(context, future)
        B = latents.shape[0]
        if noise is None:
            noise = self.draw_noise("action", B, latents.shape[1:], actions.shape[1:], generator, latents.device)
        tau_v, tau_a = sigma_to_tau(noise["sigma"]), noise["tau_a"]
        x0, eps = latents.float(), noise["eps_video"]
        net_in, tau_BT, condition_mask = video2world_inputs(interpolate(x0, eps, tau_v), tau_v, latents, cond)
        a0, eps_a = actions.float(), noise["eps_action"]
        v_video, v_action = self.velocities(net_in, tau_BT, text, condition_mask, proprio,
                                            interpolate(a0, eps_a, tau_a), tau_a)
        video_err = flow_loss(v_video, velocity_target(x0, eps), (~cond)[:, None, :, None, None])  # future frames only
        per_sample = video_err + self.joint.action_loss_scale * flow_loss(v_action, velocity_target(a0, eps_a))
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "tau_a": tau_a, "tau_v": tau_v}

    @torch.no_grad()
    def sample_actions(self, context, text, proprio, stop_after_step=None, tau_v=None, seed=0, numpy_noise=False,
                       oracle_future=None, raw=False):
        """Full joint denoising: the future video and the actions from tau = 1 to 0 together, `num_steps` Euler steps.
        (No partial denoising: stop_after_step and tau_v do not apply.) Returns actions (B, HA, d_a)."""
        if oracle_future is not None:
            raise ValueError("the joint model denoises its own future: an oracle future does not apply")
        if raw and (self.obs_normalizer is None or self.action_normalizer is None):
            raise ValueError("raw=True needs the policy's obs and action normalizers; this model has none")
        _check_finite(proprio, "proprio")
        if raw:
            proprio = self.obs_normalizer.normalize(proprio)
        latents, cond = self.window(context, None)
        B, HA = latents.shape[0], self.joint.chunk
        x_v, x_a = query_noise(((B,) + tuple(latents.shape[1:]), (B, HA, self.joint.action_dim)), seed, numpy_noise,
                               latents.device)
        n_v = x_v[0].numel()

        def velocity(x, tau):  # x: the video latents and the actions of each sample side by side, (B, n_v + n_a)
            x_v, x_a = x[:, :n_v].view_as(latents), x[:, n_v:].view(B, HA, -1)
            net_in, tau_BT, condition_mask = video2world_inputs(x_v, tau, latents, cond)
            v_v, v_a = self.velocities(net_in, tau_BT, text, condition_mask, proprio, x_a, tau)
            return torch.cat([v_v.flatten(1), v_a.flatten(1)], dim=1).float()

        x = euler_integrate(velocity, torch.cat([x_v.flatten(1), x_a.flatten(1)], dim=1), self.joint.num_steps)
        x_a = x[:, n_v:].view(B, HA, -1)  # the imagined video x[:, :n_v] is not needed
        return self.action_normalizer.unnormalize(x_a) if raw else x_a

    def head_state_dict(self):
        """What the joint model adds to the video DiT: its action embedders, positions and output head."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("video.")}


class VLAModel(VideoActionModel):
    """The VLA-style baseline: mimic-video's network (video DiT + decoder), trained end to end on the action loss,
    seeing what a k = 0 query sees: the current frames and the instruction, the future as noise at sigma = 80. Only
    what the backbone sees, that it trains, and how it was pretrained differ from mimic-video's stage 2.

    A VLA's backbone is pretrained on static images with language, not on video. `image_loss` is that pretraining
    for this network: the same flow loss on the same frames and instructions, with the time axis removed: the
    observed frames are generated from noise given the instruction alone, so the model learns what scenes look
    like, never what happens next (an image model instead of a video model; a VLM's captioning or contrastive
    objective would need another head and another loss, and the comparison would no longer isolate time)."""

    def forward(self, loss, **batch):
        return self.image_loss(**batch) if loss == "image" else super().forward(loss, **batch)

    def draw_noise(self, loss, batch, latent_shape, action_shape=None, generator=None, device=None):
        loss = "video" if loss == "image" else loss  # the image objective draws the video objective's noise
        noise = super().draw_noise(loss, batch, latent_shape, action_shape, generator, device)
        if loss == "action":  # drawn all the same, so both models consume the same randomness
            noise["sigma"] = torch.full_like(noise["sigma"], 80.0)
        return noise

    def image_loss(self, context, future, text, noise=None, generator=None):
        """VLA-style pretraining: the flow loss on the observed frames alone, all of them noised, none given.
        Returns {"loss", "per_sample", "tau_v"} as `video_loss`."""
        x0 = context.float()  # (B, C, Tc, H, W): the present; the future frames are never read
        B, Tc = x0.shape[0], x0.shape[2]
        if noise is None:
            noise = self.draw_noise("image", B, x0.shape[1:], generator=generator, device=x0.device)
        tau, eps = sigma_to_tau(noise["sigma"]), noise["eps_video"][:, :, :Tc]
        no_frames = torch.zeros(B, Tc, dtype=torch.bool, device=x0.device)  # no conditioning frame
        net_in, tau_BT, condition_mask = video2world_inputs(interpolate(x0, eps, tau), tau, x0, no_frames)
        per_sample = flow_loss(self.video(net_in, tau_BT, text, condition_mask), velocity_target(x0, eps))
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "tau_v": tau}

    def video_features(self, context, future, text, sigma, eps=None, generator=None):
        # the backbone trains with the decoder, and the future never reaches it
        return self.tapped_hidden(context, torch.zeros_like(future), text, sigma, eps, generator)


# ------------------------------------------------------------------------------------------------
# 12. The policy: LeRobot's interface, frame history, action chunks, one folder format, released checkpoints
# ------------------------------------------------------------------------------------------------


# Released checkpoints: jonpai/mimic-video on the Hub (`model/scripts/download_checkpoints.py`, eval scripts).
MIMIC_VIDEO_HUB_REPO = "jonpai/mimic-video"

UNRELEASED_POLICIES = ("libero_goal_full", "libero_spatial_half")  # the 4 x 3 LIBERO grid less these two: 10 released

_LIBERO_BACKBONE = "v2w_libero_{}_agentview_lora_rank256_lr1.778e-04_bsz32_iter_{}_fused"


RELEASED_BACKBONES = {
    "goal": _LIBERO_BACKBONE.format("goal", "000007020"),
    "object": _LIBERO_BACKBONE.format("object", "000008260"),
    "spatial": _LIBERO_BACKBONE.format("spatial", "000007540"),
    "bridge": "v2w_bridge_lora_rank256_lr1.778e-04_bsz64_iter_000070043_fused",
    "cosmos": "v2w_pretrained_cosmos",  # stock Cosmos-Predict2-2B 480p/10fps, renamed
}


RELEASED_POLICIES = {  # task -> (decoder preset, backbone, decoder iteration)
    "libero_goal_half": ("libero", "goal", "000050022"), "libero_goal_tenth": ("libero", "goal", "000040014"),
    "libero_goal_one": ("libero", "goal", "000019998"),
    "libero_object_full": ("libero", "object", "000050274"), "libero_object_half": ("libero", "object", "000030090"),
    "libero_object_tenth": ("libero", "object", "000039984"), "libero_object_one": ("libero", "object", "000029997"),
    "libero_spatial_full": ("libero", "spatial", "000051212"),
    "libero_spatial_tenth": ("libero", "spatial", "000030012"),
    "libero_spatial_one": ("libero", "spatial", "000019998"),
    "bridge": ("bridge", "bridge", "000014112"),  # on the Bridge-finetuned backbone
    "bridge_ptcosmos": ("bridge", "cosmos", "000014112"),  # on the stock Cosmos backbone
}


def released_files(task):
    """Paths inside the released repo of a task's backbone, decoder and statistics."""
    if task not in RELEASED_POLICIES:
        raise ValueError(f"unknown released task {task!r}; choose from {sorted(RELEASED_POLICIES)}")
    preset, backbone, iteration = RELEASED_POLICIES[task]
    data = "bridge" if preset == "bridge" else task
    batch = 256 if preset == "bridge" else 128
    video = RELEASED_BACKBONES[backbone]
    return {"video": f"video_backbone/{video}.pt",
            "decoder": f"action_decoder/w2a_{data}_{video}_lr1.000e-04_layer20_bsz{batch}_iter_{iteration}.pt",
            "statistics": f"dataset_statistics/{data}.json"}


def load_released_model(task, source=MIMIC_VIDEO_HUB_REPO, revision=None, cache_dir=None, device="cpu", dtype=None,
                        video_config=None, decoder_config=None, config="mimic-video"):
    """A released task's VideoActionModel (backbone, decoder, normalizers in the released layout); `load_policy`
    wraps it with the encoders and the official timing. bf16 (dtype=torch.bfloat16) on a GPU: 2B + 0.5B parameters."""
    files = released_files(task)
    preset = RELEASED_POLICIES[task][0]
    video = load_video_dit(source, files["video"], video_config, revision, cache_dir, device, dtype)
    decoder = load_action_decoder(source, files["decoder"], decoder_config or preset, revision, cache_dir, device,
                                  dtype)
    stats = json.loads(resolve_file(source, files["statistics"], revision, cache_dir).read_text())
    groups = NORMALIZATION_GROUPS[preset]
    norm_dtype = dtype or torch.float32  # the official eval normalizes in the model's dtype (bf16)
    model = VideoActionModel(video.requires_grad_(False), decoder.requires_grad_(False),
                             make_config(VideoActionConfig, config, VIDEO_ACTION_PRESETS),
                             Normalizer(stats, groups["obs"], norm_dtype),
                             Normalizer(stats, groups["action"], norm_dtype))
    return model.eval()


# A robot learner drives a policy the LeRobot way: policy.reset() at an episode's start, then
# policy.select_action(observation) once per control step. Observations use LeRobot's keys:
#     "observation.images.<camera>"  (H, W, 3) uint8 or (3, H, W) float in [0, 1]; a leading batch dim for B envs
#     "observation.state"            (d_s,) or (B, d_s)
#     "task"                         the instruction: a string, or a list of B strings
# The policy keeps the frame history the model was trained with, encodes the frames and the instruction,
# queries the model when its action queue is empty and executes `n_action_steps` of each chunk.
def camera_key(camera):
    """The observation key of a camera: observation.images.<camera>, or the key itself ("observation.image")."""
    return camera if camera.startswith("observation.") else f"observation.images.{camera}"


@dataclass
class PolicyConfig:
    """Everything between a robot's observations and the model; the defaults are the released LIBERO policies."""

    # reads observation.images.<camera> (LeRobot LIBERO: "image" is the agentview, flipped 180 deg), or a whole key
    # that starts with "observation." (some LeRobot datasets have one camera, "observation.image")
    camera: str = "image"
    state_key: str = "observation.state"  # the observation key of the proprio state (a dataset's --state_key)
    image_size: tuple = (480, 640)  # (H, W) every frame is resized to before encoding (official LIBERO data: 480 x 640)
    context_frames: int = 5  # camera frames per query (the Wan VAE takes 1 + 4k: 5 frames -> 2 latents)
    # control steps between context frames (20 Hz control, 5 Hz frames: last 17 frames, every 4th)
    frame_stride: int = 4
    # episode start: copies of the "first" frame (LIBERO eval) or of the "latest" (Bridge)
    history_padding: str = "first"
    n_action_steps: int = 5  # actions executed from each chunk before the next query (both released benchmarks: 5)
    stop_after_step: int = 23  # partial denoising: video sampler steps before the decoder reads (official HIL eval: 23)
    tau_v: float | None = None  # or stop at this video flow time instead (see `partial_schedule`)
    seed: int = 0  # the noise of every query is drawn from this seed (official: 0, every query)
    numpy_noise: bool = True  # draw the noise as the official code does (numpy RandomState); False: torch
    # (old, new) pairs applied to the instruction (released LIBERO: "black bowl" -> "bowl")
    text_replacements: tuple = ()
    video_encoder: dict = field(default_factory=lambda: {"kind": "wan", "source": COSMOS_HUB_REPO, "subfolder": "vae"})
    text_encoder: dict = field(default_factory=lambda: {"kind": "t5", "source": MIMIC_VIDEO_HUB_REPO,
                                                        "subfolder": "text_encoder/t5-11b", "max_length": 512})
    representation: dict = field(default_factory=lambda: {"kind": "libero"})

    def __post_init__(self):  # JSON gives lists: keep the tuples, so a saved and loaded config compares equal
        self.image_size = tuple(int(v) for v in self.image_size)
        self.text_replacements = tuple(tuple(pair) for pair in self.text_replacements)

    @property
    def history_length(self):
        """Control steps of history one query reads: (context_frames - 1) * frame_stride + 1 (LIBERO: 17)."""
        return (self.context_frames - 1) * self.frame_stride + 1


POLICY_PRESETS = {
    "libero": PolicyConfig(text_replacements=(("black bowl", "bowl"),)),  # eval/libero/run.py
    # eval/bridge (SimplerEnv): 5 Hz control, 5 frames at 5 Hz, the latest frame repeated until there are 5; the
    # 10-D vectors ([xyz, 6-D rows, gripper]: absolute proprio, relative target pose) pass through unchanged
    "bridge": PolicyConfig(frame_stride=1, history_padding="latest", representation={
        "kind": "identity", "state_dim": 10, "action_dim": 10,
        "state_groups": [[k, d, m] for (k, m), d in zip(NORMALIZATION_GROUPS["bridge"]["obs"], (3, 6, 1))],
        "action_groups": [[k, d, m] for (k, m), d in zip(NORMALIZATION_GROUPS["bridge"]["action"], (3, 6, 1))]}),
    # the toy world: the current frame, the pixel encoder and hashed words; 4 of 8 actions executed
    "toy": PolicyConfig(camera="top", image_size=(8, 8), context_frames=1, frame_stride=1, n_action_steps=4,
                        stop_after_step=0, numpy_noise=False,
                        video_encoder={"kind": "pixels", "patch": 1, "coords": True, "mean": -0.5, "std": 0.5},
                        text_encoder={"kind": "hashed_words", "width": 32, "max_tokens": 6},
                        representation={"kind": "identity", "state_dim": 2, "action_dim": 2}),
}


class ChunkedPolicy:
    """LeRobot's action queue: a chunk is predicted when the queue is empty, and its first `n_action_steps` actions are
    returned one per `select_action` call. Subclasses implement `observe` (every step) and `query` (a chunk)."""

    n_action_steps = 1

    def reset(self):
        self.queue, self._last = [], None

    def observe(self, observation):
        """Called on every control step with the new observation; returns whether it was batched."""
        return True

    def _observe_once(self, observation):
        """observe() once per control step. The observation passed again in the same step (predict_action_chunk,
        then select_action, on the same dict with the same values) is not recorded a second time; a new dict, or a
        value replaced in it, is a new step. (Data written into the same array in place cannot be told apart.)"""
        values = list(observation.values()) if isinstance(observation, dict) else None
        last = self._last
        if last is None or last[0] is not observation or values is None or len(values) != len(last[1]) or \
                any(a is not b for a, b in zip(values, last[1])):
            self._batched = self.observe(observation)
            self._last = (observation, values)  # references: the objects' ids cannot be reused while we compare
        return self._batched

    def query(self, observation):
        """An action chunk (B, horizon, d_a) for the current observation."""
        raise NotImplementedError

    def select_action(self, observation, **kwargs):
        """The next action: (d_a,) for one environment, (B, d_a) for a batch of B."""
        batched = self._observe_once(observation)
        if not self.queue:
            chunk = torch.as_tensor(self.query(observation, **kwargs))  # (B, H, d_a)
            self.queue = list(chunk[:, : self.n_action_steps].unbind(1))
        action = self.queue.pop(0)
        return action if batched else action[0]

    def predict_action_chunk(self, observation, **kwargs):
        """The whole chunk for this observation, (B, H, d_a) or (H, d_a); the action queue is not touched, and
        select_action with the same observation in the same step does not record its frame again."""
        batched = self._observe_once(observation)
        chunk = torch.as_tensor(self.query(observation, **kwargs))
        return chunk if batched else chunk[0]


POLICY_FORMAT = "mimic-video policy v1"


def save_policy_folder(folder, model, config: PolicyConfig, method="mimic-video"):
    """Write a policy folder atomically: config.json, video_backbone.safetensors (LoRA fused, `net.` keys),
    action_decoder.safetensors (`net.` keys; the joint model: joint_heads.safetensors) and stats.json (the released
    statistics layout). `config` names the encoders by their specs: train.py writes a policy without loading them."""
    m = model
    joint = isinstance(m, JointVideoActionModel)
    folder_config = {"format": POLICY_FORMAT, "method": "joint" if joint else method, "video": asdict(m.video.cfg),
                     "model": asdict(m.cfg), "policy": asdict(config),
                     **({"joint": asdict(m.joint)} if joint else {"decoder": asdict(m.decoder.cfg)})}
    stats = {**m.obs_normalizer.to_stats(), **m.action_normalizer.to_stats()}

    def write(tmp):
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(folder_config, indent=2))
        (tmp / "stats.json").write_text(json.dumps(stats))
        save_video_dit_checkpoint(m.video, tmp / "video_backbone.safetensors")
        if joint:  # the joint model's action embedders, positions and head
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in m.head_state_dict().items()},
                      tmp / "joint_heads.safetensors")
        else:
            save_action_decoder(m.decoder, tmp / "action_decoder.safetensors")

    atomic_write_dir(folder, write)


def push_policy_to_hub(policy, repo_id, private=None, token=None, commit_message="Upload a mimic-video policy"):
    """Upload a policy folder (the layout Policy.save writes) to the Hub repo `repo_id`, created if needed;
    load_policy(repo_id) loads it back. Returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        policy.save(Path(tmp) / "policy")
        return api.upload_folder(repo_id=repo_id, folder_path=Path(tmp) / "policy", commit_message=commit_message)


class Policy(ChunkedPolicy):
    """A mimic-video policy: encoders + VideoActionModel + representation, driven with raw observations."""

    def __init__(self, model: VideoActionModel, config: PolicyConfig, video_encoder, text_encoder,
                 method="mimic-video"):
        # the config describes the encoders in use, so a saved policy rebuilds exactly these
        self.model, self.method = model.eval(), method  # "mimic-video", "vla" or "scratch" (same network), "joint"
        self.config = replace(config, video_encoder=video_encoder.spec, text_encoder=text_encoder.spec)
        self.video_encoder, self.text_encoder = video_encoder, text_encoder
        self.representation = Representation.from_config(config.representation)
        self.n_action_steps = config.n_action_steps
        self._check()
        self.reset()

    def _check(self):
        cfg, m = self.config, self.model
        rep = self.representation
        if m.obs_normalizer is None or m.action_normalizer is None:
            raise ValueError("a Policy needs a model with its obs and action normalizers (the statistics)")
        if (rep.model_state_dim, rep.model_action_dim) != (m.state_dim, m.action_dim):
            raise ValueError(f"representation {rep.kind} gives {rep.model_state_dim}-D proprio and "
                             f"{rep.model_action_dim}-D actions; the model takes {m.state_dim} and {m.action_dim}")
        if self.video_encoder.channels != m.video.cfg.in_channels:
            raise ValueError(f"the video encoder makes {self.video_encoder.channels}-channel latents; the video DiT "
                             f"takes {m.video.cfg.in_channels}")
        if self.video_encoder.latent_frames(cfg.context_frames) != m.cfg.context_latents:
            raise ValueError(f"{cfg.context_frames} context frames give "
                             f"{self.video_encoder.latent_frames(cfg.context_frames)} latent frames; the model was "
                             f"trained with context_latents={m.cfg.context_latents}")
        if self.text_encoder.width != m.video.cfg.crossattn_emb_channels:
            raise ValueError(f"the text encoder makes {self.text_encoder.width}-d embeddings; the video DiT reads "
                             f"{m.video.cfg.crossattn_emb_channels}")
        if not 1 <= cfg.n_action_steps <= m.num_actions:
            raise ValueError(f"n_action_steps must be in [1, {m.num_actions}] (the chunk), got {cfg.n_action_steps}")
        if cfg.frame_stride < 1 or cfg.context_frames < 1:
            raise ValueError(f"frame_stride and context_frames must be >= 1, got {cfg.frame_stride}, "
                             f"{cfg.context_frames}")
        if cfg.history_padding not in ("first", "latest"):
            raise ValueError(f"history_padding must be 'first' or 'latest', got {cfg.history_padding!r}")
        partial_schedule(m.cfg.num_video_steps, *self._stop())  # validates the range

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _stop(self, stop_after_step=None, tau_v=None):
        """(stop_after_step, tau_v), exactly one of them set: the arguments, else the config's tau_v, else its k."""
        if stop_after_step is not None or tau_v is not None:
            return stop_after_step, tau_v
        return (None, self.config.tau_v) if self.config.tau_v is not None else (self.config.stop_after_step, None)

    def reset(self):
        """Forget the episode: the frame history and the queued actions."""
        super().reset()
        self.history, self.seen, self.tasks, self.state = None, 0, None, None

    def observe(self, observation):
        """Read one step's observation into the frame history; keep its state and instruction for a query."""
        cfg = self.config
        key = camera_key(cfg.camera)
        if key not in observation:
            raise KeyError(f"observation has no {key!r} (the camera this policy was trained on); it has "
                           f"{sorted(k for k in observation if isinstance(k, str))}")
        for k in (cfg.state_key, "task"):
            if k not in observation:
                raise KeyError(f"observation has no {k!r}")
        images = as_tensor(observation[key])
        batched = images.dim() == 4
        frames = resize_frames(images_to_frames(images if batched else images[None]), cfg.image_size)  # (B, 3, H, W)
        B = frames.shape[0]
        state = as_tensor(observation[cfg.state_key], dtype=torch.float32)
        state = state if state.dim() == 2 else state[None]
        if state.shape[0] != B or state.dim() != 2:
            raise ValueError(f"{cfg.state_key} must be ({B}, d) for {B} environment(s), got {tuple(state.shape)}")
        if not torch.isfinite(state).all():
            raise ValueError(f"{cfg.state_key} contains NaN or infinite values")
        tasks = _check_texts(observation["task"])
        for old, new in cfg.text_replacements:  # e.g. the released LIBERO policies never saw "black bowl"
            tasks = [t.replace(old, new) for t in tasks]
        if len(tasks) == 1 and B > 1:
            tasks = tasks * B
        if len(tasks) != B:
            raise ValueError(f"task must be one string or {B} strings (one per environment), got {len(tasks)}")
        if self.history is not None and self.history.shape[0] != B:
            raise ValueError(f"the batch changed from {self.history.shape[0]} to {B} environments: call reset() first")
        frames = frames.to(self.device)
        if self.history is None:  # episode start: the history is padded with the first frame
            self.history = frames[:, None].repeat(1, cfg.history_length, 1, 1, 1)  # (B, L, 3, H, W)
        else:
            self.history = torch.cat([self.history[:, 1:], frames[:, None]], dim=1)
        self.seen += 1
        self.state, self.tasks = state, tasks
        return batched

    def context_frames(self):
        """(B, 3, context_frames, H, W): every frame_stride-th frame of the history, ending now."""
        cfg = self.config
        if cfg.history_padding == "latest" and self.seen < cfg.history_length:  # Bridge: repeat the latest frame
            return self.history[:, -1:].repeat(1, cfg.context_frames, 1, 1, 1).transpose(1, 2)
        return self.history[:, :: cfg.frame_stride].transpose(1, 2)  # (B, L, 3, H, W) -> (B, 3, Tc, H, W)

    def _inputs(self, oracle_future=None):
        """Encoded context latents, future latents (oracle only), text and model-space proprio of the current step."""
        frames = self.context_frames()
        Tc = self.model.cfg.context_latents
        future = None
        if oracle_future is not None:  # encode context and future together: the VAE is causal in time
            oracle_future = torch.as_tensor(oracle_future, dtype=torch.float32, device=frames.device)
            latents = self.video_encoder.encode(torch.cat([frames, oracle_future], dim=2))
            context, future = latents[:, :, :Tc], latents[:, :, Tc:]
        else:
            context = self.video_encoder.encode(frames)
        text = self.text_encoder(self.tasks).to(self.device)
        proprio = self.representation.state_to_model(self.state).to(self.device)[:, None]  # (B, 1, d)
        return context, future, text, proprio

    @torch.no_grad()
    def query(self, observation=None, oracle_future=None, stop_after_step=None, tau_v=None):
        """One model query from the current history: (B, chunk, d_a) actions in the environment's space.

        oracle_future: (B, 3, T_f, H, W) true future frames in [-1, 1] instead of the video model's imagination.
        """
        if self.history is None:
            raise RuntimeError("no observation yet: call select_action or predict_action_chunk with an observation")
        self.model.eval()
        context, future, text, proprio = self._inputs(oracle_future)
        k, tau_v = self._stop(stop_after_step, tau_v)
        y = self.model.sample_actions(context, text, proprio, stop_after_step=k, tau_v=tau_v, seed=self.config.seed,
                                      numpy_noise=self.config.numpy_noise, oracle_future=future, raw=True)
        actions = self.representation.action_from_model(y.float())
        if not torch.isfinite(actions).all():
            raise FloatingPointError("the policy produced non-finite actions (NaN or inf): check the weights and the "
                                     "statistics; nothing was executed")
        return actions  # on the policy's device, as LeRobot returns them; .cpu() for the robot

    @torch.no_grad()
    def imagine(self, stop_after_step=None):
        """The plan the decoder reads at the current step, as pictures: the video model's x0 prediction at the noise
        level where partial denoising stops, decoded -> (B, 3, T, H, W) in [-1, 1] (context frames first)."""
        if self.history is None:
            raise RuntimeError("no observation yet: call select_action first")
        if isinstance(self.model, JointVideoActionModel):
            raise ValueError("imagine() shows mimic-video's partially denoised plan; the joint model has none")
        context, _, text, _ = self._inputs()
        m, (k, tau_v) = self.model, self._stop(stop_after_step)
        latents, cond = m.window(context, None)
        eps = query_noise([latents.shape], self.config.seed, self.config.numpy_noise, latents.device)[0]
        x0 = cosmos_sample(m.video, eps, latents, cond, text, m.cfg.num_video_steps, k, tau_v, return_x0=True)
        return self.video_encoder.decode(x0)

    def to(self, device):
        """Move the model and the encoders to `device` (LeRobot's policy.to); the episode starts over. Returns self."""
        self.model.to(device)
        for encoder in (self.video_encoder, getattr(self.text_encoder, "model", None)):  # T5's model; hashed: none
            if isinstance(encoder, nn.Module):
                encoder.to(device)
        if hasattr(self.text_encoder, "cache"):
            self.text_encoder.cache = {}  # embeddings on the old device
        self.reset()
        return self

    def eval(self):
        """LeRobot's policy.eval(): a Policy's model is always in eval mode. Returns self."""
        return self

    def save(self, folder):
        save_policy_folder(folder, self.model, self.config, self.method)

    def push_to_hub(self, repo_id, private=None, token=None, commit_message="Upload a mimic-video policy"):
        return push_policy_to_hub(self, repo_id, private, token, commit_message)


def check_fits_env(policy, name, env, cameras, state_dim, action_dim):
    """Refuse (ValueError) to run a policy in an environment without the camera it reads or with other state and
    action sizes: one line before the first episode, instead of a traceback inside its first step."""
    reads = (camera_key(policy.config.camera), policy.representation.state_dim, policy.representation.action_dim)
    cameras, key = [camera_key(c) for c in cameras], policy.config.state_key
    if reads[0] not in cameras or reads[1:] != (state_dim, action_dim) or key != "observation.state":
        own = "" if key == "observation.state" else f" ({key})"  # the envs here give observation.state
        raise ValueError(f"{name} reads {reads[0]} and {reads[1]}-D states{own}, and acts in {reads[2]}-D; {env} "
                         f"gives {' or '.join(cameras)} and {state_dim}-D states (observation.state), and takes "
                         f"{action_dim}-D actions (run the policy in the simulator it was trained for)")


def query_latency(policies, observation, rounds=20, warmup=3):
    """Median milliseconds per model query of each policy ({name: Policy}) on the same observation, measured in
    interleaved rounds (one query of each per round) so that machine drift falls on all of them alike."""
    for policy in policies.values():
        policy.reset()
        policy.observe(observation)
    times = {name: [] for name in policies}
    for r in range(warmup + rounds):
        for name, policy in policies.items():
            t0 = time.perf_counter()
            policy.query().cpu()  # the actions on the host, where the robot takes them: the device's work is done
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def _read_policy_json(folder, name):
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"the policy folder {folder} is incomplete: {name} missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # a truncated or overwritten file
        raise CheckpointReadError(f"cannot read {path}: {error_line(e)}") from e


def snapshot_policy(repo_id, revision=None, cache_dir=None):
    """The folder of a policy pushed to the Hub, downloaded by huggingface_hub (HF_HUB_OFFLINE=1: the local cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
    except Exception as e:  # offline without a cached copy, no such repo, no access
        raise FileNotFoundError(f"could not get the policy {repo_id!r} from the Hub ({type(e).__name__}); download it "
                                f"where the Hub is reachable (`hf download {repo_id}`), unset HF_HUB_OFFLINE if it is "
                                f"set, or pass the folder") from e


def load_policy(task_or_folder, source=MIMIC_VIDEO_HUB_REPO, device="cpu", dtype=None, video_encoder=None,
                text_encoder=None, revision=None, cache_dir=None, video_config=None, decoder_config=None,
                model_config="mimic-video", **overrides):
    """A `Policy` from a folder `Policy.save` (or train.py) wrote, or from a released task of jonpai/mimic-video.

    task_or_folder: a folder with config.json, or a released task (`libero_spatial_full`, ..., `bridge`) fetched from
    `source` (the Hub repo, or a local copy of its layout) with the official LIBERO or Bridge timing.
    video_encoder / text_encoder: objects to use instead of building them from the config (e.g. already loaded).
    video_config, decoder_config, model_config: the released task's model configs (default: the released sizes).
    overrides: PolicyConfig fields (e.g. stop_after_step=0, n_action_steps=8). bf16 (dtype) on a GPU.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():  # before any file is read
        raise ValueError(f"device={str(device)!r} but this machine has no CUDA device")
    path = Path(task_or_folder)
    hub_id = not path.exists() and str(task_or_folder) not in RELEASED_POLICIES and str(task_or_folder).count("/") == 1
    if hub_id:  # a policy folder pushed to the Hub (Policy.push_to_hub); offline: the local cache
        path = snapshot_policy(str(task_or_folder), revision, cache_dir)
    if path.is_dir():
        config = _read_policy_json(path, "config.json")
        if config.get("format") != POLICY_FORMAT:
            raise ValueError(f"{path / 'config.json'} is not a policy folder of this format ({POLICY_FORMAT!r}); found "
                             f"format {config.get('format')!r}")
        pcfg = make_config(PolicyConfig, config["policy"], **overrides)
        stats = _read_policy_json(path, "stats.json")
        weights = ["video_backbone.safetensors",
                   "joint_heads.safetensors" if "joint" in config else "action_decoder.safetensors"]
        missing = [f for f in weights if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"the policy folder {path} is incomplete: {', '.join(missing)} missing")
        video = load_video_dit(path / "video_backbone.safetensors", None, config["video"], device=device, dtype=dtype)
        obs_norm, act_norm = Representation.from_config(pcfg.representation).normalizers(stats, dtype or torch.float32)
        model_cfg = dict(config["model"])
        model_cfg.pop("train_backbone", None)  # written before the VLA-style baseline had its own class (VLAModel)
        if model_cfg.get("video_time") == "max":
            model_cfg.pop("video_time")
        va_cfg = make_config(VideoActionConfig, model_cfg)
        if "joint" in config:  # the VideoVLA-style joint model
            model = JointVideoActionModel(video, make_config(JointConfig, config["joint"]), va_cfg, obs_norm, act_norm)
            from safetensors.torch import load_file

            heads = load_file(path / "joint_heads.safetensors")
            load_state_dict_strict(model, {**{"video." + k: v for k, v in video.state_dict().items()}, **heads},
                                   f"joint model {path}")
            model = model.to(device=device, dtype=dtype).requires_grad_(False)
        else:
            decoder = load_action_decoder(path / "action_decoder.safetensors", None, config["decoder"], device=device,
                                          dtype=dtype)
            model_cls = VLAModel if config.get("method") in ("vla", "scratch") else VideoActionModel
            model = model_cls(video.requires_grad_(False), decoder.requires_grad_(False), va_cfg, obs_norm, act_norm)
        method = config.get("method", "mimic-video")
    elif str(task_or_folder) in RELEASED_POLICIES:
        model = load_released_model(str(task_or_folder), source, revision, cache_dir, device, dtype, video_config,
                                    decoder_config, model_config)
        pcfg = make_config(PolicyConfig, RELEASED_POLICIES[str(task_or_folder)][0], POLICY_PRESETS, **overrides)
        method = "mimic-video"
    elif str(task_or_folder) in UNRELEASED_POLICIES:
        raise FileNotFoundError(f"{task_or_folder!r} was not released in {MIMIC_VIDEO_HUB_REPO} (its decoder is "
                                f"missing there); the released LIBERO tasks: "
                                f"{', '.join(t for t in RELEASED_POLICIES if 'libero' in t)}")
    else:
        raise FileNotFoundError(f"{task_or_folder!r} is neither a policy folder, a Hub repo id (owner/name) nor a "
                                f"released task ({', '.join(sorted(RELEASED_POLICIES))})")
    video_encoder = video_encoder if video_encoder is not None else build_video_encoder(pcfg.video_encoder, device,
                                                                                        dtype)
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(pcfg.text_encoder, device, dtype)
    return Policy(model.eval(), pcfg,
                  video_encoder.to(device) if isinstance(video_encoder, nn.Module) else video_encoder,
                  text_encoder, method)


# ------------------------------------------------------------------------------------------------
# 13. A toy world: language-conditioned reaching, small enough to run the whole recipe on a CPU
# ------------------------------------------------------------------------------------------------


# Three coloured squares and a white agent in the unit square, rendered to 8 x 8 RGB frames with numpy.
# The instruction ("go to the red one") names the goal; the decoder never sees it, so the video model
# must carry the intent. Frames go through the pixel encoder (RGB plus coordinate channels, no temporal
# compression) and instructions through the hashed word embedding: the offline stand-ins for the VAE and T5.
# The world speaks LeRobot (observation.images.top, observation.state = the agent's position, task);
# actions are relative motions.
@dataclass
class ToyWorldConfig:
    """The toy world and how its episodes become (context, future, instruction, state, action chunk) samples."""

    image_size: int = 8  # frames are (3, S, S): with coordinates, 2 x 2 tokens of 4 x 4 pixels a frame
    max_speed: float = 0.08  # largest agent step per env step (arena [0, 1]^2)
    success_radius: float = 0.07  # success: the episode ends this close to the instructed square
    agent_size: float = 1.0  # std of the agent's Gaussian blob, in pixels: big enough to dominate what moves
    target_size: float = 0.6  # std of the squares' blobs, in pixels
    episode_steps: int = 24  # env steps per episode
    chunk: int = 8  # actions per chunk (decoder: 1 proprio token + 8 action tokens)
    execute: int = 4  # actions executed before replanning (the paper executes 5 of 15)
    future_frames: int = 4  # future latent frames in the video window
    future_stride: int = 2  # env steps between future frames (4 x 2 = the chunk's span)
    text_tokens: int = 6  # instruction length after zero padding (T5 pads with zeros too)
    text_dim: int = 32  # word embedding width


TOY_COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.25, 0.45, 1.0)}

TOY_TEMPLATES = ("go to the {} one", "move to the {} square", "reach {}", "{}")


def toy_instruction(colour, template):
    """The instruction naming colour id `colour` with template id `template`, e.g. "go to the red one"."""
    return TOY_TEMPLATES[template].format(list(TOY_COLOURS)[colour])


def toy_reset(seeds, cfg: ToyWorldConfig):
    """One episode per seed: 3 squares (distinct colours, 0.3 apart), an agent away from them, a goal."""
    agent, targets, colours, goal, template = [], [], [], [], []
    for seed in seeds:
        rng = np.random.RandomState(seed)
        while True:
            t = rng.uniform(0.15, 0.85, size=(3, 2))
            if min(np.linalg.norm(t[i] - t[j]) for i in range(3) for j in range(i)) > 0.3:
                break
        while True:
            a = rng.uniform(0.1, 0.9, size=2)
            if np.linalg.norm(t - a, axis=1).min() > 0.2:
                break
        agent.append(a), targets.append(t), colours.append(rng.permutation(3))
        goal.append(rng.randint(3)), template.append(rng.randint(len(TOY_TEMPLATES)))
    f = lambda x, dt=np.float32: np.asarray(x, dt)  # noqa: E731
    return {"agent": f(agent), "targets": f(targets), "colours": f(colours, np.int64), "goal": f(goal, np.int64),
            "template": f(template, np.int64)}


def toy_goal_position(state):
    return state["targets"][np.arange(len(state["goal"])), state["goal"]]  # (N, 2)


def toy_instructions(state):
    """The instruction of each episode, naming its goal's colour."""
    colour = state["colours"][np.arange(len(state["goal"])), state["goal"]]
    return [toy_instruction(c, t) for c, t in zip(colour, state["template"])]


def toy_render(agent, targets, colours, cfg: ToyWorldConfig):
    """(N, 2) agent, (N, 3, 2) squares, (N, 3) colour ids -> (N, 3, S, S) float32 RGB in [0, 1], channels first.
    Squares and agent are added at half intensity, not clipped: where the (white) agent covers a square the square
    stays visible, and nothing saturates the camera."""
    S = cfg.image_size
    grid = (np.arange(S, dtype=np.float32) + 0.5) / S
    palette = np.array(list(TOY_COLOURS.values()), np.float32)  # (3 colours, RGB)

    def blob(p, size):  # (N, 2) -> (N, S, S) soft blobs: sub-pixel positions stay visible; rows y, columns x
        d2 = (grid[None, :, None] - p[:, 1, None, None]) ** 2 + (grid[None, None, :] - p[:, 0, None, None]) ** 2
        return np.exp(-d2 / (2 * (size / S) ** 2))

    squares = np.zeros((len(agent), 3, S, S), np.float32)
    for k in range(targets.shape[1]):
        squares += palette[colours[:, k]][:, :, None, None] * blob(targets[:, k], cfg.target_size)[:, None]
    return 0.5 * (squares + blob(agent, cfg.agent_size)[:, None])


def toy_camera(images):
    """(N, 3, S, S) rendered images in [0, 1] -> what a camera delivers: (N, S, S, 3) uint8."""
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def toy_step(agent, action, cfg: ToyWorldConfig):
    """Move by the action, its length capped at max_speed, and stay inside the arena."""
    norm = np.linalg.norm(action, axis=-1, keepdims=True)
    action = action * np.minimum(1.0, cfg.max_speed / np.maximum(norm, 1e-9))
    return np.clip(agent + action, 0.0, 1.0).astype(np.float32)


def toy_expert_chunk(state, cfg: ToyWorldConfig, speed=None):
    """The scripted expert's next `chunk` actions: straight to the goal at `speed`, then stand still."""
    speed = cfg.max_speed if speed is None else speed
    agent, goal = state["agent"].copy(), toy_goal_position(state)
    actions = []
    for _ in range(cfg.chunk):
        delta = goal - agent
        dist = np.linalg.norm(delta, axis=-1, keepdims=True)
        a = delta * np.minimum(1.0, np.asarray(speed, np.float32).reshape(-1, 1) / np.maximum(dist, 1e-9))
        actions.append(a.astype(np.float32))
        agent = toy_step(agent, a, cfg)
    return np.stack(actions, axis=1)  # (N, chunk, 2)


def toy_random_chunk(state, cfg: ToyWorldConfig, rng):
    return rng.uniform(-cfg.max_speed, cfg.max_speed, size=(len(state["agent"]), cfg.chunk, 2)).astype(np.float32)


def toy_observation(state, cfg: ToyWorldConfig, tasks):
    """The world's observation in LeRobot keys (a batch of N environments); "toy.state" is the true state, which only
    the scripted policies read."""
    image = toy_camera(toy_render(state["agent"], state["targets"], state["colours"], cfg))  # (N, S, S, 3) uint8
    return {"observation.images.top": torch.from_numpy(image), "observation.state": torch.from_numpy(state["agent"]),
            "task": tasks, "toy.state": state}


class ToyScriptedPolicy(ChunkedPolicy):
    """The scripted expert ("expert") or uniformly random actions ("random"), on the world's true state."""

    def __init__(self, kind, cfg: ToyWorldConfig, seed=0):
        if kind not in ("expert", "random"):
            raise ValueError(f"kind must be 'expert' or 'random', got {kind!r}")
        self.kind, self.cfg, self.rng, self.n_action_steps = kind, cfg, np.random.RandomState(seed), cfg.execute
        self.reset()

    def query(self, observation):
        state = observation["toy.state"]
        return toy_expert_chunk(state, self.cfg) if self.kind == "expert" else toy_random_chunk(state, self.cfg,
                                                                                                self.rng)


def toy_rollout(policy, seeds, cfg: ToyWorldConfig, tasks=None):
    """Closed loop, one `policy.select_action(observation)` per env step after `policy.reset()`.

    tasks: instructions to give instead of the true ones. Returns {"success": (N,) bool, "agent": (N, 2) final
    positions, "images": (N, steps + 1, S, S, 3) uint8, what the camera saw}."""
    state = toy_reset(seeds, cfg)
    tasks = toy_instructions(state) if tasks is None else tasks
    policy.reset()
    obs = toy_observation(state, cfg, tasks)
    images = [obs["observation.images.top"].numpy()]
    for _ in range(cfg.episode_steps):
        action = policy.select_action(obs).cpu().numpy().astype(np.float32)  # (N, 2)
        state = dict(state, agent=toy_step(state["agent"], action, cfg))
        obs = toy_observation(state, cfg, tasks)
        images.append(obs["observation.images.top"].numpy())
    success = np.linalg.norm(state["agent"] - toy_goal_position(state), axis=-1) < cfg.success_radius
    return {"success": success, "agent": state["agent"], "images": np.stack(images, axis=1)}


def make_toy_demos(num_episodes, seed, cfg: ToyWorldConfig, speed_range=None):
    """Expert demonstrations (speed_range=None: the expert's speed) or a varied-speed 'play' corpus.

    Stored as trajectories, not pixels: frames are re-rendered per batch (cheap at 8 x 8).
    """
    seeds = [seed * 1_000_003 + i for i in range(num_episodes)]
    state = toy_reset(seeds, cfg)
    rng = np.random.RandomState(seed)
    if speed_range is None:
        speed = np.full(num_episodes, cfg.max_speed, np.float32)
    else:
        speed = rng.uniform(*speed_range, num_episodes).astype(np.float32)
    agents, actions = [state["agent"]], []
    for _ in range(cfg.episode_steps):
        a = toy_expert_chunk(state, cfg, speed)[:, 0]
        state = dict(state, agent=toy_step(state["agent"], a, cfg))
        agents.append(state["agent"]), actions.append(a)
    goal_colour = state["colours"][np.arange(num_episodes), state["goal"]]
    return {"agent": np.stack(agents, 1), "actions": np.stack(actions, 1), "targets": state["targets"],
            "colours": state["colours"], "goal_colour": goal_colour, "template": state["template"]}


def toy_demo_lengths(demos):
    """(N,) steps of each demonstration up to and including its first state on the goal: recorded robot
    episodes end at success, and the idle tail would otherwise be most of the data (a policy trained on it
    learns to stand still as soon as it is near the goal)."""
    goal_index = (demos["colours"] == demos["goal_colour"][:, None]).argmax(1)  # (N,)
    goal = demos["targets"][np.arange(len(goal_index)), goal_index]  # (N, 2)
    arrived = np.linalg.norm(demos["agent"] - goal[:, None], axis=-1) < 1e-6  # (N, L + 1)
    return np.where(arrived.any(1), arrived.argmax(1) + 1, arrived.shape[1] - 1)


def toy_batch(demos, episodes, steps, cfg: ToyWorldConfig):
    """The data seam: (episode, t) pairs -> context frames (B, 3, 1, S, S) and future frames (B, 3, F, S, S) from the
    camera, in model units (2 x / 255 - 1), instructions (B strings), state (B, 2) and action chunks (B, chunk, 2).
    Past the end of an episode the agent stands still (zero actions, the last frame)."""
    L = cfg.episode_steps
    agent, targets, colours = demos["agent"][episodes], demos["targets"][episodes], demos["colours"][episodes]
    B = len(episodes)

    def frames_at(ts):  # (B, k) env steps -> (B, 3, k, S, S)
        ts = np.minimum(ts, L)
        pos = agent[np.arange(B)[:, None], ts]  # (B, k, 2)
        k = ts.shape[1]
        img = toy_camera(toy_render(pos.reshape(B * k, 2), np.repeat(targets, k, 0), np.repeat(colours, k, 0), cfg))
        return images_to_frames(img).reshape(B, k, 3, cfg.image_size, cfg.image_size).transpose(1, 2)

    context = frames_at(steps[:, None])
    future = frames_at(steps[:, None] + cfg.future_stride * np.arange(1, cfg.future_frames + 1)[None])
    actions = np.stack([episode_chunks(demos["actions"][e], [t], cfg.chunk, pad="zero")[0]
                        for e, t in zip(episodes, steps)])
    tasks = [toy_instruction(c, t) for c, t in zip(demos["goal_colour"][episodes], demos["template"][episodes])]
    return {"context": context, "future": future, "task": tasks, "state": torch.from_numpy(agent[np.arange(B), steps]),
            "actions": torch.from_numpy(actions)}


def toy_expert_future(state, cfg: ToyWorldConfig):
    """The frames the expert would produce from here, in model units (B, 3, F, S, S): the ground-truth future of the
    oracle case study."""
    agent, frames = state["agent"], []
    chunk = toy_expert_chunk(state, cfg)
    for j in range(cfg.future_frames * cfg.future_stride):
        agent = toy_step(agent, chunk[:, j] if j < cfg.chunk else np.zeros_like(agent), cfg)
        if (j + 1) % cfg.future_stride == 0:
            frames.append(images_to_frames(toy_camera(toy_render(agent, state["targets"], state["colours"], cfg))))
    return torch.stack(frames, dim=2)  # (N, 3, F, S, S)


def toy_baselines(seeds, cfg: ToyWorldConfig, seed=0):
    """Success rates of uniformly random actions and of the scripted expert on the given episodes."""
    random = toy_rollout(ToyScriptedPolicy("random", cfg, seed), seeds, cfg)["success"].mean()
    expert = toy_rollout(ToyScriptedPolicy("expert", cfg), seeds, cfg)["success"].mean()
    return float(random), float(expert)


TOY_ENV = (("top",), 2, 2)  # what the toy world gives a policy: its cameras, state and action sizes
TOY_EVAL_SEEDS = 10**9  # held-out episodes are seeds 10**9, 10**9 + 1, ...: never used for demonstrations


def toy_probe_observation(cfg: ToyWorldConfig = None):
    """The first held-out episode's first observation (LeRobot keys, one environment): what latency is timed on."""
    cfg = cfg or ToyWorldConfig()
    state = toy_reset([TOY_EVAL_SEEDS], cfg)
    return toy_observation(state, cfg, toy_instructions(state))


# ------------------------------------------------------------------------------------------------
# 14. Command-line configs, shared by train.py and sample.py
# ------------------------------------------------------------------------------------------------


def field_comments(cfg_cls):
    """{field: its comment} from the config's source (what --help prints): the comment on the field's line, or else
    the comment lines just above it (above a commented field, they head a group of fields)."""
    import inspect

    notes, above = {}, []
    for line in inspect.getsource(cfg_cls).splitlines():
        line = line.strip()
        if line.startswith("#"):
            above.append(line.lstrip("# "))
            continue
        code, _, comment = line.partition("  # ")
        name = re.match(r"(\w+): [\w.]+ = ", code)
        if name:
            notes[name.group(1)] = comment or " ".join(above)
        above = []
    return notes


def check_device(device, compile=False):
    """--device: 'auto', 'cpu', 'cuda' or 'cuda:N' that exists on this machine. With --compile on the CPU, a C++
    compiler too: inductor builds the CPU kernels with it, and without one the first step would fail, not the start."""
    if device not in ("auto", "cpu"):
        if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device} but this machine has no CUDA device (torch.cuda.is_available() is "
                             "False)")
        if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"--device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if compile and (device == "cpu" or device == "auto" and not torch.cuda.is_available()):
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler  # torch's own search ($CXX, g++, clang++, cl)
        except ImportError:  # another torch layout: the first step will tell
            return
        try:
            get_cpp_compiler()
        except Exception as e:
            message = f"--compile=true on the CPU needs a C++ compiler, and torch finds none ({type(e).__name__})"
            raise ValueError(message + ": install g++ or clang (on Windows, MSVC), or drop --compile") from None


def changed_fields(cfg, names=None):
    """The fields of a config (among `names`; default all) set away from their defaults: the scripts refuse, by name,
    an option the run would ignore."""
    return [f.name for f in fields(cfg) if (names is None or f.name in names) and getattr(cfg, f.name) != f.default]


def parse_config(argv, cfg_cls):
    """--field=value overrides of a config dataclass. An unknown field or a value of the wrong type exits with a
    one-line message; the config's own `validate()` (if any) checks ranges the same way, before any work starts."""
    cfg, types = cfg_cls(), {f.name: type(f.default) for f in fields(cfg_cls)}
    if any(arg in ("-h", "--help") for arg in argv):
        notes = field_comments(cfg_cls)
        print("usage: --field=value ...; fields, defaults and what they mean:\n" + "\n".join(
            f"  --{k}={getattr(cfg, k)}" + (f"\n      {notes[k]}" if notes.get(k) else "") for k in types))
        raise SystemExit(0)
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"error: expected --field=value, got {arg!r}")
        if key not in types:
            raise SystemExit(f"error: unknown option --{key}; valid: {', '.join('--' + k for k in types)}")
        try:
            if types[key] is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                parsed = value.lower() in ("true", "1")
            elif types[key] is str:  # paths as a shell leaves them after "=" (--out_dir=~/runs): expanded here
                parsed = ",".join(os.path.expanduser(v) for v in value.split(","))
            else:
                parsed = types[key](value)
        except ValueError:
            raise SystemExit(f"error: --{key}={value!r} is not a valid {types[key].__name__}") from None
        setattr(cfg, key, parsed)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return cfg

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

Reading order (each part only uses what came before it):
    1. flow matching: interpolation, target, loss, time samplers, Euler, the Cosmos RF-AB2 sampler
    2. building blocks: sinusoids, attention with q/k RMSNorm and 3D RoPE, AdaLN-LoRA DiT block
    3. the Cosmos-Predict2 video DiT, Video2World conditioning and partial denoising
    4. LoRA (PEFT-compatible), merge / export
    5. checkpoint loading (official .pt, safetensors, diffusers layout; local or Hugging Face Hub)
    6. the action decoder, normalization statistics and 6-D rotations
    7. the video-action model: stage-1/2 losses, partial-denoising sampling, released checkpoints
    8. a toy world to run the whole recipe on a CPU
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange

# ------------------------------------------------------------------------------------------------
# 1. Flow matching: the math, time samplers and integrators
# ------------------------------------------------------------------------------------------------


def interpolate(x0, eps, tau):
    """x_tau on the straight path from data (tau = 0) to noise (tau = 1); tau broadcasts from the left."""
    tau = _expand_like(tau, x0)
    return (1 - tau) * x0 + tau * eps


def velocity_target(x0, eps):
    """The velocity d x_tau / d tau = eps - x0 that every network in this file predicts."""
    return eps - x0


def flow_loss(v_hat, u, mask=None):
    """Mean squared velocity error; `mask` (broadcastable to u) selects which entries count."""
    err = (v_hat.float() - u.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def sigma_to_tau(sigma):
    """EDM noise level -> flow time (Cosmos `RectifiedFlowScaling`): tau = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def tau_to_sigma(tau):
    """Flow time -> EDM noise level: sigma = tau / (1 - tau)."""
    return tau / (1 - tau)


def _expand_like(tau, x):
    """(B,) or scalar time -> shape (B, 1, ..., 1) broadcastable against x."""
    tau = torch.as_tensor(tau, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return tau.reshape(tau.shape + (1,) * (x.dim() - tau.dim())) if tau.dim() else tau


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

    def __init__(self, dim, context_dim, num_heads, mlp_ratio, cond_dim, adaln_lora_dim, order=("self_attn", "cross_attn")):
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
}


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
        B, C, T, H, W = self._check_inputs(x, tau, crossattn_emb, condition_mask)
        dtype = self.t_embedding_norm.weight.dtype
        if padding_mask is None:
            padding_mask = x.new_zeros(B, 1, H, W)
        padding_mask = F.interpolate(padding_mask.to(x.dtype), size=(H, W), mode="nearest")  # (B, 1, H, W)
        x = torch.cat([x, condition_mask.to(x.dtype), padding_mask[:, :, None].expand(B, 1, T, H, W)], dim=1)  # (B, 18, T, H, W)
        x = self.x_embedder(x.to(dtype))  # (B, T', H', W', D)
        _, Tp, Hp, Wp, D = x.shape

        tau = tau.expand(B, T) if tau.dim() == 2 else tau[:, None].expand(B, T)
        tau = tau[:, :: cfg.patch_temporal]  # (B, T'): one time per temporal patch
        s = self.t_embedder[0](tau).to(dtype)  # (B, T', D) raw sinusoid
        adaln_lora = self.t_embedder[1](s)  # (B, T', 3D), shared by all blocks and the final layer
        emb = self.t_embedding_norm(s)  # (B, T', D)

        angles = rope3d_angles(Tp, Hp, Wp, D // cfg.num_heads, (cfg.rope_t_extrapolation_ratio,
                               cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio), x.device)
        rope = (angles.cos()[:, None, :], angles.sin()[:, None, :])  # 2 x (L, 1, hd), computed once per forward
        context = crossattn_emb.to(dtype)

        x = x.reshape(B, Tp, Hp * Wp, D)  # (B, T', S, D): blocks modulate per frame, attend over all tokens
        if stop_after_block == 0:
            return x.view(B, Tp, Hp, Wp, D)
        for i, block in enumerate(self.blocks):
            x = block(x, emb, adaln_lora, context=context, rope=rope)
            if stop_after_block is not None and i + 1 == stop_after_block:
                return x.view(B, Tp, Hp, Wp, D)  # later blocks never run
        out = self.final_layer(x, emb, adaln_lora).view(B, Tp, Hp, Wp, -1)  # (B, T', H', W', p*p*pt*C)
        # unpatchify: the output channel is INNERMOST (p1, p2, r, c), unlike the input packing
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        return rearrange(out, "b t h w (p1 p2 r c) -> b c (t r) (h p1) (w p2)", p1=p, p2=p, r=pt)

    def _check_inputs(self, x, tau, crossattn_emb, condition_mask):
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
        if crossattn_emb.dim() != 3 or crossattn_emb.shape[0] != B or crossattn_emb.shape[2] != cfg.crossattn_emb_channels:
            raise ValueError(f"crossattn_emb must be ({B}, N, {cfg.crossattn_emb_channels}), got {tuple(crossattn_emb.shape)}")
        return B, C, T, H, W


# Video2World conditioning. The first latent frames are given (the observed past); the network sees
# them CLEAN with a tiny time (sigma_conditional = 1e-4) and a condition-mask channel of 1, and its x0
# prediction there is overwritten by the truth. There is no noise augmentation of the context.

SIGMA_CONDITIONAL = 1e-4


def conditional_tau(dtype=torch.float32, device=None):
    """Flow time of the conditioning frames: fp32(1e-4) / (fp32(1e-4) + 1) = 9.999e-5."""
    return sigma_to_tau(torch.tensor(SIGMA_CONDITIONAL, dtype=dtype, device=device))


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
                  hidden_block=None, padding_mask=None):
    """The official Video2World sampler (`Video2WorldPipeline.generate_video`, guidance 0).

    eps: (B, 16, T, H, W) initial noise (draw it with `numpy_randn` to reproduce official outputs).
    Full run (no stop given): 35 RF-AB2 steps, then a final clean x0 pass at sigma_min = 0.002;
    returns the generated latent x0 (B, 16, T, H, W).
    Partial denoising (mimic-video): stop_after_step = k runs k full steps, then one forward at sigma_k
    truncated after `hidden_block` blocks; returns (hidden (B, T, H/2, W/2, D), sigma_k (B,)).
    k = 0 is a single forward at sigma = 80; k = 35 taps the clean pass at sigma = 0.002.
    tau_v instead of k stops at that noise level (see `partial_schedule`).
    """
    partial = stop_after_step is not None or tau_v is not None
    sigmas = partial_schedule(num_steps, stop_after_step, tau_v) if partial else karras_sigmas(num_steps)

    def x_tau_at(x_sigma, i):
        sigma = torch.tensor(float(sigmas[i]), dtype=torch.float32, device=eps.device)  # fp32, as official
        tau = sigma_to_tau(sigma)
        return (1 - tau) * x_sigma, tau  # x_tau = (1 - tau) x_sigma

    def x0_fn(x_sigma, i):
        x_tau, tau = x_tau_at(x_sigma, i)
        return video2world_x0(net, x_tau, tau, gt_latent, cond_frames, crossattn_emb, padding_mask)

    k = len(sigmas) - 1
    x = rf_ab2_sample(x0_fn, eps.float(), sigmas, k)
    if not partial:
        return x0_fn(x, k)  # final clean pass
    x_tau, tau = x_tau_at(x, k)
    net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau, gt_latent, cond_frames)
    hidden = net(net_in, tau_BT, crossattn_emb, condition_mask, padding_mask, stop_after_block=hidden_block)
    sigma_k = torch.full((eps.shape[0],), float(sigmas[k]), dtype=torch.float32, device=eps.device)
    return hidden, sigma_k


def numpy_randn(shape, seed, dtype=torch.float32, device=None):
    """The official noise (`arch_invariant_rand`): numpy RandomState(seed) normals in one batch-major draw."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32)).to(device, dtype)


# ------------------------------------------------------------------------------------------------
# 4. LoRA, written out (no peft dependency) but PEFT-compatible in names and file layout
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


# ------------------------------------------------------------------------------------------------
# 5. Checkpoint loading: official .pt / safetensors / diffusers layout, local or from the Hub
# ------------------------------------------------------------------------------------------------

COSMOS_HUB_REPO = "nvidia/Cosmos-Predict2-2B-Video2World"  # gated: accept the license, then `hf auth login`
COSMOS_DEFAULT_FILE = "model-480p-16fps.pt"  # also model-{480,720}p-{10,16}fps.pt; mimic-video used 480p/10fps

# Entries of official checkpoints that are not parameters: RoPE tables (recomputed), training counters
# (`WeightTrainingStat`) and Transformer Engine metadata. The diffusers converter drops exactly these.
NON_PARAMETER_KEYS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range",
                      "accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration",
                      "accum_train_in_hours", "*._extra_state")

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


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists the missing, unexpected and mis-shaped keys."""


def check_state_dict(expected, sd, what="checkpoint"):
    """Raise CheckpointMismatchError unless sd has exactly the keys and shapes of `expected` (name -> tensor)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        show = lambda xs: "\n    ".join(xs[:20]) + (f"\n    ... and {len(xs) - 20} more" if len(xs) > 20 else "")  # noqa: E731
        parts = [f"{name} ({len(xs)}):\n    {show(xs)}" for name, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)) if xs]
        raise CheckpointMismatchError(f"{what} does not match the model:\n  " + "\n  ".join(parts))


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


def read_state_dict(path):
    """Tensors of a .pt (torch.load, weights_only) or .safetensors file, or of a diffusers transformer folder."""
    path = Path(path)
    if path.is_dir():  # diffusers layout: (transformer/)diffusion_pytorch_model*.safetensors, maybe sharded
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no diffusion_pytorch_model*.safetensors in {folder}")
        sd = {}
        for shard in shards:
            sd.update(read_state_dict(shard))
        return sd
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, expected a flat dict of tensors")
    return sd


def official_keys(sd, prefix="net."):
    """Normalize a checkpoint to our (= official) module names: strip `net.`, drop non-parameters,
    and undo the diffusers renames if the file is in diffusers layout."""
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, pat) for pat in NON_PARAMETER_KEYS)}
    if any(k.startswith(("transformer_blocks.", "patch_embed.", "time_embed.")) for k in sd):
        inverse = {to_diffusers_key(k): k for k in _video_dit_param_names(sd)}
        sd = {inverse.get(k, k): v for k, v in sd.items()}
    return sd


def _video_dit_param_names(sd):
    """Official parameter names of a video DiT with as many blocks as the diffusers file has."""
    n_blocks = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")), default=-1)
    with torch.device("meta"):
        names = VideoDiT(replace(VIDEO_DIT_PRESETS["tiny"], num_blocks=n_blocks)).state_dict().keys()
    return names


def load_state_dict_strict(model, sd, what="checkpoint", assign=False):
    """Check keys and shapes (clear error), then a plain strict load_state_dict."""
    check_state_dict(model.state_dict(), sd, what)
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


def load_official(model_cls, cfg, source, filename=None, revision=None, cache_dir=None, device="cpu", dtype=None):
    """Build model_cls(cfg) on the meta device and assign a checkpoint's tensors strictly (one copy in memory).

    source: a Hub repo id (with filename), a local .pt / .safetensors file, or a folder (filename inside it;
    a diffusers folder when filename is None).
    """
    path = Path(source)
    file = path if (path.is_dir() and filename is None) else resolve_file(source, filename, revision, cache_dir)
    sd = official_keys(read_state_dict(file))
    with torch.device("meta"):
        model = model_cls(cfg)
    load_state_dict_strict(model, sd, f"{model_cls.__name__} checkpoint {file}", assign=True)
    return model.to(device=device, dtype=dtype)


def load_video_dit(source=COSMOS_HUB_REPO, filename=COSMOS_DEFAULT_FILE, config="cosmos-predict2-2b",
                   revision=None, cache_dir=None, device="cpu", dtype=None):
    """Load a Cosmos-Predict2 Video2World DiT, or a fused mimic-video backbone (same layout), strictly."""
    cfg = make_config(VideoDiTConfig, config, VIDEO_DIT_PRESETS)
    return load_official(VideoDiT, cfg, source, filename, revision, cache_dir, device, dtype)


def atomic_write(path, write_fn):
    """Write via write_fn(tmp_path) to a temp file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_video_dit_checkpoint(model, path):
    """Save a video DiT (LoRA fused if wrapped) in the official layout: `net.` keys, .pt or .safetensors."""
    sd = fused_state_dict(model)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, p))
    else:
        atomic_write(path, lambda p: torch.save(sd, p))


# ------------------------------------------------------------------------------------------------
# 6. The action decoder (official `World2ActionDIT`), normalization and action representation
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
    pair_timestep_feature_rank: int = 1024  # rank R of the bilinear (tau_a, tau_v) time embedding; official requires R = D

    @property
    def num_actions(self):
        return self.max_horizon - 1


ACTION_DECODER_PRESETS = {
    "libero": ActionDecoderConfig(),  # w2a_libero: 60-step chunks
    "bridge": ActionDecoderConfig(max_horizon=16),  # w2a_bridge: 15-step chunks
    # the reference fixtures' tiny decoder
    "tiny": ActionDecoderConfig(max_horizon=5, model_channels=64, num_blocks=2, num_heads=2, crossattn_emb_channels=64,
                                adaln_lora_dim=16, pair_timestep_feature_rank=64),
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

    def __init__(self, cfg: ActionDecoderConfig):
        super().__init__()
        if cfg.pair_timestep_feature_rank != cfg.model_channels:
            raise ValueError("pair_timestep_feature_rank must equal model_channels (the official final layer assumes it)")
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
            raise ValueError(f"actions must be ({B}, <= {self.cfg.num_actions}, {self.cfg.out_channels}), got {tuple(x_scaled.shape)}")
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

    def denoise(self, x_tau, tau_a, state, crossattn_emb, context_sigma, obs_dropout=0.0, context_kv=None, generator=None):
        """Velocity of the noisy normalized action chunk (official `World2ActionPipeline.denoise`).

        x_tau: (B, HA, 10); tau_a: (B,) or (B, HA) action time; context_sigma: (B,) or (B, 1).
        returns v_hat (B, HA, 10), an estimate of eps - x0 for the action tokens only.
        """
        B, HA, _ = x_tau.shape
        tau_a = torch.as_tensor(tau_a, dtype=torch.float32, device=x_tau.device).reshape(B, -1).expand(B, HA)
        x_in = x_tau / torch.sqrt((1 - tau_a) ** 2 + tau_a ** 2)[..., None]  # unit variance along the path
        timesteps = torch.cat([torch.full((B, 1), TAU_PROPRIO, device=x_tau.device), tau_a], dim=1)  # (B, 1 + HA)
        out = self(state, x_in, timesteps, context_sigma.reshape(B, 1), crossattn_emb, obs_dropout, context_kv, generator)
        return out[:, 1:]

    @torch.no_grad()
    def sample(self, state, crossattn_emb, context_sigma, noise, num_steps=10):
        """Normalized action chunk by Euler from tau_a = 1 (noise (B, HA, 10)) to 0; the video context's keys
        and values are computed once, not once per step."""
        kv = self.context_kv(crossattn_emb)
        return euler_integrate(lambda x, tau: self.denoise(x, tau, state, None, context_sigma, context_kv=kv),
                               noise, num_steps=num_steps)


# Normalization (official `StaticBatchNormalizer`). The stats are PER CHUNK TIMESTEP, shape (H, d), not per
# dimension: action k of a chunk has its own mean and std. Positions and grippers are standardized with
# clamped stats and clipped to an outlier range; 6-D rotations pass through unchanged.

NORMALIZATION_KEYS = {  # concat order: position (3), 6-D rotation (6), gripper (1)
    "libero": {"action": ("action/eef_pos_ref_delta_lowdim", "action/eef_rot_ref_delta_lowdim", "action/gripper_action_lowdim"),
               "obs": ("obs/eef_pos_lowdim", "obs/eef_rot_lowdim", "obs/gripper_lowdim")},
    "bridge": {"action": ("action/eef_pos_lowdim", "action/eef_rot_lowdim", "action/gripper_action_lowdim"),
               "obs": ("obs/eef_pos_lowdim", "obs/eef_rot_lowdim", "obs/gripper_state_lowdim")},
}


class Normalizer:
    """normalize(x) = clamp((x - shift) * scale, lo, hi); unnormalize(y) = y / scale + shift (no clamp)."""

    def __init__(self, shift, scale, clamp_min, clamp_max):
        self.shift, self.scale, self.clamp_min, self.clamp_max = shift, scale, clamp_min, clamp_max  # each (H, d)

    @classmethod
    def from_stats(cls, stats, keys, dtype=torch.float32):
        """Build from a released dataset_statistics JSON (dict of key -> field -> nested lists).

        VARIANCE (positions, grippers): shift = mean_clamped, scale = 1 / std_clamped (1 where std < 1e-5),
        bounds = (mean + 1.5 (p2 - mean) - shift) * scale and likewise with p98. IDENTITY (keys with "rot").
        The official eval runs this in bf16 (pass dtype=torch.bfloat16 to match it bit for bit).
        """
        parts = []
        for key in keys:
            if key not in stats:
                raise KeyError(f"statistics have no entry {key!r}; found {sorted(stats)}")
            s = {k: torch.tensor(v, dtype=torch.float64) for k, v in stats[key].items()
                 if k in ("mean", "mean_clamped", "std_clamped", "percentiles")}
            if "_rot" in key:
                z = torch.zeros_like(s["mean"])
                parts.append((z, z + 1, z - math.inf, z + math.inf))
                continue
            shift = s["mean_clamped"]
            scale = torch.where(s["std_clamped"] < 1e-5, torch.ones_like(shift), 1 / s["std_clamped"])
            p2, p98 = s["percentiles"][20], s["percentiles"][980]  # grid 0.0..100.0 in steps of 0.1
            mean = s["mean"]
            parts.append((shift, scale, (mean + 1.5 * (p2 - mean) - shift) * scale, (mean + 1.5 * (p98 - mean) - shift) * scale))
        return cls(*(torch.cat([p[i] for p in parts], dim=-1).to(dtype) for i in range(4)))  # 4 x (H, 10)

    def normalize(self, x):
        y = (x - self.shift.to(x)) * self.scale.to(x)
        if torch.isinf(self.clamp_min).all() and torch.isinf(self.clamp_max).all():
            return y
        return torch.maximum(torch.minimum(y, self.clamp_max.to(x)), self.clamp_min.to(x))

    def unnormalize(self, y):
        return y / self.scale.to(y) + self.shift.to(y)


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


def load_action_decoder(source, filename=None, config="libero", revision=None, cache_dir=None, device="cpu", dtype=None):
    """Load a released mimic-video action decoder (`net.` keys, .pt) strictly."""
    cfg = make_config(ActionDecoderConfig, config, ACTION_DECODER_PRESETS)
    return load_official(ActionDecoder, cfg, source, filename, revision, cache_dir, device, dtype)


# ------------------------------------------------------------------------------------------------
# 7. The video-action model: partial denoising -> middle-block features -> action decoder
# ------------------------------------------------------------------------------------------------


@dataclass
class VideoActionConfig:
    """How the frozen video model and the decoder are coupled, trained and sampled (official stage 2)."""

    tap_block: int = 20  # the decoder reads the output of this video block (official xattn_layer_idx; 20 of 28)
    latent_frames: int = 16  # context + future latent frames in the window (61 pixel frames -> 2 + 14 latents)
    num_video_steps: int = 35  # the Cosmos schedule that stop_after_step indexes
    num_action_steps: int = 10  # Euler steps of the decoder from tau_a = 1 to 0
    loss_scale: float = 10.0  # stage-2 loss = loss_scale * velocity MSE
    obs_dropout: float = 0.2  # stage-2 probability of masking the proprio token
    video_time: str = "official"  # "official": sigma = 4 exp(N(0,1)) + 5% tail; "paper": logit-normal tau_v
    video_sigma_multiplier: float = 4.0  # official: sqrt(latent frames)
    action_time: str = "official"  # "official": uniform on [0.001, 1]; "paper": Beta(1.5, 1)


VIDEO_ACTION_PRESETS = {
    "mimic-video": VideoActionConfig(),
    "tiny": VideoActionConfig(tap_block=2, latent_frames=4),
}


class VideoActionModel(nn.Module):
    """The video DiT (frozen in stage 2) and the action decoder, with the optional normalizers of a policy.

    Latents are (B, 16, T, H, W) with the first Tc frames the observed context; the text is (B, N, 1024).
    Proprio (B, 1, 10) and actions (B, HA, 10) are normalized unless a method says otherwise.
    """

    def __init__(self, video: VideoDiT, decoder: ActionDecoder, cfg: VideoActionConfig = VideoActionConfig(),
                 obs_normalizer: Normalizer | None = None, action_normalizer: Normalizer | None = None):
        super().__init__()
        if decoder.cfg.crossattn_emb_channels != video.cfg.model_channels:
            raise ValueError(f"decoder reads {decoder.cfg.crossattn_emb_channels}-d context, video width is {video.cfg.model_channels}")
        if not 0 <= cfg.tap_block <= video.cfg.num_blocks:
            raise ValueError(f"tap_block must be in [0, {video.cfg.num_blocks}], got {cfg.tap_block}")
        self.video, self.decoder, self.cfg = video, decoder, cfg
        self.obs_normalizer, self.action_normalizer = obs_normalizer, action_normalizer

    def window(self, context, future):
        """(context, future) -> latents (B, C, T, H, W) and the conditioning-frame mask (B, T)."""
        if future is None:  # inference: the future is what the video model imagines; official zero-pads
            B, C, Tc, H, W = context.shape
            future = context.new_zeros(B, C, self.cfg.latent_frames - Tc, H, W)
        latents = torch.cat([context, future], dim=2)  # (B, C, Tc + Tf, H, W)
        return latents, first_frames_mask(latents.shape[0], latents.shape[2], context.shape[2], latents.device)

    def video_features(self, context, future, text, sigma, eps=None, generator=None):
        """Decoder context from ground-truth future latents noised to sigma (training; the paper's oracle).

        One video forward truncated after `tap_block`, no gradient to the backbone. Returns (B, T'H'W', D)
        in (t, h, w) order; the clean context frames are among the tokens.
        """
        latents, cond = self.window(context, future)
        if eps is None:
            eps = torch.randn(latents.shape, generator=generator, device=latents.device)
        tau_v = sigma_to_tau(sigma.float())
        x_tau = interpolate(latents.float(), eps, tau_v)  # = (1 - tau_v) x_sigma
        net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau_v, latents, cond)
        with torch.no_grad():
            hidden = self.video(net_in, tau_BT, text, condition_mask, stop_after_block=self.cfg.tap_block)
        return hidden.flatten(1, 3)  # (B, T, H', W', D) -> (B, L, D)

    def forward(self, stage, *args, **kwargs):
        """The training loss of a stage (1: video LoRA, 2: decoder), so DistributedDataParallel can wrap the model."""
        return self.stage1_loss(*args, **kwargs) if stage == 1 else self.stage2_loss(*args, **kwargs)

    def draw_noise(self, stage, batch, latent_shape, action_shape=None, generator=None, device=None):
        """Every random draw of one training step, for `batch` samples: sigma (and tau_a, the proprio mask),
        eps for the video and the actions. Draw it for the global batch and slice it per rank, and the loss
        does not depend on how the batch is sharded (DDP equals one process; resume is exact)."""
        cfg = self.cfg
        if stage == 1 or cfg.video_time == "official":
            sigma = sample_video_sigma(batch, generator, device, multiplier=cfg.video_sigma_multiplier)
        elif cfg.video_time == "paper":
            sigma = tau_to_sigma(sample_tau_logit_normal(batch, generator, device))
        else:
            raise ValueError(f"video_time must be 'official' or 'paper', got {cfg.video_time!r}")
        noise = {"sigma": sigma, "eps_video": torch.randn((batch,) + tuple(latent_shape), generator=generator, device=device)}
        if stage == 1:
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

    def stage2_loss(self, context, future, text, proprio, actions, noise=None, generator=None):
        """Decoder loss on the frozen backbone: tau_v and tau_a drawn independently per sample.

        Returns {"loss": scalar, "per_sample": (B,), "tau_a": (B,), "tau_v": (B,)} (per-sample values for
        logging the loss binned by time).
        """
        B = actions.shape[0]
        latent_shape = (context.shape[1], context.shape[2] + future.shape[2]) + tuple(context.shape[3:])
        if noise is None:
            noise = self.draw_noise(2, B, latent_shape, actions.shape[1:], generator, actions.device)
        sigma, tau_a = noise["sigma"], noise["tau_a"]
        ctx = self.video_features(context, future, text, sigma, eps=noise["eps_video"])
        x0, eps = actions.float(), noise["eps_action"]
        x_tau = interpolate(x0, eps, tau_a)
        u = velocity_target(x0, eps)
        v_hat = self.decoder.denoise(x_tau, tau_a, proprio, ctx, sigma, obs_dropout=noise["obs_mask"])
        per_sample = self.cfg.loss_scale * ((v_hat.float() - u) ** 2).mean(dim=(1, 2))
        return {"loss": per_sample.mean(), "per_sample": per_sample.detach(), "tau_a": tau_a, "tau_v": sigma_to_tau(sigma)}

    def stage1_loss(self, context, future, text, noise=None, generator=None):
        """Video flow loss (LoRA stage): future frames noised, context frames clean and excluded from the loss.

        Cosmos trains with the x0 loss weighted by (1 + sigma)^2 / sigma^2, which is exactly this velocity MSE.
        Returns {"loss", "per_sample", "tau_v"}.
        """
        latents, cond = self.window(context, future)
        if noise is None:
            noise = self.draw_noise(1, latents.shape[0], latents.shape[1:], generator=generator, device=latents.device)
        tau = sigma_to_tau(noise["sigma"])
        x0, eps = latents.float(), noise["eps_video"]
        x_tau = interpolate(x0, eps, tau)
        net_in, tau_BT, condition_mask = video2world_inputs(x_tau, tau, latents, cond)
        v_hat = self.video(net_in, tau_BT, text, condition_mask).float()
        mask = (~cond)[:, None, :, None, None].float()  # (B, 1, T, 1, 1): future frames only
        err = ((v_hat - velocity_target(x0, eps)) ** 2 * mask).sum(dim=(1, 2, 3, 4))
        per_sample = err / (mask.sum(dim=(1, 2, 3, 4)) * x0.shape[1] * x0.shape[3] * x0.shape[4])
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
        if raw and self.obs_normalizer is not None:
            proprio = self.obs_normalizer.normalize(proprio)
        latents, cond = self.window(context, oracle_future)
        B, HA = latents.shape[0], self.decoder.cfg.num_actions
        noise = self._noise(((B,) + tuple(latents.shape[1:]), (B, HA, self.decoder.cfg.out_channels)), seed, numpy_noise, latents.device)
        if oracle_future is not None:
            sigma_v = float(partial_schedule(self.cfg.num_video_steps, stop_after_step, tau_v)[-1])
            sigma = torch.full((B,), sigma_v, dtype=torch.float32, device=latents.device)
            ctx = self.video_features(context, oracle_future, text, sigma, eps=noise[0])
        else:
            hidden, sigma = cosmos_sample(self.video, noise[0], latents, cond, text, self.cfg.num_video_steps,
                                          stop_after_step, tau_v, hidden_block=self.cfg.tap_block)
            ctx = hidden.flatten(1, 3)  # (B, L, D) in (t, h, w) order
        actions = self.decoder.sample(proprio, ctx, sigma, noise[1], self.cfg.num_action_steps)
        if raw and self.action_normalizer is not None:
            actions = self.action_normalizer.unnormalize(actions)
        return actions

    @staticmethod
    def _noise(shapes, seed, numpy_noise, device):
        if numpy_noise:  # official: the same seed for the video and the action noise
            return [numpy_randn(shape, seed, device=device) for shape in shapes]
        g = torch.Generator(device=device).manual_seed(seed)
        return [torch.randn(shape, generator=g, device=device) for shape in shapes]


# Released checkpoints: jonpai/mimic-video on the Hub (`model/scripts/download_checkpoints.py`, eval scripts).

MIMIC_VIDEO_HUB_REPO = "jonpai/mimic-video"
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
    "libero_spatial_full": ("libero", "spatial", "000051212"), "libero_spatial_tenth": ("libero", "spatial", "000030012"),
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


def load_policy(task, source=MIMIC_VIDEO_HUB_REPO, revision=None, cache_dir=None, device="cpu", dtype=None,
                video_config="cosmos-predict2-2b", decoder_config=None, config="mimic-video"):
    """A released mimic-video policy (backbone, decoder, normalizers) from the Hub repo or a local copy of it.

    The official eval runs in bf16 (dtype=torch.bfloat16) on a GPU: 2B + 0.5B parameters.
    """
    files = released_files(task)
    preset = RELEASED_POLICIES[task][0]
    video = load_video_dit(source, files["video"], video_config, revision, cache_dir, device, dtype)
    decoder = load_action_decoder(source, files["decoder"], decoder_config or preset, revision, cache_dir, device, dtype)
    stats = json.loads(resolve_file(source, files["statistics"], revision, cache_dir).read_text())
    keys = NORMALIZATION_KEYS[preset]
    model = VideoActionModel(video.requires_grad_(False), decoder.requires_grad_(False),
                             make_config(VideoActionConfig, config, VIDEO_ACTION_PRESETS),
                             Normalizer.from_stats(stats, keys["obs"]), Normalizer.from_stats(stats, keys["action"]))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# 8. A toy world: language-conditioned reaching, small enough to run the whole recipe on a CPU
# ------------------------------------------------------------------------------------------------
# Three coloured squares and a white agent in the unit square, rendered to 8 x 8 RGB frames with numpy.
# The instruction ("go to the red one") names the goal; the decoder never sees it, so the video model
# must carry the intent. Frames serve directly as latents (no VAE, no temporal compression) and words
# get a fixed random embedding (no T5). Proprio is the agent's position; actions are relative motions.

@dataclass
class ToyWorldConfig:
    """The toy world and how its episodes become (context, future, text, proprio, action chunk) samples."""

    image_size: int = 8  # frames are (5, S, S): 2 x 2 tokens of 4 x 4 pixels a frame
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


def toy_vocab():
    words = sorted({w for t in TOY_TEMPLATES for w in t.format("").split()} | set(TOY_COLOURS))
    return {w: i for i, w in enumerate(words)}


def toy_text_embedding(goal_colour, template, cfg: ToyWorldConfig):
    """(N,) colour and template indices -> (N, text_tokens, text_dim) fixed word embeddings, zero padded."""
    vocab, colours = toy_vocab(), list(TOY_COLOURS)
    table = np.random.RandomState(1234).standard_normal((len(vocab), cfg.text_dim)).astype(np.float32)
    out = np.zeros((len(goal_colour), cfg.text_tokens, cfg.text_dim), np.float32)
    for n, (c, t) in enumerate(zip(goal_colour, template)):
        words = TOY_TEMPLATES[t].format(colours[c]).split()
        out[n, : len(words)] = table[[vocab[w] for w in words]]
    return torch.from_numpy(out)


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


def toy_render(agent, targets, colours, cfg: ToyWorldConfig):
    """(N, 2) agent, (N, 3, 2) squares, (N, 3) colour ids -> (N, 5, S, S) float32 frames: RGB in [-1, 3]
    (-1 is empty floor; above 1 where the agent covers a square) and (x, y) in [-1, 1]."""
    S = cfg.image_size
    grid = (np.arange(S, dtype=np.float32) + 0.5) / S
    palette = np.array(list(TOY_COLOURS.values()), np.float32)  # (3 colours, RGB)

    def blob(p, size):  # (N, 2) -> (N, S, S) soft blobs: sub-pixel positions stay visible; rows y, columns x
        d2 = (grid[None, :, None] - p[:, 1, None, None]) ** 2 + (grid[None, None, :] - p[:, 0, None, None]) ** 2
        return np.exp(-d2 / (2 * (size / S) ** 2))

    squares = np.zeros((len(agent), 3, S, S), np.float32)
    for k in range(targets.shape[1]):
        squares += palette[colours[:, k]][:, :, None, None] * blob(targets[:, k], cfg.target_size)[:, None]
    # added, not clipped: where the (white) agent covers a square, the square stays visible
    img = squares + blob(agent, cfg.agent_size)[:, None]
    # two coordinate channels (x, y): the video model's hidden states carry no absolute position (RoPE acts
    # inside attention only) and the decoder attends to them as an unordered set, so location must be part
    # of the content, as it is in a real VAE latent of a real scene
    coords = np.stack([grid[None, :].repeat(S, 0), grid[:, None].repeat(S, 1)])  # (2, S, S)
    coords = np.broadcast_to(coords, (len(agent), 2, S, S))
    return np.concatenate([img, coords], axis=1) * 2 - 1  # (N, 5, S, S)


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


def toy_rollout(policy, seeds, cfg: ToyWorldConfig, record=False):
    """Closed loop: every `execute` steps, policy(obs) -> (N, chunk, 2) actions. Returns success (N,) bool
    (and the frames (N, steps + 1, 3, S, S) if record). obs: frame, text, proprio and the raw state."""
    state = toy_reset(seeds, cfg)
    text = toy_text_embedding(state["colours"][np.arange(len(seeds)), state["goal"]], state["template"], cfg)
    frames = [toy_render(state["agent"], state["targets"], state["colours"], cfg)]
    for _ in range(0, cfg.episode_steps, cfg.execute):
        obs = {"frame": torch.from_numpy(frames[-1]), "text": text, "proprio": torch.from_numpy(state["agent"])[:, None], "state": state}
        chunk = np.asarray(policy(obs), np.float32)
        for j in range(cfg.execute):
            state = dict(state, agent=toy_step(state["agent"], chunk[:, j], cfg))
            frames.append(toy_render(state["agent"], state["targets"], state["colours"], cfg))
    success = np.linalg.norm(state["agent"] - toy_goal_position(state), axis=-1) < cfg.success_radius
    return (success, np.stack(frames, axis=1)) if record else success


def make_toy_demos(num_episodes, seed, cfg: ToyWorldConfig, speed_range=None):
    """Expert demonstrations (speed_range=None: the expert's speed) or a varied-speed 'play' corpus.

    Stored as trajectories, not pixels: frames are re-rendered per batch (cheap at 8 x 8).
    """
    seeds = [seed * 1_000_003 + i for i in range(num_episodes)]
    state = toy_reset(seeds, cfg)
    rng = np.random.RandomState(seed)
    speed = np.full(num_episodes, cfg.max_speed, np.float32) if speed_range is None else rng.uniform(*speed_range, num_episodes).astype(np.float32)
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
    """The data seam: (episode, t) pairs -> context (B, 5, 1, S, S), future (B, 5, F, S, S),
    text (B, N, C), proprio (B, 1, 2), actions (B, chunk, 2). Past the end the agent stands still."""
    L = cfg.episode_steps
    agent, targets, colours = demos["agent"][episodes], demos["targets"][episodes], demos["colours"][episodes]
    B = len(episodes)

    def frames_at(ts):  # (B, k) env steps -> (B, 3, k, S, S)
        ts = np.minimum(ts, L)
        pos = agent[np.arange(B)[:, None], ts]  # (B, k, 2)
        k = ts.shape[1]
        img = toy_render(pos.reshape(B * k, 2), np.repeat(targets, k, 0), np.repeat(colours, k, 0), cfg)
        return torch.from_numpy(img.reshape(B, k, img.shape[1], cfg.image_size, cfg.image_size)).transpose(1, 2)

    context = frames_at(steps[:, None])
    future = frames_at(steps[:, None] + cfg.future_stride * np.arange(1, cfg.future_frames + 1)[None])
    t_act = steps[:, None] + np.arange(cfg.chunk)[None]  # (B, chunk)
    padded = np.concatenate([demos["actions"][episodes], np.zeros((B, cfg.chunk, 2), np.float32)], axis=1)
    actions = torch.from_numpy(padded[np.arange(B)[:, None], t_act])
    proprio = torch.from_numpy(agent[np.arange(B), steps])[:, None]
    text = toy_text_embedding(demos["goal_colour"][episodes], demos["template"][episodes], cfg)
    return {"context": context, "future": future, "text": text, "proprio": proprio, "actions": actions}


def array_to_stats(x):
    """Statistics of (N, H, d) chunks in the released JSON layout (official `array_to_stats`), per chunk step."""
    x = np.asarray(x, np.float64)
    pct = np.percentile(x, np.linspace(0, 100, 1001), axis=0)  # (1001, H, d)
    mean = x.mean(0)
    lo, hi = mean + 1.5 * (pct[20] - mean), mean + 1.5 * (pct[980] - mean)
    clamped = np.clip(x, lo, hi)
    return {k: v.tolist() for k, v in dict(min=x.min(0), max=x.max(0), mean=mean, std=x.std(0), percentiles=pct,
                                            clamp_min=lo, clamp_max=hi, mean_clamped=clamped.mean(0),
                                            std_clamped=clamped.std(0)).items()}


TOY_VIDEO_PRESET = VideoDiTConfig(in_channels=5, out_channels=5, patch_spatial=4, model_channels=64, num_blocks=4,
                                  num_heads=2, crossattn_emb_channels=32, adaln_lora_dim=16, max_img_h=8, max_img_w=8)
TOY_DECODER_PRESET = ActionDecoderConfig(max_horizon=9, in_channels=2, out_channels=2, model_channels=64, num_blocks=2,
                                         num_heads=2, crossattn_emb_channels=64, adaln_lora_dim=16, pair_timestep_feature_rank=64)
VIDEO_DIT_PRESETS["toy"] = TOY_VIDEO_PRESET
ACTION_DECODER_PRESETS["toy"] = TOY_DECODER_PRESET
VIDEO_ACTION_PRESETS["toy"] = VideoActionConfig(tap_block=2, latent_frames=5, video_sigma_multiplier=math.sqrt(5))


def toy_expert_future(state, cfg: ToyWorldConfig):
    """The frames the expert would produce from here: the ground-truth future of the oracle case study."""
    agent, frames = state["agent"], []
    chunk = toy_expert_chunk(state, cfg)
    for j in range(cfg.future_frames * cfg.future_stride):
        agent = toy_step(agent, chunk[:, j] if j < cfg.chunk else np.zeros_like(agent), cfg)
        if (j + 1) % cfg.future_stride == 0:
            frames.append(toy_render(agent, state["targets"], state["colours"], cfg))
    return torch.from_numpy(np.stack(frames, axis=2))  # (N, 5, F, S, S)


def toy_policy(model: VideoActionModel, cfg: ToyWorldConfig, stop_after_step=None, tau_v=None, oracle=False, seed=0):
    """A VideoActionModel as a toy-world policy: obs -> raw action chunk (N, chunk, 2), one query per call."""
    device = next(model.parameters()).device

    def policy(obs):
        context = obs["frame"][:, :, None].to(device)  # (N, 5, 1, S, S): the current frame is the context
        future = toy_expert_future(obs["state"], cfg).to(device) if oracle else None
        actions = model.sample_actions(context, obs["text"].to(device), obs["proprio"].to(device), stop_after_step,
                                       tau_v, seed=seed, oracle_future=future, raw=True)
        return actions.float().cpu().numpy()

    return policy

"""
Partial-denoising inference: run the Cosmos sampler for k of its 35 steps and tap a middle block.

Status: the action decoder lands next. For now this demonstrates the video half on the tiny preset
with random weights: the official schedule, and where each `stop_after_step` leaves tau_v.
"""

import torch

import mimic_video as mv

if __name__ == "__main__":
    torch.manual_seed(0)
    net = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["tiny"]).eval()
    B, T, H, W = 1, 4, 8, 8
    eps = mv.numpy_randn((B, 16, T, H, W), seed=0)
    gt = torch.randn(B, 16, T, H, W)
    cond = mv.first_frames_mask(B, T, 2)
    text = torch.zeros(B, 8, net.cfg.crossattn_emb_channels)
    print(f"{'k':>3} {'sigma_k':>9} {'tau_v':>8}  hidden state (tiny model, random weights)")
    with torch.no_grad():
        for k in (0, 5, 10, 15, 20, 25, 35):
            hidden, sigma = mv.cosmos_sample(net, eps, gt, cond, text, stop_after_step=k, hidden_block=2)
            print(f"{k:>3} {sigma[0].item():>9.4f} {mv.sigma_to_tau(sigma[0]).item():>8.5f}  {tuple(hidden.shape)}")

"""
Partial-denoising inference: run the Cosmos sampler for k of its 35 steps, tap a middle block, decode actions.

Status: the toy world and trained checkpoints come next. For now this runs the whole policy query on the
tiny presets with random weights and prints, for each `stop_after_step`, the noise level the video plan
stops at and the time per query.
"""

import time

import torch

import mimic_video as mv

if __name__ == "__main__":
    torch.manual_seed(0)
    video = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["tiny"]).eval()
    decoder = mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["tiny"]).eval()
    model = mv.VideoActionModel(video, decoder, mv.VIDEO_ACTION_PRESETS["tiny"])
    context = torch.randn(1, 16, 2, 8, 8)  # 2 observed latent frames
    text = torch.zeros(1, 8, 24)
    proprio = torch.zeros(1, 1, 10)
    print(f"{'k':>3} {'sigma_k':>9} {'tau_v':>8} {'ms/query':>9}  first action (tiny model, random weights)")
    for k in (0, 5, 10, 15, 20, 25, 35):
        t0 = time.perf_counter()
        actions = model.sample_actions(context, text, proprio, stop_after_step=k, seed=0)
        ms = 1000 * (time.perf_counter() - t0)
        sigma = float(mv.karras_sigmas(35)[k])
        print(f"{k:>3} {sigma:>9.4f} {sigma / (1 + sigma):>8.5f} {ms:>9.1f}  {actions[0, 0, :3].tolist()}")

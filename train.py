"""
Train mimic-video: stage 1 (LoRA on the video DiT) and stage 2 (action decoder on the frozen backbone).

Status: the model file (mimic_video.py) has the video side; the action decoder, the toy world and the
training loops land next. Until then this script prints the recipe it will run, so the README's
command works from day one.
"""

import sys

import mimic_video as mv

RECIPE = f"""mimic-video training recipe (not yet runnable: the action decoder and the toy world come next)

stage 1  LoRA on the Cosmos-Predict2 video DiT ({len(mv.VIDEO_DIT_PRESETS)} presets: {', '.join(mv.VIDEO_DIT_PRESETS)})
         adapters {mv.LORA_PRESETS['mimic-video-stage1'].target_modules}
         rank {mv.LORA_PRESETS['mimic-video-stage1'].r}, alpha {mv.LORA_PRESETS['mimic-video-stage1'].lora_alpha}, adaLN trained fully
         video flow loss on future latents, context frames clean (Video2World frame replacement)
stage 2  action decoder on the frozen backbone, conditioned on block-20 hidden states at tau_v
         tau_v ~ official sigma sampler (sigma = 4 exp(N(0,1)), 5% log-uniform [200, 1e5])
         tau_a ~ uniform [0.001, 1] (released configs; the paper states Beta(1.5, 1))
"""

if __name__ == "__main__":
    print(RECIPE)
    sys.exit(0)

"""A second world for the dataset path, made unlike the toy one: a white disk pushes one of two blocks onto a mark.

The toy world's agent reaches a target; here the agent must go around a block, get behind it and push it, and the
camera sees objects move that the agent does not carry. 64 x 64 frames (the dataset path resizes them), 15 fps,
state = the pusher's position, action = its motion, one instruction naming the block ("push the red block onto the
mark"). A scripted expert on the true state makes the demonstrations and the unlabeled videos (other seeds).

    python tests/push_world.py export OUT [--demos=30] [--videos=300]   # OUT/demos, OUT/videos (LeRobot v3.0)
    python tests/push_world.py eval POLICY_FOLDER [--episodes=200]      # closed-loop success on held-out seeds

tests/test_datasets.py checks the expert and the export; the README reports mimic-video, vla and scratch here.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mimic_video as mv  # noqa: E402

SIZE, FPS, STEPS = 64, 15, 80  # camera pixels, control rate, steps an episode may take
R_PUSHER, R_BLOCK, SPEED = 0.08, 0.12, 0.06  # radii and the pusher's top speed per step, arena [-1, 1]^2
SUCCESS = 0.12  # the named block's centre within this of the mark's
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 230)}
TEMPLATES = ("push the {} block onto the mark", "move the {} one to the yellow mark")
TEST_SEEDS = 10**8  # evaluation seeds start here; demonstrations and videos use others


def reset(seeds):
    """One episode a seed: pusher, two blocks (0 red, 1 blue), the mark, which block to push, the template."""
    N = len(seeds)
    s = {k: np.zeros(shape, np.float32) for k, shape in (("pusher", (N, 2)), ("blocks", (N, 2, 2)), ("mark", (N, 2)))}
    s["target"], s["template"] = np.zeros(N, np.int64), np.zeros(N, np.int64)
    for n, seed in enumerate(seeds):
        rng = np.random.RandomState(seed % 2**32)
        while True:  # blocks apart, off the mark and away from the pusher, all well inside the arena
            blocks, mark = rng.uniform(-0.55, 0.55, (2, 2)), rng.uniform(-0.6, 0.6, 2)
            pusher = rng.uniform(-0.85, 0.85, 2)
            gaps = [np.linalg.norm(blocks[0] - blocks[1]), *np.linalg.norm(blocks - mark, axis=1),
                    *np.linalg.norm(blocks - pusher, axis=1)]
            if min(gaps) > 0.4:
                break
        s["pusher"][n], s["blocks"][n], s["mark"][n] = pusher, blocks, mark
        s["target"][n], s["template"][n] = rng.randint(2), rng.randint(len(TEMPLATES))
    return s


def instructions(s):
    names = list(COLOURS)
    return [TEMPLATES[t].format(names[k]) for k, t in zip(s["target"], s["template"])]


def step(s, action):
    """The pusher moves (at most SPEED), then each block it overlaps is pushed out along the line of centres."""
    a = np.asarray(action, np.float32)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    a = a * np.minimum(1, SPEED / np.maximum(norm, 1e-9))
    pusher = np.clip(s["pusher"] + a, -1 + R_PUSHER, 1 - R_PUSHER)
    d = s["blocks"] - pusher[:, None]  # (N, 2 blocks, 2)
    dist = np.linalg.norm(d, axis=-1, keepdims=True)
    touch = dist < R_PUSHER + R_BLOCK
    out = pusher[:, None] + d / np.maximum(dist, 1e-9) * (R_PUSHER + R_BLOCK)
    blocks = np.clip(np.where(touch, out, s["blocks"]), -1 + R_BLOCK, 1 - R_BLOCK).astype(np.float32)
    return dict(s, pusher=pusher.astype(np.float32), blocks=blocks)


def block_to_mark(s):
    return np.linalg.norm(s["blocks"][np.arange(len(s["target"])), s["target"]] - s["mark"], axis=-1)


def expert(s):
    """Get behind the named block (around it if it is in the way), then push it towards the mark; stop there."""
    b = s["blocks"][np.arange(len(s["target"])), s["target"]]
    u = s["mark"] - b
    u /= np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-9)
    contact = R_PUSHER + R_BLOCK
    behind = b - u * (contact + 0.03)
    rel = s["pusher"] - b
    along, across = (rel * u).sum(-1), rel[:, 0] * u[:, 1] - rel[:, 1] * u[:, 0]
    pushing = (along < 0) & (np.abs(across) < 0.05)
    # going around: a point beside the block, on the pusher's side, when the block lies between pusher and behind
    side = np.where(across >= 0, 1.0, -1.0)[:, None] * np.stack([u[:, 1], -u[:, 0]], -1)
    blocked = along > -0.9 * contact  # not behind yet: first beside it, level with the push position
    goal = np.where(blocked[:, None], b + side * (contact + 0.06) - u * contact, behind)
    goal = np.where(pushing[:, None], b + u * 0.3 * contact, goal)  # aim through the block's centre
    a = goal - s["pusher"]
    a *= np.minimum(1, SPEED / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-9))
    return np.where((block_to_mark(s) < SUCCESS / 2)[:, None], 0, a).astype(np.float32)


def render(s):
    """(N, 64, 64, 3) uint8: grey floor, the yellow mark (a ring), the blocks (squares), the pusher (a white disk);
    2 x 2 supersampled."""
    S = 2 * SIZE
    c = (np.arange(S) + 0.5) / S * 2 - 1
    X, Y = np.meshgrid(c, c)  # (S, S): x to the right, y down
    N = len(s["pusher"])
    img = np.full((N, S, S, 3), 70.0)
    d = np.hypot(X - s["mark"][:, 0, None, None], Y - s["mark"][:, 1, None, None])
    img[(d > SUCCESS * 0.6) & (d < SUCCESS * 1.1)] = (230, 210, 40)
    for k, colour in enumerate(COLOURS.values()):
        bx, by = s["blocks"][:, k, 0, None, None], s["blocks"][:, k, 1, None, None]
        img[(np.abs(X - bx) < R_BLOCK * 0.85) & (np.abs(Y - by) < R_BLOCK * 0.85)] = colour
    d = np.hypot(X - s["pusher"][:, 0, None, None], Y - s["pusher"][:, 1, None, None])
    img[d < R_PUSHER] = (245, 245, 245)
    return img.reshape(N, SIZE, 2, SIZE, 2, 3).mean((2, 4)).round().astype(np.uint8)


def observation(s, tasks):
    return {"observation.images.front": torch.from_numpy(render(s)), "observation.state": torch.from_numpy(s["pusher"]),
            "task": tasks, "push.state": s}


class Expert(mv.ChunkedPolicy):
    """The scripted expert as a policy (one action a query), on the true state."""

    n_action_steps = 1

    def query(self, obs):
        return torch.from_numpy(expert(obs["push.state"]))[:, None]


def rollout(policy, seeds, tasks=None):
    """Closed loop from reset, STEPS steps. Returns (success: the named block ends on the mark, (N,) bool; progress:
    the share of its starting distance to the mark it was pushed, (N,), 0 if it never moved, negative if away)."""
    s = reset(seeds)
    start = block_to_mark(s)
    tasks = instructions(s) if tasks is None else tasks
    policy.reset()
    for _ in range(STEPS):
        s = step(s, policy.select_action(observation(s, tasks)).cpu().numpy())
    return block_to_mark(s) < SUCCESS, 1 - block_to_mark(s) / start


def episodes(seeds):
    """Expert episodes in write_lerobot_dataset's form, each up to the step after the block reaches the mark."""
    s, frames, states, actions = reset(seeds), [], [], []
    tasks = instructions(s)
    for _ in range(STEPS):
        a = expert(s)
        frames.append(render(s)), states.append(s["pusher"]), actions.append(a)
        s = step(s, a)
    out = []
    arrived = np.stack([np.all(a == 0, axis=-1) for a in actions], 1)  # (N, STEPS): the expert has stopped
    for n in range(len(seeds)):
        L = int(np.argmax(arrived[n]) + 1) if arrived[n].any() else STEPS
        out.append({"frames": np.stack([f[n] for f in frames[:L]]), "state": np.stack([x[n] for x in states[:L]]),
                    "action": np.stack([x[n] for x in actions[:L]]), "task": tasks[n]})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("export", "eval"))
    p.add_argument("path")
    p.add_argument("--demos", type=int, default=30)
    p.add_argument("--videos", type=int, default=300)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "export":
        import train  # the LeRobot writer
        for name, n, seed in (("demos", args.demos, args.seed), ("videos", args.videos, args.seed + 1)):
            eps = episodes([seed * 1_000_003 + i for i in range(n)])
            train.write_lerobot_dataset(Path(args.path) / name, eps, fps=FPS, camera="observation.images.front",
                                        robot_type="push")
            print(f"wrote {n} episodes ({sum(len(e['frames']) for e in eps)} frames) to {Path(args.path) / name}")
    else:
        policy = mv.load_policy(args.path)
        success, progress = rollout(policy, [TEST_SEEDS + i for i in range(args.episodes)])
        print(f"success {100 * success.mean():.1f}%, progress {100 * progress.mean():.1f}% (of the named block's way "
              f"to the mark) on {args.episodes} held-out episodes")


if __name__ == "__main__":
    main()

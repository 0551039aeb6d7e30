"""
Run a mimic-video policy in closed loop, and sweep how far the video is denoised before the decoder reads it.

    python sample.py                                  # the policy train.py wrote (out/toy/policy), stop_after_step=0
    python sample.py --stop_after_step=0,5,10,20,35   # the paper's tau_v sweep: success per noise level
    python sample.py --tau_v=0.99,0.9,0.5             # the same by flow time
    python sample.py --oracle=true --stop_after_step=0,10,20,35   # condition on noised true futures
    python sample.py --wrong_instruction=true         # name another square: where does the policy go?
    python sample.py --gif=rollout.gif                # rollout beside the imagined plan (needs Pillow)
    python sample.py --env=libero --policy=libero_spatial_full --suite=libero_spatial   # released weights (GPU, LIBERO)

Every policy is an `mv.Policy` (mv.load_policy: a folder train.py wrote, or a released task of jonpai/mimic-video),
driven LeRobot's way: reset(), then select_action(observation) once per control step. A policy query = k steps of
the Cosmos sampler (k = stop_after_step), one video forward truncated at the tap block, then 10 Euler steps of the
action decoder; n_action_steps actions of the chunk run before the next query.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import mimic_video as mv


@dataclass
class SampleConfig:
    policy: str = "out/toy/policy"  # a policy folder (train.py writes out/toy/policy) or a released task name
    env: str = "toy"  # "toy": the toy world; "libero": the LIBERO simulator (needs the libero package and its assets)
    episodes: int = 200  # toy: held-out episodes per setting
    stop_after_step: str = "0"  # comma-separated list of k on the 35-step schedule
    tau_v: str = ""  # comma-separated list of video flow times (instead of stop_after_step)
    oracle: bool = False  # toy: condition on the expert's true future, noised to the same level
    wrong_instruction: bool = False  # toy: the instruction names another square (the decoder never reads it: only
    #                                  the video model can make the policy follow it)
    gif: str = ""  # toy: write the first episodes' rollout next to the imagined plans to this GIF
    suite: str = "libero_spatial"  # libero: libero_spatial, libero_object, libero_goal or libero_10
    trials: int = 50  # libero: trials per task (official: 50)
    device: str = "auto"
    seed: int = 0  # toy: the random baseline's seed

    def settings(self):
        """[(name, value)] of the noise levels to sweep."""
        if self.tau_v:
            return [("tau_v", float(v)) for v in self.tau_v.split(",")]
        return [("stop_after_step", int(k)) for k in self.stop_after_step.split(",")]


# ----------------------------------------------------------------------------------------------
# the toy world

def timed(policy):
    """Count a Policy's model queries and their wall time (per call of `policy.query`)."""
    query = policy.query

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = query(*args, **kwargs)
        policy.seconds += time.perf_counter() - t0
        policy.queries += 1
        return out

    policy.query, policy.seconds, policy.queries = wrapped, 0.0, 0
    return policy


class Oracle:
    """The policy given the expert's true future frames (the paper's case study) instead of its own plan."""

    def __init__(self, policy, world):
        self.policy, self.world = policy, world

    def reset(self):
        self.policy.reset()

    def select_action(self, obs):
        return self.policy.select_action(obs, oracle_future=mv.toy_expert_future(obs["toy.state"], self.world))


def wrong_instructions(seeds, world):
    """For each episode, an instruction naming another colour of its scene, and where that square is."""
    state = mv.toy_reset(seeds, world)
    n = np.arange(len(seeds))
    named = (state["colours"][n, state["goal"]] + 1) % len(mv.TOY_COLOURS)  # another colour of this scene
    named_pos = state["targets"][n, (state["colours"] == named[:, None]).argmax(1)]  # (N, 2)
    return [mv.toy_instruction(c, t) for c, t in zip(named, state["template"])], named_pos


class Imagining:
    """Record, for each executed step, the plan the decoder read: the frame of the imagined future (decoded) that
    corresponds to the step, shown until the next query."""

    def __init__(self, policy):
        self.policy, self.plans = policy, []

    def reset(self):
        self.policy.reset()

    def select_action(self, obs):
        querying = not self.policy.queue
        action = self.policy.select_action(obs)
        if querying:  # the decoded plan's frames after the context frames
            self.plan = self.policy.imagine()[:, :, self.policy.config.context_frames:]
            self.step = 0
        chunk = self.policy.model.decoder.cfg.num_actions
        future = self.plan.shape[2]  # the imagined future frames span the chunk
        self.plans.append(self.plan[:, :, min(future - 1, self.step * future // chunk)].numpy())
        self.step += 1
        return action


def save_gif(policy, world, path, episodes=4):
    """Top row per episode: the rollout; bottom row: the plan the decoder read at each query (the video model's x0
    prediction at the noise level where partial denoising stopped; at k = 0, one forward from pure noise: a blurred
    average of the futures it considers likely)."""
    try:
        from PIL import Image
    except ImportError:
        sys.exit("error: --gif needs Pillow: pip install pillow")
    seeds = [mv.TOY_EVAL_SEEDS + i for i in range(episodes)]
    recorder = Imagining(policy)
    result = mv.toy_rollout(recorder, seeds, world)
    real = result["images"][:, 1:] * 2 - 1  # (N, steps, 3, S, S) in model units
    S = real.shape[-1]
    fake = torch.from_numpy(np.stack(recorder.plans, axis=1))  # (N, steps, 3, h, w)
    fake = mv.resize_frames(fake, (S, S)).numpy()
    pictures = []
    for t in range(real.shape[1]):
        rows = [np.concatenate([real[n, t], fake[n, t]], axis=1) for n in range(episodes)]  # (3, 2S, S) each
        grid = np.concatenate(rows, axis=2).clip(-1, 1)  # (3, 2S, N*S); white where the agent covers a square
        img = ((grid.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8).repeat(8, 0).repeat(8, 1)
        pictures.append(Image.fromarray(img))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=150, loop=0)
    print(f"wrote {path}: {episodes} episodes (success {result['success'].mean():.0%}); top rollout, bottom the plan "
          f"at k={policy.config.stop_after_step}")


def toy_sweep(cfg, policy):
    world = mv.ToyWorldConfig()
    seeds = [mv.TOY_EVAL_SEEDS + i for i in range(cfg.episodes)]  # the held-out seeds train.py evaluates on
    random, expert = mv.toy_baselines(seeds, world, cfg.seed)
    print(f"{cfg.episodes} held-out episodes; random policy {random:.1%}, scripted expert {expert:.1%}"
          + ("; ORACLE: conditioned on the expert's noised future" if cfg.oracle else ""))
    print(f"{'setting':>22} {'tau_v':>8} {'success':>8} {'ms/query':>9}")
    tasks, named_pos = wrong_instructions(seeds, world) if cfg.wrong_instruction else (None, None)
    timed(policy)
    for name, value in cfg.settings():
        policy.config.stop_after_step, policy.config.tau_v = (value, None) if name == "stop_after_step" else (0, value)
        tau_v = value if name == "tau_v" else float(mv.sigma_to_tau(mv.karras_sigmas(35)[value]))
        policy.seconds, policy.queries = 0.0, 0
        result = mv.toy_rollout(Oracle(policy, world) if cfg.oracle else policy, seeds, world, tasks=tasks)
        ms = 1000 * policy.seconds / policy.queries / cfg.episodes  # per query of one episode (batched)
        line = f"{name + '=' + str(value):>22} {tau_v:>8.4f} {result['success'].mean():>8.1%} {ms:>9.2f}"
        if cfg.wrong_instruction:
            at_named = np.linalg.norm(result["agent"] - named_pos, axis=-1) < world.success_radius
            line += f"   ends at the named square: {at_named.mean():.1%}"
        print(line)
    if cfg.gif:
        name, value = cfg.settings()[0]
        policy.config.stop_after_step = value if name == "stop_after_step" else 0
        save_gif(policy, world, cfg.gif)


# ----------------------------------------------------------------------------------------------
# LIBERO, the official protocol (eval/libero/run.py): 480 x 640 agentview flipped 180 degrees, 10 settle steps
# with the dummy action, at most 220/280/300/520 policy steps (spatial/object/goal/10), 50 trials per task from the
# fixed initial states, 5 actions executed per query.

LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
LIBERO_DUMMY_ACTION = [0, 0, 0, 0, 0, 0, -1]
LIBERO_SETTLE_STEPS = 10


def libero_observation(obs, task):
    """A LIBERO simulator observation -> LeRobot keys, as the LeRobot LIBERO datasets store them: the agentview
    flipped 180 degrees (upright) as "image", the wrist camera as "image2", and the 8-D state [eef xyz, eef
    axis-angle, 2 finger joints]."""
    rotvec = mv.matrix_to_axis_angle(mv.quaternion_to_matrix(torch.as_tensor(np.asarray(obs["robot0_eef_quat"]), dtype=torch.float64)))
    state = np.concatenate([obs["robot0_eef_pos"], rotvec.numpy(), obs["robot0_gripper_qpos"]]).astype(np.float32)
    out = {"observation.images.image": np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]),
           "observation.state": state, "task": task}
    if "robot0_eye_in_hand_image" in obs:
        out["observation.images.image2"] = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
    return out


def libero_tasks(suite):
    """The LIBERO benchmark's tasks of a suite: [(language, make_env(), initial states)]. Needs the `libero` package
    (pip install hf-libero) with its scene assets, and MUJOCO_GL=egl on a headless machine."""
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError:
        sys.exit("error: --env=libero needs the LIBERO simulator: pip install hf-libero (its scene assets come from "
                 "the Hugging Face Hub or the LIBERO GitHub repository)")
    bench = benchmark.get_benchmark_dict()[suite]()
    tasks = []
    for i in range(bench.n_tasks):
        task = bench.get_task(i)
        bddl = str(Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file)
        make = lambda bddl=bddl: OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=480, camera_widths=640)  # noqa: E731
        tasks.append((task.language, make, bench.get_task_init_states(i)))
    return tasks


def libero_eval(policy, suite, trials=50, tasks=None, log=print):
    """Success rate per task of `policy` on a LIBERO suite. tasks: [(language, make_env, init_states)] (default: the
    real benchmark); each env follows the robosuite API (seed, reset, set_init_state, step -> obs, reward, done, info)."""
    max_steps = LIBERO_MAX_STEPS[suite]
    tasks = libero_tasks(suite) if tasks is None else tasks
    rates = {}
    for language, make_env, init_states in tasks:
        env = make_env()
        env.seed(0)
        successes = 0
        for trial in range(trials):
            env.reset()
            obs = env.set_init_state(init_states[trial % len(init_states)])
            policy.reset()
            for t in range(max_steps + LIBERO_SETTLE_STEPS):
                if t < LIBERO_SETTLE_STEPS:  # let the objects settle
                    obs, _, done, _ = env.step(LIBERO_DUMMY_ACTION)
                    continue
                action = np.asarray(policy.select_action(libero_observation(obs, language)), np.float64)
                obs, _, done, _ = env.step(action.tolist())
                if done:
                    successes += 1
                    break
        env.close()
        rates[language] = successes / trials
        log(f"{rates[language]:6.1%}  {language}")
    log(f"{sum(rates.values()) / len(rates):6.1%}  mean over {len(rates)} tasks of {suite} ({trials} trials each)")
    return rates


def main(argv):
    cfg = mv.parse_config(argv, SampleConfig)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.env == "libero" else None
    if not (Path(cfg.policy) / "config.json").is_file() and cfg.policy not in mv.RELEASED_POLICIES:
        sys.exit(f"error: no policy at {cfg.policy} (no config.json there) and not a released task; run `python "
                 f"train.py` first, or pass --policy=FOLDER or one of {', '.join(sorted(mv.RELEASED_POLICIES))}")
    policy = mv.load_policy(cfg.policy, device=device, dtype=dtype)
    if cfg.env == "libero":
        for name, value in cfg.settings():
            policy.config.stop_after_step, policy.config.tau_v = (value, None) if name == "stop_after_step" else (0, value)
            print(f"{cfg.suite}, {name}={value}:")
            libero_eval(policy, cfg.suite, cfg.trials)
        return
    toy_sweep(cfg, policy)


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Run a mimic-video policy in closed loop, and sweep how far the video is denoised before the decoder reads it.

    python sample.py                                  # the policy train.py wrote (out/toy/policy), stop_after_step=0
    python sample.py --stop_after_step=0,5,10,20,35   # the paper's tau_v sweep: success per noise level
    python sample.py --tau_v=0.99,0.9,0.5             # the same by flow time
    python sample.py --oracle=true --stop_after_step=0,10,20,35   # condition on noised true futures
    python sample.py --wrong_instruction=true         # name another square: where does the policy go?
    python sample.py --gif=rollout.gif                # rollout beside the imagined plan (needs Pillow)
    python sample.py --env=libero --policy=libero_spatial_full --suite=libero_spatial   # released weights (GPU, LIBERO)
    python sample.py --benchmark=true                 # latency of a query at the real shapes (GPU) or reduced (CPU)
    python sample.py --latency=A,B,C                  # ms per query of several policy folders, side by side

Every policy is an `mv.Policy` (mv.load_policy: a folder train.py wrote, or a released task of jonpai/mimic-video),
driven LeRobot's way: reset(), then select_action(observation) once per control step. A policy query = k steps of
the Cosmos sampler (k = stop_after_step), one video forward truncated at the tap block, then 10 Euler steps of the
action decoder; n_action_steps actions of the chunk run before the next query.
"""

import gc
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import mimic_video as mv


@dataclass
class SampleConfig:
    policy: str = "out/toy/policy"  # a policy folder (train.py writes out/toy/policy), a Hub repo id or a released task
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
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"
    seed: int = 0  # toy: the random baseline's seed
    benchmark: bool = False  # time policy queries against the floor: the real shapes on a GPU, reduced on a CPU
    bench_runs: int = 10  # benchmark: timed runs per measurement (after warm-up), the median is reported
    bench_shapes: str = "auto"  # benchmark: real (bf16), reduced (fp32), tiny (fp32, seconds: a smoke run); auto =
    #                             real on a GPU, reduced on a CPU
    compile: bool = False  # benchmark: torch.compile the video DiT and the decoder
    latency: str = ""  # comma-separated policy folders: ms per query of each, side by side on one toy observation

    def settings(self):
        """[(name, value)] of the noise levels to sweep."""
        if self.tau_v:
            return [("tau_v", float(v)) for v in self.tau_v.split(",")]
        return [("stop_after_step", int(k)) for k in self.stop_after_step.split(",")]

    def validate(self):
        """Every value checked before a policy is loaded or an episode run (mv.parse_config: one line, exit 1)."""
        try:
            settings = self.settings()
        except ValueError:
            raise ValueError(f"--stop_after_step and --tau_v take comma-separated numbers, got "
                             f"{self.stop_after_step!r} and {self.tau_v!r}") from None
        for name, value in settings:
            if name == "stop_after_step" and not 0 <= value <= 35:
                raise ValueError(f"--stop_after_step values must be in [0, 35] (the 35-step schedule), got {value}")
            if name == "tau_v" and not 0 < value < 1:
                raise ValueError(f"--tau_v values must be in (0, 1), got {value}")
        if self.env not in ("toy", "libero"):
            raise ValueError(f"--env must be toy or libero, got {self.env!r}")
        if self.env == "libero" and self.suite not in LIBERO_MAX_STEPS:
            raise ValueError(f"--suite must be one of {', '.join(LIBERO_MAX_STEPS)}, got {self.suite!r}")
        released = mv.RELEASED_POLICIES.get(self.policy, ("",))[0]  # "libero" or "bridge" for a released task
        if released and (released, self.env) != ("libero", "libero") and not (self.benchmark or self.latency):
            raise ValueError(f"--policy={self.policy} is a released {released} policy: " + (
                "run it with --env=libero" if released == "libero" else "it runs in SimplerEnv (Bridge), which "
                "sample.py does not drive; mv.load_policy gives it to your own loop"))  # before gigabytes load
        if self.env == "libero" and not self.benchmark and importlib.util.find_spec("libero") is None:
            raise ValueError(LIBERO_MISSING)  # before the policy (gigabytes for a released one) is loaded
        if self.episodes < 1 or self.trials < 1 or self.bench_runs < 1:
            raise ValueError(f"--episodes, --trials and --bench_runs must be at least 1, got {self.episodes}, "
                             f"{self.trials}, {self.bench_runs}")
        if self.bench_shapes not in ("auto", "real", "reduced", "tiny"):
            raise ValueError(f"--bench_shapes must be auto, real, reduced or tiny, got {self.bench_shapes!r}")
        if self.env == "libero" and (self.oracle or self.wrong_instruction or self.gif):
            raise ValueError("--oracle, --wrong_instruction and --gif are toy-world options (--env=toy)")
        if self.gif and importlib.util.find_spec("PIL") is None:  # before the episodes, not after them
            raise ValueError("--gif needs Pillow: pip install pillow")
        if self.gif:
            folder = Path(self.gif).resolve().parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise ValueError(f"--gif={self.gif}: the folder {folder} does not exist or is not writable")
        mv.check_device(self.device, self.compile)
        folders = [f for f in self.latency.split(",") if f]
        for folder in folders:
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(f"--latency: no policy at {folder} (no config.json there)")
        if len({Path(f).resolve() for f in folders}) < len(folders):  # one row per folder
            raise ValueError(f"--latency names a policy folder twice: {self.latency}")
        libero, bench = ("suite", "trials"), ("bench_runs", "bench_shapes", "compile")
        for needs, names in (("--env=libero", libero if self.env != "libero" else ()),
                             ("--benchmark=true", bench if not self.benchmark else ())):
            given = mv.changed_fields(self, names)
            if given:  # it would be ignored
                raise ValueError(f"--{given[0]} applies only with {needs}")
        if self.benchmark or self.latency:  # random weights, or the folders --latency names, timed on one observation
            rollout = ("policy", "env", "episodes", "stop_after_step", "tau_v", "oracle", "wrong_instruction", "gif",
                       "seed", "latency" if self.benchmark else "benchmark")
            given = mv.changed_fields(self, rollout)
            if given:
                raise ValueError(f"--{given[0]} does not apply to {'--benchmark' if self.benchmark else '--latency'}")
        folder = (Path(self.policy) / "config.json").is_file()
        hub = not Path(self.policy).exists() and self.policy.count("/") == 1  # owner/name: pushed with push_to_hub
        if not (self.benchmark or self.latency or folder or hub or self.policy in mv.RELEASED_POLICIES):
            raise ValueError(f"no policy at {self.policy} (no config.json there), not a Hub repo id (owner/name) and "
                             f"not a released task; run `python train.py` first, or pass --policy=FOLDER, a Hub repo "
                             f"id or one of {', '.join(sorted(mv.RELEASED_POLICIES))}")


# ----------------------------------------------------------------------------------------------
# the toy world

def timed(policy):
    """Count a Policy's model queries and their wall time (per call of `policy.query`)."""
    query = policy.query

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = query(*args, **kwargs)
        if out.is_cuda:  # the actions stay on the device: wait for the query's kernels to finish
            torch.cuda.synchronize(out.device)
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
        self.plans.append(self.plan[:, :, min(future - 1, self.step * future // chunk)].cpu().numpy())
        self.step += 1
        return action


def save_gif(policy, world, path, episodes=4):
    """Top row per episode: the rollout; bottom row: the plan the decoder read at each query (the video model's x0
    prediction at the noise level where partial denoising stopped; at k = 0, one forward from pure noise: a blurred
    average of the futures it considers likely)."""
    Image = mv.require("PIL.Image", "pillow")
    seeds = [mv.TOY_EVAL_SEEDS + i for i in range(episodes)]
    recorder = Imagining(policy)
    result = mv.toy_rollout(recorder, seeds, world)
    real = mv.images_to_frames(torch.from_numpy(result["images"][:, 1:])).numpy()  # (N, steps, 3, S, S) in [-1, 1]
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


def apply_setting(policy, name, value):
    """Stop the policy's partial denoising after step `value` of the schedule, or at the flow time tau_v = `value`."""
    policy.config.stop_after_step, policy.config.tau_v = (value, None) if name == "stop_after_step" else (0, value)


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
        apply_setting(policy, name, value)
        tau_v = value if name == "tau_v" else float(mv.sigma_to_tau(mv.karras_sigmas(35)[value]))
        policy.seconds, policy.queries = 0.0, 0
        result = mv.toy_rollout(Oracle(policy, world) if cfg.oracle else policy, seeds, world, tasks=tasks)
        ms = 1000 * policy.seconds / policy.queries / cfg.episodes  # per query of one episode (batched)
        setting = f"{name}={value}" if policy.method == "mimic-video" else policy.method  # the others: k = 0 or joint
        line = f"{setting:>22} {tau_v:>8.4f} {result['success'].mean():>8.1%} {ms:>9.2f}"
        if cfg.wrong_instruction:
            at_named = np.linalg.norm(result["agent"] - named_pos, axis=-1) < world.success_radius
            line += f"   ends at the named square: {at_named.mean():.1%}"
        print(line)
    if cfg.gif:
        apply_setting(policy, *cfg.settings()[0])
        save_gif(policy, world, cfg.gif)


# ----------------------------------------------------------------------------------------------
# LIBERO, the official protocol (eval/libero/run.py): 480 x 640 agentview flipped 180 degrees, 10 settle steps
# with the dummy action, at most 220/280/300/520 policy steps (spatial/object/goal/10), 50 trials per task from the
# fixed initial states, 5 actions executed per query.

LIBERO_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
LIBERO_DUMMY_ACTION = [0, 0, 0, 0, 0, 0, -1]
LIBERO_SETTLE_STEPS = 10
LIBERO_MISSING = ("--env=libero needs the LIBERO simulator: pip install hf-libero (its scene assets come from the "
                  "Hugging Face Hub or the LIBERO GitHub repository)")


def libero_observation(obs, task):
    """A LIBERO simulator observation -> LeRobot keys, as the LeRobot LIBERO datasets store them: the agentview
    flipped 180 degrees (upright) as "image", the wrist camera as "image2", and the 8-D state [eef xyz, eef
    axis-angle, 2 finger joints]."""
    rotvec = mv.matrix_to_axis_angle(mv.quaternion_to_matrix(torch.as_tensor(np.asarray(obs["robot0_eef_quat"]),
                                                                             dtype=torch.float64)))
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
        sys.exit(f"error: {LIBERO_MISSING}")
    bench = benchmark.get_benchmark_dict()[suite]()
    tasks = []
    for i in range(bench.n_tasks):
        task = bench.get_task(i)
        bddl = str(Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file)
        make = lambda bddl=bddl: OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=480,
                                                    camera_widths=640)  # noqa: E731
        tasks.append((task.language, make, bench.get_task_init_states(i)))
    return tasks


def libero_eval(policy, suite, trials=50, tasks=None, log=print):
    """Success rate per task of `policy` on a LIBERO suite. tasks: [(language, make_env, init_states)] (default: the
    real benchmark); each env follows the robosuite API (seed, reset, set_init_state, step -> obs, reward, done,
    info)."""
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
                action = policy.select_action(libero_observation(obs, language)).cpu().numpy().astype(np.float64)
                obs, _, done, _ = env.step(action.tolist())
                if done:
                    successes += 1
                    break
        env.close()
        rates[language] = successes / trials
        log(f"{rates[language]:6.1%}  {language}")
    log(f"{sum(rates.values()) / len(rates):6.1%}  mean over {len(rates)} tasks of {suite} ({trials} trials each)")
    return rates


# ----------------------------------------------------------------------------------------------
# latency at real scale (--benchmark=true): a policy query per k against an analytic floor, and our DiT vs diffusers'

def bench_setup(device, shapes):
    """Random weights at the real LIBERO shapes (2B video DiT, 0.5B decoder, 16 latent frames of 60 x 80, T5 text of
    512 tokens; bf16), or the same architecture narrower and shallower: "reduced" (fp32, for a CPU), "tiny" (a smoke
    run)."""
    video_cfg, dec_cfg = mv.VIDEO_DIT_PRESETS["cosmos-predict2-2b"], mv.ACTION_DECODER_PRESETS["libero"]
    va_cfg, latent, text = mv.VIDEO_ACTION_PRESETS["mimic-video"], (16, 16, 60, 80), (512, 1024)
    if shapes != "real":  # width, video blocks, decoder blocks, tap block, latent H x W, text (tokens, width)
        D, blocks, dec_blocks, tap, (H, W), text = {"reduced": (256, 8, 4, 6, (12, 16), (64, 128)),
                                                     "tiny": (64, 2, 2, 1, (4, 4), (8, 32))}[shapes]
        video_cfg = mv.replace(video_cfg, model_channels=D, num_blocks=blocks, num_heads=4, adaln_lora_dim=64,
                               crossattn_emb_channels=text[1])
        dec_cfg = mv.replace(dec_cfg, model_channels=D, num_blocks=dec_blocks, num_heads=4, adaln_lora_dim=64,
                             crossattn_emb_channels=D, pair_timestep_feature_rank=D)
        va_cfg, latent = mv.replace(va_cfg, tap_block=tap), (16, 16, H, W)
    dtype = torch.bfloat16 if shapes == "real" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = mv.VideoActionModel(mv.VideoDiT(video_cfg), mv.ActionDecoder(dec_cfg), va_cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"context": torch.randn(1, latent[0], va_cfg.context_latents, *latent[2:], generator=g).to(device),
              "text": torch.randn(1, *text, generator=g).to(device, dtype),
              "proprio": torch.randn(1, 1, dec_cfg.in_channels, generator=g).to(device)}
    return model.requires_grad_(False), inputs, latent, text


def query_flops(model, latent, text, k):
    """Analytic FLOPs of one query, matmuls only (2 per multiply-add): k full video forwards, one forward truncated at
    the tap block, the decoder's keys/values of the video tokens (once) and its Euler steps."""
    v, d, (C, T, H, W), (N, Ct) = model.video.cfg, model.decoder.cfg, latent, text
    L, D = T * (H // v.patch_spatial) * (W // v.patch_spatial), v.model_channels  # video tokens and width
    Td, Dd = d.max_horizon, d.model_channels  # decoder tokens and width
    # a video block: q, k, v, o (4 L D^2), cross q, o (2 L D^2), the 4x MLP (8 L D^2), attention over L tokens and
    # over the N text tokens, whose keys and values come from Ct-wide embeddings
    block = 2 * (14 * L * D * D + 2 * L * L * D + 2 * N * Ct * D + 2 * L * N * D)
    video = k * (v.num_blocks * block + 2 * L * D * C * v.patch_spatial ** 2) + model.cfg.tap_block * block
    # a decoder block per step: the same over Td tokens, its cross-attention over the L video tokens
    step = d.num_blocks * 2 * (14 * Td * Dd * Dd + 2 * Td * Td * Dd + 2 * Td * L * Dd)
    return video + d.num_blocks * 4 * L * D * Dd + model.cfg.num_action_steps * step


def median_ms(fn, device, runs, warmup=2):
    """Median wall time of fn() in ms after `warmup` calls; on a GPU, each run waits for its kernels."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def run_phase(name, fn, device):
    """One benchmark phase: a failure (out of memory included) is printed on its own row, and the next phase runs."""
    try:
        return fn()
    except Exception as e:  # torch.OutOfMemoryError is one
        print(f"  {name}: FAILED ({mv.error_line(e)})")
        gc.collect()  # the failed phase's tensors, before the next phase allocates
        if device.type == "cuda":
            torch.cuda.empty_cache()


def benchmark(cfg, device):
    """Per stop_after_step k in {0, 1, 5, 35}: the median ms of a policy query after warm-up, its peak memory and its
    ratio to the floor (analytic FLOPs / the matmul throughput measured in this run); then our DiT vs diffusers'."""
    shapes = cfg.bench_shapes if cfg.bench_shapes != "auto" else ("real" if device.type == "cuda" else "reduced")
    model, x, latent, text = bench_setup(device, shapes)
    if cfg.compile:
        compile_model(model)
    dtype, runs, cuda = next(model.parameters()).dtype, cfg.bench_runs, device.type == "cuda"
    n = 8192 if cuda else 1024  # the floor's denominator: a large square matmul on this device and dtype
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops_per_s = 2 * n ** 3 / (median_ms(lambda: a @ b, device, 20 if cuda else 5, warmup=3) / 1000)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    which = "the real LIBERO shapes" if shapes == "real" else f"{shapes.upper()} shapes (--bench_shapes=real: the 2B)"
    v, millions = model.video.cfg, lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"benchmark on {device} ({name}), {dtype}{', torch.compile' if cfg.compile else ''}; {which}; matmul "
          f"throughput {flops_per_s / 1e12:.2f} TFLOP/s; median of {runs} runs\n  video DiT "
          f"{millions(model.video):.1f}M ({v.num_blocks} blocks, width {v.model_channels}, tap block "
          f"{model.cfg.tap_block}), decoder {millions(model.decoder):.1f}M, latent {latent}, text {text}")

    def row(k):  # one query at k, timed whole
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms = median_ms(lambda: model.sample_actions(x["context"], x["text"], x["proprio"], stop_after_step=k),
                       device, runs if k <= 5 or shapes == "real" else max(2, runs // 3))
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
        else:  # the process's peak resident set (Linux: in KiB)
            import resource

            peak = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        flops = query_flops(model, latent, text, k)
        return {"k": k, "ms": ms, "peak GiB": peak / 2**30, "TFLOP": flops / 1e12,
                "floor ms": 1000 * flops / flops_per_s}

    with torch.no_grad():
        rows = [run_phase(f"query k = {k}", lambda k=k: row(k), device) or {"k": k, "failed": True}
                for k in (0, 1, 5, 35)]
    print(f"{'k':>3} {'ms/query':>9} {'TFLOP':>7} {'floor ms':>8} {'x floor':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['k']:>3} FAILED (above)" if r.get("failed") else f"{r['k']:>3} {r['ms']:>9.1f} {r['TFLOP']:>7.2f} "
              f"{r['floor ms']:>8.1f} {r['ms'] / r['floor ms']:>7.2f} {r['peak GiB']:>8.2f}")
    if not (rows[1].get("failed") or rows[2].get("failed")):  # k = 0 and k = 1 differ in the sampler's first step
        print(f"  per extra video step: {(rows[2]['ms'] - rows[1]['ms']) / 4:.1f} ms (k = 1 -> 5)")
    latents, cond = model.window(x["context"], None)
    run_phase("our DiT vs diffusers", lambda: bench_against_diffusers(model.video, latents, x["text"], cond, device,
                                                                      runs), device)
    return rows


def compile_model(model, backend="inductor"):
    """torch.compile the video DiT and the decoder in place (nn.Module.compile): every call of the module, also the
    decoder's own self(...) inside `sample`, runs the compiled forward. (torch.compile(module) would return a wrapper
    whose .sample resolves to the original module: the sampling path would stay uncompiled.)"""
    model.video.compile(backend=backend)
    model.decoder.compile(backend=backend)
    return model


def bench_against_diffusers(video, latents, text, cond, device, runs):
    """Our VideoDiT forward against diffusers' CosmosTransformer3DModel with the same random weights and inputs."""
    try:
        from diffusers import CosmosTransformer3DModel
    except ImportError:
        print("  (diffusers not installed: pip install diffusers, to time our DiT against CosmosTransformer3DModel)")
        return
    v, dtype = video.cfg, next(video.parameters()).dtype  # bf16 at the real shapes: both networks in it
    # the padding-mask channel is passed with the condition mask (concatenated in the same order), so diffusers does
    # not resize it (with torchvision, which has no build for the CPU torch); built where it runs (fast on a GPU)
    with torch.device(device):
        ref = CosmosTransformer3DModel(
            in_channels=v.in_channels + 2, out_channels=v.out_channels, num_attention_heads=v.num_heads,
            attention_head_dim=v.model_channels // v.num_heads, num_layers=v.num_blocks, mlp_ratio=v.mlp_ratio,
            text_embed_dim=v.crossattn_emb_channels, adaln_lora_dim=v.adaln_lora_dim,
            max_size=(v.max_frames, v.max_img_h, v.max_img_w), patch_size=(v.patch_temporal, v.patch_spatial,
                                                                          v.patch_spatial),
            rope_scale=(v.rope_t_extrapolation_ratio, v.rope_h_extrapolation_ratio, v.rope_w_extrapolation_ratio),
            concat_padding_mask=False, extra_pos_embed_type=None).eval()
    ref = ref if dtype == torch.float32 else ref.to(dtype)  # (a cast to float32 would warn about a learned table)
    ref.load_state_dict({mv.to_diffusers_key(k): t for k, t in video.state_dict().items() if "lora" not in k})
    for m in ref.modules():  # the official q/k-norm eps (diffusers' default is 1e-5)
        if isinstance(m, torch.nn.RMSNorm) and m.eps == 1e-5:
            m.eps = 1e-6
    net_in, tau_BT, mask = mv.video2world_inputs(latents, torch.full((latents.shape[0],), 0.5, device=device),
                                                 latents, cond)
    masks = torch.cat([mask, torch.zeros_like(mask)], dim=1)  # (B, 2, T, H, W): condition, padding (zeros)
    with torch.no_grad():
        ours = lambda: video(net_in, tau_BT, text, mask)  # noqa: E731
        theirs = lambda: ref(net_in.to(dtype), tau_BT[:, None, :, None, None].to(dtype), text.to(dtype),
                             condition_mask=masks.to(dtype), return_dict=False)[0]  # noqa: E731
        diff = (ours().float() - theirs().float()).abs().max().item()
        a, b = median_ms(ours, device, runs), median_ms(theirs, device, runs)
    print(f"  our VideoDiT forward {a:.1f} ms vs diffusers CosmosTransformer3DModel {b:.1f} ms, same weights and "
          f"inputs: ratio {a / b:.2f} ({'not slower' if a <= b else 'SLOWER'}); outputs agree to {diff:.1e}")


def load_policy(name, device, dtype=None, env=None):
    """mv.load_policy, and with an env = (name, cameras, state dim, action dim) mv.check_fits_env: what is wrong with
    a policy's files (missing, truncated, another format, not fitting the model) or with the env for it, in one
    line, before any episode."""
    try:
        policy = mv.load_policy(name, device=device, dtype=dtype)
        if env is not None:
            mv.check_fits_env(policy, name, *env)
        return policy
    except (ValueError, FileNotFoundError) as e:  # CheckpointReadError and CheckpointMismatchError are ValueErrors
        sys.exit(f"error: {e}")


def latency_side_by_side(cfg, device, rounds=30):
    """Milliseconds per query (one environment) of several policies, interleaved on one toy-world observation."""
    env = ("--latency (a toy-world observation)", *mv.TOY_ENV)  # what the policies are timed on
    policies = {folder: load_policy(folder, device, env=env) for folder in cfg.latency.split(",")}
    for folder, ms in mv.query_latency(policies, mv.toy_probe_observation(), rounds).items():
        p = policies[folder]
        what = (f"{p.model.joint.num_steps} joint steps" if p.method == "joint" else f"k = {p.config.stop_after_step}")
        print(f"{ms:8.1f} ms per query  {p.method:<12} ({what})  {folder}")


def main(argv):
    cfg = mv.parse_config(argv, SampleConfig)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.benchmark:
        return benchmark(cfg, device)
    if cfg.latency:
        return latency_side_by_side(cfg, device)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.env == "libero" else None
    env = {"toy": mv.TOY_ENV, "libero": (("image", "image2"), 8, 7)}[cfg.env]  # cameras, state, action dims
    policy = load_policy(cfg.policy, device, dtype, env=(f"--env={cfg.env}", *env))
    if policy.method != "mimic-video" and (cfg.oracle or cfg.gif or cfg.settings() != [("stop_after_step", 0)]):
        sys.exit(f"error: --oracle, --gif and the stop_after_step / tau_v sweep act on mimic-video's partial "
                 f"denoising; {cfg.policy} holds a {policy.method} policy")
    if cfg.env == "libero":
        for name, value in cfg.settings():
            apply_setting(policy, name, value)
            print(f"{cfg.suite}, {name}={value}:")
            libero_eval(policy, cfg.suite, cfg.trials)
        return
    toy_sweep(cfg, policy)


if __name__ == "__main__":
    main(sys.argv[1:])

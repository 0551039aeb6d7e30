"""Nothing lost, nothing silent: checkpoints as one unit, honest resume, one run per folder, strict diffusers folders,
values validated at startup, non-finite inputs refused, ordinary file modes."""

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

import mimic_video as mv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import train  # noqa: E402

SMALL = ["--num_demos=32", "--num_pretrain=32", "--eval_episodes=4", "--batch_size=8", "--log_every=1"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A pretrain + stage-1 output folder to start stage-2 runs from."""
    out = tmp_path_factory.mktemp("base")
    train.main([f"--out_dir={out}", *SMALL, "--stage=pretrain", "--pretrain_steps=2"])
    train.main([f"--out_dir={out}", *SMALL, "--stage=1", "--stage1_steps=2"])
    return out


def copy_base(stage1, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("pretrain", "stage1"):
        shutil.copytree(stage1 / name, dst / name)
    for f in stage1.glob("*.npz"):
        shutil.copy(f, dst)
    return dst


STAGE2 = [*SMALL, "--stage=2", "--stage2_warmup=2", "--ckpt_every=2"]


def weights(out):
    return load_file(out / "stage2" / "checkpoint" / "model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------ a checkpoint is one unit ------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
calls = [0]
real = train.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint: its weights are written, its optimizer state is not
        os.kill(os.getpid(), signal.SIGKILL)
train.save_file = save_then_die
train.main(sys.argv[1:])
"""


def test_a_kill_between_files_leaves_the_previous_checkpoint_and_resume_is_exact(stage1, tmp_path):
    straight, killed = copy_base(stage1, tmp_path / "straight"), copy_base(stage1, tmp_path / "killed")
    train.main([f"--out_dir={straight}", *STAGE2, "--stage2_steps=4"])
    res = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT)), f"--out_dir={killed}", *STAGE2,
                          "--stage2_steps=4"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert train.read_train_state(killed / "stage2")["step"] == 2  # the step-2 checkpoint, whole
    assert (killed / ".lock").exists()  # the killed run's lock is left behind...
    train.main([f"--out_dir={killed}", *STAGE2, "--stage2_steps=4", "--resume=true"])  # ...and recognised as stale
    assert_same(weights(straight), weights(killed))
    assert not list((killed / "stage2").glob(".*"))  # the half-written folder is gone


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(stage1, tmp_path, monkeypatch):
    out = copy_base(stage1, tmp_path / "run")
    calls = [0]
    real = torch.save

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed") from OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(SystemExit,
                       match=r"could not write the step 4 checkpoint to .*stage2/checkpoint: "
                             r".*no space left on device"):
        train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=6"])
    monkeypatch.undo()
    assert train.read_train_state(out / "stage2")["step"] == 2  # intact and usable
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=6", "--resume=true"])
    assert train.read_train_state(out / "stage2")["step"] == 6


def test_a_full_disk_on_a_real_small_filesystem(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a small tmpfs (needs root)")
    try:
        (mount / "ckpt").mkdir()
        mv.atomic_write(mount / "ckpt" / "a.bin", lambda p: Path(p).write_bytes(b"old"))
        big = {"w": torch.zeros(64 * 1024)}  # 256 kB: does not fit
        with pytest.raises(OSError, match="no space left on device while writing .*a.bin") as info:
            mv.atomic_write(mount / "ckpt" / "a.bin", lambda p: save_file(big, p))
        assert info.value.errno == errno.ENOSPC
        assert (mount / "ckpt" / "a.bin").read_bytes() == b"old" and os.listdir(mount / "ckpt") == ["a.bin"]
        with pytest.raises(OSError, match="no space left on device"):
            mv.atomic_write_dir(mount / "ckpt", lambda tmp: save_file(big, tmp / "m.safetensors"))
        assert (mount / "ckpt" / "a.bin").read_bytes() == b"old"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------ honest resume ------------------------------


@pytest.fixture(scope="module")
def two_steps(stage1, tmp_path_factory):
    out = copy_base(stage1, tmp_path_factory.mktemp("two"))
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=4", "--ckpt_every=2"])
    return out


@pytest.mark.parametrize("change,field", [("--seed=1", "seed"), ("--batch_size=16", "batch_size"),
                                          ("--stage2_lr=3e-4", "stage2_lr"), ("--stage2_steps=8", "stage2_steps"),
                                          ("--num_demos=40", "num_demos")])
def test_resume_refuses_a_change_and_names_it(two_steps, change, field):
    with pytest.raises(SystemExit, match=rf"cannot resume stage2 exactly .*changed {field} \(checkpoint"):
        train.main([f"--out_dir={two_steps}", *STAGE2, "--stage2_steps=4", "--resume=true", change])


def test_resume_allows_a_named_change_and_says_so(two_steps, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(two_steps, out)
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=6", "--resume=true", "--allow_config_change=stage2_steps"])
    assert "resuming with changed stage2_steps (allowed by --allow_config_change)" in capsys.readouterr().out
    assert train.read_train_state(out / "stage2")["step"] == 6


def test_resume_refuses_a_changed_input_and_a_checkpoint_past_the_end(two_steps, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(two_steps, out)
    with pytest.raises(SystemExit, match="beyond the requested 3 steps"):
        train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=3", "--resume=true",
                    "--allow_config_change=stage2_steps"])
    video = mv.load_video_dit(out / "stage1" / "video_fused.safetensors", None)
    with torch.no_grad():
        video.final_layer.linear.weight.add_(1.0)
    mv.save_video_dit_checkpoint(video, out / "stage1" / "video_fused.safetensors")  # another backbone
    with pytest.raises(SystemExit, match="changed input video .*--allow_config_change=all "):
        train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=4", "--resume=true"])
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=4", "--resume=true", "--allow_config_change=all"])
    assert train.read_train_state(out / "stage2")["step"] == 4  # what the message offers works


def test_resume_without_a_checkpoint_and_a_fresh_run_over_one(two_steps, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--resume=true but .*typo.* holds no checkpoint of stage2"):
        train.main([f"--out_dir={tmp_path / 'typo'}", *STAGE2, "--stage2_steps=4", "--resume=true"])
    with pytest.raises(SystemExit,
                       match=r"already holds checkpoints: stage2 \(step 4\).*--resume=true.*--overwrite=true"):
        train.main([f"--out_dir={two_steps}", *STAGE2, "--stage2_steps=4"])
    out = tmp_path / "copy"
    shutil.copytree(two_steps, out)
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=4", "--resume=true"])  # complete: nothing to train
    assert "stage2: complete at step 4, nothing to train" in capsys.readouterr().out
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=2", "--overwrite=true"])
    assert train.read_train_state(out / "stage2")["step"] == 2
    with pytest.raises(SystemExit,
                       match="--stage=2 reads .*video_fused.safetensors, which does not exist: run --stage=1"):
        train.main([f"--out_dir={tmp_path / 'empty'}", *STAGE2, "--stage2_steps=2"])


# ------------------------------ one run per output folder ------------------------------


def test_a_second_run_into_the_same_folder_stops_naming_the_first(stage1, tmp_path):
    out = copy_base(stage1, tmp_path / "run")
    first = subprocess.Popen([sys.executable, "train.py", f"--out_dir={out}", *STAGE2, "--stage2_steps=100000"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if (out / ".lock").exists() and (out / ".lock").read_text():
                break
            time.sleep(0.1)
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {first.pid} on"):
            train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=4", "--overwrite=true"])
        first.terminate()  # SIGTERM, as a cluster preempts a job: the run ends through its cleanup, the folder free
        assert first.wait(timeout=60) == 128 + signal.SIGTERM and not (out / ".lock").exists()
    finally:
        first.kill()
        first.wait()


def test_on_windows_a_lock_is_never_probed_with_os_kill(monkeypatch):
    """os.kill(pid, 0) asks whether a process exists on POSIX; on Windows it terminates it."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("os.kill called"))
    assert train.RunLock._alive({"host": socket.gethostname(), "pid": os.getpid()})


def test_a_stale_lock_is_taken_over(stage1, tmp_path, capsys):
    out = copy_base(stage1, tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout), "started": "1"}))
    train.main([f"--out_dir={out}", *STAGE2, "--stage2_steps=2"])
    assert f"taking over a stale lock of pid {int(gone.stdout)}" in capsys.readouterr().out
    assert not (out / ".lock").exists()


# ------------------------------ diffusers folders: exactly the indexed files ------------------------------


@pytest.fixture
def diffusers_folder(tmp_path):
    sd = mv.official_keys(torch.load(FIXTURES / "video_dit_weights.pt", weights_only=True))
    diff = {mv.to_diffusers_key(k): v for k, v in sd.items()}
    keys = sorted(diff)
    folder = tmp_path / "repo" / "transformer"
    folder.mkdir(parents=True)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for name, part in zip(names, halves):
        save_file({k: diff[k] for k in part}, folder / name)
    index = {"metadata": {}, "weight_map": {k: names[i] for i, part in enumerate(halves) for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder, diff, names


def test_stray_and_variant_files_are_never_read(diffusers_folder):
    folder, diff, names = diffusers_folder
    ref = mv.load_video_dit(folder.parent, None, "tiny").final_layer.linear.weight.clone()
    poison = {k: torch.full_like(v, 7.0) for k, v in diff.items()}
    save_file(poison, folder / "diffusion_pytorch_model.fp16.safetensors")  # a precision variant
    save_file(poison, folder / "diffusion_pytorch_model-00003-of-00003.safetensors")  # a stale shard
    assert torch.equal(mv.load_video_dit(folder.parent, None, "tiny").final_layer.linear.weight, ref)


def test_a_key_in_two_files_and_index_mismatches_are_refused(diffusers_folder):
    folder, diff, names = diffusers_folder
    key = sorted(diff)[0]
    part = load_file(folder / names[1])
    save_file({**part, key: diff[key]}, folder / names[1])
    with pytest.raises(mv.CheckpointReadError,
                       match=rf"'{key}' is defined twice: in .*00001-of-00002.* and in .*00002-of-00002"):
        mv.read_state_dict(folder.parent)
    save_file(part, folder / names[1])
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = names[0]
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mv.CheckpointReadError, match="lists 1 key.* that its shards do not hold, e.g. 'extra.weight'"):
        mv.read_state_dict(folder.parent)


def test_read_errors_name_the_file(diffusers_folder, tmp_path):
    folder, diff, names = diffusers_folder
    data = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(mv.CheckpointReadError, match=rf"cannot read .*{names[1]}"):
        mv.load_video_dit(folder.parent, None, "tiny")
    (folder / names[1]).write_bytes(b"\x00garbage" * 100)  # corrupt
    with pytest.raises(mv.CheckpointReadError, match=rf"cannot read .*{names[1]}"):
        mv.load_video_dit(folder.parent, None, "tiny")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(mv.CheckpointReadError, match="cannot read .*bad.pt"):
        mv.load_video_dit(tmp_path / "bad.pt", None, "tiny")
    torch.save({"net.x": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "objects.pt")
    with pytest.raises(mv.CheckpointReadError, match=r"objects.pt: UnpicklingError: Weights only load failed.* \(it "
                                                     r"holds Python objects besides tensors") as e:
        mv.load_video_dit(tmp_path / "objects.pt", None, "tiny")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)  # torch's message: 6 lines, terminal colours
    sd = torch.load(FIXTURES / "video_dit_weights.pt", weights_only=True)
    mixed = dict(sd, **{"net.final_layer.linear.weight": sd["net.final_layer.linear.weight"].double()})
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(mv.CheckpointReadError,
                       match=r"mixed.pt: mixed parameter dtypes: .*torch.float64 \(e.g. 'final_layer"):
        mv.load_video_dit(tmp_path / "mixed.pt", None, "tiny")
    ints = dict(sd, **{"net.final_layer.linear.weight": sd["net.final_layer.linear.weight"].long()})
    torch.save(ints, tmp_path / "ints.pt")
    with pytest.raises(mv.CheckpointReadError,
                       match="ints.pt: non-floating parameters, e.g. 'final_layer.linear.weight'"):
        mv.load_video_dit(tmp_path / "ints.pt", None, "tiny")
    shutil.rmtree(folder)
    folder.mkdir()
    save_file(diff, folder / "diffusion_pytorch_model.fp16.safetensors")  # only a variant: not guessed
    with pytest.raises(FileNotFoundError,
                       match=r"neither diffusion_pytorch_model.safetensors nor .*index.json \(found"):
        mv.load_video_dit(folder.parent, None, "tiny")


# ------------------------------ every value checked at startup ------------------------------


@pytest.mark.parametrize("arg,message", [
    ("--lora_rank=0", "--lora_rank must be at least 1"), ("--batch_size=-2", "--batch_size must be at least 1"),
    ("--stage2_steps=0", "--stage2_steps must be at least 1"),
    ("--eval_episodes=0", "--eval_episodes must be at least 1"),
    ("--num_demos=0", "--num_demos must be at least 1"), ("--stage2_lr=0", "--stage2_lr must be a positive number"),
    ("--stage2_lr=nan", "--stage2_lr must be a positive number"), ("--device=tpu", "--device must be auto, cpu, cuda"),
    ("--stop_after_step=36", r"--stop_after_step must be in \[0, 35\]"),
    ("--video_preset=huge", "--video_preset='huge' is not a preset"),
    ("--allow_config_change=sed", "unknown fields"), ("--out_dir=", "--out_dir must not be empty")])
def test_train_values_are_validated_before_any_work(arg, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main([f"--out_dir={tmp_path / 'x'}", arg] if not arg.startswith("--out_dir") else [arg])
    assert not (tmp_path / "x").exists()  # nothing was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_that_does_not_exist():
    with pytest.raises(SystemExit, match="--device=cuda but this machine has no CUDA device"):
        mv.parse_config(["--device=cuda"], train.TrainConfig)
    with pytest.raises(ValueError, match="device='cuda:0' but this machine has no CUDA device"):
        mv.load_policy("libero_spatial_full", device="cuda:0")


def test_a_path_given_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """The shell leaves ~ unexpanded after "=" (--out_dir=~/runs): a run must not make a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mv.parse_config(["--out_dir=~/runs"], train.TrainConfig).out_dir == str(tmp_path / "runs")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    cfg = mv.parse_config(["--latency=~/a,~/b"], sample.SampleConfig)  # each folder of a list
    assert cfg.latency == f"{tmp_path / 'a'},{tmp_path / 'b'}"


def test_compile_on_a_cpu_without_a_compiler_is_refused_at_the_start(monkeypatch):
    """torch.compile builds CPU kernels with a C++ compiler: without one, the first step failed, after the data."""
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    for main, args in ((train.main, []), (sample.main, ["--benchmark=true"])):
        with pytest.raises(SystemExit, match=r"--compile=true on the CPU needs a C\+\+ compiler"):
            main(["--compile=true", "--device=cpu", *args])
    mv.check_device("cpu", compile=False)  # without --compile no compiler is needed


@pytest.mark.parametrize("arg,message", [
    ("--stop_after_step=36", r"must be in \[0, 35\]"), ("--stop_after_step=-1", r"must be in \[0, 35\]"),
    ("--stop_after_step=a", "comma-separated numbers"), ("--tau_v=1.5", r"--tau_v values must be in \(0, 1\)"),
    ("--episodes=0", "must be at least 1"), ("--gif=/no/such/folder/r.gif", "does not exist or is not writable"),
    ("--env=mujoco", "--env must be toy or libero"), ("--policy=/no/policy", "no policy at /no/policy"),
    ("--trials=10", "--trials applies only with --env=libero"),
    ("--compile=true", "--compile applies only with --benchmark=true")])
def test_sample_values_are_validated_before_any_work(arg, message):
    with pytest.raises(SystemExit, match=message):
        sample.main([arg])


def test_a_bad_value_is_one_line_without_a_traceback():
    res = subprocess.run([sys.executable, "train.py", "--lora_rank=0"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "error: --lora_rank must be at least 1, got 0"


# ------------------------------ the policy refuses non-finite values ------------------------------


def toy_policy():
    cfg = mv.POLICY_PRESETS["toy"]
    rep = mv.Representation.from_config(cfg.representation)
    stats = rep.stats(np.random.rand(50, 1, 2), np.random.randn(50, 8, 2) * 0.05)
    model = mv.VideoActionModel(mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"]),
                                mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"]),
                                mv.VIDEO_ACTION_PRESETS["toy"], *rep.normalizers(stats))
    return mv.Policy(model, cfg, mv.build_video_encoder(cfg.video_encoder), mv.build_text_encoder(cfg.text_encoder))


def toy_obs(n=2):
    world = mv.ToyWorldConfig()
    state = mv.toy_reset(list(range(n)), world)
    return mv.toy_observation(state, world, mv.toy_instructions(state))


def test_non_finite_inputs_are_refused_and_non_finite_actions_never_returned():
    policy = toy_policy()
    obs = toy_obs()
    obs["observation.images.top"] = obs["observation.images.top"].permute(0, 3, 1, 2) / 255  # float (3, H, W) in [0, 1]
    obs["observation.images.top"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        policy.select_action(obs)
    policy.reset()
    with torch.no_grad():
        policy.model.decoder.final_layer.linear.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite actions"):
        policy.select_action(toy_obs())


def test_an_instruction_that_is_not_text_is_named():
    policy = toy_policy()
    for task in (3, [3, "go"], [], None):
        policy.reset()
        with pytest.raises(ValueError, match="instructions must be a string or a non-empty list of strings"):
            policy.select_action({**toy_obs(1), "task": task})
    policy.reset()
    assert policy.select_action({**toy_obs(2), "task": np.array(["go to red", "go to blue"])}).shape == (2, 2)


def test_shape_and_range_mistakes_name_the_argument():
    video = mv.VideoDiT(mv.VIDEO_DIT_PRESETS["toy"])
    x = torch.zeros(1, 5, 5, 8, 8)
    with pytest.raises(ValueError, match=r"stop_after_block must be in \[0, 4\]"):
        video(x, torch.zeros(1), torch.zeros(1, 3, 32), torch.zeros(1, 1, 5, 8, 8), stop_after_block=5)
    with pytest.raises(ValueError, match=r"stop_after_step must be in \[0, 35\]"):
        mv.partial_schedule(35, stop_after_step=40)
    with pytest.raises(ValueError, match="context_latents must be in"):
        mv.VideoActionModel(video, mv.ActionDecoder(mv.ACTION_DECODER_PRESETS["toy"]),
                            mv.VideoActionConfig(tap_block=2, latent_frames=5, context_latents=5))


# ------------------------------ ordinary file modes ------------------------------


def test_checkpoints_and_caches_get_the_ordinary_file_mode(tmp_path, two_steps):
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    mv.atomic_write(tmp_path / "f.json", lambda p: Path(p).write_text("{}"))
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == expected
    for f in (two_steps / "stage2" / "checkpoint").iterdir():
        assert f.stat().st_mode & 0o777 == expected, f
    assert (two_steps / "stage2" / "checkpoint").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in two_steps.glob("*.npz"):
        assert f.stat().st_mode & 0o777 == expected, f

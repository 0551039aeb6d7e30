"""LeRobot datasets (v3.0 and v2.1, written here with pyarrow + PyAV): frame lookup, timing at the edges,
interpolation, statistics, the encode-once cache, clear errors, and the toy world's round trip through the format."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow", reason="optional: pip install pyarrow")
pytest.importorskip("av", reason="optional: pip install av")
import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mimic_video as mv  # noqa: E402
from conftest import tiny_t5  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import train  # noqa: E402

FPS = 10


def colour(ep, k):
    """A flat colour that names (episode, frame): survives lossy compression to within a few levels."""
    return np.array([40 + 25 * ep, 10 + 12 * k, 200 - 12 * k], np.uint8)


def episodes(lengths=(9, 6), size=16, state_dim=3, action_dim=2):
    out = []
    for e, n in enumerate(lengths):
        frames = np.stack([np.broadcast_to(colour(e, k), (size, size, 3)) for k in range(n)])
        state = np.stack([np.arange(state_dim) + 10 * e + k for k in range(n)]).astype(np.float32)  # linear in k
        action = np.stack([np.full(action_dim, 100 * e + k) for k in range(n)]).astype(np.float32)
        out.append({"frames": frames, "state": state, "action": action,
                    "task": ["pick the cube", "open the drawer"][e % 2]})
    return out


@pytest.fixture(scope="module", params=["v3.0", "v2.1"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "data"
    train.write_lerobot_dataset(root, episodes(), fps=FPS, camera="observation.images.front", version=request.param)
    return root


def test_layout_is_lerobots(dataset):
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["fps"] == FPS and info["features"]["observation.images.front"]["dtype"] == "video"
    if info["codebase_version"] == "v3.0":  # two episodes in one parquet and one mp4
        assert [p.relative_to(dataset).as_posix() for p in sorted(dataset.rglob("*.mp4"))] == [
            "videos/observation.images.front/chunk-000/file-000.mp4"]
        assert (dataset / "data/chunk-000/file-000.parquet").is_file() and (dataset / "meta/tasks.parquet").is_file()
        ep = pq.read_table(dataset / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
        assert [e["videos/observation.images.front/from_timestamp"] for e in ep] == [0.0, 0.9]
        assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in ep] == [(0, 9), (9, 15)]
    else:  # one file per episode
        assert (dataset / "videos/chunk-000/observation.images.front/episode_000001.mp4").is_file()
        assert (dataset / "data/chunk-000/episode_000001.parquet").is_file()
        assert len((dataset / "meta/episodes.jsonl").read_text().splitlines()) == 2


def test_a_resize_of_the_frames_is_said(dataset, tmp_path, capsys):
    """The encode names the frames' stored size when --image_size differs from it (the aspect ratio may change); the
    size is read from meta/info.json, frames stored HWC or CHW."""
    train.main([f"--data={dataset}", f"--out_dir={tmp_path}", "--stage=encode", "--image_size=8x8", "--pixel_patch=2"])
    assert "camera observation.images.front (16x16 frames, resized to 8x8: --image_size)," in capsys.readouterr().out
    ds = train.LeRobotDataset(dataset)
    for shape, names in (([24, 32, 3], None), ([3, 24, 32], None), ([3, 24, 32], ["channels", "height", "width"]),
                         ([24, 32, 3], ["height", "width", "channel"])):
        ds.info["features"][ds.camera].update(shape=shape, names=names)
        assert ds.frame_size() == (24, 32), (shape, names)


def test_frames_lowdim_and_task(dataset):
    ds = train.LeRobotDataset(dataset)  # the only camera is chosen
    assert (len(ds), ds.fps, ds.camera, ds.state_dim, ds.action_dim) == (2, FPS, "observation.images.front", 3, 2)
    for e, n in enumerate((9, 6)):
        got = ds.frames(e, [n - 1, 0, 3])
        assert got.shape == (3, 16, 16, 3)
        for img, k in zip(got, (n - 1, 0, 3)):
            assert np.abs(img.astype(int) - colour(e, k)).max() <= 3, (e, k)  # the right frame, not a neighbour
        low = ds.lowdim(e)
        assert np.allclose(low["timestamp"], np.arange(n) / FPS) and low["state"].shape == (n, 3)
        assert low["task"] == ["pick the cube", "open the drawer"][e]
    assert train.LeRobotDataset(dataset, camera="front").camera == "observation.images.front"


def test_av1_video_of_the_v3_format(tmp_path):
    train.write_lerobot_dataset(tmp_path / "d", episodes(size=64), fps=FPS, codec="libsvtav1")
    ds = train.LeRobotDataset(tmp_path / "d")
    img = ds.frames(1, [4])[0]
    assert np.abs(img.astype(int) - colour(1, 4)).max() <= 6  # AV1, yuv420p, crf 30: flat colours survive


def test_a_fractional_frame_rate_is_written_exactly(tmp_path):
    """12.5 fps (or NTSC's 29.97): each frame at k / fps in the video, where the reader looks for it (a rate rounded
    to 12 put frame 13 at 1.083 s, and the reader found no frame 13)."""
    train.write_lerobot_dataset(tmp_path / "d", episodes(lengths=(16, 14)), fps=12.5)
    ds = train.LeRobotDataset(tmp_path / "d")
    for e, n in enumerate((16, 14)):
        for img, k in zip(ds.frames(e, np.arange(n)), range(n)):
            assert np.abs(img.astype(int) - colour(e, k)).max() <= 3, (e, k)


def test_one_dimensional_state_and_action_are_plain_columns(tmp_path):
    """LeRobot stores a feature of shape (1,) as one number per frame (not a list of one): the writer does the same,
    and the reader reads both layouts."""
    eps = episodes(lengths=(5, 4), state_dim=1, action_dim=1)
    train.write_lerobot_dataset(tmp_path / "d", eps, fps=FPS)
    schema = pq.read_schema(tmp_path / "d" / "data/chunk-000/file-000.parquet")
    assert str(schema.field("observation.state").type) == str(schema.field("action").type) == "float"
    ds = train.LeRobotDataset(tmp_path / "d")
    assert (ds.state_dim, ds.action_dim) == (1, 1)
    for n, ep in enumerate(eps):
        low = ds.lowdim(n)
        np.testing.assert_array_equal(low["state"], ep["state"])
        np.testing.assert_array_equal(low["action"], ep["action"])


def test_window_timing_at_the_edges_and_interpolation(dataset):
    ds = train.LeRobotDataset(dataset)
    low = ds.lowdim(0)
    timing = train.WindowTiming(context_frames=3, context_hz=5.0, future_frames=4, future_hz=5.0, future_offset=0.2,
                             chunk=6, chunk_hz=10.0)
    ctx, fut = ds.window_indices(low["timestamp"], 0.1, timing)
    assert ctx.tolist() == [0, 0, 1] and fut.tolist() == [3, 5, 7, 8]  # before 0: frame 0; past the end: the last
    ctx, fut = ds.window_indices(low["timestamp"], 0.8, timing)
    assert ctx.tolist() == [4, 6, 8] and fut.tolist() == [8, 8, 8, 8]
    acts = train.interpolate_lowdim(low["timestamp"], low["action"], timing.action_times(0.55))
    assert np.allclose(acts[:, 0], [5.5, 6.5, 7.5, 8, 8, 8])  # linear between frames, the last value repeated
    # slerp: halfway between two rotations about z is the half angle
    times, rot = np.array([0.0, 1.0]), np.array([[0, 0, 0.2], [0, 0, 1.0]])
    assert np.allclose(train.interpolate_lowdim(times, rot, [0.5], rotvec_dims=(0,)), [[0, 0, 0.6]])
    big = np.array([[0, 0, 3.0], [0, 0, -3.0]])  # across pi: the short way round, not through zero
    mid = train.interpolate_lowdim(times, big, [0.5], rotvec_dims=(0,))[0]
    assert np.isclose(abs(mid[2]), np.pi, atol=1e-6)


def test_errors_name_the_file_and_the_episode(tmp_path):
    root = tmp_path / "d"
    train.write_lerobot_dataset(root, episodes(), fps=FPS)
    with pytest.raises(train.DatasetError, match="no camera 'observation.images.wrist'; it has"):
        train.LeRobotDataset(root, camera="wrist")
    with pytest.raises(train.DatasetError, match="'observation.effort' is not a 1-D feature"):
        train.LeRobotDataset(root, state_key="observation.effort")
    video = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 3])  # truncated: episode 1's frames are gone
    with pytest.raises(train.DatasetError,
                       match=r"episode 1: (cannot decode .*file-000.mp4|.*file-000.mp4 has no frame)"):
        train.LeRobotDataset(root).frames(1, [5])
    video.unlink()
    with pytest.raises(train.DatasetError, match="episode 0: its video .*file-000.mp4 does not exist"):
        train.LeRobotDataset(root).frames(0, [0])
    table = pq.read_table(root / "data/chunk-000/file-000.parquet")
    pq.write_table(table.slice(0, 12), root / "data/chunk-000/file-000.parquet")  # episode 1 loses 3 rows
    with pytest.raises(train.DatasetError, match=r"episode 1: .*file-000.parquet holds 3 rows of it, its length is 6"):
        train.LeRobotDataset(root).lowdim(1)
    (root / "meta/info.json").unlink()
    with pytest.raises(train.DatasetError, match="is not a LeRobot dataset"):
        train.LeRobotDataset(root)
    with pytest.raises(FileNotFoundError, match="could not get the dataset 'nobody/nothing' from the Hub"):
        train.LeRobotDataset("nobody/nothing")


def test_a_hub_error_of_several_lines_is_one(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):  # what huggingface_hub raises online without a network: two lines
        raise OSError("Got: ConnectError: Name or service not known\nAn error happened while trying to locate files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"\(OSError: Got: ConnectError: Name or service not known\); ") as e:
        train.LeRobotDataset("nobody/nothing")
    assert "\n" not in str(e.value)


def test_nan_in_the_data_is_named(tmp_path):
    eps = episodes()
    eps[1]["state"][2, 1] = np.nan
    train.write_lerobot_dataset(tmp_path / "d", eps, fps=FPS)
    with pytest.raises(train.DatasetError, match="episode 1: observation.state in .* has NaN"):
        train.LeRobotDataset(tmp_path / "d").lowdim(1)


# ------------------------------ encode once, then train from the cache ------------------------------

SMALL = ["--batch_size=8", "--log_every=1", "--image_size=16x16", "--pixel_patch=2", "--timing=small"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    base = tmp_path_factory.mktemp("enc")
    train.write_lerobot_dataset(base / "data", episodes(lengths=(9, 6, 7, 8)), fps=FPS)
    train.main([f"--data={base / 'data'}", f"--out_dir={base / 'out'}", "--stage=encode", "--val_fraction=0.25",
                *SMALL])
    return base


def test_the_cache_holds_every_window_and_the_statistics(encoded):
    cache = encoded / "out" / "cache"
    meta = json.loads((cache / "meta.json").read_text())
    assert [e["anchors"] for e in meta["episodes"]] == [9, 6, 7, 8] and len(meta["val"]) == 1
    assert meta["texts"] == ["pick the cube", "open the drawer"]
    data = train.CachedData(cache, "all")
    (C, T, h, w), (H, d_a) = data.shapes()
    assert (C, T, h, w, H, d_a) == (3, 1 + 4, 8, 8, 8, 2)  # each 2 x 2 patch's colour; 1 + 4 frames; 8 actions
    ep = train.LeRobotDataset(encoded / "data")
    low = ep.lowdim(2)
    w2 = data.windows(np.nonzero(data.index[:, 0] == 2)[0][:1])  # episode 2's first window (anchor t = 0)
    timing = train.timing_preset("small", FPS)
    expect = train.interpolate_lowdim(low["timestamp"], low["action"], timing.action_times(0.0))
    assert torch.allclose(w2["actions"][0], torch.from_numpy(expect).float())
    frames = mv.images_to_frames(torch.from_numpy(ep.frames(2, [0, 2, 4, 6, 6])))  # future frames past the end repeat
    rgb = w2["latents"][0, :, :, 0, 0]  # the top-left latent pixel: the average colour of its 2 x 2 pixels
    assert torch.allclose(rgb, frames[:, :, :2, :2].mean((-2, -1)).T, atol=6 / 255)
    # the statistics are the training split's, per chunk step, in the released layout
    train_eps = [i for i in meta["train"]]
    chunks = np.concatenate([load_file(cache / meta["episodes"][i]["file"])["actions"].numpy() for i in train_eps])
    stats = meta["stats"]["action/action_lowdim"]
    assert np.allclose(stats["mean"], chunks.mean(0)) and np.shape(stats["percentiles"]) == (1001, 8, 2)


def test_a_long_episode_is_decoded_window_by_window_into_the_same_cache(encoded, tmp_path, monkeypatch):
    """An episode whose frames would not fit in memory is decoded a group of windows at a time (here every episode,
    the budget set to 0), and large windows go through the encoder a few at a time (here one): the cache is the
    same, file for file."""
    monkeypatch.setattr(train, "EPISODE_DECODE_BYTES", 0)
    monkeypatch.setattr(train, "ENCODE_VALUES", 1)
    sizes, encode = [], mv.PixelEncoder.encode
    monkeypatch.setattr(mv.PixelEncoder, "encode", lambda self, x: sizes.append(len(x)) or encode(self, x))
    train.main([f"--data={encoded / 'data'}", f"--out_dir={tmp_path}", "--stage=encode", "--val_fraction=0.25",
                *SMALL])
    assert set(sizes) == {1}


def test_an_encoder_out_of_memory_takes_fewer_windows_at_a_time(encoded, tmp_path, monkeypatch):
    """A GPU too small for a group of windows in the video encoder: the group is split in halves, down to one
    window, and the cache is the same, file for file."""
    sizes, encode = [], mv.PixelEncoder.encode

    def small_memory(self, frames):
        sizes.append(len(frames))
        if len(frames) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return encode(self, frames)

    monkeypatch.setattr(mv.PixelEncoder, "encode", small_memory)
    train.main([f"--data={encoded / 'data'}", f"--out_dir={tmp_path}", "--stage=encode", "--val_fraction=0.25",
                *SMALL])
    assert max(sizes) > 2 and {1, 2} & set(sizes)  # tried whole, then in halves
    for f in sorted((encoded / "out" / "cache").glob("episode_*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "cache" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    files = sorted((encoded / "out" / "cache").glob("episode_*.safetensors"))
    for f in files:
        a, b = load_file(f), load_file(tmp_path / "cache" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    assert len(files) == 4


def test_encoding_resumes_and_refuses_other_settings(encoded, capsys, monkeypatch):
    out = encoded / "out"
    first = (out / "cache" / "episode_000000.safetensors").stat().st_mtime_ns
    (out / "cache" / "episode_000003.safetensors").unlink()  # as if interrupted before the last episode
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    assert (out / "cache" / "episode_000000.safetensors").stat().st_mtime_ns == first  # not encoded again
    assert (out / "cache" / "episode_000003.safetensors").exists()
    # a finished cache of these settings: a repeated or resumed run loads no encoder (T5-11B takes minutes)
    with monkeypatch.context() as m:
        m.setattr(train, "make_text_encoder", lambda *a, **k: pytest.fail("the text encoder was loaded"))
        train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    assert "already encoded for these settings" in capsys.readouterr().out
    monkeypatch.chdir(encoded)  # the same dataset by a relative path: the same cache
    train.main(["--data=data", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    assert "already encoded for these settings" in capsys.readouterr().out
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.5", *SMALL])
    assert len(json.loads((out / "cache" / "meta.json").read_text())["val"]) == 2  # another split: meta.json redone
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    with pytest.raises(SystemExit, match="was encoded from another dataset or with other settings"):
        train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", *SMALL, "--anchor_stride=2"])


def test_the_recipe_on_a_dataset_writes_a_policy_that_runs(encoded, capsys, monkeypatch):
    out = encoded / "out"
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=pretrain", "--pretrain_steps=2",
                "--ckpt_every=2", *SMALL])
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=1", "--stage1_steps=2", *SMALL])
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=2", "--stage2_steps=2", *SMALL])
    log = capsys.readouterr().out
    assert "stage2 step 2: validation loss" in log and "(1 held-out episodes)" in log
    assert "stage2: --stage2_warmup=100 is not shorter than its 2 steps: the learning rate peaks at 2% of" in log
    policy = mv.load_policy(out / "policy")
    assert policy.config.camera == "top" and policy.config.n_action_steps == 4 and policy.representation.state_dim == 3
    action = policy.select_action({"observation.images.top": torch.zeros(20, 30, 3, dtype=torch.uint8),
                                   "observation.state": torch.zeros(3), "task": "pick the cube"})
    assert action.shape == (2,) and torch.isfinite(action).all()
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=benchmark", *SMALL])
    assert "samples/s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"reads observation.images.top and 3-D states, and acts in 2-D; --env=toy "
                                         r"gives observation.images.top and 2-D states"):
        sample.main([f"--policy={out / 'policy'}", "--episodes=1"])  # not a toy-world policy: one line, no episode
    with pytest.raises(SystemExit, match=r"reads observation.images.top and 3-D states, and acts in 2-D; the toy "
                                         r"world \(--stage=eval\) gives observation.images.top and 2-D states"):
        train.main([f"--out_dir={out}", "--stage=eval", "--eval_episodes=1"])  # the same in train.py's evaluation
    with pytest.raises(SystemExit, match=r"and 3-D states, and acts in 2-D; --latency \(a toy-world observation\)"):
        sample.main([f"--latency={out / 'policy'}"])  # timed on a toy observation: one line, not a traceback
    capsys.readouterr()
    monkeypatch.chdir(encoded)  # a resume names the same dataset by a relative path: the same setting
    train.main(["--data=data", f"--out_dir={out}", "--stage=2", "--stage2_steps=2", "--resume=true", *SMALL])
    assert "stage2: complete at step 2, nothing to train" in capsys.readouterr().out
    (encoded / "other").mkdir(exist_ok=True)  # another folder is another dataset: refused, as any changed field
    with pytest.raises(SystemExit, match=r"changed data \(checkpoint '.*data', now 'other'\)"):
        train.main(["--data=other", f"--out_dir={out}", "--stage=2", "--stage2_steps=2", "--resume=true", *SMALL])


def test_a_camera_outside_observation_images_is_read_by_the_policy(tmp_path):
    """Some LeRobot datasets name their one camera "observation.image" (not observation.images.<name>): the policy
    trained on it reads that key."""
    train.write_lerobot_dataset(tmp_path / "d", episodes(), fps=FPS, camera="observation.image")
    train.main([f"--data={tmp_path / 'd'}", f"--out_dir={tmp_path / 'out'}", "--pretrain_steps=1", "--stage1_steps=1",
                "--stage2_steps=1", "--ckpt_every=1", *SMALL])
    policy = mv.load_policy(tmp_path / "out" / "policy")
    assert policy.config.camera == "observation.image"
    action = policy.select_action({"observation.image": torch.zeros(16, 16, 3, dtype=torch.uint8),
                                   "observation.state": torch.zeros(3), "task": "pick the cube"})
    assert action.shape == (2,) and torch.isfinite(action).all()


def test_the_policy_reads_the_state_under_the_datasets_state_key(tmp_path, capsys):
    """A dataset whose state is not observation.state (--state_key=observation.states.ee) trains a policy that reads
    that key; a later stage given another --state_key is refused (the cache holds the first key's states; left out,
    the cache's key is used)."""
    root = tmp_path / "d"
    train.write_lerobot_dataset(root, episodes(lengths=(9, 8)), fps=FPS)
    data = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    pq.write_table(table.rename_columns([c.replace("observation.state", "observation.states.ee")
                                         for c in table.column_names]), data)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.states.ee"] = info["features"].pop("observation.state")
    (root / "meta/info.json").write_text(json.dumps(info))
    run = [f"--data={root}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0", *SMALL]
    train.main([*run, "--state_key=observation.states.ee", "--pretrain_steps=1", "--stage1_steps=1",
                "--stage2_steps=1", "--ckpt_every=1"])
    policy = mv.load_policy(tmp_path / "out" / "policy")
    assert policy.config.state_key == "observation.states.ee"
    obs = {"observation.images.top": torch.zeros(16, 16, 3, dtype=torch.uint8), "task": "pick the cube"}
    assert policy.select_action({**obs, "observation.states.ee": torch.zeros(3)}).shape == (2,)
    policy.reset()
    with pytest.raises(KeyError, match="observation has no 'observation.states.ee'"):
        policy.select_action({**obs, "observation.state": torch.zeros(3)})
    with pytest.raises(SystemExit, match="encoded with other values of --state_key"):
        train.main([*run, "--stage=2", "--state_key=observation.states.joint", "--stage2_steps=1", "--overwrite=true"])
    plan = json.loads((tmp_path / "out" / "cache" / "plan.json").read_text())
    old = {k: v for k, v in plan.items() if k not in train.CACHE_KEYS}  # a cache from before plans named the keys
    assert train.same_plan(old, {**old, **train.CACHE_KEYS}) and not train.same_plan(old, plan)


def test_instructions_that_get_the_same_embedding_are_warned_of(tmp_path, capsys):
    """Two instructions the text encoder cannot tell apart (here: the same first word, one word kept) are named."""
    eps = episodes(lengths=(5, 5, 5))
    for ep, task in zip(eps, ("open the drawer", "open the door", "close the door")):
        ep["task"] = task
    train.write_lerobot_dataset(tmp_path / "d", eps, fps=FPS)
    train.main([f"--data={tmp_path / 'd'}", f"--out_dir={tmp_path / 'out'}", "--stage=encode", "--text_tokens=1",
                *SMALL])
    assert ("1 instruction(s) get the same embedding as another, e.g. 'open the drawer' and 'open the door': the "
            "policy cannot tell them apart (--text_encoder=hashed keeps 1 tokens)") in capsys.readouterr().err
    train.main([f"--data={tmp_path / 'd'}", f"--out_dir={tmp_path / 'out2'}", "--stage=encode", *SMALL])
    assert "same embedding" not in capsys.readouterr().err


def test_a_stage_refuses_options_its_cache_was_not_encoded_with(encoded):
    """The stages read the cache as it was encoded: an option given with another value would be ignored, silently."""
    args = [f"--data={encoded / 'data'}", f"--out_dir={encoded / 'out'}", "--stage=2", "--batch_size=8"]
    with pytest.raises(SystemExit, match=r"was encoded with other values of --image_size, --pixel_patch: the stages"):
        train.main([*args, "--image_size=24x24", "--pixel_patch=3"])
    with pytest.raises(SystemExit, match=r"other values of --val_fraction"):
        train.main([*args, "--val_fraction=0.5", *SMALL])


def test_the_comparisons_train_on_a_dataset(encoded, capsys):
    """--method=vla (image pretraining on the dataset's own frames, then end to end), scratch and joint write policy
    folders that run; --patience stops on the validation loss and keeps the best step."""
    (encoded / "cmp").mkdir(exist_ok=True)
    for method in ("vla", "scratch", "joint"):
        out = encoded / "cmp" / method
        shutil.copytree(encoded / "out" / "cache", out / "cache")
        args = [f"--data={encoded / 'data'}", f"--out_dir={out}", f"--method={method}", *SMALL]
        stages = train.stages_of(train.TrainConfig(data="x", method=method))
        assert stages == (("encode", "2") if method == "scratch" else ("encode", "pretrain", "2"))
        if "pretrain" in stages:
            train.main([*args, "--stage=pretrain", "--pretrain_steps=2"])
        assert (out / "pretrain" / "image.safetensors").exists() == (method == "vla")
        train.main([*args, "--stage=2", "--stage1_steps=1", "--stage2_steps=3", "--ckpt_every=1", "--patience=1",
                    "--stage2_lr=1e-2"])
        state = train.read_train_state(out / "stage2")
        assert state["best"] is not None and state["step"] - state["best"][0] <= 1
        policy = mv.load_policy(out / "policy")
        assert policy.method == method
        action = policy.select_action({"observation.images.top": torch.zeros(20, 30, 3, dtype=torch.uint8),
                                       "observation.state": torch.zeros(3), "task": "pick the cube"})
        assert action.shape == (2,) and torch.isfinite(action).all()
    assert "validation loss" in capsys.readouterr().out


def test_an_empty_episode_is_named(tmp_path):
    train.write_lerobot_dataset(tmp_path / "d", episodes(), fps=FPS, version="v2.1")
    path = tmp_path / "d" / "meta" / "episodes.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["length"] = 0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(train.DatasetError, match="episode 1 has length 0 in .*episodes.jsonl"):
        train.LeRobotDataset(tmp_path / "d")


def bad_startup_args(tmp_path):
    """Each mismatch that used to surface after the encode (or at the very end), and the line that now names it."""
    weights = tmp_path / "video.safetensors"
    weights.write_bytes(b"")  # never opened: the channel check comes first
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 48}))  # only the config is read
    return [
        (["--timing=libero"], r"action chunk at 20 Hz is not at the dataset's control rate \(10 fps\)"),
        (["--camera=wrist"], "no camera 'observation.images.wrist'"),
        (["--state_key=observation.effort"], "'observation.effort' is not a 1-D feature"),
        (["--action_key=observation.state.joints"], "'observation.state.joints' is not a 1-D feature"),
        (["--representation=libero"], "libero takes 8-D states and 7-D actions; .* has 3-D observation.state"),
        (["--n_action_steps=9"], "more than the 8 actions"),
        (["--image_size=20x20"], "multiples of 8"),
        (["--text_encoder=t5", f"--t5_source={t5}"], "gives 48-wide embeddings; --video_preset=toy reads 32"),
        (["--video_init=no/such/file.pt"], "no local file or folder; a Hub repo id needs --video_init_file"),
        (["--video_init=nobody/nothing", "--video_init_file=model.pt"], "could not get 'model.pt' from the Hub repo"),
        ([f"--video_init={weights}", "--video_init_file=model.pt"], "is a file: --video_init_file='model.pt' names"),
        ([f"--video_init={weights}", "--video_preset=cosmos-predict2-2b", "--stage=1"],
         "3-channel latents; .* reads 16"),
        (["--patience=5"], r"--val_fraction=0.1 of 2 episode\(s\) holds out none"),
    ]


def test_mismatches_are_refused_at_startup(tmp_path, monkeypatch):
    """Every mismatch stops the run before any encoder, model or video is loaded, in one line naming the value."""
    pytest.importorskip("transformers", reason="optional: pip install transformers")
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)

    def reached(*a, **k):
        raise AssertionError("work started before the mismatch was found")

    for name in ("make_video_encoder", "make_text_encoder", "setup"):
        monkeypatch.setattr(train, name, reached)
    for args, message in bad_startup_args(tmp_path):
        with pytest.raises(SystemExit, match="^error: .*" + message):
            train.main([f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL, *args])
    assert not (tmp_path / "out").exists()


def test_the_validation_split_leaves_an_episode_to_train_on():
    split = lambda fraction, n: train.validation_split(train.TrainConfig(val_fraction=fraction), n)  # noqa: E731
    assert split(0.9, 2) == [1] or split(0.9, 2) == [0]  # round(1.8) = 2 would leave no training episode
    assert split(0.5, 1) == [] and len(split(0.1, 40)) == 4 and split(0.0, 5) == []


def test_patience_on_a_cache_without_validation_episodes_is_refused_before_training(tmp_path):
    """--patience stops on the validation loss: a cache encoded without held-out episodes (2 episodes, 10%) cannot
    give one. Said before the first step, not at the first checkpoint."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)
    args = [f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL]
    train.main([*args, "--stage=encode"])
    with pytest.raises(SystemExit, match="--patience stops on the validation loss, and .* holds out no validation"):
        train.main([*args, "--stage=2", "--method=scratch", "--patience=5"])
    assert not (tmp_path / "out" / "stage2").exists()


def test_a_missing_encoder_package_is_named_at_startup(tmp_path, monkeypatch):
    """--video_encoder=wan without diffusers (or t5 without transformers): the install line, before any work."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)

    def import_module(name, *a, _import=mv.importlib.import_module):
        if name in ("diffusers", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return _import(name, *a)

    monkeypatch.setattr(mv.importlib, "import_module", import_module)
    monkeypatch.setattr(train, "setup", lambda *a: pytest.fail("work started"))
    for args, package in ((["--video_encoder=wan", "--video_preset=cosmos-predict2-2b"], "diffusers"),
                          (["--text_encoder=t5"], "transformers")):
        with pytest.raises(SystemExit, match=f"^error: {package} is not installed; .*pip install {package}"):
            train.main([f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL, *args])


def test_a_cache_that_would_not_fit_on_the_disk_is_refused_at_startup(tmp_path, monkeypatch):
    """The encode's latents are counted before it starts: 15 windows of 3 x 5 x 8 x 8 float32 latents (3,840 bytes
    each) do not fit in 40 KB."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage._replace(free=40_000))
    monkeypatch.setattr(train, "setup", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit, match=r"the cache of 15 windows needs about 0.0 GiB of latents \(0.00 MiB a "
                                         r"window\) and 0.0 GiB are free .*--anchor_stride=k"):
        train.main([f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL])
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage._replace(free=60_000))
    with pytest.raises(pytest.fail.Exception, match="work started"):  # 57,600 bytes fit: the run goes on
        train.main([f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL])


def test_tokens_wider_than_the_video_dit_are_warned_of(tmp_path, capsys):
    """The pixel encoder's latents times the video DiT's patch must fit through its width (the velocity it predicts
    carries the noise it was given): 32 x 32 frames space-to-depth by 4 make 768-number tokens for the 64-wide toy
    DiT, whose video loss then stays near 1; the default (each patch's average colour) makes 48."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)
    for args, warned in ((["--pixel_keep=0"], "tokens carry 768 numbers into a 64-wide"), ([], None),
                         (["--pixel_coords=true"], "tokens carry 80 numbers")):
        cfg = mv.parse_config([f"--data={tmp_path / 'data'}", "--image_size=32x32", "--pixel_patch=4", *args],
                              train.TrainConfig)
        train.check_dataset(cfg, ("encode",))
        err = capsys.readouterr().err
        assert (warned in err) if warned else "warning" not in err, (args, err)


def test_a_broken_dataset_stops_train_py_in_one_line(tmp_path):
    """A user's file that breaks mid-run (here a truncated video, found while encoding): one line, exit code 1."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)
    video = tmp_path / "data/videos/observation.images.top/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[:300])
    res = subprocess.run([sys.executable, "train.py", f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                          "--stage=encode", *SMALL], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: episode 0: ")
    # an optional package missing where it is first needed (here PyAV, for --stage=export): its install line
    no_av = ("import builtins, runpy, sys; real = builtins.__import__\n"
             "def imp(name, *a, **k):\n"
             "    if name.split('.')[0] == 'av': raise ImportError('No module named av')\n"
             "    return real(name, *a, **k)\n"
             f"builtins.__import__ = imp; sys.argv = ['train.py', '--stage=export', '--out_dir={tmp_path / 'exp'}']\n"
             "runpy.run_path('train.py', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", no_av], cwd=ROOT, capture_output=True, text=True)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last == "error: av is not installed; it is needed here: pip install av", last


def test_the_encode_is_shared_by_the_ranks(tmp_path):
    """torchrun with 2 gloo ranks: each rank encodes its own episodes, and the cache equals a 1-process encode."""
    train.write_lerobot_dataset(tmp_path / "data", episodes(lengths=(9, 6, 7, 8, 5)), fps=FPS)
    args = [f"--data={tmp_path / 'data'}", "--stage=encode", "--val_fraction=0.2", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path / 'single'}", *args], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py",
                          f"--out_dir={tmp_path / 'ddp'}", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rank 0 encoded 3 episodes" in res.stdout and "rank 1 encoded 2 episodes" in res.stdout
    a, b = tmp_path / "single" / "cache", tmp_path / "ddp" / "cache"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    meta_a, meta_b = (json.loads((c / "meta.json").read_text()) for c in (a, b))
    assert meta_a | {"plan": 0} == meta_b | {"plan": 0}
    for f in a.glob("*.safetensors"):
        x, y = load_file(f), load_file(b / f.name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name


def test_the_encoders_run_in_the_requested_dtype_and_are_gone_before_training(tmp_path, monkeypatch):
    """A tiny T5 as --t5_source: loaded in the run's dtype (bf16 here, as on CUDA), its spec the one the plan
    promised, and no encoder alive when the first training stage starts."""
    model, tokenizer = tiny_t5(d_model=32)  # the toy video preset reads 32-wide embeddings
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    train.write_lerobot_dataset(tmp_path / "data", episodes(), fps=FPS)
    alive = []
    monkeypatch.setattr(train, "encoder_dtype", lambda device: torch.bfloat16)
    for name in ("make_video_encoder", "make_text_encoder"):
        def make(*a, _make=getattr(train, name), **k):
            enc = _make(*a, **k)
            alive.append(weakref.ref(enc))
            if isinstance(enc, mv.T5TextEncoder):
                assert next(enc.model.parameters()).dtype == torch.bfloat16 and a[2] == torch.bfloat16
            return enc
        monkeypatch.setattr(train, name, make)

    class Started(Exception):
        pass

    def train_stage(*a, **k):
        gc.collect()
        assert len(alive) == 2 and all(ref() is None for ref in alive), "an encoder is still referenced"
        raise Started

    monkeypatch.setattr(train, "train_stage", train_stage)
    with pytest.raises(Started):
        train.main([f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *SMALL, "--text_encoder=t5",
                    f"--t5_source={tmp_path / 't5'}"])
    meta = json.loads((tmp_path / "out" / "cache" / "meta.json").read_text())
    assert meta["plan"]["text_encoder"] == mv.load_text_encoder(tmp_path / "t5").spec
    assert load_file(tmp_path / "out" / "cache" / "text.safetensors")["embeddings"].shape == (2, 512, 32)


def test_the_video_encoder_is_built_on_the_run_device():
    """On a GPU the encode runs there: the pixel encoder's DCT basis goes with it (it once stayed on the CPU, and a
    GPU run's first encoded batch failed on mixed devices). The meta device stands in for cuda."""
    cfg = train.TrainConfig(data="d", pixel_patch=4, pixel_keep=1)
    assert train.make_video_encoder(cfg, torch.device("meta")).basis.device.type == "meta"


def test_the_toy_world_round_trip_is_the_same_data(tmp_path):
    """Exported as LeRobot v3.0 and encoded back, a toy demonstration gives the windows the built-in path trains on."""
    world = mv.ToyWorldConfig()
    train.main([f"--out_dir={tmp_path / 'export'}", "--stage=export", "--num_demos=6", "--num_pretrain=2"])
    train.main([f"--data={tmp_path / 'export' / 'demos'}", f"--out_dir={tmp_path / 'out'}", "--stage=encode",
                "--image_size=8x8", "--pixel_patch=1", "--pixel_coords=true", "--val_fraction=0", "--batch_size=8",
                "--text_tokens=6"])
    data = train.CachedData(tmp_path / "out" / "cache", "all")
    demos = mv.make_toy_demos(6, 0, world)
    lengths = mv.toy_demo_lengths(demos)
    assert [e["anchors"] for e in data.meta["episodes"]] == lengths.tolist()  # each episode up to its arrival
    toy = train.ToyData(demos, world, (mv.PixelEncoder(1), mv.HashedWordEncoder(32, 6)),
                        mv.Representation("identity", 2, 2))
    for e in range(6):
        for t in range(lengths[e]):
            raw = mv.toy_batch(demos, np.array([e]), np.array([t]), world)
            built_in = toy.encoders[0].encode(torch.cat([raw["context"], raw["future"]], dim=2))[0]
            w = data.windows(np.array([sum(lengths[:e]) + t]))
            assert torch.allclose(w["latents"][0], built_in, atol=2.5 / 255 * 2), (e, t)  # the codec's rounding only
            assert torch.allclose(w["actions"][0], raw["actions"][0], atol=1e-6) and torch.allclose(w["state"][0],
                                                                                                    raw["state"][0])
            assert torch.equal(w["text"][0], toy.encoders[1](raw["task"])[0])


def dataset_model(cache, args=()):
    cfg = mv.parse_config([f"--data={cache}", *SMALL, *args], train.TrainConfig)
    data = train.CachedData(cache, "all")
    rep = mv.Representation.from_config(data.meta["plan"]["representation"])
    video_cfg, decoder_cfg, model_cfg = train.dataset_models(cfg, data, rep)
    model = mv.VideoActionModel(mv.VideoDiT(video_cfg), mv.ActionDecoder(decoder_cfg), model_cfg,
                                *rep.normalizers(data.stats()))
    return cfg, model


def test_validation_is_split_across_ranks(encoded, monkeypatch):
    """Each rank computes the loss of its own slice of the validation windows; the all-reduced sum is the loss of
    one process (here the all-reduce is the sum of the ranks' returns)."""
    from contextlib import nullcontext

    cache = encoded / "out" / "cache"
    cfg, model = dataset_model(cache, ["--batch_size=7"])
    val = train.CachedData(cache, "val")
    monkeypatch.setattr(train.dist, "all_reduce", lambda t: None)
    cpu = torch.device("cpu")
    for loss in ("action", "video"):
        single = train.validation_loss(model, val, loss, cfg, (0, 1, cpu, nullcontext()))
        for world in (2, 3):  # 7 windows: uneven slices
            parts = [train.validation_loss(model, val, loss, cfg, (r, world, cpu, nullcontext())) for r in range(world)]
            assert sum(parts) == pytest.approx(single, rel=1e-5), (loss, world)
        cfg.grad_accum = 3  # in micro-batches of 2 (training's), not all 7 windows at once
        calls, forward = [], model.forward
        model.forward = lambda *a, **k: calls.append(len(k["noise"]["sigma"])) or forward(*a, **k)
        one = train.validation_loss(model, val, loss, cfg, (0, 1, cpu, nullcontext()))
        assert one == pytest.approx(single, rel=1e-5)
        del model.forward
        cfg.grad_accum = 1
        assert calls == [2, 2, 2, 1] * 4, calls


def test_bf16_weights_train_with_fp32_master_weights(encoded, tmp_path, monkeypatch):
    """A bf16 backbone file (as the released Cosmos checkpoint) under bf16 autocast: the frozen weights stay bf16,
    what trains (LoRA, adaLN) and its AdamW state are fp32."""
    out = tmp_path / "out"
    shutil.copytree(encoded / "out" / "cache", out / "cache")
    _, model = dataset_model(out / "cache")
    mv.save_video_dit_checkpoint(model.video.to(torch.bfloat16), tmp_path / "bf16.safetensors")
    monkeypatch.setattr(train, "setup",
                        lambda cfg: (0, 1, torch.device("cpu"), torch.autocast("cpu", dtype=torch.bfloat16)))
    trained = []
    train_stage = train.train_stage
    monkeypatch.setattr(train, "train_stage", lambda name, stage, model, *a, **k: trained.append(model) or
                        train_stage(name, stage, model, *a, **k))
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=1",
                f"--video_init={tmp_path / 'bf16.safetensors'}",
                "--stage1_steps=2", *SMALL])
    video = trained[0].video
    dtypes = {(p.requires_grad, p.dtype) for p in video.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    state = torch.load(out / "stage1" / "checkpoint" / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert {v["exp_avg"].dtype for v in state.values()} == {torch.float32}


def test_the_push_world_expert_and_its_export(tmp_path):
    """The second world (tests/push_world.py): its expert pushes the named block onto the mark on held-out seeds, a
    pusher that stays moves nothing, and its export reads back as a LeRobot dataset at 15 fps with the front camera,
    the pusher's state and the expert's actions, each episode ending when it stops."""
    sys.path.insert(0, str(ROOT / "tests"))
    import push_world as pw

    seeds = [pw.TEST_SEEDS + i for i in range(40)]
    success, progress = pw.rollout(pw.Expert(), seeds)
    assert success.mean() >= 0.95 and progress.mean() > 0.8

    class Still(mv.ChunkedPolicy):
        n_action_steps = 1

        def query(self, obs):
            return torch.zeros(len(obs["task"]), 1, 2)

    success, progress = pw.rollout(Still(), seeds)
    assert success.mean() == 0 and np.all(progress == 0)  # the mark starts away from both blocks, which stay
    pw.main(["export", str(tmp_path), "--demos=3", "--videos=2"])
    ds = train.LeRobotDataset(tmp_path / "demos")
    assert (len(ds), ds.fps, ds.camera, ds.state_dim, ds.action_dim) == (3, 15, "observation.images.front", 2, 2)
    eps = pw.episodes(list(range(3)))
    for n, ep in enumerate(eps):
        low = ds.lowdim(n)
        assert np.allclose(low["state"], ep["state"]) and np.allclose(low["action"], ep["action"])
        assert low["task"] == ep["task"] and np.all(ep["action"][-1] == 0) and not np.all(ep["action"][-2] == 0)
        got = ds.frames(n, [0, len(ep["frames"]) - 1])
        assert got.shape == (2, 64, 64, 3) and np.abs(got.astype(int) - ep["frames"][[0, -1]]).max() <= 3
    assert len(train.LeRobotDataset(tmp_path / "videos")) == 2

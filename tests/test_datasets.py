"""LeRobot datasets (v3.0 and v2.1, written here with pyarrow + PyAV): frame lookup, timing at the edges,
interpolation, statistics, the encode-once cache, clear errors, and the toy world's round trip through the format."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow", reason="optional: pip install pyarrow")
pytest.importorskip("av", reason="optional: pip install av")
import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mimic_video as mv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
        out.append({"frames": frames, "state": state, "action": action, "task": ["pick the cube", "open the drawer"][e % 2]})
    return out


@pytest.fixture(scope="module", params=["v3.0", "v2.1"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "data"
    mv.write_lerobot_dataset(root, episodes(), fps=FPS, camera="observation.images.front", version=request.param)
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


def test_frames_lowdim_and_task(dataset):
    ds = mv.LeRobotDataset(dataset)  # the only camera is chosen
    assert (len(ds), ds.fps, ds.camera, ds.state_dim, ds.action_dim) == (2, FPS, "observation.images.front", 3, 2)
    for e, n in enumerate((9, 6)):
        got = ds.frames(e, [n - 1, 0, 3])
        assert got.shape == (3, 16, 16, 3)
        for img, k in zip(got, (n - 1, 0, 3)):
            assert np.abs(img.astype(int) - colour(e, k)).max() <= 3, (e, k)  # the right frame, not a neighbour
        low = ds.lowdim(e)
        assert np.allclose(low["timestamp"], np.arange(n) / FPS) and low["state"].shape == (n, 3)
        assert low["task"] == ["pick the cube", "open the drawer"][e]
    assert mv.LeRobotDataset(dataset, camera="front").camera == "observation.images.front"


def test_av1_video_of_the_v3_format(tmp_path):
    mv.write_lerobot_dataset(tmp_path / "d", episodes(size=64), fps=FPS, codec="libsvtav1")
    ds = mv.LeRobotDataset(tmp_path / "d")
    img = ds.frames(1, [4])[0]
    assert np.abs(img.astype(int) - colour(1, 4)).max() <= 6  # AV1, yuv420p, crf 30: flat colours survive


def test_window_timing_at_the_edges_and_interpolation(dataset):
    ds = mv.LeRobotDataset(dataset)
    low = ds.lowdim(0)
    timing = mv.WindowTiming(context_frames=3, context_hz=5.0, future_frames=4, future_hz=5.0, future_offset=0.2,
                             chunk=6, chunk_hz=10.0)
    ctx, fut = ds.window_indices(low["timestamp"], 0.1, timing)
    assert ctx.tolist() == [0, 0, 1] and fut.tolist() == [3, 5, 7, 8]  # before 0: frame 0; past the end: the last
    ctx, fut = ds.window_indices(low["timestamp"], 0.8, timing)
    assert ctx.tolist() == [4, 6, 8] and fut.tolist() == [8, 8, 8, 8]
    acts = mv.interpolate_lowdim(low["timestamp"], low["action"], timing.action_times(0.55))
    assert np.allclose(acts[:, 0], [5.5, 6.5, 7.5, 8, 8, 8])  # linear between frames, the last value repeated
    # slerp: halfway between two rotations about z is the half angle
    times, rot = np.array([0.0, 1.0]), np.array([[0, 0, 0.2], [0, 0, 1.0]])
    assert np.allclose(mv.interpolate_lowdim(times, rot, [0.5], rotvec_dims=(0,)), [[0, 0, 0.6]])
    big = np.array([[0, 0, 3.0], [0, 0, -3.0]])  # across pi: the short way round, not through zero
    mid = mv.interpolate_lowdim(times, big, [0.5], rotvec_dims=(0,))[0]
    assert np.isclose(abs(mid[2]), np.pi, atol=1e-6)


def test_errors_name_the_file_and_the_episode(tmp_path):
    root = tmp_path / "d"
    mv.write_lerobot_dataset(root, episodes(), fps=FPS)
    with pytest.raises(mv.DatasetError, match="no camera 'observation.images.wrist'; it has"):
        mv.LeRobotDataset(root, camera="wrist")
    with pytest.raises(mv.DatasetError, match="'observation.effort' is not a 1-D feature"):
        mv.LeRobotDataset(root, state_key="observation.effort")
    video = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 3])  # truncated: episode 1's frames are gone
    with pytest.raises(mv.DatasetError, match=r"episode 1: (cannot decode .*file-000.mp4|.*file-000.mp4 has no frame)"):
        mv.LeRobotDataset(root).frames(1, [5])
    video.unlink()
    with pytest.raises(mv.DatasetError, match="episode 0: its video .*file-000.mp4 does not exist"):
        mv.LeRobotDataset(root).frames(0, [0])
    table = pq.read_table(root / "data/chunk-000/file-000.parquet")
    pq.write_table(table.slice(0, 12), root / "data/chunk-000/file-000.parquet")  # episode 1 loses 3 rows
    with pytest.raises(mv.DatasetError, match=r"episode 1: .*file-000.parquet holds 3 rows of it, its length is 6"):
        mv.LeRobotDataset(root).lowdim(1)
    (root / "meta/info.json").unlink()
    with pytest.raises(mv.DatasetError, match="is not a LeRobot dataset"):
        mv.LeRobotDataset(root)
    with pytest.raises(FileNotFoundError, match="could not get the dataset 'nobody/nothing' from the Hub"):
        mv.LeRobotDataset("nobody/nothing")


def test_nan_in_the_data_is_named(tmp_path):
    eps = episodes()
    eps[1]["state"][2, 1] = np.nan
    mv.write_lerobot_dataset(tmp_path / "d", eps, fps=FPS)
    with pytest.raises(mv.DatasetError, match="episode 1: observation.state in .* has NaN"):
        mv.LeRobotDataset(tmp_path / "d").lowdim(1)


# ------------------------------ encode once, then train from the cache ------------------------------

SMALL = ["--batch_size=8", "--log_every=1", "--image_size=16x16", "--pixel_patch=2", "--timing=small"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    base = tmp_path_factory.mktemp("enc")
    mv.write_lerobot_dataset(base / "data", episodes(lengths=(9, 6, 7, 8)), fps=FPS)
    train.main([f"--data={base / 'data'}", f"--out_dir={base / 'out'}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    return base


def test_the_cache_holds_every_window_and_the_statistics(encoded):
    cache = encoded / "out" / "cache"
    meta = json.loads((cache / "meta.json").read_text())
    assert [e["anchors"] for e in meta["episodes"]] == [9, 6, 7, 8] and len(meta["val"]) == 1
    assert meta["texts"] == ["pick the cube", "open the drawer"]
    data = train.CachedData(cache, "all")
    (C, T, h, w), (H, d_a) = data.shapes()
    assert (C, T, h, w, H, d_a) == (3 * 4 + 2, 1 + 4, 8, 8, 8, 2)  # 1 context + 4 future frames; 8 actions
    ep = mv.LeRobotDataset(encoded / "data")
    low = ep.lowdim(2)
    w2 = data.windows(np.nonzero(data.index[:, 0] == 2)[0][:1])  # episode 2's first window (anchor t = 0)
    timing = mv.timing_preset("small", FPS)
    expect = mv.interpolate_lowdim(low["timestamp"], low["action"], timing.action_times(0.0))
    assert torch.allclose(w2["actions"][0], torch.from_numpy(expect).float())
    frames = mv.images_to_frames(torch.from_numpy(ep.frames(2, [0, 2, 4, 6, 6])))  # future frames past the end repeat
    rgb = w2["latents"][0, 0:12:4, :, 0, 0]  # channels (c, p, q): R, G, B of the top-left pixel of each latent
    assert torch.allclose(rgb, frames[:, :, 0, 0].T, atol=6 / 255)
    # the statistics are the training split's, per chunk step, in the released layout
    train_eps = [i for i in meta["train"]]
    chunks = np.concatenate([load_file(cache / meta["episodes"][i]["file"])["actions"].numpy() for i in train_eps])
    stats = meta["stats"]["action/action_lowdim"]
    assert np.allclose(stats["mean"], chunks.mean(0)) and np.shape(stats["percentiles"]) == (1001, 8, 2)


def test_encoding_resumes_and_refuses_other_settings(encoded, capsys):
    out = encoded / "out"
    first = (out / "cache" / "episode_000000.safetensors").stat().st_mtime_ns
    (out / "cache" / "episode_000003.safetensors").unlink()  # as if interrupted before the last episode
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", "--val_fraction=0.25", *SMALL])
    assert (out / "cache" / "episode_000000.safetensors").stat().st_mtime_ns == first  # not encoded again
    assert (out / "cache" / "episode_000003.safetensors").exists()
    with pytest.raises(SystemExit, match="was encoded from another dataset or with other settings"):
        train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=encode", *SMALL[:-1], "--timing=libero"])


def test_the_recipe_on_a_dataset_writes_a_policy_that_runs(encoded, capsys):
    out = encoded / "out"
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=pretrain", "--pretrain_steps=2", "--ckpt_every=2", *SMALL])
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=1", "--stage1_steps=2", *SMALL])
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=2", "--stage2_steps=2", *SMALL])
    log = capsys.readouterr().out
    assert "stage2 step 2: validation loss" in log and "(1 held-out episodes)" in log
    policy = mv.load_policy(out / "policy")
    assert policy.config.camera == "top" and policy.config.n_action_steps == 4 and policy.representation.state_dim == 3
    action = policy.select_action({"observation.images.top": torch.zeros(20, 30, 3, dtype=torch.uint8),
                                   "observation.state": torch.zeros(3), "task": "pick the cube"})
    assert action.shape == (2,) and torch.isfinite(action).all()
    train.main([f"--data={encoded / 'data'}", f"--out_dir={out}", "--stage=benchmark", *SMALL])
    assert "samples/s" in capsys.readouterr().out


def test_the_toy_world_round_trip_is_the_same_data(tmp_path):
    """Exported as LeRobot v3.0 and encoded back, a toy demonstration gives the windows the built-in path trains on."""
    world = mv.ToyWorldConfig()
    train.main([f"--out_dir={tmp_path / 'export'}", "--stage=export", "--num_demos=6", "--num_pretrain=2"])
    train.main([f"--data={tmp_path / 'export' / 'demos'}", f"--out_dir={tmp_path / 'out'}", "--stage=encode",
                "--image_size=8x8", "--pixel_patch=1", "--val_fraction=0", "--batch_size=8", "--text_tokens=6"])
    data = train.CachedData(tmp_path / "out" / "cache", "all")
    demos = mv.make_toy_demos(6, 0, world)
    lengths = mv.toy_demo_lengths(demos)
    assert [e["anchors"] for e in data.meta["episodes"]] == lengths.tolist()  # each episode up to its arrival
    toy = train.ToyData(demos, world, (mv.PixelEncoder(1), mv.HashedWordEncoder(32, 6)), mv.Representation("identity", 2, 2))
    for e in range(6):
        for t in range(lengths[e]):
            raw = mv.toy_batch(demos, np.array([e]), np.array([t]), world)
            built_in = toy.encoders[0].encode(torch.cat([raw["context"], raw["future"]], dim=2))[0]
            w = data.windows(np.array([sum(lengths[:e]) + t]))
            assert torch.allclose(w["latents"][0], built_in, atol=2.5 / 255 * 2), (e, t)  # the codec's rounding only
            assert torch.allclose(w["actions"][0], raw["actions"][0], atol=1e-6) and torch.allclose(w["state"][0], raw["state"][0])
            assert torch.equal(w["text"][0], toy.encoders[1](raw["task"])[0])

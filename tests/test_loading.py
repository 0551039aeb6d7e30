"""Checkpoint loading: official .pt / safetensors / diffusers layouts, local and through the Hub cache, strict
errors."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, fixture
from safetensors.torch import save_file

import mimic_video as mv


@pytest.fixture(scope="module")
def official_sd():
    return torch.load(FIXTURES / "video_dit_weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def io():
    return fixture("video_dit_io.safetensors")


def velocity(model, io):
    with torch.no_grad():
        return model(io["x"], io["timesteps"], io["crossattn_emb"], io["condition_mask"])


@pytest.mark.parametrize("extra_state", ["uint8 tensor", "BytesIO"])
def test_drops_rope_buffers_counters_and_te_extra_state(official_sd, io, tmp_path, extra_state):
    """Transformer Engine writes `*._extra_state` as a 1-D uint8 tensor or (some versions) a pickled io.BytesIO, which
    a plain weights-only torch.load refuses: both load, with weights_only kept, as the same weights as without them."""
    import io as pyio

    sd = dict(official_sd)
    for i in range(3):
        value = torch.zeros(7, dtype=torch.uint8) if extra_state == "uint8 tensor" else pyio.BytesIO(b"\x00" * 7)
        sd[f"net.blocks.{i}.cross_attn.attn_op._extra_state"] = value
    assert "net.pos_embedder.seq" in sd and "net.accum_iteration" in sd
    torch.save(sd, tmp_path / "model.pt")
    if extra_state == "BytesIO":
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(tmp_path / "model.pt", weights_only=True)  # the file really holds what a plain load refuses
    model = mv.load_video_dit(tmp_path / "model.pt", filename=None, config="tiny")
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)


def test_regular_weights_are_loaded_beside_ema_weights(official_sd, io, tmp_path):
    """A file with `net_ema.` beside `net.` loads `net.` (the official default); a file with only EMA weights, those."""
    ema = {"net_ema." + k.removeprefix("net."): torch.zeros_like(v) if v.is_floating_point() else v
           for k, v in official_sd.items()}
    torch.save({**official_sd, **ema}, tmp_path / "both.pt")
    model = mv.load_video_dit(tmp_path / "both.pt", filename=None, config="tiny")
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)
    torch.save({"net_ema." + k.removeprefix("net."): v for k, v in official_sd.items()}, tmp_path / "ema.pt")
    model = mv.load_video_dit(tmp_path / "ema.pt", filename=None, config="tiny")
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)


def test_bf16_checkpoint_like_the_released_files(official_sd, tmp_path):
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in official_sd.items()}, tmp_path / "bf16.pt")
    model = mv.load_video_dit(tmp_path / "bf16.pt", filename=None, config="tiny")
    assert model.t_embedding_norm.weight.dtype == torch.bfloat16
    assert mv.load_video_dit(tmp_path / "bf16.pt", filename=None, config="tiny",
                             dtype=torch.float32).t_embedding_norm.weight.dtype == torch.float32


def test_diffusers_layout_sharded(official_sd, io, tmp_path):
    sd = mv.official_keys(official_sd)
    diff = {mv.to_diffusers_key(k): v for k, v in sd.items()}
    assert "transformer_blocks.0.attn1.to_out.0.weight" in diff and "patch_embed.proj.weight" in diff
    assert "time_embed.t_embedder.linear_1.weight" in diff and "norm_out.linear_2.weight" in diff
    assert "transformer_blocks.2.ff.net.0.proj.weight" in diff and "transformer_blocks.1.norm3.linear_2.weight" in diff
    folder = tmp_path / "repo" / "transformer"
    folder.mkdir(parents=True)
    keys = sorted(diff)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    for name, part in zip(names, halves):
        save_file({k: diff[k] for k in part}, folder / name)
    # what diffusers writes beside them
    index = {"weight_map": {k: name for name, part in zip(names, halves) for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = mv.load_video_dit(tmp_path / "repo", filename=None, config="tiny")
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)
    model = mv.load_video_dit(tmp_path / "repo", config="tiny")  # the default filename is not there: the folder is read
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)


def test_missing_key_is_named(official_sd, tmp_path):
    sd = {k: v for k, v in official_sd.items() if k != "net.blocks.1.mlp.layer2.weight"}
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(mv.CheckpointMismatchError, match=r"missing keys \(1\):\s+blocks.1.mlp.layer2.weight"):
        mv.load_video_dit(tmp_path / "m.pt", filename=None, config="tiny")


def test_unexpected_key_is_named(official_sd, tmp_path):
    sd = dict(official_sd, **{"net.blocks.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})
    save_file(sd, tmp_path / "u.safetensors")
    with pytest.raises(mv.CheckpointMismatchError,
                       match=r"unexpected keys \(1\):\s+blocks.0.self_attn.q_proj.lora_A.weight"):
        mv.load_video_dit(tmp_path / "u.safetensors", filename=None, config="tiny")


def test_wrong_shape_is_named(official_sd, tmp_path):
    sd = dict(official_sd, **{"net.x_embedder.proj.1.weight": torch.zeros(64, 68)})  # 17 input channels, say
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(mv.CheckpointMismatchError,
                       match=r"mis-shaped keys \(1\):\s+x_embedder.proj.1.weight: checkpoint \(64, 68\) vs "
                             r"model \(64, 72\)"):
        mv.load_video_dit(tmp_path / "w.pt", filename=None, config="tiny")


def test_long_mismatch_lists_are_capped(official_sd, tmp_path):
    torch.save(official_sd, tmp_path / "w.pt")
    with pytest.raises(mv.CheckpointMismatchError, match=r"mis-shaped keys \(67\):(.|\n)*and 47 more"):
        mv.load_video_dit(tmp_path / "w.pt", filename=None,
                          config=mv.replace(mv.VIDEO_DIT_PRESETS["tiny"], model_channels=32))


def test_missing_local_file():
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        mv.load_video_dit("no/such/dir/model.pt", filename=None, config="tiny")


def test_hub_offline_without_cache_says_how_to_get_the_file(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"hf download nvidia/Cosmos-Predict2-2B-Video2World model-480p-10fps.pt"):
        mv.load_video_dit(cache_dir=tmp_path, config="tiny")


def test_hub_repo_id_through_the_cache(tmp_path, io):
    """A file already in the huggingface_hub cache (what `hf download` leaves) loads by repo id, offline."""
    commit = "f50c09f5d8ab133a90cac3f4886a6471e9ba3f18"
    repo = tmp_path / "models--nvidia--Cosmos-Predict2-2B-Video2World"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(FIXTURES / "video_dit_weights.pt", repo / "snapshots" / commit / "model-480p-16fps.pt")
    model = mv.load_video_dit("nvidia/Cosmos-Predict2-2B-Video2World", "model-480p-16fps.pt", config="tiny",
                              cache_dir=tmp_path)
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)
    model = mv.load_video_dit("nvidia/Cosmos-Predict2-2B-Video2World", "model-480p-16fps.pt", config="tiny",
                              cache_dir=tmp_path, revision=commit)
    torch.testing.assert_close(velocity(model, io), io["velocity"], atol=1e-5, rtol=0)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def failing_write(p):
        with open(p, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mv.atomic_write(target, failing_write)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]

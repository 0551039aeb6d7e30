"""Encoders: the Wan2.1 VAE (diffusers), T5 (transformers), and the offline stand-ins (pixels, hashed words)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_t5, tiny_wan_vae

import mimic_video as mv


def frames(B, T, H, W, seed=0):
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------ Wan2.1 VAE ------------------------------


@pytest.fixture(scope="module")
def vae():
    return mv.WanVAE(tiny_wan_vae())


def test_vae_shapes_and_refused_frame_counts(vae):
    assert vae.encode(frames(2, 5, 32, 48)).shape == (2, 16, 2, 4, 6)  # 1 + 4k frames -> 1 + k latents, space / 8
    assert vae.encode(frames(1, 1, 16, 16)).shape == (1, 16, 1, 2, 2)
    assert vae.encode(frames(1, 9, 16, 16)).shape == (1, 16, 3, 2, 2)
    for T in (2, 4, 6):
        with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
            vae.encode(frames(1, T, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(frames(1, 5, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    assert vae.decode(vae.encode(frames(1, 5, 16, 16))).shape == (1, 3, 5, 16, 16)


def test_vae_is_the_normalized_posterior_mode(vae):
    x = frames(1, 5, 16, 16, seed=1)
    with torch.no_grad():
        posterior = vae.vae.encode(x).latent_dist
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert mean[0, 0].item() == pytest.approx(-0.7571) and std[0, 0].item() == pytest.approx(2.8184)  # the Wan2.1 stats
    expected = (posterior.mode() - mean) / std  # by hand: the mode (the mean of the Gaussian), then per channel
    torch.testing.assert_close(vae.encode(x), expected)
    assert torch.equal(posterior.mode(), posterior.mean)
    assert not torch.allclose(posterior.sample(), posterior.mode())  # a sample would be something else


def test_vae_is_causal_in_time(vae):
    clip = frames(1, 9, 16, 16, seed=2)
    torch.testing.assert_close(vae.encode(clip[:, :, :5]), vae.encode(clip)[:, :, :2], atol=1e-5, rtol=1e-5)


def test_load_vae_from_a_diffusers_folder(tmp_path, vae):
    vae.vae.save_pretrained(tmp_path / "repo" / "vae")
    x = frames(1, 5, 16, 16, seed=3)
    for source, subfolder in ((tmp_path / "repo", "vae"), (tmp_path / "repo" / "vae", "vae")):
        loaded = mv.load_vae(source, subfolder)
        torch.testing.assert_close(loaded.encode(x), vae.encode(x))
    assert mv.build_video_encoder(loaded.spec).encode(x).shape == (1, 16, 2, 2, 2)  # the spec rebuilds it
    with pytest.raises(FileNotFoundError, match="could not load the Wan VAE"):
        mv.load_vae(tmp_path / "empty_folder_that_does_not_exist_here", None)


# ------------------------------ T5 ------------------------------


@pytest.fixture(scope="module")
def t5():
    return mv.T5TextEncoder(*tiny_t5(), max_length=12)


def test_t5_shape_zeros_past_the_tokens_and_the_empty_string(t5):
    out = t5(["go to the red one", "", "pick up the bowl and place it on the plate"])
    assert out.shape == (3, 12, 24) and out.dtype == torch.float32
    # "go to the red one" is 5 words + </s>: rows 6.. are exactly zero, rows 0..5 are not
    assert torch.all(out[0, 6:] == 0) and torch.all(out[0, :6].abs().sum(-1) > 0)
    assert torch.all(out[1, 1:] == 0) and out[1, 0].abs().sum() > 0  # "" is just </s>
    assert out[2].abs().sum(-1).gt(0).sum() == 11  # 10 words + </s>; truncated at 12 tokens at most
    long = t5(["go " * 40])
    assert long.abs().sum(-1).gt(0).sum() == 12  # truncated to max_length


def test_t5_matches_the_model_and_caches_per_instruction(t5):
    model, tokenizer = t5.model, t5.tokenizer
    enc = tokenizer(["go to the blue square"], padding="max_length", max_length=12, truncation=True,
                    return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    ref = ref * enc.attention_mask[..., None]
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    a = t5(["go to the blue square", "go to the blue square"])
    b = t5("go to the blue square")
    handle.remove()
    torch.testing.assert_close(a[0], ref[0])
    assert torch.equal(a[1], a[0]) and torch.equal(b[0], a[0])
    assert len(calls) == 1  # one forward for one distinct instruction, then the cache
    with pytest.raises(ValueError, match="instructions must be"):
        t5([3])


def test_load_text_encoder_from_a_folder(tmp_path, t5):
    t5.model.save_pretrained(tmp_path / "t5")
    t5.tokenizer.save_pretrained(tmp_path / "t5")
    loaded = mv.load_text_encoder(tmp_path / "t5", max_length=12)
    torch.testing.assert_close(loaded(["reach the green one"]), t5(["reach the green one"]))
    assert loaded.spec["kind"] == "t5" and mv.build_text_encoder(loaded.spec).width == 24


# ------------------------------ offline stand-ins ------------------------------


def test_pixel_encoder_space_to_depth_and_coordinates():
    enc = mv.PixelEncoder(patch=2, coords=True)
    x = frames(2, 3, 8, 12)
    z = enc.encode(x)
    # no temporal compression
    assert z.shape == (2, 3 * 4 + 2, 3, 4, 6) and enc.channels == 14 and enc.latent_frames(3) == 3
    # (c, p, q)
    assert torch.equal(z[:, 0, :, 1, 2], x[:, 0, :, 2, 4]) and torch.equal(z[:, 3, :, 1, 2], x[:, 0, :, 3, 5])
    # x of token centres
    assert torch.allclose(z[0, 12, 0, 0], torch.tensor([-5 / 6, -1 / 2, -1 / 6, 1 / 6, 1 / 2, 5 / 6]))
    assert torch.allclose(z[0, 13, 0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # y
    assert torch.equal(enc.decode(z), x)
    assert mv.PixelEncoder(patch=1, coords=False).encode(x).shape == (2, 3, 3, 8, 12)
    with pytest.raises(ValueError, match="multiples of 2"):
        enc.encode(frames(1, 1, 7, 8))


def test_pixel_encoder_keeps_the_lowest_frequencies():
    x = frames(2, 3, 8, 12)
    enc = mv.PixelEncoder(patch=4, keep=1, coords=False)  # keep = 1: each patch's average colour
    assert enc.channels == 3 and enc.spec["keep"] == 1
    assert torch.allclose(enc.encode(x), F.avg_pool3d(x, (1, 4, 4)), atol=1e-6)
    enc = mv.PixelEncoder(patch=4, keep=2)
    z = enc.encode(x)
    assert z.shape == (2, 3 * 4 + 2, 3, 2, 3) and enc.channels == 14
    assert torch.allclose(enc.encode(enc.decode(z)), z, atol=1e-5)  # decode: a right inverse on the kept frequencies
    ramp = torch.linspace(-1, 1, 8).expand(1, 3, 1, 8, 8)  # smooth frames survive the compression nearly intact
    assert (enc.decode(enc.encode(ramp)) - ramp).abs().max() < 0.05
    assert torch.equal(mv.PixelEncoder(patch=4, keep=4).encode(x), mv.PixelEncoder(patch=4).encode(x))  # all: lossless
    assert mv.build_video_encoder(enc.spec).keep == 2 and "keep" not in mv.PixelEncoder(patch=4).spec
    with pytest.raises(ValueError, match="keep in"):
        mv.PixelEncoder(patch=2, keep=3)


def test_hashed_words_are_deterministic_zero_padded_any_width():
    enc = mv.HashedWordEncoder(width=7, max_tokens=4)
    a = enc(["Go to the red one.", "reach red"])
    assert a.shape == (2, 4, 7)
    assert torch.equal(a[0, 3], a[1, 1])  # "red" is the same vector wherever it appears (case and punctuation ignored)
    assert torch.all(a[1, 2:] == 0)  # zero padding past the words
    again = mv.HashedWordEncoder(width=7, max_tokens=4)(["Go to the red one."])
    assert torch.equal(again[0], a[0])  # the same on every run: a hash, not Python's salted hash()
    assert mv.HashedWordEncoder(width=5, max_tokens=2)(["an instruction never seen before"]).shape == (1, 2, 5)
    assert torch.all(enc([""]) == 0)
    # words of any script are words (not dropped: every Chinese instruction would be the same zeros)
    zh, de = enc(["拿起杯子", "放下杯子"]), enc(["größe", "grosse"])
    assert zh[:, 0].abs().sum(-1).all() and not torch.equal(zh[0], zh[1]) and not torch.equal(de[0], de[1])
    assert torch.equal(enc(["snake_case"])[0, :2], enc(["snake case"])[0, :2])  # "_" separates, as punctuation does


def test_images_to_frames_conventions():
    u8 = torch.randint(0, 256, (2, 6, 4, 3), dtype=torch.uint8)  # (B, H, W, 3)
    f = mv.images_to_frames(u8)
    assert f.shape == (2, 3, 6, 4) and torch.allclose(f, u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    assert torch.equal(mv.images_to_frames(u8.permute(0, 3, 1, 2).float() / 255), f)  # float (3, H, W) in [0, 1]
    with pytest.raises(ValueError, match=r"uint8 images must be \(\.\.\., H, W, 3\)"):
        mv.images_to_frames(torch.zeros(3, 6, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        mv.images_to_frames(torch.full((3, 4, 4), float("nan")))
    assert mv.resize_frames(f, (12, 8)).shape == (2, 3, 12, 8)

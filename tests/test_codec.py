"""PixelCodec: the toy world's video <-> transformer-input mapping, with and without pixel averaging."""

import pytest
import torch

from univigu.data.codec import PixelCodec


def _video(b=2, t=3, h=8, w=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_identity_codec_round_trip():
    codec, video = PixelCodec(), _video()
    x = codec.encode(video)
    assert x.shape == (2, 3, 3, 8, 12) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(codec.decode(x), video)
    assert codec.latent_shape(3, 8, 12) == (3, 3, 8, 12)


def test_downsampling_averages_blocks_and_decodes_by_repeating():
    codec, video = PixelCodec(downsample=2), _video()
    x = codec.encode(video)
    assert x.shape == (2, 3, 3, 4, 6) == (2, *codec.latent_shape(3, 8, 12))
    block = video[0, 1, 2:4, 4:6, 0].float().mean() / 127.5 - 1  # pixel block (1, 2) of frame 1, red
    assert torch.isclose(x[0, 0, 1, 1, 2], block)
    decoded = codec.decode(x)
    assert decoded.shape == video.shape
    blocky = decoded[:, :, ::2, ::2]  # a video of constant 2x2 blocks survives the round trip exactly
    blocky = blocky.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(decoded, blocky) and torch.equal(codec.decode(codec.encode(blocky)), blocky)


def test_codec_errors_are_clear():
    with pytest.raises(ValueError, match="downsample must be >= 1"):
        PixelCodec(0)
    with pytest.raises(ValueError, match="2x2 pixel blocks"):
        PixelCodec(2).encode(_video(h=7))
    with pytest.raises(ValueError, match="expected uint8 videos"):
        PixelCodec().encode(_video().float())

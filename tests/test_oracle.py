import numpy as np
import pytest

from univigu.data.oracle import Oracle
from univigu.data.world import World, accuracy, attribute_matches, degrade


@pytest.fixture(scope="module")
def rendered():
    world = World()
    scenes = world.scenes("test", range(250), seed=11)
    return scenes, world.render(scenes)


def _accuracy(scenes, videos):
    preds = Oracle()(videos)
    return accuracy(attribute_matches(s.attributes(), p) for s, p in zip(scenes, preds))


def test_oracle_reads_clean_videos(rendered):
    scenes, videos = rendered
    assert _accuracy(scenes, videos)["all"] >= 0.995


def test_oracle_survives_noise_and_blur(rendered):
    scenes, videos = rendered
    noisy = degrade(videos, noise_std=0.1, blur=3, seed=5)
    assert np.abs(noisy.astype(int) - videos.astype(int)).mean() > 10  # really degraded
    assert _accuracy(scenes, noisy)["all"] >= 0.97


def test_oracle_on_blank_video_finds_no_objects():
    video = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    assert Oracle().read(video) == {"background": "black", "objects": []}


def test_oracle_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[N, T, H, W, 3\]"):
        Oracle()(np.zeros((16, 32, 32), dtype=np.uint8))


def test_oracle_detects_wrong_attributes():
    # A video rendered for another scene must score badly against this scene's attributes.
    world = World()
    a, b = world.scenes("test", [0, 1])
    pred = Oracle()(world.render([b]))[0]
    scores = attribute_matches(a.attributes(), pred)
    assert accuracy([scores])["all"] < 0.9
    with pytest.raises(ValueError, match="no scores"):  # was 0.0: a failure nothing was measured for
        accuracy([])


def test_oracle_rejects_videos_it_would_misread(rendered):
    video = rendered[1][:1]
    oracle = Oracle()
    for wrong in (video / 255.0, video > 0):  # read as black with no objects before
        with pytest.raises(TypeError, match=r"videos must be uint8 \(0..255\), got (float64|bool)"):
            oracle(wrong)
    for wrong in (video[:, :, :24], video[:, :1], video[:, :0]):  # another frame size, T = 1, T = 0
        with pytest.raises(ValueError, match=r"H x W = 32x32 .* T >= 2, got shape"):
            oracle(wrong)
    with pytest.raises(ValueError, match="got shape"):
        oracle.read(video)  # read takes one video
    assert oracle.read(video[0]) == oracle(video)[0]

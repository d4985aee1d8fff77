import numpy as np
import pytest

from univigu.data.video_io import VideoReadError, read_video, write_video
from univigu.data.world import World


@pytest.fixture(scope="module")
def video():
    world = World()
    return np.ascontiguousarray(world.render(world.scenes("test", [0]))[0])


@pytest.mark.parametrize("ext,tolerance", [("gif", 0.0), ("mp4", 6.0), ("webm", 6.0)])
def test_write_read_round_trip(tmp_path, video, ext, tolerance):
    path = write_video(tmp_path / f"clip.{ext}", video)
    back = read_video(path)
    assert back.shape == video.shape and back.dtype.is_floating_point is False
    assert np.abs(back.numpy().astype(float) - video).mean() <= tolerance


def test_gif_keeps_merged_frames(tmp_path):
    video = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    video[2] = 200  # runs of 2, 1 and 3 identical frames, which GIF writers merge
    back = read_video(write_video(tmp_path / "pairs.gif", video))
    assert np.array_equal(back.numpy(), video)


def test_read_resizes_and_resamples_frames(tmp_path, video):
    path = write_video(tmp_path / "clip.gif", video, scale=2)
    back = read_video(path, num_frames=5, size=(32, 32))
    assert back.shape == (5, 32, 32, 3)
    assert np.abs(back.numpy().astype(float) - video[[0, 4, 8, 11, 15]]).mean() < 3
    assert read_video(path, num_frames=40).shape[0] == 40  # a short clip repeats frames


def test_clear_errors_for_bad_files(tmp_path, video):
    with pytest.raises(VideoReadError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoReadError, match="cannot decode"):
        read_video(tmp_path / "junk.mp4")
    good = write_video(tmp_path / "good.mp4", video).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 3])
    with pytest.raises(VideoReadError):
        read_video(tmp_path / "truncated.mp4")


def test_write_rejects_bad_frames(tmp_path, video):
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_video(tmp_path / "a.mp4", video[..., 0])
    with pytest.raises(ValueError, match="T > 0"):
        write_video(tmp_path / "a.mp4", video[:0])
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", video[:, :31])
    with pytest.raises(ValueError, match="unsupported"):
        write_video(tmp_path / "a.avi", video)

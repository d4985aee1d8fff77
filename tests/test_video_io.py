import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

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


def test_a_cut_webm_reads_what_is_left_with_a_warning(tmp_path, video):
    """A WebM cut short decodes without error up to the cut: the reader says so instead of passing part of a video
    off as all of it (the caption command and the app caption what it returns)."""
    good = write_video(tmp_path / "good.webm", video)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole file: no warning
        assert read_video(good).shape[0] == len(video)
    cut = tmp_path / "cut.webm"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 4 // 5])
    with pytest.warns(UserWarning, match=r"cut.webm: decoded \d+ frames .* header says 2.00 s; the file looks truncated"):
        left = read_video(cut)
    assert 0 < len(left) < len(video)


def test_write_rejects_bad_frames(tmp_path, video):
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_video(tmp_path / "a.mp4", video[..., 0])
    with pytest.raises(ValueError, match="T > 0"):
        write_video(tmp_path / "a.mp4", video[:0])
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", video[:, :31])
    with pytest.raises(ValueError, match="unsupported"):
        write_video(tmp_path / "a.avi", video)


@pytest.mark.parametrize("ext,fps", [(e, f) for e in ("gif", "mp4", "webm") for f in (10**9, 0, -5, float("nan"), "8")]
                         + [("gif", 101), ("mp4", 1001)])  # fmt: skip
def test_write_rejects_bad_fps_and_keeps_the_existing_file(tmp_path, video, ext, fps):
    path = write_video(tmp_path / f"clip.{ext}", video)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"fps must be a number from 0.01 to \d+ for .{ext}, got"):
        write_video(path, video, fps=fps)
    assert path.read_bytes() == before


def test_write_rejects_bad_scale(tmp_path, video):
    with pytest.raises(ValueError, match="scale must be an int >= 1, got 0"):
        write_video(tmp_path / "a.gif", video, scale=0)
    with pytest.raises(TypeError, match="scale must be an int >= 1, got float 1.5"):
        write_video(tmp_path / "a.gif", video, scale=1.5)
    assert not list(tmp_path.iterdir())


def test_write_takes_fractional_fps(tmp_path, video):
    with av.open(str(write_video(tmp_path / "a.mp4", video, fps=2.5))) as container:
        assert container.streams.video[0].average_rate == Fraction(5, 2)
    with Image.open(write_video(tmp_path / "a.gif", video, fps=2.5)) as gif:
        assert gif.info["duration"] == 400


def test_failed_write_keeps_the_existing_file(tmp_path, video, monkeypatch):
    path = write_video(tmp_path / "clip.gif", video)
    before = path.read_bytes()

    def broken(image, fp, filename):  # Pillow has opened (emptied) the file: fail halfway through
        fp.write(b"GIF89a")
        raise OSError("disk full")

    monkeypatch.setitem(Image.SAVE_ALL, "GIF", broken)
    with pytest.raises(OSError, match="disk full"):
        write_video(path, video)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.gif"]  # no partial file left


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(num_frames=0), ValueError, "num_frames must be an int >= 1, got 0"),
    (dict(num_frames=2.5), TypeError, "num_frames must be an int >= 1, got float 2.5"),
    (dict(size=(0, 0)), ValueError, "size height must be an int >= 1, got 0"),
    (dict(size=(8,)), TypeError, r"size must be \(height, width\), got \(8,\)"),
    (dict(size=16), TypeError, r"size must be \(height, width\), got 16"),
    (dict(size=2.5), TypeError, r"size must be \(height, width\), got 2.5"),
])  # fmt: skip
def test_read_rejects_bad_num_frames_and_size(tmp_path, video, kwargs, error, message):
    path = write_video(tmp_path / "clip.gif", video)
    with pytest.raises(error, match=message):
        read_video(path, **kwargs)


def _numbered(frames: int, size: int = 8) -> np.ndarray:
    """Frame i is the flat grey level 10 * i (GIF keeps it exactly)."""
    return np.stack([np.full((size, size, 3), 10 * i, dtype=np.uint8) for i in range(frames)])


def _levels(video) -> list[int]:
    return [int(round(float(f.float().mean()) / 10)) for f in video]


def test_num_frames_samples_the_nearest_frames_evenly(tmp_path):
    path = write_video(tmp_path / "n.gif", _numbered(16))
    assert _levels(read_video(path, num_frames=5)) == [0, 4, 8, 11, 15]  # round(15 * k / 4): 0, 3.75, 7.5, 11.25, 15
    assert _levels(read_video(path, num_frames=4)) == [0, 5, 10, 15]
    assert _levels(read_video(write_video(tmp_path / "three.gif", _numbered(3)), num_frames=5)) == [0, 0, 1, 2, 2]


def test_scale_repeats_pixels_in_both_directions(tmp_path, video):
    gif = read_video(write_video(tmp_path / "big.gif", video, scale=3))
    np.testing.assert_array_equal(gif.numpy(), video.repeat(3, axis=1).repeat(3, axis=2))
    assert read_video(write_video(tmp_path / "big.mp4", video, scale=2)).shape == (len(video), 64, 64, 3)


def test_resizing_down_is_antialiased(tmp_path):
    """Thin lines (every 4th column white) shrunk 4x are an even grey, their average, not a sample of the pixels
    between them (black)."""
    lines = np.zeros((2, 16, 16, 3), np.uint8)
    lines[:, :, ::4] = 255
    lines[1, 1, 1] = 128  # two different frames, so the GIF keeps both
    small = read_video(write_video(tmp_path / "lines.gif", lines), size=(4, 4)).numpy().astype(float)
    assert small.shape == (2, 4, 4, 3) and small[0].min() > 40  # without antialiasing: all 0
    assert np.abs(small[0, :, 1:3] - 255 / 4).max() <= 1  # inside: the average (the border columns lean)


def test_a_gif_frame_lasting_about_twice_the_shortest_shows_twice(tmp_path):
    """GIF delays are whole centiseconds, so writers approximate a rate with uneven delays: each frame shows for
    the nearest whole number of the shortest delay (13 cs beside 7 cs: 1.86, twice)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in _numbered(3)]
    images[0].save(tmp_path / "uneven.gif", save_all=True, append_images=images[1:], duration=[70, 130, 70], loop=0)
    assert _levels(read_video(tmp_path / "uneven.gif")) == [0, 1, 1, 2]


def test_gifs_loop_forever(tmp_path, video):
    with Image.open(write_video(tmp_path / "a.gif", video, fps=4)) as gif:
        assert gif.info["loop"] == 0 and gif.info["duration"] == 250


def _gif(path, levels, durations):
    """A GIF of flat grey frames (level 10 * l) shown for the given centiseconds each, as written (no merging)."""
    images = [Image.fromarray(np.full((8, 8, 3), 10 * level, np.uint8)) for level in levels]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[10 * d for d in durations], loop=0)
    return path


def test_load_clip_takes_the_frame_showing_at_each_time(tmp_path):
    """GIF writers merge identical consecutive frames into one longer frame (write_video's do): load_clip takes the
    frame showing at each target time, not the nearest frame start (which is the next frame inside a long one), and
    a clip lasts until its last frame ends."""
    from univigu.data.video_folder import load_clip

    merged = write_video(tmp_path / "merged.gif", _numbered(6)[[0, 1, 1, 3, 4, 5]])  # starts 0, .12, .36, ...
    assert _levels(load_clip(merged, 6, 8, 8, fps=8, min_side=1)) == [0, 1, 1, 3, 4, 5]  # .25 s: still frame 1
    held = _gif(tmp_path / "held.gif", [0, 1, 2], [12, 12, 48])  # the last frame shows from 0.24 s to 0.72 s
    assert _levels(load_clip(held, 6, 8, 8, fps=8, min_side=1)) == [0, 1, 2, 2, 2, 2]
    with pytest.raises(VideoReadError, match=r"too short: 0.72 s decoded, 7 frames at 8 fps need more than 0.740 s"):
        load_clip(held, 7, 8, 8, fps=8, min_side=1)


def test_read_video_resizes_each_frame_as_it_is_decoded(tmp_path, video, monkeypatch):
    """With `size`, no more than one full-size frame is held (a 10 s 720p clip's full-size stack is gigabytes);
    the result is the same as resizing the whole clip."""
    from univigu.data import video_io

    path = write_video(tmp_path / "big.mp4", video, scale=4)  # 128 x 128
    full = read_video(path)
    seen, real = [], video_io.resize_video
    monkeypatch.setattr(video_io, "resize_video", lambda v, size: seen.append(tuple(v.shape)) or real(v, size))
    small = read_video(path, num_frames=5, size=(16, 24))
    assert seen and all(shape[0] == 1 for shape in seen), seen
    index = torch.linspace(0, len(full) - 1, 5).round().long()
    assert torch.equal(small, real(full, (16, 24))[index])


def test_a_folder_is_not_a_video_file(tmp_path):
    with pytest.raises(VideoReadError, match="is a folder, not a video file"):
        read_video(tmp_path)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_a_cut_gif_reads_what_is_left_with_a_warning(tmp_path, fraction):
    """A GIF cut short decodes its whole frames without error and its header holds no length: the missing trailer
    (the byte 0x3B that ends every GIF) tells."""
    good = write_video(tmp_path / "good.gif", np.random.default_rng(0).integers(0, 255, (40, 16, 16, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_video(good).shape[0] == 40
    padded = tmp_path / "padded.gif"  # a whole GIF with a trailing newline or padding is not cut
    for tail in (b"\n", b"\r\n", b"\0\0 \t"):
        padded.write_bytes(good.read_bytes() + tail)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_video(padded).shape[0] == 40
    cut = tmp_path / "cut.gif"
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * fraction)])
    with pytest.warns(UserWarning, match=r"cut.gif: decoded \d+ frames .* no GIF trailer; the file looks truncated"):
        left = read_video(cut)
    assert 0 < len(left) < 40


def test_a_failing_clean_up_keeps_the_write_error(tmp_path, video, monkeypatch):
    """When removing the partial file fails too (a read-only folder), the error raised is the write's."""
    from pathlib import Path

    def broken(image, fp, filename):
        fp.write(b"GIF89a")
        raise OSError("disk full")

    def unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setitem(Image.SAVE_ALL, "GIF", broken)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "clip.gif", video)


def _delays(path) -> list[int]:
    with Image.open(path) as gif:
        delays = []
        for k in range(gif.n_frames):
            gif.seek(k)
            delays.append(gif.info["duration"])
    return delays


def test_gif_delays_add_up_to_the_clip_length(tmp_path):
    """GIF delays are whole centiseconds: frame i lasts round((i + 1) * 100 / fps) - round(i * 100 / fps), so 81
    frames at 16 fps last 5.06 s (not 81 * 6 cs = 4.86 s, which load_clip called too short); uneven 6 and 7 cs
    delays read back frame for frame, long merged runs too; 8 fps alternates 13 and 12 cs; load_clip allows one GIF
    tick of slack."""
    from univigu.data.video_folder import load_clip

    video = np.stack([np.full((8, 8, 3), 3 * i, np.uint8) for i in range(81)])
    path = write_video(tmp_path / "wan.gif", video, fps=16)
    assert sum(_delays(path)) == 5060 and set(_delays(path)) == {60, 70}
    assert np.array_equal(read_video(path).numpy(), video)
    assert np.array_equal(load_clip(path, 81, 8, 8, fps=16, min_side=1).numpy(), video)
    held = video.copy()
    held[10:30], held[40:53] = held[10], held[40]  # runs of 20 and 13 frames, each merged into one GIF frame
    path = write_video(tmp_path / "held.gif", held, fps=16)
    assert len(_delays(path)) == 81 - 19 - 12 and np.array_equal(read_video(path).numpy(), held)
    assert _delays(write_video(tmp_path / "toy.gif", _numbered(4), fps=8)) == [130, 120, 130, 120]
    tick = _gif(tmp_path / "tick.gif", [0, 1, 2], [12, 12, 1])  # 0.25 s: one GIF tick of slack for the 0.25 s target
    assert _levels(load_clip(tick, 3, 8, 8, fps=8, min_side=1)) == [0, 1, 2]

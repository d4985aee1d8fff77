"""Crash-safe checkpoint directories: write to a temp dir, fsync, rename, then point `latest`.

A checkpoint directory is either absent or complete: a kill at any moment leaves at worst a
`.tmp_*` directory (removed by the next save) and the previous `latest` intact (a step saved again,
killed between `replace_dir`'s renames, is absent: the one before it is then the newest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open

_STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and the directories, to disk."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _aside(final: Path) -> Path:
    """Where `replace_dir` moves the old `final` before deleting it: a hidden sibling (same filesystem, so renames
    are atomic) that `rotate` also clears, as a temp dir."""
    return final.parent / f".tmp_{final.name}.old"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(tmp: Path, final: Path) -> None:
    """Turn the complete temp dir `tmp` into `final`, replacing any old `final` whole: the old one is renamed aside,
    the new one renamed in, and only then the old one deleted. A kill at any point leaves either the old folder or
    the new one whole, except between the two renames, where there is no folder and the old one lies whole aside
    (`.tmp_<name>.old`); an error in a rename puts the old one back. The aside left by an earlier kill is removed
    first."""
    fsync_tree(tmp)
    aside = _aside(final)
    _remove(aside)  # a kill left it: the old folder of an earlier replace, or part of it
    if final.exists() or final.is_symlink():
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    _fsync_dir(final.parent)
    _remove(aside)


def publish(tmp: Path, final: Path) -> None:
    """Atomically turn the complete temp dir `tmp` into `final`, then point `latest` at it."""
    replace_dir(tmp, final)  # re-saving a step (e.g. after a resume that failed to log) replaces it
    pointer = final.parent / (LATEST + ".tmp")
    with open(pointer, "w") as fh:
        fh.write(final.name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(pointer, final.parent / LATEST)
    _fsync_dir(final.parent)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; else (killed between rename and pointer) the newest dir."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir():
            return target
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (and leftover temp dirs)."""
    for p in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p)
    for p in root.glob(".tmp_*"):
        shutil.rmtree(p, ignore_errors=True)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of the model weights in checkpoint `path`, from the file header (nothing is loaded); None
    without a `model.safetensors` (FSDP shards)."""
    file = path / "model.safetensors"
    if not file.is_file():
        return None
    with safe_open(file, "pt") as fh:
        return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}


def damage(path: Path) -> str | None:
    """What makes checkpoint `path` unloadable (a missing or truncated file), or None. A kill cannot cause it
    (see `publish`), a full disk or a copy gone wrong can."""
    for name in ("trainer_state.json", "config.json"):
        try:
            json.loads((path / name).read_text())
        except FileNotFoundError:
            return f"no {name}"
        except ValueError:
            return f"{name} is not valid JSON"
    try:
        weight_shapes(path)
    except (SafetensorError, OSError) as error:  # a truncated file, an unreadable one
        return f"model.safetensors is unreadable: {error}"
    return None

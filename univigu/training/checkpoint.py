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
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil  # installed with accelerate
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


def _discard(path: Path) -> None:
    """Delete a folder by first renaming it out of its name: a kill mid-delete leaves a `.tmp_deleting_*` folder
    (removed by the next discard of the same path, or `rotate`), never part of a folder under its own name."""
    doomed = path.with_name(f".tmp_deleting_{path.name}")
    _remove(doomed)
    if path.exists() or path.is_symlink():
        os.replace(path, doomed)
        _remove(doomed)


class RunFolderInUse(ValueError):
    """A run folder holds a live run's lock."""


@contextmanager
def sole_run(out: Path, command: str) -> Iterator[None]:
    """Hold OUT/run.lock (this process's PID) while running: two runs in one folder would write the same files (a
    resume started beside the workers of a killed launcher, which torch's launcher leaves running, say). A lock
    whose process is gone is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "run.lock"
    try:
        with open(lock, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        owner = lock.read_text().strip()
        if not owner.isdigit() or psutil.pid_exists(int(owner)):
            raise RunFolderInUse(f"{out} is in use by another {command} (process {owner or '?'}): wait for it or "
                                 f"stop it (a killed launcher's workers keep running: kill that process; if no such "
                                 f"run is left, delete {lock})") from None  # fmt: skip
        lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Turn the complete temp dir `tmp` into `final`, replacing any old `final` whole: the old one is renamed aside,
    the new one renamed in, and only then the old one deleted. A kill at any point leaves either the old folder or
    the new one whole, except between the two renames, where there is no folder and the old one lies whole aside
    (`.tmp_<name>.old`, whole until it is discarded); an error in a rename puts the old one back. The aside left
    by an earlier kill is discarded first."""
    fsync_tree(tmp)
    aside = _aside(final)
    _discard(aside)  # a kill between the renames of an earlier replace left it
    if final.exists() or final.is_symlink():
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    _fsync_dir(final.parent)
    _discard(aside)


def write_replacing(target: Path, write: Callable[[Path], None], tag: str) -> None:
    """`write(folder)` into a staging folder beside `target` (`.<name>.<tag>-tmp`), then swapped in whole for it by
    `replace_dir` (a file or folder there is replaced): a failed write leaves the target as it was, and nothing of
    an older folder stays beside the new files to be loaded."""
    staging = target.parent / f".{target.name}.{tag}-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    replace_dir(staging, target)


def restore_interrupted(final: Path) -> None:
    """Put back the folder a `replace_dir` into `final` moved aside, when a kill between its two renames left no
    `final`: the state before that replace (what replaced it is written again by whatever was replacing it)."""
    aside = _aside(final)
    if aside.is_dir() and not (final.exists() or final.is_symlink()):
        try:
            os.replace(aside, final)
        except OSError:  # every process of a run restores: another one may have put it back first
            if not final.is_dir():
                raise


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
    """The checkpoint `latest` names (after a kill between a checkpoint's rename and the pointer's update: the one
    before, from which the resume is as exact); without a pointer, or one naming a missing folder, the newest."""
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
        _discard(p)  # a kill mid-delete leaves a temp dir, never a half checkpoint
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


# what `Trainer.save_checkpoint` writes besides the JSON files: accelerate's model and optimizer state (FSDP, by its
# state_dict_type: sharded folders pytorch_model_fsdp_0/ and optimizer_0/, or pytorch_model_fsdp*.bin and
# optimizer*.bin files), per process its RNG states and the task generator, and with EMA the averaged weights
_FSDP_MODEL, _OPTIMIZER = "pytorch_model_fsdp", "optimizer"
_TRAINER_STATE = ("step", "micro_batches", "bad_total", "bad_streak", "elapsed")
_TORCH_SAVED = (".pt", ".bin", ".pkl")  # torch.save files (accelerate writes optimizer.bin and the RNG .pkl so too)


def _zip_problem(file: Path) -> str | None:
    """torch.save writes a zip archive, its directory at the end: opening it reads only that (not the GBs of an
    optimizer state), and a truncated file has none."""
    try:
        with zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, OSError) as error:
        return f"{file.name} is truncated or unreadable: {error}"


def layout(path: Path) -> str:
    """How checkpoint `path` holds its model: "plain" (model.safetensors), or FSDP's "sharded" (a
    torch.distributed.checkpoint folder) or "full" (whole-weight .bin files)."""
    if (path / f"{_FSDP_MODEL}_0").is_dir():
        return "sharded"
    return "full" if any(path.glob(f"{_FSDP_MODEL}*.bin")) else "plain"


def damage(path: Path) -> str | None:
    """What makes checkpoint `path` unloadable (a missing or truncated file), or None. A kill cannot cause it
    (see `publish`), a full disk or a copy gone wrong can. Cheap: file headers and zip directories are read,
    no tensors."""
    records = {}
    for name in ("trainer_state.json", "config.json"):
        try:
            records[name] = json.loads((path / name).read_text())
        except FileNotFoundError:
            return f"no {name}"
        except ValueError:
            return f"{name} is not valid JSON"
    config, state = records["config.json"], records["trainer_state.json"]
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    lacking = [key for key in _TRAINER_STATE if not isinstance(state, dict) or key not in state]
    if lacking:
        return f"trainer_state.json lacks {lacking}"
    try:
        weight_shapes(path)
    except (SafetensorError, OSError) as error:  # a truncated file, an unreadable one
        return f"model.safetensors is unreadable: {error}"
    names = {p.name for p in path.iterdir()}
    fsdp = any(name.startswith(_FSDP_MODEL) for name in names)
    if not fsdp and "model.safetensors" not in names:
        return f"no model weights (model.safetensors or {_FSDP_MODEL}*)"
    if not any(name.startswith(_OPTIMIZER) for name in names):
        return f"no optimizer state ({_OPTIMIZER}.bin, {_OPTIMIZER}_0/ ...)"
    processes = config.get("num_processes", 1)
    if type(processes) is not int or processes < 1:
        return f"config.json: num_processes is {processes!r}, not a count"
    expected = [f"{kind}_{rank}.{ext}" for rank in range(processes)
                for kind, ext in (("random_states", "pkl"), ("generator", "pt"))]  # fmt: skip
    for name in expected:
        if name not in names:
            return f"no {name}"
    if config.get("ema_decay") is not None:  # a run without EMA saves none
        for name in [f"ema_{rank}.pt" for rank in range(processes)] if fsdp else ["ema.pt"]:
            if name not in names:
                return f"no {name} (the run keeps an EMA)"
    for name in sorted(names):
        item = path / name
        if item.is_dir() and name.startswith((_FSDP_MODEL, _OPTIMIZER)):  # torch.distributed.checkpoint folders
            shards = {p.name for p in item.iterdir()}
            if not shards:
                return f"{name}/ is empty"
            if ".metadata" not in shards:  # written last, and needed to load the shards
                return f"{name}/ has no .metadata (an incomplete save or copy)"
        elif item.is_file() and name.endswith(_TORCH_SAVED) and (problem := _zip_problem(item)):
            return problem
    return None

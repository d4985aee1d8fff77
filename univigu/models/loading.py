"""Strict checkpoint loading: a checkpoint whose keys or shapes differ from the model its config describes is an
error naming every such key, checked from the safetensors headers before any weight is read. (diffusers only warns
about missing/unexpected keys and leaves those weights random.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["StrictLoading", "check_checkpoint"]


def _key_summary(keys: list[str], limit: int = 8) -> str:
    """Weight names, a few in full, else grouped by their module (`blocks.4.*: 31`): a checkpoint of another size
    would list thousands."""
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        cut = next((i + 1 for i, part in enumerate(parts[:-1]) if part.isdigit()), 1)  # up to the block index
        group = ".".join(parts[:cut]) + ".*"
        groups[group] = groups.get(group, 0) + 1
    shown = [f"{g}: {n}" for g, n in list(groups.items())[:limit]]
    return ", ".join(shown) + (f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else "")


def _odd_types(cls: type, config: dict) -> list[str]:
    """`key=value` for config values of another kind than the constructor's default (a str for an int, ...): what a
    TypeError from deep inside the constructor (which names no key) most likely came from."""
    import inspect

    kinds = ((bool,), (int, float), (str,), (list, tuple))
    odd = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        default, value = parameter.default, config.get(name)
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        kind = next((k for k in kinds if isinstance(default, k)), None)
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool)):
            odd.append(f"{name}={value!r}")
    return odd


def check_checkpoint(cls: type[ModelMixin], folder: Path, kwargs: dict | None = None) -> None:
    """Compare the safetensors headers in `folder` with the parameters of the `cls` its config (plus any constructor
    arguments in `kwargs`) describes, before any weight is read: FileNotFoundError without the folder, its
    config.json or weights, ValueError for an unreadable file, a config the class cannot be built from, or keys /
    shapes that differ, naming each. (diffusers only warns about missing/unexpected keys and leaves those weights
    random, and fails on other shapes with advice to ignore them.)"""
    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (or is not a folder): no {cls.__name__} to load")
    if not (folder / cls.config_name).is_file() and (folder / "model_index.json").is_file():
        parts = sorted(c.parent.name for c in folder.glob(f"*/{cls.config_name}")
                       if json.loads(c.read_text()).get("_class_name") == cls.__name__)  # fmt: skip
        where = f"subfolder={parts[0]!r}" if parts else "subfolder=<its folder>"
        raise FileNotFoundError(f"{folder} is a pipeline folder: load its {cls.__name__} with {where} "
                                f"({cls.__name__}.from_pretrained(path, {where})), or the whole pipeline with "
                                "UniViGUPipeline.from_pretrained")  # fmt: skip
    if not (folder / cls.config_name).is_file():
        raise FileNotFoundError(f"no {cls.config_name} in {folder}: not a saved {cls.__name__} (write it with "
                                "save_pretrained)")  # fmt: skip
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif single.exists():
        files = [single]
    elif any(folder.glob("diffusion_pytorch_model*")):
        return  # another format (.bin, variant): diffusers' loader decides
    else:
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors in {folder}")
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} (listed in {index.name}) does not exist")
        try:
            with safe_open(f, framework="pt") as reader:
                found.update({k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()})
        except SafetensorError as error:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {error}") from error

    try:
        config = cls.load_config(folder)
    except OSError as error:  # diffusers' "not a valid JSON file", from deep in its loader
        raise ValueError(f"{folder / 'config.json'} is not readable: {error}") from error
    overrides = {k: v for k, v in (kwargs or {}).items() if k in cls._get_init_keys(cls)}
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls.from_config(config, **overrides).state_dict().items()}
    except (TypeError, ValueError) as error:  # e.g. "num_layers": "four", raised deep inside the constructor
        odd = _odd_types(cls, config)
        hint = f" (of another type than the defaults: {', '.join(odd)})" if odd else ""
        raise ValueError(f"{folder / cls.config_name} does not describe a {cls.__name__}: {error}{hint}") from error
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in sorted(expected) if
              k in found and found[k] != expected[k]]  # fmt: skip
    if missing or unexpected or shapes:
        lines = [f"checkpoint {folder} does not match the {cls.__name__} its config describes:"]
        lines += [f"  missing keys ({len(missing)}): {_key_summary(missing)}"] if missing else []
        lines += [f"  unexpected keys ({len(unexpected)}): {_key_summary(unexpected)}"] if unexpected else []
        # diffusers drops config keys the class does not take (a typo'd "num_layer": the default size, then this);
        # rope_theta is not one: our loaders put it back (set_rope_theta / load_wan_transformer, models/wan.py)
        unknown = sorted(k for k in config if not k.startswith("_") and k not in cls._get_init_keys(cls)
                         and k not in ("rope_theta",))  # fmt: skip
        lines += [f"  {cls.config_name} keys {cls.__name__} does not take (typos?): {unknown}"] if unknown else []
        if shapes:
            more = [f"    ... and {len(shapes) - 8} more"] if len(shapes) > 8 else []
            lines += [f"  mismatched shapes ({len(shapes)}):"] + [f"    {s}" for s in shapes[:8]] + more
        raise ValueError("\n".join(lines))


class StrictLoading:
    """Mixed in before diffusers' ModelMixin: `from_pretrained` made strict, a checkpoint whose keys or shapes
    differ from the model the config (plus any config overrides in kwargs) describes is an error naming every
    such key (`check_checkpoint`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs) -> ModelMixin | tuple[ModelMixin, dict]:  # fmt: skip
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        # local files only: a folder that is not there must not become a hub id (requests to huggingface.co, then
        # diffusers' OSError); pass local_files_only=False to load from the hub
        kwargs.setdefault("local_files_only", True)
        if folder.is_dir() or kwargs["local_files_only"]:
            check_checkpoint(cls, folder, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
        if problems:
            raise ValueError(f"checkpoint {pretrained_model_name_or_path} does not match {cls.__name__}: {problems}")
        return (model, info) if want_info else model

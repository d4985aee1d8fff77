"""A sharded on-disk cache of Wan VAE latents and umT5 prompt states, so training never runs either.

Layout of a cache folder (`build_latent_cache`, the `univigu cache-latents` command):

    settings.json                      the settings the shards are made with (a rerun must use the same)
    index.json                         settings, buckets, shards (written last; rebuilt on every run)
    null_prompt.safetensors            the empty prompt's states (the guidance / dropped-condition input)
    shards/chunk_00012_480x832.safetensors   latents [N, C, T', H', W'], prompt_states [N, S, D] cut at the
                                       longest prompt of the shard, prompt_lengths [N]; metadata: the
                                       records (video path, prompt, caption) as JSON
    shards/chunk_00012.done.json       what chunk 12 (records 12*S .. 13*S-1) wrote and skipped, and a digest
                                       of its records
    shards/stale/                      during a run, the shards of chunks written again, until no row still to
                                       come names one of their videos (removed at the run's end)
    run.lock                           while a run writes the folder (a second run is refused)
    skipped.jsonl                      every video skipped and why (also printed)

Records are processed in chunks of `shard_size` in the caption file's order; a chunk whose `.done.json`
exists (with the same records: an edited or extended captions file redoes only the chunks it changed) is
skipped on a rerun, so an interrupted run resumes where it stopped; records are compared by their paths in the
videos folder, so a rerun naming the folder otherwise (absolute / relative) or the same folder moved resumes too.
A chunk written again takes the latents of the videos this cache encoded before (the same path in the folder,
size and first and last MiB; the same settings and encoders) from the earlier shards: a row inserted or deleted
above shifts every chunk below it, but the VAE runs only for videos it has not encoded.
A rerun with other settings (frames, fps, sizes, ...) is refused: its shards would not match the finished ones.
Each video goes to the size bucket (height x width) nearest its aspect ratio; a chunk writes one shard per
bucket it touches. A video that cannot be read (missing, corrupt, truncated, too short, too small), whose
prompt or caption does not fit the text stream, or whose prompt is longer than umT5 reads (512 tokens, the end
token included: umT5 would truncate it, where `generate` refuses it), is skipped and listed, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from univigu.data.tokenizer import unknown_words
from univigu.data.video_folder import VideoRecord, load_clip
from univigu.data.video_io import VideoReadError, open_video
from univigu.models.wan import WAN_PROMPT_LENGTH, hash_edges

__all__ = ["CacheError", "CacheSettings", "build_latent_cache", "LatentCacheDataset", "LatentCodec",
           "collate_latents"]


class CacheError(ValueError):
    """A latent cache that cannot serve the request: other settings than asked, no such bucket, texts longer
    than the text stream."""


@dataclass
class CacheSettings:
    frames: int = 81
    fps: float | None = 16.0  # None: the file's own frame rate
    buckets: tuple[tuple[int, int], ...] = ((480, 832),)  # (height, width) sizes
    shard_size: int = 64  # records per chunk
    batch_size: int = 4  # videos per VAE call
    dtype: str = "bfloat16"  # stored dtype of latents and prompt states
    min_side: int = 16  # videos smaller than this (pixels) are skipped
    text_length: int = 256  # the text stream's canvas (from_wan's): longer prompts / captions (end token too) skip


def bucket_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def nearest_bucket(height: int, width: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to the video's."""
    return min(buckets, key=lambda b: abs(math.log((width / height) / (b[1] / b[0]))))


def _probe(path: Path) -> tuple[int, int, str]:
    """(height, width, pixel format) of the first video stream, without decoding."""
    with open_video(path) as container:
        ctx = container.streams.video[0].codec_context
        return ctx.height, ctx.width, ctx.pix_fmt or ""


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _atomic_json(data: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _content_settings(settings: CacheSettings) -> dict:
    """The settings that decide what the shards hold (as JSON would give them back)."""
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "batch_size"}))


def _check_settings(out: Path, settings: CacheSettings, encoders: dict[str, str] | None = None) -> None:
    """Refuse a rerun whose settings, or whose VAE / umT5 / tokenizer (`encoders`: their folders' fingerprints),
    differ from those the folder's finished shards were made with; record them."""
    wanted = _content_settings(settings)
    if encoders is not None:
        wanted["encoders"] = encoders
    made = None
    if (out / "settings.json").exists():
        made = json.loads((out / "settings.json").read_text())
    elif (out / "index.json").exists():  # a cache written before settings.json
        made = json.loads((out / "index.json").read_text())["settings"]
    if made is not None and any((out / "shards").glob("*.done.json")):  # without a finished chunk: start afresh
        changed = []
        for key, value in wanted.items():
            if key not in made or made[key] == value:
                continue
            if key == "buckets" and sorted(made[key]) == sorted(value):  # a tie in aspect ratio takes the first
                changed.append(f"buckets in another order ({made[key]} -> {value}): give --size in the order of "
                               "the run that made it")  # fmt: skip
            elif key == "encoders":
                parts = [part for part in value if made[key].get(part) != value[part]]
                changed.append(f"another Wan folder's {' / '.join(parts)} (its files differ from those that made "
                               "the cached latents and prompt states)")  # fmt: skip
            else:
                changed.append(f"{key} {made[key]} -> {value}")
        if changed:
            raise CacheError(f"{out} holds a cache made with other settings ({'; '.join(changed)}): its shards "
                             "would not match the new ones. Use a new folder, or the same settings to resume.")
    _atomic_json(wanted, out / "settings.json")


# lines saying why a chunk is encoded again, per reason; the rest are counted at the end (a row inserted at the top
# of a captions file shifts every chunk below it)
REDO_LINES = 3
DIGEST_VERSION = 2  # done files without "digest_version" hold _legacy_digest


def _video_key(path: Path, videos: Path | None) -> list:
    """A video as the cache knows it: its path relative to the `videos` folder, and its size in bytes (a video
    replaced under the same name is encoded again). Relative, not the folder as typed: a rerun naming it otherwise
    (absolute after relative) or the same folder moved or mounted elsewhere resumes, where the VAE would redo hours
    of identical work (the shards' records keep the path of the run that wrote them). A video outside the folder
    (an absolute path in the captions file), or records given without their folder: its resolved absolute path.
    Size None: missing (skipped, and listed, each run alike)."""
    key = None
    if videos is not None:
        try:
            key = path.relative_to(videos).as_posix()
        except ValueError:
            pass
    return [key or path.resolve().as_posix(), path.stat().st_size if path.is_file() else None]


def _digest(records: list[VideoRecord], keys: list[list]) -> str:
    """What a chunk's records are: each video (its `_video_key`, in `keys`), its prompt and caption."""
    text = json.dumps([DIGEST_VERSION, [[*key, r.prompt, r.caption] for r, key in zip(records, keys)]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _legacy_digest(records: list[VideoRecord]) -> str:
    """The digest of caches written before DIGEST_VERSION 2: the paths as typed (they match when typed as then)."""
    text = json.dumps([[str(r.path), r.prompt, r.caption] for r in records])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sample(path: Path) -> str:
    """A digest of a video file's first and last MiB: tells apart two videos of one size without reading them."""
    digest = hashlib.sha256()
    hash_edges(digest, path)
    return digest.hexdigest()[:16]


class _EarlierLatents:
    """The latents of videos this cache encoded before, found by video (`_video_key` and `_sample`), in the shards
    made with these settings and encoders: a chunk encoded again (its rows changed, e.g. a row inserted or deleted
    above it shifted them) takes them instead of decoding and running the VAE again. A shard about to be replaced
    is moved to `shards/stale/`, and deleted once no row still to come names one of its videos. The shards' headers
    are read when a chunk is first encoded, or at once when a cut run left shards aside (a rerun that keeps every
    chunk reads none)."""

    def __init__(self, shards: Path, made_with: str) -> None:
        self.shards, self.stale, self.made_with = shards, shards / "stale", made_with
        self.where: dict[str, tuple[Path, int]] = {}  # json [key, sample] -> (shard, row)
        self.moved: dict[Path, Path] = {}  # shard -> where retire() put it
        self.videos_in: dict[Path, list[str]] = {}  # stale shard -> its rows' json keys
        self.read: dict[Path, tuple[list[str], int]] = {}  # shard -> its rows' json keys, its rows without records
        self.unrecorded = 0  # rows an older univigu wrote, without these records (never reused), in shards replaced
        self.scanned = False
        # shards a cut run moved aside: read at once, so that free() deletes those no row needs from the start
        if self.stale.is_dir() and any(self.stale.glob("*.safetensors")):
            self._scan()

    def _scan(self) -> None:
        """Index the shards' records (once; before any is moved: they are found by where they were)."""
        if self.scanned:
            return
        self.scanned = True
        for file in [*sorted(self.stale.glob("*.safetensors")), *sorted(self.shards.glob("*.safetensors"))]:
            rows = self._rows(file)
            for row, record in enumerate(rows):  # rows of before this record, or of other settings: not used
                if record.get("made_with") == self.made_with and "sample" in record:
                    self.where[json.dumps([record["key"], record["sample"]])] = (file, row)
            self.read[file] = [json.dumps(r.get("key")) for r in rows], sum("made_with" not in r for r in rows)
            if file.parent == self.stale:  # replaced by a run that was cut: counted as replaced by this one
                self.videos_in[file], unrecorded = self.read[file]
                self.unrecorded += unrecorded

    @staticmethod
    def _rows(file: Path) -> list[dict]:
        try:
            with safe_open(file, "pt") as f:
                return json.loads((f.metadata() or {}).get("records", "[]"))
        except (OSError, SafetensorError, ValueError):  # a damaged file: its videos are encoded again
            return []

    def get(self, key: list, sample: str) -> Tensor | None:
        """The latents [C, T', H', W'] of a video, or None."""
        self._scan()
        file, row = self.where.get(json.dumps([key, sample]), (None, 0))
        if file is None:
            return None
        try:
            with safe_open(self.moved.get(file, file), "pt") as f:
                return f.get_slice("latents")[row : row + 1][0]
        except (OSError, SafetensorError):
            return None

    def retire(self, file: Path) -> None:
        """Move a shard about to be replaced or deleted aside (a unique name: an earlier cut run may have left one)."""
        self._scan()
        if not file.exists():
            return
        self.stale.mkdir(exist_ok=True)
        target = self.stale / f"{time.time_ns()}_{file.name}"
        # read by the scan (a shard this run wrote is never replaced by it); without its keys it is freed at once
        self.videos_in[target], unrecorded = self.read.get(file, ([], 0))
        os.replace(file, target)
        self.moved[file] = target
        self.unrecorded += unrecorded

    def free(self, pending: Counter) -> None:
        """Delete the stale shards none of whose videos a row still to come names (`pending`: json keys)."""
        for file, keys in list(self.videos_in.items()):
            if not any(pending[key] for key in keys):
                file.unlink(missing_ok=True)
                del self.videos_in[file]


def _too_long(records: list[VideoRecord], tokenizer: Any, text_length: int, prompt_length: int | None = None,
              kinds: tuple[str, ...] = ("prompt", "caption")) -> dict[int, str]:  # fmt: skip
    """{position in records: why} for records whose texts of `kinds` the text stream cannot hold, or (given
    `prompt_length`) whose prompt umT5 would have to truncate: `generate` refuses such a prompt (PromptError), so
    training on its cut states would teach what no prompt at inference gives."""
    limit = text_length - 1  # the end token
    counts = {kind: [len(ids) for ids in tokenizer([getattr(r, kind) for r in records],
                                                    add_special_tokens=False)["input_ids"]]
              for kind in kinds}  # fmt: skip
    if prompt_length is not None:  # counted as encode_prompts encodes it: whitespace runs collapsed
        encoded = tokenizer([" ".join(r.prompt.split()) for r in records], add_special_tokens=False)["input_ids"]
    reasons = {}
    for i, record in enumerate(records):
        why = []
        long = [f"{kind} is {counts[kind][i]} tokens" for kind in counts if counts[kind][i] > limit]
        if len(long) == 2 and record.prompt == record.caption:  # a record with one text uses it for both
            long = [f"prompt (also its caption) is {counts['prompt'][i]} tokens"]
        if long:
            why.append(f"{' and '.join(long)} long; the text stream holds {limit} (text length {text_length}, end "
                       "token included)")  # fmt: skip
        if prompt_length is not None and len(encoded[i]) > prompt_length - 1:
            why.append(f"prompt is {len(encoded[i])} tokens long; umT5 reads {prompt_length - 1} (prompt length "
                       f"{prompt_length}, end token included)")  # fmt: skip
        if why:
            reasons[i] = f"{record.path}: {'; '.join(why)}"
    return reasons


def build_latent_cache(records: list[VideoRecord], out_dir: str | os.PathLike, wan: Any, settings: CacheSettings,
                       log: Callable[[str], None] = tqdm.write,
                       videos: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Encode `records` with `wan` (a `WanComponents`) into a cache folder; returns the index.

    `videos`: the folder the records' paths were read in (`read_captions`'s); a rerun's chunks are matched by
    the paths in it, however it is named (without it: by resolved absolute paths).

    Each bucket size is checked against the VAE first (ValueError naming the nearest valid size); a folder
    holding a cache made with other settings is refused (`CacheError`), and so is one another run is writing
    (`RunFolderInUse`, from its OUT/run.lock)."""
    from univigu.training.checkpoint import sole_run

    with sole_run(Path(out_dir), "univigu cache-latents"):
        return _build_latent_cache(records, Path(out_dir), wan, settings, log, videos)


def _build_latent_cache(records: list[VideoRecord], out: Path, wan: Any, settings: CacheSettings,
                        log: Callable[[str], None], videos: str | os.PathLike | None) -> dict:  # fmt: skip
    dtype = getattr(torch, settings.dtype)
    buckets = tuple(tuple(b) for b in settings.buckets)
    for h, w in buckets:
        wan.codec.check_size(settings.frames, h, w)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    encoders = wan.fingerprint()
    _check_settings(out, settings, encoders)
    made_with = hashlib.sha256(json.dumps([_content_settings(settings), encoders]).encode()).hexdigest()[:16]
    folder = None if videos is None else Path(videos)
    earlier = _EarlierLatents(out / "shards", made_with)
    keys = [_video_key(r.path, folder) for r in records]  # each row's video, read once
    pending = Counter(json.dumps(key) for key in keys)  # the videos of rows still to come
    null_file = out / "null_prompt.safetensors"
    if not null_file.exists():
        states, mask = wan.encode_prompts([""], length=WAN_PROMPT_LENGTH)
        _atomic_save({"prompt_states": states.to(dtype)[:, : int(mask.sum())]}, null_file, {})

    chunks = range(0, len(records), settings.shard_size)
    bar = tqdm(total=len(records), desc="cache-latents", unit="video")
    redone, reused = 0, 0  # chunks this run encoded (the rest were cached by an earlier run); videos not encoded
    redo_reasons: Counter = Counter()  # chunks encoded again, by why
    for start in chunks:
        chunk = start // settings.shard_size
        rows = slice(start, start + settings.shard_size)
        chunk_records, chunk_keys = records[rows], keys[rows]
        earlier.free(pending)  # the replaced shards no row from here on needs
        pending.subtract(json.dumps(key) for key in chunk_keys)
        done = out / "shards" / f"chunk_{chunk:05d}.done.json"
        digest = _digest(chunk_records, chunk_keys)
        if done.exists():
            previous = json.loads(done.read_text())
            recorded, legacy = previous.get("records", digest), previous.get("digest_version", 1) < DIGEST_VERSION
            same = recorded == digest or (legacy and recorded == _legacy_digest(chunk_records))
            missing = sorted(name for name in previous["shards"] if not (out / "shards" / name).exists())
            if same and not missing:
                if recorded != digest:  # resumed by the paths as typed then: from now on, by the new digest
                    _atomic_json({**previous, "records": digest, "digest_version": DIGEST_VERSION}, done)
                bar.update(len(chunk_records))
                continue
            if same:
                kind, why = "their shard files are gone", f"its shard files {missing} are gone"
            else:
                kind, why = "their records changed", "its records changed since it was cached"
                if legacy:
                    why += (" (or the videos folder is named otherwise than in the run that cached it: this chunk "
                            "was cached before chunks were matched by the paths in the folder; name the folder as "
                            "then, e.g. relative or absolute, to keep the cached chunks)")  # fmt: skip
            redo_reasons[kind] += 1
            if redo_reasons[kind] <= REDO_LINES:
                log(f"chunk {chunk}: {why}; encoding it again")
            elif redo_reasons[kind] == REDO_LINES + 1:
                log(f"chunk {chunk} and further chunks encoded again because {kind}: counted at the end")
            # the index, then the chunk's shards (moved aside), then its record: a run killed while the chunk is redone
            # leaves nothing that names its old shards (a rerun encodes it again; training meanwhile is told to finish
            # the cache)
            (out / "index.json").unlink(missing_ok=True)
            for name in previous["shards"]:
                earlier.retire(out / "shards" / name)
            done.unlink()
        redone += 1
        # (record, [video key, sample], its clip to encode or None, its latents encoded before or None), by bucket
        groups: dict[tuple[int, int], list[tuple[VideoRecord, list, Tensor | None, Tensor | None]]] = defaultdict(list)
        skipped, notes = [], []
        too_long = _too_long(chunk_records, wan.tokenizer, settings.text_length, WAN_PROMPT_LENGTH)
        unknown = unknown_words(wan.tokenizer, [f"{r.prompt} {r.caption}" for r in chunk_records])
        for i, record in enumerate(chunk_records):
            if i in too_long:
                skipped.append({"video": str(record.path), "reason": too_long[i]})
                log(f"skipped: {too_long[i]}")
                continue
            key, sample = chunk_keys[i], None
            try:
                h, w, pix_fmt = _probe(record.path)
                bucket = nearest_bucket(h, w, buckets)
                sample = _sample(record.path)
                found = earlier.get(key, sample)
                if found is not None and tuple(found.shape) != tuple(wan.codec.latent_shape(settings.frames, *bucket)):
                    found = None  # another bucket's: not this video as cached now
                clip = None if found is not None else \
                    load_clip(record.path, settings.frames, *bucket, fps=settings.fps, min_side=settings.min_side)
            except VideoReadError as error:
                skipped.append({"video": str(record.path), "reason": str(error)})
                log(f"skipped: {error}")
                continue
            if pix_fmt.startswith("gray"):
                notes.append({"video": str(record.path), "note": f"grayscale ({pix_fmt}), expanded to RGB"})
                log(f"note: {record.path}: {notes[-1]['note']}")
            if unknown[i]:  # cached as they read (generate warns of them too)
                words = ", ".join(repr(w[:40]) for w in list(dict.fromkeys(unknown[i]))[:10])
                notes.append({"video": str(record.path),
                              "note": f"words its tokenizer does not know, read as {wan.tokenizer.unk_token}: {words}"})
                log(f"note: {record.path}: {notes[-1]['note']}")
            groups[bucket].append((record, [key, sample], clip, found))
        shards = {}
        for bucket, items in groups.items():
            todo = [i for i, (_, _, clip, _) in enumerate(items) if clip is not None]
            latents = [found for *_, found in items]
            for i in range(0, len(todo), settings.batch_size):
                batch = todo[i : i + settings.batch_size]
                for j, encoded in zip(batch, wan.encode_video(torch.stack([items[j][2] for j in batch]))):
                    latents[j] = encoded
            reused += len(items) - len(todo)
            states, mask = wan.encode_prompts([r.prompt for r, *_ in items], length=WAN_PROMPT_LENGTH)  # none cut
            lengths = mask.sum(1)
            name = f"chunk_{chunk:05d}_{bucket_name(bucket)}.safetensors"
            earlier.retire(out / "shards" / name)  # left by a cut run: its latents may serve this chunk's
            # one metadata entry: safetensors writes several in no fixed order (a rerun's file would differ)
            meta = [{"video": str(r.path), "prompt": r.prompt, "caption": r.caption, "key": key, "sample": sample,
                     "made_with": made_with} for r, (key, sample), *_ in items]  # fmt: skip
            tensors = {"latents": torch.stack([x.to(dtype) for x in latents]),
                       "prompt_states": states[:, : int(lengths.max())].to(dtype), "prompt_lengths": lengths}
            _atomic_save(tensors, out / "shards" / name, {"records": json.dumps(meta)})
            shards[name] = {"bucket": bucket_name(bucket), "count": len(items)}
        _atomic_json({"shards": shards, "skipped": skipped, "notes": notes, "records": digest,
                      "digest_version": DIGEST_VERSION}, done)  # fmt: skip
        bar.update(len(chunk_records))
    bar.close()
    shutil.rmtree(earlier.stale, ignore_errors=True)
    for kind, count in redo_reasons.items():
        if count > REDO_LINES:
            log(f"{count - REDO_LINES} more chunk(s) encoded again because {kind} ({count} in all)")
    if redone < len(chunks):
        log(f"{len(chunks) - redone} of {len(chunks)} chunks were cached by an earlier run (kept as they were)")
    if earlier.unrecorded:
        log(f"{earlier.unrecorded} video(s) in the shards replaced were cached by an older univigu, which recorded "
            "nothing to reuse their latents by: those still listed were encoded again")  # fmt: skip
    if reused:
        log(f"{reused} video(s) of the chunks encoded again were encoded by an earlier run: their latents were "
            "reused, not encoded again")  # fmt: skip
    return _write_index(out, settings, len(chunks), log, wan.codec.latent_space())


def _write_index(out: Path, settings: CacheSettings, num_chunks: int, log: Callable[[str], None],
                 latent_space: dict[str, Any]) -> dict:  # fmt: skip
    """index.json and skipped.jsonl from every chunk's done file."""
    buckets: dict[str, dict] = {}
    skipped, notes = [], []
    with safe_open(out / "null_prompt.safetensors", "pt") as f:
        prompt_dim = f.get_slice("prompt_states").get_shape()[-1]
    for chunk in range(num_chunks):
        done = json.loads((out / "shards" / f"chunk_{chunk:05d}.done.json").read_text())
        skipped += done["skipped"]
        notes += done["notes"]
        for name, info in done["shards"].items():
            entry = buckets.setdefault(info["bucket"], {"shards": [], "counts": []})
            entry["shards"].append(f"shards/{name}")
            entry["counts"].append(info["count"])
    for entry in buckets.values():
        with safe_open(out / entry["shards"][0], "pt") as f:
            entry["latent_shape"] = f.get_slice("latents").get_shape()[1:]
    index = {"version": 1, "settings": asdict(settings), "latent_space": latent_space, "prompt_dim": prompt_dim,
             "buckets": buckets,
             "num_videos": sum(sum(b["counts"]) for b in buckets.values()), "num_skipped": len(skipped),
             "notes": notes}  # fmt: skip
    with (out / "skipped.jsonl").open("w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    _atomic_json(index, out / "index.json")
    log(f"cached {index['num_videos']} videos in {len(buckets)} bucket(s) {sorted(buckets)}; "
        f"skipped {len(skipped)} (listed in {out / 'skipped.jsonl'})")  # fmt: skip
    return index


class LatentCacheDataset(Dataset):
    """The videos of one bucket of a latent cache. Item: {"video": latents [C, T', H', W'] float32,
    "prompt_states": [prompt_length, D] float32 (zero past the prompt), "prompt": str, "caption": str}.

    bucket: "HxW"; None picks the only bucket (an error naming them when there are several: batches must
    share a size, so train one bucket per stage)."""

    def __init__(self, path: str | os.PathLike, bucket: str | None = None, prompt_length: int = 512) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.exists():
            if (self.path / "settings.json").exists():  # a run that was cut, or is redoing changed chunks
                raise FileNotFoundError(f"{self.path}: its `univigu cache-latents` run has not finished (no "
                                        "index.json yet): run it again to finish the cache")  # fmt: skip
            raise FileNotFoundError(f"{self.path} is not a latent cache (no index.json); build one with "
                                    "`univigu cache-latents`")  # fmt: skip
        self.index = json.loads(index_file.read_text())
        buckets = self.index["buckets"]
        if bucket is None and len(buckets) == 1:
            bucket = next(iter(buckets))
        if bucket not in buckets:
            counts = {b: sum(v["counts"]) for b, v in buckets.items()}
            what = "holds several buckets: name one" if bucket is None else f"has no bucket {bucket!r}"
            raise CacheError(f"{self.path} {what} (data.bucket; one per stage, batches share a size): {counts} "
                             "(videos per bucket)")  # fmt: skip
        self.bucket, self.prompt_length = bucket, prompt_length
        entry = buckets[bucket]
        self.latent_shape = tuple(entry["latent_shape"])
        self.rows = [(shard, row) for shard, n in zip(entry["shards"], entry["counts"]) for row in range(n)]
        self._records: dict[str, list[dict]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def frame_size(self) -> tuple[int, int, int]:
        """(frames, height, width) of the videos in pixels."""
        h, w = map(int, self.bucket.split("x"))
        return self.index["settings"]["frames"], h, w

    def records(self) -> list[VideoRecord]:
        """The bucket's records (video, prompt, caption), in its order."""
        shards = dict.fromkeys(shard for shard, _ in self.rows)
        return [VideoRecord(Path(r["video"]), r["prompt"], r["caption"]) for s in shards for r in self._records_of(s)]

    def check_texts(self, canvas: Any, kinds: tuple[str, ...] = ("prompt", "caption")) -> None:
        """Raise `CacheError` naming the cached texts of `kinds` (a stage that trains no caption reads only prompts)
        longer than `canvas` (a `TextCanvas`) holds, so a stage fails before its first step, not at the batch that
        holds one. Free when the cache was made for a text stream no longer than this one (longer texts were
        skipped then)."""
        made = self.index["settings"].get("text_length")
        if made is not None and made <= canvas.length:
            return
        records = self.records()
        reasons = list(_too_long(records, canvas.tokenizer, canvas.length, kinds=kinds).values())
        if reasons:
            raise CacheError(f"{len(reasons)} of the {len(records)} cached videos have a text the stage's text stream "
                             f"cannot hold, e.g. {reasons[0]}. Raise pipeline.text_length (--pipeline.text_length=N), "
                             f"or cache again with --text-length {canvas.length} (skips them)")  # fmt: skip

    def _records_of(self, shard: str) -> list[dict]:
        """The records (video, prompt, caption) of a shard, read once from its metadata."""
        if shard not in self._records:
            with safe_open(self.path / shard, "pt") as f:
                self._records[shard] = json.loads(f.metadata()["records"])
        return self._records[shard]

    def null_prompt_states(self) -> Tensor:
        """[1, prompt_length, D] float32: the empty prompt's states, zero-padded."""
        with safe_open(self.path / "null_prompt.safetensors", "pt") as f:
            return self._pad(f.get_tensor("prompt_states")[0])[None]

    def _pad(self, states: Tensor) -> Tensor:
        out = states.new_zeros(self.prompt_length, states.shape[-1], dtype=torch.float32)
        out[: len(states)] = states.float()
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row = self.rows[index]
        with safe_open(self.path / shard, "pt") as f:  # memory-mapped: reads only this row
            length = int(f.get_slice("prompt_lengths")[row : row + 1][0])
            states = f.get_slice("prompt_states")[row : row + 1][0, :length]
            latents = f.get_slice("latents")[row : row + 1][0].float()
        record = self._records_of(shard)[row]
        return {"video": latents, "prompt_states": self._pad(states), "prompt": record["prompt"],
                "caption": record["caption"]}  # fmt: skip


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents [B, C, T', H', W'] and prompt states [B, S, D]; keep texts as lists."""
    return {
        "video": torch.stack([it["video"] for it in items]),
        "prompt_states": torch.stack([it["prompt_states"] for it in items]),
        "prompt": [it["prompt"] for it in items],
        "caption": [it["caption"] for it in items],
    }


class LatentCodec:
    """The codec of cached data: the batch already holds the latents [B, C, T', H', W']."""

    def encode(self, latents: Tensor) -> Tensor:
        if not latents.is_floating_point() or latents.ndim != 5:
            raise ValueError(f"expected float latents [B, C, T, H, W], got {latents.dtype} {tuple(latents.shape)}")
        return latents.float()

"""Tokenizers for the text stream and the prompt encoder, and the fixed-length text canvas.

The toy world's tokenizer is a word-level `tokenizers` model built offline from the world's
vocabulary and wrapped as a `transformers` fast tokenizer, so it saves as `tokenizer.json`
next to a checkpoint and loads with `AutoTokenizer`. Real-scale models use the umT5
tokenizer; `TextCanvas` works with either, through the standard special-token attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from univigu.data.world import vocabulary
from univigu.flow.text import cut_at_end

PAD, END, MASK, UNK = "[PAD]", "[END]", "[MASK]", "[UNK]"


def build_world_tokenizer(words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary (or `words`), with pad/end/mask/unk."""
    words = sorted(set(words if words is not None else vocabulary()))
    specials = [PAD, END, MASK, UNK]
    vocab = {token: i for i, token in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "right." into "right", "."
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=END, mask_token=MASK, unk_token=UNK
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved next to a checkpoint (local folder only, never the network)."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def unknown_words(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[str]]:
    """Per text, the words `tokenizer` reads as its unknown token, as written (a fast tokenizer: its offsets)."""
    if tokenizer.unk_token_id is None:
        return [[] for _ in texts]
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [[text[a:b].strip() for t, (a, b) in zip(ids, spans) if t == tokenizer.unk_token_id]
            for text, ids, spans in zip(texts, encoded["input_ids"], encoded["offset_mapping"])]  # fmt: skip


@dataclass
class TextCanvas:
    """A fixed-length text canvas: tokens, then one end token, then padding.

    The end token and the padding are real targets of the text stream (the model learns
    where the text stops). Tokenizers without a mask token (umT5) get one extra id,
    `vocab_size`, for the absorbing source of discrete flow matching.
    """

    tokenizer: PreTrainedTokenizerBase
    length: int

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def end_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def mask_id(self) -> int:
        mask = self.tokenizer.mask_token_id
        return int(mask) if mask is not None else self.vocab_size

    def encode(self, texts: Sequence[str], truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts to `(ids [B, L] long, mask [B, L] bool)`; mask is True on text and end token.

        Raises ValueError for a text longer than the canvas unless `truncate`.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.length), dtype=torch.bool)
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        for i, tokens in enumerate(encoded):
            if len(tokens) + 1 > self.length:
                if not truncate:
                    raise ValueError(
                        f"text {i} has {len(tokens)} tokens but the canvas holds "
                        f"{self.length - 1} plus the end token: {texts[i][:80]!r}"
                    )
                tokens = tokens[: self.length - 1]
            n = len(tokens)
            ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
            ids[i, n] = self.end_id
            mask[i, : n + 1] = True
        return ids, mask

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token rows `[B, L]` to texts, cut at the first end token."""
        texts = []
        for row in cut_at_end(ids, self.end_id):
            row = [t for t in row if t < self.vocab_size and t not in (self.pad_id, self.mask_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            texts.append(text.replace(" .", ".").replace(" ,", ","))
        return texts

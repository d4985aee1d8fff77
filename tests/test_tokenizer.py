import pytest
import torch

from univigu.data.tokenizer import TextCanvas, build_world_tokenizer, load_tokenizer
from univigu.data.world import World


def test_world_tokenizer_round_trip_through_canvas(tmp_path):
    tok = build_world_tokenizer()
    tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists()
    canvas = TextCanvas(load_tokenizer(tmp_path), length=64)
    scenes = World().scenes("train", range(200))
    ids, mask = canvas.encode([s.caption for s in scenes])
    assert ids.shape == (200, 64) and mask.dtype == torch.bool
    assert canvas.decode(ids) == [s.caption for s in scenes]
    # one end token per row, right after the text; padding after it
    lengths = mask.sum(1)
    assert (ids[torch.arange(200), lengths - 1] == canvas.end_id).all()
    assert (ids[~mask] == canvas.pad_id).all()
    assert tok.unk_token_id not in ids


def test_special_ids_are_distinct_and_mask_in_vocab():
    canvas = TextCanvas(build_world_tokenizer(), length=8)
    ids = {canvas.pad_id, canvas.end_id, canvas.mask_id, canvas.tokenizer.unk_token_id}
    assert len(ids) == 4 and canvas.mask_id < canvas.vocab_size


def test_over_long_text_is_a_clear_error_or_truncated():
    canvas = TextCanvas(build_world_tokenizer(), length=4)
    with pytest.raises(ValueError, match="canvas holds 3"):
        canvas.encode(["a red circle moves right"])
    ids, mask = canvas.encode(["a red circle moves right"], truncate=True)
    assert canvas.decode(ids) == ["a red circle"] and mask.all()


def test_decode_stops_at_end_and_unknown_words_map_to_unk():
    canvas = TextCanvas(build_world_tokenizer(), length=8)
    ids, _ = canvas.encode(["a red zebra"])
    assert canvas.tokenizer.unk_token_id in ids[0].tolist()
    row = torch.tensor([canvas.encode(["a red circle"])[0][0].tolist()])
    row[0, -1] = canvas.tokenizer.convert_tokens_to_ids("blue")  # after the end token
    assert canvas.decode(row) == ["a red circle"]


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_the_canvas_holds_length_minus_one_tokens_then_the_end_token():
    canvas = TextCanvas(build_world_tokenizer(), length=4)
    ids, mask = canvas.encode(["a red circle"])  # 3 tokens + end: exactly full
    assert ids[0, 3] == canvas.end_id and mask.all() and canvas.decode(ids) == ["a red circle"]
    with pytest.raises(ValueError, match="has 4 tokens but the canvas holds 3 plus the end token"):
        canvas.encode(["a red circle moves"])


def _tokenizer_without_mask():
    """A umT5-like tokenizer: pad, end and unknown tokens, no mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "cat": 5}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def test_a_tokenizer_without_mask_token_gets_the_extra_id_vocab_size():
    """umT5 has no mask token: the absorbing source's mask is one id past the vocabulary (not a real word's id), and
    decode drops it wherever it is left."""
    canvas = TextCanvas(_tokenizer_without_mask(), length=8)
    assert canvas.vocab_size == 6 and canvas.mask_id == 6
    ids, _ = canvas.encode(["a red cat"])
    assert ids[0].tolist() == [3, 4, 5, 1, 0, 0, 0, 0]
    assert canvas.decode(torch.tensor([[3, 6, 4, 6, 5, 1, 6, 0]])) == ["a red cat"]


def test_unknown_words_are_named_as_written():
    from univigu.data.tokenizer import unknown_words

    tok = build_world_tokenizer()
    assert unknown_words(tok, ["a red Zebra circle, Okapi.", "a red circle"]) == [["Zebra", "Okapi"], []]

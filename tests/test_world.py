import numpy as np
import pytest
import torch

from univigu.data.dataset import WorldDataset, collate
from univigu.data.world import (
    BACKGROUNDS,
    MOTIONS,
    OBJECT_COLOURS,
    SHAPES,
    SIZE_RADIUS,
    TRAVEL,
    Scene,
    World,
    WorldConfig,
    WorldObject,
    attribute_matches,
    parse_caption,
    render_videos,
    tokenize_caption,
    vocabulary,
)


def test_samples_are_deterministic_and_splits_differ():
    world = World()
    a = world.scenes("train", range(20), seed=3)
    b = world.scenes("train", range(20), seed=3)
    assert a == b
    assert np.array_equal(world.render(a), world.render(b))
    assert a != world.scenes("val", range(20), seed=3)
    assert a != world.scenes("train", range(20), seed=4)
    # An item does not depend on which batch renders it.
    assert np.array_equal(world.render(a)[7], world.render([a[7]])[0])


def test_render_shape_dtype_and_configurable_size():
    cfg = WorldConfig(height=24, width=40, frames=5)
    world = World(cfg)
    videos = world.render(world.scenes("test", range(8)))
    assert videos.shape == (8, 5, 24, 40, 3) and videos.dtype == np.uint8


def test_every_value_appears_and_objects_stay_in_frame():
    world = World()
    scenes = world.scenes("train", range(3000))
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(OBJECT_COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.motion for o in objects} == set(MOTIONS)
    assert {len(s.objects) for s in scenes} == {1, 2}
    videos = world.render(scenes[:500])
    # The border of every frame is background: objects never leave the frame.
    for scene, video in zip(scenes[:500], videos):
        bg = np.array(video[0, 0, 0])
        border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
        assert (border == bg).all()


def test_prompt_names_main_object_and_motion():
    scene = World().scene("train", 5)
    main = scene.objects[0]
    assert scene.prompt.startswith(f"a {main.colour} {main.shape} ")
    words = {"grow": "grows", "still": "stays still"}
    assert scene.prompt.endswith(words.get(main.motion, f"moves {main.motion}"))


def test_every_caption_parses_back_exactly():
    world = World()
    for split in ("train", "test", "heldout"):
        for scene in world.scenes(split, range(1500)):
            assert parse_caption(scene.caption) == scene.attributes(), scene.caption


def test_tokenize_caption_splits_words_and_punctuation_in_lower_case():
    assert tokenize_caption("A Red circle,moves right.") == ["a", "red", "circle", ",", "moves", "right", "."]
    assert tokenize_caption("  ?! 3 ") == []


def test_parser_is_tolerant_and_missing_counts_wrong():
    text = "zzz a large red circle quickly moves left blorp from the top right. the background is gray."
    parsed = parse_caption(text)
    assert parsed["background"] == "gray"
    assert parsed["objects"] == [
        {"colour": "red", "shape": "circle", "size": "large", "motion": "left", "speed": "fast",
         "position": "top right"}  # fmt: skip
    ]
    truth = {"background": "gray", "objects": [dict(parsed["objects"][0])]}
    partial = parse_caption("a red circle. the background is gray.")
    scores = attribute_matches(truth, partial)
    assert scores["colour"] == (1, 1) and scores["shape"] == (1, 1)
    assert scores["size"] == (0, 1) and scores["motion"] == (0, 1) and scores["position"] == (0, 1)
    assert parse_caption("") == {"background": None, "objects": []}


def test_heldout_combinations_never_in_5k_training_samples():
    """Drawn objects that are held out are redrawn; one uniform draw in six is one, so 5k scenes try the rule
    over a thousand times (20k took 25 s of the suite)."""
    world = World()
    for i in range(5_000):
        for obj in world.scene("train", i).objects:
            assert not world.is_heldout(obj), (i, obj)


def test_heldout_split_main_object_is_a_heldout_combination():
    world = World()
    scenes = world.scenes("heldout", range(300))
    assert all(world.is_heldout(s.objects[0]) for s in scenes)
    combos = {tuple(sorted(c.items())) for c in world.config.heldout}
    seen = {c for s in scenes for c in combos if all(s.objects[0].attributes()[k] == v for k, v in c)}
    assert seen == combos


def test_config_rejects_unknown_heldout_values():
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig(heldout=({"colour": "mauve", "shape": "circle"},))
    with pytest.raises(ValueError, match="split"):
        World().scene("training", 0)


def test_vocabulary_covers_all_captions():
    vocab = set(vocabulary())
    for scene in World().scenes("train", range(500)):
        assert set(tokenize_caption(scene.caption)) <= vocab
        assert set(scene.prompt.split()) <= vocab


def test_dataset_yields_video_prompt_caption_attributes():
    ds = WorldDataset("val", size=10, seed=1)
    item = ds[4]
    assert item["video"].dtype == torch.uint8 and item["video"].shape == (16, 32, 32, 3)
    assert item["prompt"] and item["caption"] and item["attributes"]["objects"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 16, 32, 32, 3)
    assert torch.equal(batch["video"][1], ds[1]["video"])
    with pytest.raises(IndexError):
        ds[10]


def test_render_videos_draws_known_scenes():
    """Hand-made scenes in a 24x40 world of 5 frames: the background everywhere but the objects, a still circle
    the same in every frame, a square moving right by TRAVEL * width over the clip, in its own colour."""
    config = WorldConfig(height=24, width=40, frames=5)
    still = WorldObject("red", "circle", "large", "still", None, "center", x=20.0, y=12.0)
    moving = WorldObject("blue", "square", "small", "right", "slow", "middle left", x=8.0, y=12.0)
    video = render_videos([Scene("gray", (still,)), Scene("white", (moving,))], config)
    assert video.shape == (2, 5, 24, 40, 3)
    red, blue, gray, white = (OBJECT_COLOURS["red"], OBJECT_COLOURS["blue"], BACKGROUNDS["gray"],
                              BACKGROUNDS["white"])  # fmt: skip
    assert (video[0, :, 12, 20] == red).all() and (video[0, :, 0, 0] == gray).all()
    assert (video[0] == video[0, :1]).all()  # still
    radius = SIZE_RADIUS["large"] * 24  # pixels: the circle covers about pi r^2 of them
    covered = (video[0, 0] == red).all(-1).sum()
    assert abs(covered - np.pi * radius**2) < 0.1 * np.pi * radius**2
    assert set(map(tuple, video[0, 0].reshape(-1, 3))) == {red, gray}
    end_x = 8 + TRAVEL["slow"] * 40  # 18
    assert (video[1, 0, 12, 8] == blue).all() and (video[1, 0, 12, int(end_x)] == white).all()
    assert (video[1, -1, 12, int(end_x)] == blue).all() and (video[1, -1, 12, 8] == white).all()
    assert np.array_equal(World(config).render([Scene("gray", (still,))]), video[:1])


@pytest.mark.parametrize("caption", [None, 3, ["a red circle."]])
def test_parse_caption_rejects_non_str(caption):
    with pytest.raises(TypeError, match="caption must be a str"):
        parse_caption(caption)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(height=32.5), TypeError, r"WorldConfig.height must be an int >= 16, got float 32.5"),
    (dict(height="32"), TypeError, r"WorldConfig.height must be an int"),
    (dict(frames=1), ValueError, r"WorldConfig.frames must be an int >= 2, got 1"),
    (dict(height=2**20, width=2**20, frames=2**20), ValueError, r"pixels per video, too many to render"),
    # the smallest int the check allows, but a large fast object cannot sweep across it (training failed mid-run)
    (dict(height=16, width=16), ValueError, r"16x16 \(height x width\): a \{.*'size': 'large'.*\} object does not "
                                             r"fit the frame; every object fits 17x17"),
    (dict(height=16, width=64), ValueError, r"every object fits 17x64"),
    (dict(two_object_prob=2), ValueError, r"two_object_prob must be a probability in \[0, 1\], got 2"),
    (dict(two_object_prob=-1), ValueError, r"two_object_prob .* got -1"),
    (dict(two_object_prob=float("nan")), ValueError, r"two_object_prob .* got nan"),
    (dict(heldout="abc"), TypeError, r"heldout must be a sequence of non-empty dicts .* got 'abc'"),
    (dict(heldout=({},)), TypeError, r"heldout must be a sequence of non-empty dicts"),
])  # fmt: skip
def test_config_rejects_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        WorldConfig(**kwargs)


@pytest.mark.parametrize("height, width", [(17, 17), (32, 17), (17, 64)])
def test_the_smallest_frames_the_config_allows_hold_every_scene(height, width):
    world = World(WorldConfig(height=height, width=width, frames=4))
    for split in ("train", "heldout"):
        assert world.render(world.scenes(split, range(300))).shape == (300, 4, height, width, 3)


def test_world_rejects_bad_config_index_and_seed():
    with pytest.raises(TypeError, match="World takes a WorldConfig.*'x'"):
        World("x")
    world = World()
    with pytest.raises(TypeError, match="index must be an int >= 0, got float 1.7"):
        world.scenes("train", [1.7])  # was silently scene 1
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        world.scene("train", 0, seed=-1)
    with pytest.raises(ValueError, match="heldout split needs held-out combinations"):
        World(WorldConfig(heldout=())).scene("heldout", 0)
    # integers of any kind still index: numpy, 0-d torch tensors (as a DataLoader may pass)
    assert world.scenes("train", [np.int64(0), torch.tensor(1)], seed=np.int64(1)) == world.scenes("train", [0, 1], 1)


def test_dataset_items_are_its_split_and_seed_scenes_and_negative_indices_are_refused():
    ds = WorldDataset("val", size=10, seed=1)
    scenes = World().scenes("val", [4, 7], 1)
    items = ds.__getitems__([4, 7])
    assert [it["prompt"] for it in items] == [s.prompt for s in scenes]
    assert [it["caption"] for it in items] == [s.caption for s in scenes]
    assert np.array_equal(items[0]["video"].numpy(), World().render(scenes[:1])[0])
    others = [WorldDataset("train", 10, seed=1), WorldDataset("val", 10, seed=2)]
    for other in others:  # another split, another seed: other scenes
        assert [it["caption"] for it in other.__getitems__(list(range(10)))] != [
            it["caption"] for it in ds.__getitems__(list(range(10)))]
    with pytest.raises(IndexError):
        ds[-1]

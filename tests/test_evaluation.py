import pytest

from univigu.data.oracle import Oracle
from univigu.data.world import World
from univigu.evaluation import caption_scores, evaluate, prompt_accuracy
from univigu.evaluation.evaluate import coevolution


def test_prompt_accuracy_on_rendered_videos_is_perfect_and_detects_swaps():
    world = World()
    scenes = world.scenes("test", range(40))
    readings = Oracle()(world.render(scenes))
    mains = [s.objects[0].attributes() for s in scenes]
    assert prompt_accuracy(mains, readings)["exact"] == 1.0
    shuffled = prompt_accuracy(mains, readings[1:] + readings[:1])
    assert shuffled["all"] < 0.7


def test_caption_scores_rank_exact_above_wrong():
    world = World()
    refs = [s.caption for s in world.scenes("test", range(20))]
    exact = caption_scores(refs, refs)
    wrong = caption_scores(refs, refs[1:] + refs[:1])
    assert exact["bleu4"] > 0.99 and exact["cider"] > wrong["cider"] and exact["bleu4"] > wrong["bleu4"]


def test_scores_refuse_unpaired_or_empty_lists():
    reading = {"objects": [{"colour": "red", "shape": "circle", "motion": "right"}]}
    want = {"colour": "red", "shape": "circle", "motion": "right"}
    for wanted, got in (([want] * 3, [reading]), ([want], [reading] * 3)):  # zip truncated: 33% and 100%
        with pytest.raises(ValueError, match="3 vs 1|1 vs 3"):
            prompt_accuracy(wanted, got)
        with pytest.raises(ValueError, match="pair up"):
            caption_scores(["a red circle"] * len(wanted), ["a red circle"] * len(got))
    with pytest.raises(ValueError, match="nothing to score"):
        prompt_accuracy([], [])
    with pytest.raises(ValueError, match="nothing to score"):
        caption_scores([], [])


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": ("bogus",)}, "tasks must be"), ({"tasks": ()}, "tasks must be"), ({"tasks": "t2v"}, "tasks must be"),
    ({"n": 0}, "n .* at least 1"), ({"n": -1}, "n .* at least 1"), ({"n": 0, "tasks": ("v2t",)}, "n .* at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"), ({"split": "bogus"}, "split must be one of"),
])  # fmt: skip
def test_evaluate_refuses_nonsense_before_touching_the_pipeline(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(object(), **kwargs)  # an object with no config: the check comes first


def test_coevolution_refuses_nonsense_before_touching_the_pipeline():
    for kwargs in ({"n": 0}, {"batch_size": 0}, {"split": "bogus"}):
        with pytest.raises(ValueError, match="at least 1|split must be"):
            coevolution(object(), **kwargs)

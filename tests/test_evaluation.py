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


def test_prompt_accuracy_all_counts_attributes_exact_counts_samples():
    """1 of 3 attributes wrong in 1 of 2 samples: "all" is 5/6 of the attributes, "exact" 1/2 of the samples."""
    want = [{"colour": "red", "shape": "circle", "motion": "right"},
            {"colour": "blue", "shape": "square", "motion": "up"}]  # fmt: skip
    readings = [{"objects": [{"colour": "red", "shape": "circle", "motion": "right"}]},
                {"objects": [{"colour": "blue", "shape": "square", "motion": "down"}]}]  # fmt: skip
    out = prompt_accuracy(want, readings)
    assert out["all"] == pytest.approx(5 / 6) and out["exact"] == pytest.approx(1 / 2)
    assert out["colour"] == out["shape"] == 1.0 and out["motion"] == 0.5


def test_caption_scores_put_candidates_against_references():
    """A candidate that is a 5-word prefix of its 20-word reference: every n-gram matches, so BLEU-4 is the
    brevity penalty exp(1 - 20/5) alone; with candidates and references swapped there is no brevity penalty
    but the precisions are 5/20, 4/19, 3/18, 2/17 (BLEU-4 about 0.18)."""
    import math

    words = [f"w{i}" for i in range(20)]
    reference, candidate = " ".join(words), " ".join(words[:5])
    scores = caption_scores([reference], [candidate])
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 20 / 5), rel=1e-3)
    swapped = caption_scores([candidate], [reference])
    assert swapped["bleu4"] > 0.15 > scores["bleu4"]


class _AgreeingPipeline:
    """A stub joint generator: the world's own scenes, rendered and captioned, so video and text agree per sample.
    Step 0 has the videos and no captions; step 1 the captions."""

    def __init__(self, n: int):
        from types import SimpleNamespace

        self.config = SimpleNamespace(height=32, width=32, frames=16, text_update="ctmc")
        self.world = World.sized_like(self.config)
        self.scenes = self.world.scenes("test", range(n), 0)

    def generate(self, prompts, seed, num_steps, progress, text_update, return_trajectory):
        from types import SimpleNamespace

        assert return_trajectory
        scenes = self.scenes[seed : seed + len(prompts)]  # seed = 0 + the batch's start
        assert [s.prompt for s in scenes] == list(prompts)
        videos = self.world.render(scenes)
        captions = [s.caption for s in scenes]
        return SimpleNamespace(video_trajectory=[videos, videos], text_trajectory=[[""] * len(scenes), captions])


def test_coevolution_shuffled_baseline_mismatches_pairs():
    out = coevolution(_AgreeingPipeline(12), n=12, batch_size=5)
    assert out["num_steps"] == 2 and out["consistency"][-1] > 0.99 and out["consistency"][0] < out["consistency"][-1]
    assert out["video"][-1] == 1.0 and out["text"][-1] == 1.0
    assert out["shuffled"] < out["consistency"][-1] - 0.2


class _WorldPipeline:
    """A stub pipeline that answers from the world itself: the prompt's own scene rendered, its true caption.
    `shift` answers with the scene `shift` places on instead (a model that gets the pairing wrong); `reverse`
    pairs joint generation's videos with their batch's captions reversed."""

    def __init__(self, n: int, shift: int = 0, reverse: bool = False):
        from univigu import PipelineConfig

        self.config = PipelineConfig()
        self.world = World.sized_like(self.config)
        self.scenes = self.world.scenes("test", range(n + shift + 1), 0)
        self.shift, self.reverse = shift, reverse

    def _scenes(self, seed: int, count: int):
        return self.scenes[seed + self.shift : seed + self.shift + count]  # seed = 0 + the batch's start

    def text_to_video(self, prompts, seed, num_steps, progress):
        from types import SimpleNamespace

        return SimpleNamespace(videos=self.world.render(self._scenes(seed, len(prompts))))

    def video_to_text(self, videos, seed, num_steps, progress):
        from types import SimpleNamespace

        return SimpleNamespace(texts=[s.caption for s in self._scenes(seed, len(videos))])

    def generate(self, prompts, seed, num_steps, progress, text_update):
        from types import SimpleNamespace

        scenes = self._scenes(seed, len(prompts))
        captions = [s.caption for s in scenes]
        return SimpleNamespace(videos=self.world.render(scenes), texts=captions[::-1] if self.reverse else captions)


def test_evaluate_scores_a_model_that_answers_with_the_truth_perfectly():
    """evaluate end to end on known answers: the true videos and captions score (near) 1 on every task, a
    pipeline answering with the next scene scores lower on T2V and V2T, and joint consistency compares each video
    with its own caption."""
    n = 12
    truth = evaluate(_WorldPipeline(n), n=n, batch_size=5, base_pipeline=_WorldPipeline(n, shift=1))
    assert truth["t2v"]["all"] > 0.99 and truth["v2t"]["all"] == 1.0 and truth["v2t"]["bleu4"] > 0.99
    assert truth["t2v_base"]["all"] < 0.8
    assert truth["t2v_drop_from_base"] == truth["t2v_base"]["all"] - truth["t2v"]["all"]
    assert truth["joint"]["t2v"] > 0.99 and truth["joint"]["consistency"] > 0.99
    reversed_pairs = evaluate(_WorldPipeline(n, reverse=True), n=n, batch_size=5, tasks=("joint",))
    assert reversed_pairs["joint"]["consistency"] < 0.8 and reversed_pairs["joint"]["t2v"] > 0.99
    wrong = evaluate(_WorldPipeline(n, shift=1), n=n, batch_size=5, tasks=("t2v", "v2t"))
    assert wrong["t2v"]["all"] < 0.8 and wrong["v2t"]["all"] < 0.8 and wrong["v2t"]["cider"] < truth["v2t"]["cider"]
    assert "joint" not in wrong and truth["n"] == n and truth["split"] == "test"

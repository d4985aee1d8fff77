from univigu.data.oracle import Oracle
from univigu.data.world import World
from univigu.evaluation import caption_scores, prompt_accuracy


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

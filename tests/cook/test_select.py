"""Issue 19 part 2, cheaper and better selection: the top-k soup and its curve, ensemble-guided greedy, and
`soup cook --best` with its verdict; each figure recomputed by a plain evaluation of the weights."""

import re

import pytest
import torch
from rich.console import Console

from soup.cook.methods import greedy_soup, guided_soup
from soup.cook.selector import Selector
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.models.metrics import scores
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.score.evaluator import predictions
from soup.train.loop import train_ingredient

from conftest import invoke_with_console, plain_scores, tiny_recipe, with_bn_reset

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def pantry(tmp_path_factory, small_sketch_root):
    """Four tiny ResNet ingredients of one start, with a holdout slice to select on; one at a high lr. Two
    epochs: with one step, every ingredient would keep the BatchNorm statistics of that step's batch at the
    shared start, which a soup then keeps (soup.cook.batchnorm)."""
    out = tmp_path_factory.mktemp("select")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, data={"holdout": 0.25}, train={"epochs": 2},
                                          sweep={"train.seed": [0, 1], "train.lr": [2e-3, 5e-2]}))
    return [read_checkpoint(train_ingredient(i, out / "checkpoints", quiet)) for i in expand_sweep(recipe)]


def run(args, monkeypatch, width=200):
    return invoke_with_console(args, monkeypatch, width)


def mean_of(checkpoints) -> dict:
    """The uniform average by hand: a float64 sum, integer buffers from the first."""
    states = [c.state_dict() for c in checkpoints]
    return {k: (sum(s[k].double() for s in states) / len(states)).float() if v.is_floating_point() else v
            for k, v in states[0].items()}


def ranked(checkpoints, split):
    accuracy = {c.name: plain_scores(c, split=split)["top1"] for c in checkpoints}
    return sorted(checkpoints, key=lambda c: -accuracy[c.name]), accuracy  # stable: ties keep the given order


def test_topk_scores_each_k_by_hand_and_keeps_the_best(pantry, tmp_path, monkeypatch):
    out = tmp_path / "topk.safetensors"
    result = run(["cook", "--topk", *[str(c.path) for c in pantry], "-o", str(out)], monkeypatch)
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(out)
    order, accuracy = ranked(pantry, "val")
    curve = soup.meta["steps"]
    assert [p["k"] for p in curve] == [1, 2, 3, 4]
    assert [p["added"] for p in curve] == [c.name for c in order]
    for point in curve:
        by_hand = with_bn_reset(soup, mean_of(order[:point["k"]])) if point["k"] > 1 else mean_of(order[:1])
        assert point["top1"] == plain_scores(order[0], by_hand)["top1"], point
    best = max(curve, key=lambda p: p["top1"])
    # The printed curve (one line, k = 1, 2, ... in the ranking's order) is the recorded one, checked by hand above.
    said = re.search(r"topk: k = 1 to 4: (.*?); best k = (\d+)", " ".join(result.output.split()))
    assert said and said.group(1).split() == [f"{p['top1']:.2%}" for p in curve], result.output
    assert int(said.group(2)) == best["k"]
    assert all(p["top1"] < best["top1"] for p in curve if p["k"] < best["k"])  # ties go to the smaller k
    assert soup.meta["topk"]["k"] == best["k"] and len(soup.meta["members"]) == best["k"]
    weights = soup.state_dict()
    expected = mean_of(order[:best["k"]])
    if best["k"] > 1:
        expected = with_bn_reset(soup, expected)
    assert all(torch.allclose(weights[k], v.to(weights[k].dtype), atol=1e-6) for k, v in expected.items())
    assert soup.meta["selection"]["top1"] == plain_scores(soup)["top1"] == best["top1"]


def test_plot_draws_the_topk_curve(pantry, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from soup.judge.plot import plot_checkpoints

    result = run(["cook", "--topk", *[str(c.path) for c in pantry], "-o", str(tmp_path / "topk.safetensors")],
                 monkeypatch)
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(tmp_path / "topk.safetensors")
    drawn = plot_checkpoints(pantry + [soup], tmp_path / "soups.png", "val")
    assert drawn["series"]["top-k: uniform of the k best"] == [p["top1"] for p in soup.meta["steps"]]
    assert drawn["series"]["top-k: chosen k"] == [max(p["top1"] for p in soup.meta["steps"])]


class Linear:
    """A stand-in selector: a linear classifier whose weights are the checkpoint's `w`, on fixed points whose
    labels a true `w` gives; it counts the weight sets it scores."""

    split = "val"

    def __init__(self, x, y):
        self.x, self.y, self.calls = x, y, 0

    def logits(self, state):
        self.calls += 1
        return self.x @ state["w"].T, self.y.tolist()

    def __call__(self, state):
        return scores(*self.logits(state))

    def judged(self, state):
        logits, targets = self.logits(state)
        return scores(logits, targets), predictions(logits, targets, ["a", "b", "c", "d"])


def linear_ingredients(tmp_path):
    """Four noisy copies of the true weights (good) and six random ones (off-basin), interleaved."""
    generator = torch.Generator().manual_seed(3)
    truth = torch.randn(4, 8, generator=generator)
    x = torch.randn(300, 8, generator=generator)
    good = [truth + 0.3 * torch.randn(4, 8, generator=generator) for _ in range(4)]
    bad = [torch.randn(4, 8, generator=generator) for _ in range(6)]
    weights = [w for pair in zip(good, bad) for w in pair] + bad[4:]
    checkpoints = []
    for i, w in enumerate(weights):
        meta = {"kind": "ingredient", "name": "lin", "id": f"{i:02d}", "recipe": {}, "backbone": "timm:lin",
                "classes": ["a", "b", "c", "d"], "start_fingerprint": "same"}
        checkpoints.append(read_checkpoint(save_checkpoint(tmp_path / f"{i}" / "model.safetensors", {"w": w}, meta)))
    return checkpoints, Linear(x, (x @ truth.T).argmax(1)), {f"{i:02d}" for i in (0, 2, 4, 6)}


def test_guided_keeps_greedy_members_and_scores_fewer_weight_sets(tmp_path):
    ingredients, select, good = linear_ingredients(tmp_path)
    greedy = greedy_soup(ingredients, select, quiet)
    greedy_calls, select.calls = select.calls, 0
    guided = guided_soup(ingredients, select, quiet)
    members = {c.meta["id"] for c, _ in guided.members}
    assert {c.meta["id"] for c, _ in greedy.members} == members == good
    assert greedy_calls == 10 + 9  # plain greedy: each ingredient, then each candidate
    # Guided: each ingredient once (its logits), the three good candidates, then three rejections in a row
    # (the default patience).
    assert select.calls == guided.extra["guided"]["scored"] == 10 + 3 + 3 < greedy_calls
    assert len(guided.extra["guided"]["untried"]) == 3
    kept = [s for s in guided.steps if s["kept"]]
    assert all(later["top1"] >= earlier["top1"] for earlier, later in zip(kept, kept[1:]))  # the paper's >=


def test_guided_through_the_cli_records_plain_figures(pantry, tmp_path, monkeypatch):
    calls = []
    logits = Selector.logits
    monkeypatch.setattr(Selector, "logits", lambda self, state: calls.append(1) or logits(self, state))
    out = tmp_path / "guided.safetensors"
    result = run(["cook", "--guided", "--patience", "1", *[str(c.path) for c in pantry], "-o", str(out)],
                 monkeypatch)
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(out)
    record = soup.meta["guided"]
    assert record["patience"] == 1 and record["plain_greedy_scores"] == 7
    assert len(calls) == record["scored"] + 1  # and the finished soup's own score
    assert f"scored {record['scored']} weight sets; plain greedy scores 4 + 3 = 7" in result.output
    order, accuracy = ranked(pantry, "val")
    by_name = {c.name: c for c in pantry}
    kept = [order[0]]
    assert soup.meta["steps"][0] == {"candidate": order[0].name, "top1": accuracy[order[0].name], "kept": True}
    for step in soup.meta["steps"][1:]:
        trial = kept + [by_name[step["candidate"]]]
        assert step["top1"] == plain_scores(order[0], with_bn_reset(soup, mean_of(trial)))["top1"]
        kept = trial if step["kept"] else kept
    assert [m["name"] for m in soup.meta["members"]] == [c.name for c in kept]
    assert soup.meta["selection"]["top1"] == plain_scores(soup)["top1"] >= accuracy[order[0].name]


@pytest.mark.parametrize("select_on", ["holdout", "val"])
def test_best_compares_every_method_cross_fitted_on_the_selection_split(pantry, tmp_path, monkeypatch, select_on):
    out = tmp_path / "best.safetensors"
    result = run(["cook", "--best", *[str(c.path) for c in pantry], "--select-on", select_on, "-o", str(out)],
                 monkeypatch)
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(out)
    record = soup.meta["best"]
    assert list(record["candidates"]) == ["uniform", "greedy", "topk", "guided", "learned", "stock"]
    assert record["skipped"] == {} and record["compared_on"]["split"] == select_on
    scores_ = record["candidates"]
    assert record["winner"] == max(scores_, key=lambda m: scores_[m])  # ties: the earlier method
    # Recomputed plainly: the saved winner's weights on the whole split; the uniform soup chooses nothing,
    # so cross-fitted it scores what the one uniform soup, averaged by hand, scores on the whole split.
    assert soup.meta["selection"]["top1"] == plain_scores(soup, split=select_on)["top1"]
    assert scores_["uniform"] == plain_scores(pantry[0], with_bn_reset(soup, mean_of(pantry)), split=select_on)["top1"]
    said = " ".join(result.output.split())
    assert f"against the ingredient {select_on} picks" in said
    assert "against ensemble (mean of logits)" in said
    assert f"{record['winner']} (winner)" in said
    assert f"the comparison, on {select_on} cross-fitted" in said and "no row was chosen on the images it is scored on" in said


def test_best_notes_a_method_that_cannot_run_and_refuses_mixed_flags(pantry, tmp_path, monkeypatch):
    out = tmp_path / "best.safetensors"
    result = run(["cook", "--best", str(pantry[0].path), "-o", str(out)], monkeypatch)
    assert result.exit_code == 0, result.output
    assert "best: stock skipped: the stock soup needs at least two ingredients" in " ".join(result.output.split())
    assert set(read_checkpoint(out).meta["best"]["skipped"]) == {"stock"}
    for extra, said in ((["--greedy"], "drop the method flag"), (["--patience", "2"], "drop --patience"),
                        (["--no-eval"], "drop --no-eval"), (["--folds", "1"], "--folds 1: expected 2 to 10 parts"),
                        (["--folds", "3", "--greedy"], "drop the method flag")):
        result = run(["cook", "--best", *extra, str(pantry[0].path), "-o", str(tmp_path / "x.safetensors")],
                     monkeypatch)
        assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output, result.output
    result = run(["cook", "--greedy", "--folds", "3", str(pantry[0].path), "-o", str(tmp_path / "y.safetensors")],
                 monkeypatch)
    assert result.exit_code == 2 and "--folds goes with --best" in result.output, result.output

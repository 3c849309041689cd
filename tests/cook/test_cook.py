import contextlib
import copy

import pytest
import torch
from rich.console import Console
from torch.optim.swa_utils import AveragedModel

import soup.cook.weights
from soup.cook.cooking import cook
from soup.cook.methods import METHODS, Kitchen, greedy_soup
from soup.cook.weights import weighted_average
from soup.errors import SoupError
from soup.models.backbones import build_model, model_from_checkpoint
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.recipe.spec import expand_sweep
from soup.train.loop import train_ingredient

from conftest import CLASSES

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory, small_sketch_root):
    """Three tiny ResNet ingredients (BatchNorm: integer buffers) from one start, different seeds/lrs."""
    from conftest import tiny_recipe
    from soup.recipe.spec import recipe_from_dict

    out = tmp_path_factory.mktemp("ingredients")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, train={"epochs": 1},
                                          sweep={"train.seed": [0, 1, 2]}))
    return [read_checkpoint(train_ingredient(i, out)) for i in expand_sweep(recipe)]


def test_uniform_is_the_mean_and_matches_averaged_model(ingredients, tmp_path):
    path = cook("uniform", ingredients, tmp_path / "u.safetensors", select_on=None, console=quiet)
    soup = read_checkpoint(path)
    state = soup.state_dict()
    states = [c.state_dict() for c in ingredients]
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.allclose(value, torch.stack([s[key] for s in states]).mean(0), atol=1e-6), key
        else:  # integer buffers are copied from the first ingredient, never averaged
            assert value.dtype == states[0][key].dtype and torch.equal(value, states[0][key]), key
    models = [model_from_checkpoint(c) for c in ingredients]
    averaged = AveragedModel(copy.deepcopy(models[0]))
    for model in models:  # AveragedModel counts from zero: its first update copies
        averaged.update_parameters(model)
    for name, param in averaged.module.named_parameters():
        assert torch.allclose(param, state[name], atol=1e-6), name
    assert soup.kind == "uniform" and [m["weight"] for m in soup.meta["members"]] == pytest.approx([1 / 3] * 3)
    assert soup.meta["selection"] is None and soup.classes == CLASSES
    # A soup is a normal checkpoint: it rebuilds and predicts like an ingredient.
    assert model_from_checkpoint(soup)(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASSES))


def test_uniform_with_selection_records_it(ingredients, tmp_path):
    soup = read_checkpoint(cook("uniform", ingredients, tmp_path / "u.safetensors", "val", console=quiet))
    assert soup.meta["selection"]["split"] == "val" and 0 <= soup.meta["selection"]["top1"] <= 1


def make_scalar_ingredients(tmp_path, values):
    paths = []
    for i, value in enumerate(values):
        meta = {"kind": "ingredient", "name": "pico", "id": f"{i:02d}", "recipe": {}, "backbone": "timm:pico",
                "classes": ["a"], "start_fingerprint": "same"}
        state = {"w": torch.tensor([float(value)]), "steps": torch.tensor(i, dtype=torch.int64)}
        paths.append(save_checkpoint(tmp_path / f"{i}" / "model.safetensors", state, meta))
    return [read_checkpoint(p) for p in paths]


def paper_greedy(values, score):
    """The paper's rule, written out independently for the test."""
    order = sorted(range(len(values)), key=lambda i: -score(values[i]))
    kept = [order[0]]
    best = score(values[order[0]])
    for i in order[1:]:
        trial = score(sum(values[j] for j in kept + [i]) / (len(kept) + 1))
        if trial >= best:
            kept.append(i)
            best = trial
    return kept, best


@pytest.mark.parametrize("values", [[0.9, 1.4, 0.2, 1.1, 3.0], [1.0, 1.0, 1.0], [2.0, -1.0, 0.5, 1.6]])
def test_greedy_follows_the_paper(tmp_path, values):
    def score(w):  # held-out "accuracy" peaks at w = 1
        return 1.0 - abs(w - 1.0) / 10

    ingredients = make_scalar_ingredients(tmp_path, values)

    def select(state):
        return {"top1": score(state["w"].item())}

    select.split = "val"
    soup = greedy_soup(ingredients, select, quiet)
    expected, expected_acc = paper_greedy(values, score)
    assert [c.meta["id"] for c, _ in soup.members] == [f"{i:02d}" for i in expected]
    mean = sum(values[i] for i in expected) / len(expected)
    assert soup.state_dict["w"].item() == pytest.approx(mean)
    assert score(soup.state_dict["w"].item()) == pytest.approx(expected_acc)
    assert score(soup.state_dict["w"].item()) >= max(score(v) for v in values)
    assert soup.state_dict["steps"].item() == expected[0]  # integers come from the first member


def test_greedy_by_loss_keeps_what_lowers_held_out_loss(tmp_path):
    """--criterion loss, by hand: rank by accuracy, start from the best, keep a candidate where the mix's
    held-out loss does not rise, even where accuracy ties it at a lower step (the small-val case)."""
    values = [1.3, 0.6, 1.05, 2.5]

    def accuracy(w):  # coarse, as on a small held-out set: it steps in tenths, best at 1.3
        return round(1.0 - abs(w - 1.3), 1)

    def loss(w):  # smooth, lowest at w = 1.0
        return (w - 1.0) ** 2

    ingredients = make_scalar_ingredients(tmp_path, values)

    def select(state):
        w = state["w"].item()
        return {"top1": accuracy(w), "loss": loss(w)}

    select.split = "val"
    kitchen = Kitchen(ingredients[0], {"criterion": "loss"})
    soup = greedy_soup(ingredients, select, quiet, kitchen)
    # By hand: accuracies 1.0, 0.3, 0.8, -0.2 rank 0, 2, 1, 3; the soup starts at 1.3 (loss 0.09).
    # + 1.05 -> mean 1.175, loss 0.0306: kept (its accuracy, 0.9, is below the start's 1.0);
    # + 0.6 -> mean 0.983, loss 0.0003: kept; + 2.5 -> mean 1.3625, loss 0.131: left out.
    assert [c.meta["id"] for c, _ in soup.members] == ["00", "02", "01"]
    assert soup.state_dict["w"].item() == pytest.approx((1.3 + 1.05 + 0.6) / 3)
    assert [step["kept"] for step in soup.steps] == [True, True, True, False]
    assert [step["loss"] for step in soup.steps] == pytest.approx([0.09, 0.175 ** 2, (2.95 / 3 - 1) ** 2,
                                                                   (5.45 / 4 - 1) ** 2], abs=1e-6)
    assert soup.extra == {"greedy": {"criterion": "loss"}}
    # The paper's rule on the same selection set keeps the best alone: every mix lowers accuracy.
    paper = greedy_soup(ingredients, select, quiet)
    assert [c.meta["id"] for c, _ in paper.members] == ["00"] and paper.extra == {}


def test_greedy_by_loss_through_cook_records_its_criterion(ingredients, tmp_path):
    path = cook("greedy", ingredients, tmp_path / "g.safetensors", "val", console=quiet,
                options={"criterion": "loss"})
    soup = read_checkpoint(path)
    assert soup.meta["greedy"] == {"criterion": "loss"} and all("loss" in step for step in soup.meta["steps"])
    losses = [step["loss"] for step in soup.meta["steps"] if step["kept"]]
    assert losses == sorted(losses, reverse=True)  # each kept step lowered (or held) the held-out loss
    assert soup.meta["selection"]["loss"] == pytest.approx(losses[-1], abs=1e-6)
    with pytest.raises(SoupError, match="--criterion 'accuracy': expected top1 or loss"):
        cook("greedy", ingredients, tmp_path / "h.safetensors", "val", console=quiet, options={"criterion": "accuracy"})


def test_greedy_on_real_ingredients_never_below_best(ingredients, tmp_path):
    soup = read_checkpoint(cook("greedy", ingredients, tmp_path / "g.safetensors", "val", console=quiet))
    best = max(step["top1"] for step in soup.meta["steps"][:1])
    assert soup.meta["selection"]["top1"] >= best
    assert len(soup.meta["steps"]) == len(ingredients)
    assert 1 <= len(soup.meta["members"]) <= len(ingredients)


def test_greedy_needs_data(ingredients, tmp_path):
    with pytest.raises(SoupError, match="--no-eval works with --uniform or"):
        cook("greedy", ingredients, tmp_path / "g.safetensors", None, console=quiet)


def test_streaming_average_reads_one_ingredient_at_a_time(tmp_path):
    ingredients = make_scalar_ingredients(tmp_path, [1.0, 2.0, 6.0])
    state = weighted_average([(c, 1 / 3) for c in ingredients])
    assert state["w"].item() == pytest.approx(3.0) and state["steps"].dtype == torch.int64


def test_streaming_average_holds_one_file_open_at_a_time(tmp_path, monkeypatch):
    # A file held open keeps the pages it handed out mapped and counted in RSS: N files open together made
    # cooking's memory grow with N (benchmarks/cook_memory.py measured 8.6 checkpoints at N = 8).
    ingredients = make_scalar_ingredients(tmp_path, [1.0, 2.0, 6.0])
    real_open, open_now, most = soup.cook.weights.safe_open, [0], [0]

    @contextlib.contextmanager
    def counted(*args, **kwargs):
        with real_open(*args, **kwargs) as f:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
            try:
                yield f
            finally:
                open_now[0] -= 1
    monkeypatch.setattr(soup.cook.weights, "safe_open", counted)
    state = weighted_average([(c, w) for c, w in zip(ingredients, (0.5, 0.25, 0.25))])
    assert state["w"].item() == pytest.approx(0.5 + 0.5 + 1.5) and most == [1]


def test_incompatible_checkpoints_are_refused(ingredients, tmp_path):
    base = ingredients[0]
    state = base.state_dict()

    def variant(name, meta_change=None, state_change=None):
        meta = {**base.meta, **(meta_change or {})}
        new_state = {**state, **(state_change or {})}
        return read_checkpoint(save_checkpoint(tmp_path / name / "model.safetensors", new_state, meta))

    other_classes = variant("classes", {"classes": list(reversed(CLASSES))})
    with pytest.raises(SoupError, match=r"cannot soup .* with .*classes.*: same classes in a different order"):
        cook("uniform", [base, other_classes], tmp_path / "x.safetensors", None, console=quiet)
    other_shape = variant("shape", state_change={"head.bias": torch.zeros(7)})
    with pytest.raises(SoupError, match=r"tensor head.bias differs in shape"):
        cook("uniform", [base, other_shape], tmp_path / "x.safetensors", None, console=quiet)
    other_start = variant("start", {"start_fingerprint": "0123456789abcdef"})
    with pytest.raises(SoupError, match="different starting weights.*--force"):
        cook("uniform", [base, other_start], tmp_path / "x.safetensors", None, console=quiet)
    forced = cook("uniform", [base, other_start], tmp_path / "x.safetensors", None, force=True, console=quiet)
    assert forced.exists()
    with pytest.raises(SoupError, match="tensor head.bias differs"):
        cook("uniform", [base, other_shape], tmp_path / "y.safetensors", None, force=True, console=quiet)
    assert not (tmp_path / "y.safetensors").exists()


def test_soups_are_not_cooked_again(ingredients, tmp_path):
    soup = read_checkpoint(cook("uniform", ingredients, tmp_path / "u.safetensors", None, console=quiet))
    with pytest.raises(SoupError, match="is a uniform soup, not an ingredient"):
        cook("uniform", [soup, ingredients[0]], tmp_path / "v.safetensors", None, console=quiet)
    with pytest.raises(SoupError, match="listed twice"):
        cook("uniform", [ingredients[0], ingredients[0]], tmp_path / "v.safetensors", None, console=quiet)


def test_methods_are_registered_in_one_place():
    assert {"uniform", "greedy"} <= set(METHODS)
    assert METHODS["greedy"].needs_selection and not METHODS["uniform"].needs_selection


def test_soup_can_start_a_new_run(ingredients, tmp_path):
    soup = cook("uniform", ingredients, tmp_path / "u.safetensors", None, console=quiet)
    from soup.recipe.spec import recipe_from_dict

    recipe = recipe_from_dict({**ingredients[0].recipe, "model": {**ingredients[0].recipe["model"],
                                                                   "weights": str(soup)}})
    model = build_model(recipe.model, CLASSES, 32)
    assert torch.equal(model.head.weight, read_checkpoint(soup).state_dict()["head.weight"])

"""Issue 32 section 4: a soup method declares its options, and `soup cook`'s flags, `--best`'s candidates and
the demo follow from the registry. A method registered here, in the test, as a plugin would be ("halfway",
one float option) is a flag with its option in --help, checked in one line, cooked through the CLI to the
weights a hand computation gives, and one of --best's candidates; then it is gone again."""

import contextlib

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from soup.cli import cli
from soup.cook import learned
from soup.cook.best import candidate_methods
from soup.cook.cooking import cook
from soup.cook.methods import METHODS, Kitchen, Option, Soup, soup_method
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import invoke_with_console, one_error_line, plain_scores, tiny_recipe

quiet = Console(quiet=True)
FRACTION = Option("fraction", float, 0.5, "how far from the first ingredient toward the last.", metavar="T",
                  minimum=0, maximum=1)


def halfway_soup(ingredients, select, console, kitchen: Kitchen) -> Soup:
    """Halfway (a test's method): the first ingredient moved --fraction of the way toward the last."""
    if len(ingredients) < 2:
        raise SoupError("the halfway soup needs two ingredients")
    t = kitchen.options["fraction"]
    first, last = ingredients[0].state_dict(), ingredients[-1].state_dict()
    state = {key: torch.lerp(value, last[key], t) if value.is_floating_point() else value
             for key, value in first.items()}
    return Soup(state, [(ingredients[0], 1 - t), (ingredients[-1], t)])


@contextlib.contextmanager
def registered(name="halfway", options=(FRACTION,), **kwargs):
    """`name` in the registry while the block runs, through the registry's own decorator."""
    soup_method(name, options=list(options), **kwargs)(halfway_soup)
    try:
        yield
    finally:
        del METHODS[name]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients of one start, with a holdout slice. Two epochs: after one step both would
    keep the BatchNorm statistics of that step's batch, and no soup of them would need its own."""
    out = tmp_path_factory.mktemp("halfway")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, data={"holdout": 0.25}, train={"epochs": 2},
                                          sweep={"train.seed": [0, 1]}))
    return [read_checkpoint(train_ingredient(i, out, quiet)) for i in expand_sweep(recipe)]


def by_hand(pair, t: float) -> dict:
    """(1 - t)·first + t·last in float64, integer buffers from the first."""
    a, b = pair[0].state_dict(), pair[1].state_dict()
    return {k: ((1 - t) * v.double() + t * b[k].double()).float() if v.is_floating_point() else v
            for k, v in a.items()}


def test_a_registered_method_and_its_option_are_in_cook_help_and_gone_with_it():
    with registered():
        said = "".join(CliRunner().invoke(cli, ["cook", "--help"]).output.split())  # as wrapped at any width
        for line in ("--halfway Halfway (a test's method): the first ingredient moved --fraction of the way",
                     "--fraction T --halfway: how far from the first ingredient toward the last (a number from 0 "
                     "to 1). [default: 0.5]"):
            assert "".join(line.split()) in said, line
    said = CliRunner().invoke(cli, ["cook", "--help"]).output
    assert "--halfway" not in said and "--fraction" not in said and "--patience N" in said


def test_its_option_is_checked_in_one_line_before_any_work(pair, tmp_path, monkeypatch):
    a, b = str(pair[0].path), str(pair[1].path)
    out = tmp_path / "h.safetensors"
    monkeypatch.setattr(type(pair[0]), "state_dict", lambda self: pytest.fail("ingredients read before the check"))
    with registered():
        for value, said in (("2", "--fraction 2.0: expected a number from 0 to 1"),
                            ("abc", "--fraction abc: expected a number from 0 to 1"),
                            ("nan", "--fraction nan: expected a number from 0 to 1")):
            one_error_line(CliRunner().invoke(cli, ["cook", "--halfway", a, b, "--fraction", value, "-o", str(out)]),
                           said)
        one_error_line(CliRunner().invoke(cli, ["cook", "--greedy", a, b, "--fraction", "0.3", "-o", str(out)]),
                       "--fraction is not an option of the greedy soup; it goes with --halfway")
        one_error_line(CliRunner().invoke(cli, ["cook", "--best", a, b, "--fraction", "0.3", "-o", str(out)]),
                       "drop --fraction")
        misspelled = CliRunner().invoke(cli, ["cook", "--halfway", a, b, "--fractoin", "0.3", "-o", str(out)])
        assert misspelled.exit_code == 2 and "No such option '--fractoin'" in misspelled.output
        assert "Did you mean one of: '--fraction'" in misspelled.output
        for value in ("0.3", True, -0.1):  # the Python API checks alike
            with pytest.raises(SoupError, match="--fraction .*: expected a number from 0 to 1"):
                cook("halfway", pair, out, None, console=quiet, options={"fraction": value})
    assert not out.exists()
    gone = CliRunner().invoke(cli, ["cook", a, b, "--fraction", "0.3", "-o", str(out)])
    assert gone.exit_code == 2 and "No such option '--fraction'" in gone.output  # unregistered: no method has it


def test_cooked_through_the_cli_it_equals_the_hand_computation(pair, tmp_path):
    out = tmp_path / "h.safetensors"
    with registered():
        result = CliRunner().invoke(cli, ["cook", "--halfway", str(pair[0].path), str(pair[1].path),
                                          "--fraction", "0.25", "--no-eval", "-o", str(out)])
        assert result.exit_code == 0, result.output
        default = read_checkpoint(cook("halfway", pair, tmp_path / "d.safetensors", None, console=quiet))
    soup = read_checkpoint(out)
    assert soup.kind == "halfway" and [m["weight"] for m in soup.meta["members"]] == [0.75, 0.25]
    for state, t in ((soup.state_dict(), 0.25), (default.state_dict(), 0.5)):
        expected = by_hand(pair, t)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert value.dtype == state[key].dtype and torch.allclose(state[key], value, rtol=0, atol=1e-6), key
    moved = [k for k, v in by_hand(pair, 0.25).items() if v.is_floating_point() and not torch.equal(v, by_hand(pair, 0.5)[k])]
    assert moved  # the two fractions give different soups: the option reached the method


def test_best_cooks_it_among_its_candidates(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(learned, "MIN_STEPS", 4)  # the learned candidate's fit, kept short
    out = tmp_path / "best.safetensors"
    with registered():
        assert candidate_methods()[-1] == "halfway"
        result = invoke_with_console(["cook", "--best", str(pair[0].path), str(pair[1].path), "--select-on",
                                      "holdout", "-o", str(out)], monkeypatch, 200)
        alone = read_checkpoint(cook("halfway", pair, tmp_path / "alone.safetensors", "holdout", console=quiet))
    assert result.exit_code == 0, result.output
    assert "halfway" not in candidate_methods()
    record = read_checkpoint(out).meta["best"]
    assert list(record["candidates"]) == ["uniform", "greedy", "topk", "guided", "learned", "stock", "halfway"]
    said = " ".join(result.output.split())
    assert "best: halfway:" in said and "halfway  " in result.output  # cross-fitted, and in the verdict's table
    # Its cross-fitted score is the halfway soup's (it chooses nothing, so every part's soup is the same: default
    # fraction, BatchNorm statistics re-estimated on the same train images), which a plain evaluation of that
    # soup's saved weights recomputes.
    assert record["candidates"]["halfway"] == alone.meta["selection"]["top1"] == plain_scores(alone, split="holdout")["top1"]


def test_a_declaration_mistake_is_the_authors_and_said_at_once():
    for option, said in ((Option("x", float, 0.5, ""), "help text"),
                         (Option("x", list, [], "a list"), "needs a type"),
                         (Option("x", bool, True, "on by default"), "must default to False"),
                         (Option("x", float, 2.0, "out of its own range", maximum=1), "expected a number")):
        with pytest.raises((ValueError, SoupError), match=said):
            soup_method("broken", options=[option])(halfway_soup)
    assert "broken" not in METHODS
    with registered("clash", options=[Option("force", bool, False, "shadows cook's own --force")]):
        result = CliRunner().invoke(cli, ["cook", "--help"])
    assert isinstance(result.exception, ValueError) and "--force" in str(result.exception)
    assert CliRunner().invoke(cli, ["cook", "--help"]).exit_code == 0


def test_whole_numbers_and_flags_are_read_as_declared(tmp_path):
    """The built-in options through the same path: --patience is a whole number, at least 1; --per-layer a
    flag that takes no value. Refused while parsing, before the (absent) checkpoints are looked for."""
    missing = str(tmp_path / "nowhere")
    for value, said in (("2.5", "--patience 2.5: expected a whole number, at least 1"),
                        ("0", "--patience 0: expected a whole number, at least 1")):
        one_error_line(CliRunner().invoke(cli, ["cook", "--guided", missing, "--patience", value]), said)
    result = CliRunner().invoke(cli, ["cook", "--learned", "--per-layer=yes", missing])
    assert result.exit_code == 2 and "Option '--per-layer' does not take a value" in result.output
    assert Option("n", int, 3, "n").from_text("4") == 4 and Option("x", float, 1, "x").value(2) == 2.0


"""Hostile inputs from issue 26 on cooking and what feeds it: a non-finite or endless --alpha, a user error
under torchrun, weight files that are not weights (NumPy, /dev/zero, a FIFO), an infinite grad_clip, NaN
weights at export, an edited class list, and the guided and hyperplane lines."""

import os
import shutil
import threading

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import soup.cook.cooking
from soup.cli import cli
from soup.cook.methods import MAX_ALPHA_POINTS, parse_alphas
from soup.models.checkpoint import read_checkpoint, rewrite_metadata, save_checkpoint

from conftest import ingredient_path, one_error_line, run_study, tiny_recipe

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients of one start under <work>/checkpoints/tiny/, on a copy of the data."""
    work = tmp_path_factory.mktemp("hostile_cook")
    shutil.copytree(small_sketch_root, work / "data")
    run_study(work, tiny_recipe(work / "data", sweep={"train.seed": [0, 1]}))
    return work


def edited_copy(trained, tmp_path, name, tensors=None, meta=None):
    """A copy of the first ingredient with some tensors and/or its metadata replaced."""
    source = read_checkpoint(ingredient_path(trained))
    path = tmp_path / name
    save_checkpoint(path, {**source.state_dict(), **(tensors or {})}, {**source.meta, **(meta or {})})
    return path


def write_recipe(trained, tmp_path, **sections) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(trained / "data", **sections)))
    return str(path)


# 1, 7. --alpha: finite numbers, and a sweep of at most MAX_ALPHA_POINTS ------------------------------------

@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "0:nan:0.1", "0:inf:0.1", "-inf:1:0.1", "0:1:inf",
                                   "0:1:nan", "1e300", "-1e39:0:1e38"])
def test_a_non_finite_alpha_is_one_line_before_any_ingredient_is_read(trained, tmp_path, monkeypatch, alpha):
    def never(*args, **kwargs):
        raise AssertionError("the ingredients were read before --alpha was checked")

    monkeypatch.setattr(soup.cook.cooking, "check_ingredients", never)
    out = tmp_path / "soup.safetensors"
    for extra in ([], ["--no-eval"]):
        result = CliRunner().invoke(cli, ["cook", "--interpolate", str(ingredient_path(trained, 0)),
                                          str(ingredient_path(trained, 1)), f"--alpha={alpha}", "-o", str(out),
                                          *extra])
        one_error_line(result, f"--alpha {alpha}", "finite")
    assert not out.exists()


@pytest.mark.parametrize("alpha", ["0:1:1e-7", "0:1:0.0009", "0:1001:1", "0:3e38:1e-300", "-3e38:3e38:1"])
def test_an_alpha_sweep_past_the_cap_is_one_line_naming_it(trained, tmp_path, monkeypatch, alpha):
    monkeypatch.setattr(soup.cook.cooking, "check_ingredients", lambda *a, **k: pytest.fail("ingredients read"))
    result = CliRunner().invoke(cli, ["cook", "--interpolate", str(ingredient_path(trained, 0)),
                                      str(ingredient_path(trained, 1)), f"--alpha={alpha}",
                                      "-o", str(tmp_path / "soup.safetensors")])
    one_error_line(result, f"--alpha {alpha}", f"more than {MAX_ALPHA_POINTS} points")


def test_an_alpha_whose_soup_overflows_float32_is_one_line(trained, tmp_path):
    b = read_checkpoint(ingredient_path(trained, 1)).state_dict()
    assert max(t.abs().max().item() for t in b.values() if t.is_floating_point()) > 1.2  # 3e38 x that > 3.4e38
    out = tmp_path / "soup.safetensors"
    result = CliRunner().invoke(cli, ["cook", "--interpolate", str(ingredient_path(trained, 0)),
                                      str(ingredient_path(trained, 1)), "--alpha=3e38", "-o", str(out)])
    one_error_line(result, "--alpha 3e+38", "overflows to inf or NaN")
    assert not out.exists()


def test_the_cap_itself_is_a_sweep_and_is_documented():
    assert parse_alphas("0:1:0.001") == [round(i * 0.001, 10) for i in range(MAX_ALPHA_POINTS)]
    assert parse_alphas("0:1000:1")[-1] == 1000.0 and parse_alphas("0.25") == [0.25]
    with open(os.path.join(DOCS, "cooking.md")) as page:
        assert f"at most {MAX_ALPHA_POINTS} points" in " ".join(page.read().split())


# 11. torchrun: rank 0 says a user error; every rank exits non-zero --------------------------------------

def test_under_torchrun_only_rank_0_prints_a_user_error(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.yaml")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        result = CliRunner().invoke(cli, ["train", missing])
        if rank == "0":
            one_error_line(result, "missing.yaml")
        else:
            assert result.exit_code == 2 and result.stderr == "" and result.stdout == "", result.output


def test_under_torchrun_a_rank_of_its_own_failure_says_it(trained, tmp_path, monkeypatch):
    # Rank 1 cannot join the process group (no MASTER_ADDR): rank 0 may never see that, so rank 1 says it.
    recipe = write_recipe(trained, tmp_path)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = CliRunner().invoke(cli, ["train", recipe, "--out", str(tmp_path / "out")])
    one_error_line(result, "process group for rank 1 of 2", "MASTER_ADDR")


# 11. model.weights in NumPy's formats; train.grad_clip non-finite ---------------------------------------

@pytest.mark.parametrize("name", ["w.npz", "w.npy", "npz_named.pth"])
def test_numpy_weights_are_one_line_naming_the_formats_that_work(trained, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, np.zeros(3, dtype=np.float32))
    else:
        with open(path, "wb") as f:
            np.savez(f, **{"embedding/kernel": np.zeros((2, 2), dtype=np.float32)})
    recipe = write_recipe(trained, tmp_path, model={"weights": str(path)})
    result = CliRunner().invoke(cli, ["train", recipe, "--out", str(tmp_path / "out")])
    one_error_line(result, str(path), "NumPy", ".safetensors", "torch.save")
    assert "data.pkl" not in result.output


@pytest.mark.parametrize("clip", [".inf", ".nan", "-.inf"])
def test_a_non_finite_grad_clip_is_refused_saying_what_turns_clipping_off(trained, tmp_path, clip):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(trained / "data")).replace("num_workers: 0",
                                                                           f"num_workers: 0\n  grad_clip: {clip}"))
    assert "grad_clip" in recipe.read_text()
    result = CliRunner().invoke(cli, ["train", str(recipe), "--list"])
    one_error_line(result, "train.grad_clip", "finite", "null")
    fine = CliRunner().invoke(cli, ["train", str(recipe), "--list", "--set", "train.grad_clip=1.0"])
    assert fine.exit_code == 0, fine.output


# 13. Messages that name the real trouble ----------------------------------------------------------------

def test_weights_from_a_device_a_fifo_or_a_folder_are_not_a_regular_file(trained, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it would wait for a writer forever

    def hang_up():  # should soup open the pipe after all, its reader gets an end: a failure, not a hang
        with open(fifo, "wb"):
            pass

    watchdog = threading.Timer(60, hang_up)
    watchdog.daemon = True
    watchdog.start()
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        recipe = write_recipe(trained, tmp_path, model={"weights": path})
        result = CliRunner().invoke(cli, ["train", recipe, "--out", str(tmp_path / "out")])
        one_error_line(result, f"model.weights: {path} is not a regular file", ".safetensors")
    watchdog.cancel()
    recipe = write_recipe(trained, tmp_path, model={"weights": str(tmp_path / "absent.pth")})
    one_error_line(CliRunner().invoke(cli, ["train", recipe]), "absent.pth does not exist")


def test_exporting_nan_weights_names_the_nan_not_a_bug_to_report(trained, tmp_path):
    first = read_checkpoint(ingredient_path(trained)).state_dict()
    key = next(k for k, v in first.items() if v.is_floating_point())
    poisoned = edited_copy(trained, tmp_path, "nan.safetensors", {key: first[key] * float("nan")})
    result = CliRunner().invoke(cli, ["export", str(poisoned), str(tmp_path / "exported")])
    one_error_line(result, key, "NaN")
    assert "report" not in result.output and not (tmp_path / "exported").exists()


def test_a_class_listed_twice_is_blamed_on_the_checkpoint_metadata(trained, tmp_path):
    classes = read_checkpoint(ingredient_path(trained)).classes
    for name, edited in (("dup.safetensors", classes[:-1] + classes[:1]),
                         ("dup_extra.safetensors", classes + classes[:1])):
        path = edited_copy(trained, tmp_path, name)
        rewrite_metadata(path, {**read_checkpoint(path).meta, "classes": edited})
        for args in (["eval", str(path)], ["export", str(path), str(tmp_path / f"{name}.hf")]):
            result = CliRunner().invoke(cli, args)
            one_error_line(result, str(path), "classes", f"{classes[0]!r} twice", "metadata")
            assert "class folders" not in result.stderr


def test_a_class_list_in_another_order_is_blamed_on_the_checkpoint_metadata(trained, tmp_path):
    path = edited_copy(trained, tmp_path, "reordered.safetensors")
    rewrite_metadata(path, {**read_checkpoint(path).meta, "classes": read_checkpoint(path).classes[::-1]})
    result = CliRunner().invoke(cli, ["eval", str(path)])
    one_error_line(result, "another order", "metadata (classes)")
    assert "missing []" not in result.stderr


# 16. The guided and hyperplane lines ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharper(tmp_path_factory, sketch_root):
    """An ingredient above chance on val (80 images a class), and two of its copies whose head says class 0
    whatever the image: each averaged with the first says class 0 too, so the guided soup rejects it."""
    work = tmp_path_factory.mktemp("guided")
    run_study(work, tiny_recipe(sketch_root, train={"epochs": 2}))
    good = read_checkpoint(ingredient_path(work))
    state = good.state_dict()
    bias = state["head.bias"].clone().zero_()
    bias[0] = 1e4
    for k in (1, 2):
        folder = work / "checkpoints" / "tiny" / f"fixed{k}"
        folder.mkdir()
        save_checkpoint(folder / "model.safetensors", {**state, "head.weight": state["head.weight"] * 0,
                                                       "head.bias": bias}, {**good.meta, "id": f"fixed{k}"})
    return work


def test_guided_counts_one_candidate_and_one_rejection_in_the_singular(sharper, monkeypatch):
    monkeypatch.chdir(sharper)
    result = CliRunner().invoke(cli, ["cook", "--guided", "--patience", "1", "checkpoints/tiny",
                                      "-o", "guided.safetensors"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "start from tiny/00 (" in said  # the copies say class 0: a quarter of val, below the original
    assert "(1 candidate left untried after 1 rejection in a row)" in said, said
    assert read_checkpoint(sharper / "guided.safetensors").meta["guided"]["untried"] != []


def test_a_hyperplane_bound_of_zero_prints_the_convex_hull_unsigned(trained, monkeypatch):
    monkeypatch.chdir(trained)
    result = CliRunner().invoke(cli, ["cook", "--learned", "--hyperplane", "--bound", "0",
                                      str(ingredient_path(trained, 0)), str(ingredient_path(trained, 1)),
                                      "--select-on", "val", "-o", "hull.safetensors"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "coefficients in [0, 1]" in said and "[-0" not in said, said

"""Hostile inputs on the new surfaces (issue 17): outputs aimed at the data, stored temperatures at the edge
of floats, huge bootstrap counts, nested recipe keys, unrepresentable rates, long ids, links, odd names."""

import json
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

import soup.cli.base
import soup.judge.evaluate
import soup.score.calibrate
from soup.cli import cli
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint, rewrite_metadata
from soup.models.metrics import scores
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import ingredient_path, invoke_with_console, one_error_line, run_study, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients of one start under <work>/checkpoints/tiny/, and a copy of their data
    (<work>/data, their recipe's data.root), so that a test aiming at the data can only harm a copy."""
    work = tmp_path_factory.mktemp("hostile")
    shutil.copytree(small_sketch_root, work / "data")
    run_study(work, tiny_recipe(work / "data", sweep={"train.seed": [0, 1]}))
    return work




def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. Outputs never replace the data, nor land among its images --------------------------------------------

def test_submit_never_replaces_a_test_or_val_image_even_with_overwrite(trained, tmp_path):
    data = trained / "data"
    before = snapshot(data)
    test_image = sorted((data / "test_images" / "mistery_category").iterdir())[0]
    val_image = sorted((data / "val_images" / "circle").iterdir())[0]
    for target in (test_image, val_image, data / "test_images" / "mistery_category" / "s.csv",
                   data / "val_images" / "s.csv"):
        result = CliRunner().invoke(cli, ["submit", str(ingredient_path(trained)), "--data", str(data),
                                          "-o", str(target), "--overwrite"])
        one_error_line(result, str(target), "data root")
    (data / "notes.csv").write_text("mine\n")  # a file of the data root, outside its image folders
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(trained)), "-o", str(data / "notes.csv"),
                                      "--overwrite"])  # the recipe's data.root: the same folder
    one_error_line(result, "notes.csv", "never replaces")
    (data / "notes.csv").unlink()
    assert snapshot(data) == before


def test_submit_companion_json_obeys_the_same_rule(trained, tmp_path):
    data = trained / "data"
    test_image = sorted((data / "test_images" / "mistery_category").iterdir())[0]
    before = test_image.read_bytes()
    (tmp_path / "s.csv.json").symlink_to(test_image)  # the companion would be written through into the data
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(trained)), "-o", str(tmp_path / "s.csv"),
                                      "--overwrite"])
    one_error_line(result, "s.csv.json")
    assert test_image.read_bytes() == before and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("name,existing", [("photo.jpeg", True), ("photo.JPG", True), ("new.png", False),
                                           ("scan.tiff", False), ("anim.gif", True)])
def test_a_submission_never_takes_an_image_suffix(trained, tmp_path, name, existing):
    target = tmp_path / name
    if existing:
        target.write_bytes(b"an image")
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(trained)), "-o", str(target), "--overwrite"])
    one_error_line(result, str(target), "image")
    assert target.exists() == existing and (not existing or target.read_bytes() == b"an image")


def test_cook_and_plot_never_write_into_the_data(trained, tmp_path):
    data = trained / "data"
    before = snapshot(data)
    a, b = str(ingredient_path(trained, 0)), str(ingredient_path(trained, 1))
    val_image = sorted((data / "val_images" / "circle").iterdir())[0]
    for target in (data / "val_images" / "circle" / "soup.safetensors", data / "train_images" / "s.safetensors",
                   val_image):
        one_error_line(CliRunner().invoke(cli, ["cook", "--no-eval", a, b, "-o", str(target), "--overwrite"]),
                       str(target))
    for args in (["-o", str(data / "val_images" / "circle" / "soups.png")], ["-o", str(val_image)],
                 ["-o", str(tmp_path / "p.png"), "--reliability", str(data / "train_images" / "circle" / "r.png")]):
        one_error_line(CliRunner().invoke(cli, ["plot", a, b, *args]), "data root")
    one_error_line(CliRunner().invoke(cli, ["cook", "--no-eval", a, b, "-o", str(tmp_path / "u.safetensors"),
                                            "--plot", str(data / "val_images" / "circle" / "p.png")]), "data root")
    assert snapshot(data) == before and not (tmp_path / "u.safetensors").exists()


def test_plot_reliability_never_replaces_a_checkpoint(trained, tmp_path):
    a = ingredient_path(trained)
    before = a.read_bytes()
    result = CliRunner().invoke(cli, ["plot", str(a), "-o", str(tmp_path / "p.png"), "--reliability", str(a)])
    one_error_line(result, str(a))
    assert a.read_bytes() == before


# 2. Stored temperatures within the fitting bounds; --json never prints bare NaN ---------------------------

def calibrated_copy(trained, tmp_path, temperature, index=0, name="calibrated.safetensors"):
    path = tmp_path / name
    shutil.copy(ingredient_path(trained, index), path)
    rewrite_metadata(path, {**read_checkpoint(path).meta, "calibration": {"temperature": temperature}})
    return path


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-4, 1e4, 1e300])
def test_a_temperature_outside_the_fitting_bounds_is_refused(trained, tmp_path, temperature):
    path = calibrated_copy(trained, tmp_path, temperature)
    for args in (["eval", str(path), "--json"], ["submit", str(path), str(ingredient_path(trained, 1)), "--ensemble",
                                                  "-o", str(tmp_path / "s.csv")]):
        one_error_line(CliRunner().invoke(cli, args), str(path), "calibration.temperature", "soup calibrate")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_the_fitting_bounds_themselves_are_accepted(trained, tmp_path, temperature):
    path = calibrated_copy(trained, tmp_path, temperature)
    result = CliRunner().invoke(cli, ["eval", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["temperature"] == temperature


def test_a_small_temperature_prints_with_its_significant_digits(trained, tmp_path, monkeypatch):
    """Issue 31 N: T = 0.001 printed as T=0.00 said nothing; the table and soup calibrate's line say 0.001."""
    path = calibrated_copy(trained, tmp_path, 1e-3)
    table = invoke_with_console(["eval", str(path)], monkeypatch, 200)
    assert table.exit_code == 0 and "T=0.001" in table.output and "T=0.00 " not in table.output, table.output
    monkeypatch.setattr(soup.score.calibrate, "fit_temperature", lambda *args, **kwargs: 1e-3)
    fitted = invoke_with_console(["calibrate", str(path)], monkeypatch, 200)
    assert fitted.exit_code == 0 and "T=0.001 fitted on val" in fitted.output, fitted.output


def strict_json(text):
    """json.loads that refuses what Python's parser lets through but JSON has not: NaN, Infinity."""
    def refuse(constant):
        raise AssertionError(f"bare {constant} in --json output")
    return json.loads(text, parse_constant=refuse)


def test_eval_json_writes_a_non_finite_figure_as_null(trained, monkeypatch):
    # A diverged model's loss or calibration error is NaN; JSON has no NaN.
    monkeypatch.setattr(soup.judge.evaluate, "expected_calibration_error", lambda *args, **kwargs: float("nan"))
    monkeypatch.setattr(soup.judge.evaluate, "scores", lambda *args: {**scores(*args), "loss": float("inf")})
    result = CliRunner().invoke(cli, ["eval", str(ingredient_path(trained)), "--json"])
    assert result.exit_code == 0, result.output
    [row] = strict_json(result.stdout)
    assert row["ece"] is None and row["nll"] is None and row["loss"] is None and 0 <= row["top1"] <= 1


# 3. --bootstrap is bounded ----------------------------------------------------------------------------------

@pytest.mark.parametrize("resamples", [100_001, 10**9, 10**30])
def test_bootstrap_beyond_its_bound_is_one_line(trained, resamples):
    result = CliRunner().invoke(cli, ["eval", str(ingredient_path(trained)), "--bootstrap", str(resamples)])
    one_error_line(result, "--bootstrap", "at most 100,000")


def test_bootstrap_at_its_bound_runs(trained):
    result = CliRunner().invoke(cli, ["eval", str(ingredient_path(trained)), "--json", "--bootstrap", "100000"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["top1_low"] <= row["top1"] <= row["top1_high"]


# 4. A recipe key together with its parent ------------------------------------------------------------------

KWARGS = [{"drop_path_rate": 0.0}, {"drop_path_rate": 0.1}]
DPR = "model.kwargs.drop_path_rate"


@pytest.mark.parametrize("sweep,space,named", [
    ({"model.kwargs": KWARGS}, {DPR: {"uniform": [0.0, 0.2]}}, ("sweep.model.kwargs", f"search.space.{DPR}")),
    ({DPR: [0.0, 0.1]}, {"model.kwargs": {"choice": KWARGS}}, (f"sweep.{DPR}", "search.space.model.kwargs")),
    ({}, {"model.kwargs": {"choice": KWARGS}, DPR: {"uniform": [0.0, 0.2]}},
     ("search.space.model.kwargs", f"search.space.{DPR}")),
    ({"model.kwargs": KWARGS, DPR: [0.0, 0.1]}, None, ("sweep.model.kwargs", f"sweep.{DPR}")),
    ({"model": [{"backbone": "timm:test_resnet"}], "model.freeze": [0.0]}, None, ("sweep.model", "sweep.model.freeze")),
])
def test_a_key_and_its_parent_are_refused(tmp_path, sweep, space, named):
    sections = {"sweep": sweep} | ({"search": {"trials": 2, "space": space}} if space else {})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"])
    one_error_line(result, *named, "one key lies inside the other")


def test_keys_that_share_a_prefix_but_do_not_nest_are_fine(tmp_path):
    recipe = tiny_recipe(tmp_path, sweep={"train.lr": [1e-3, 2e-3]},
                         search={"trials": 2, "space": {"train.lr_drop_factor": {"uniform": [0.1, 0.5]}}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 4, result.output


# 5, 6. Rates and alphas a float32 step can hold ------------------------------------------------------------

@pytest.mark.parametrize("sections,message", [
    ({"train": {"lr": 1e38}}, "train.lr must be a positive number, at most 10000"),
    ({"train": {"lr": float("nan")}}, "train.lr must be"),
    ({"train": {"min_lr": 1e308}}, "train.min_lr must be 0 or more, at most 10000"),
    ({"train": {"weight_decay": 1e300}}, "train.weight_decay must be a number from 0 to 10000"),
    ({"train": {"lr_drop_factor": 1e300}}, "train.lr_drop_factor must be a positive number, at most 10000"),
    ({"model": {"probe": {"epochs": 1, "lr": float("inf")}}}, "model.probe.lr must be positive, at most 10000"),
    ({"train": {"mixup": float("inf")}}, "train.mixup must be 0 (off) or a positive alpha, finite in float32"),
    ({"train": {"cutmix": 1e39}}, "train.cutmix must be 0 (off) or a positive alpha, finite in float32"),
    ({"search": {"trials": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e308]}}}},
     "search.space.train.lr: high 1e+308: train.lr must be"),
    ({"search": {"trials": 2, "space": {"train.weight_decay": {"uniform": [0, 1e38]}}}},
     "search.space.train.weight_decay: high 1e+38"),
    ({"search": {"trials": 2, "space": {"train.mixup": {"uniform": [0, float("inf")]}}}},
     "search.space.train.mixup: high inf: train.mixup must be"),
    ({"search": {"trials": 2, "space": {"train.cutmix": {"choice": [0.2, float("inf")]}}}},
     "search.space.train.cutmix: choice inf: train.cutmix must be"),
])
def test_rates_and_alphas_a_float32_step_cannot_hold_are_refused_at_load(tmp_path, sections, message):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, **sections)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"])
    one_error_line(result, message)


def test_an_overflowing_optimizer_step_is_the_nan_stop_line(small_sketch_root, tmp_path):
    [ingredient] = expand_sweep(recipe_from_dict(tiny_recipe(small_sketch_root, train={"lr": 1e-3})))
    ingredient.recipe.train.lr = 1e38  # past the recipe checks: whatever overflows in a step is the NaN stop
    with pytest.raises(SoupError, match=r"^00: the step failed \(value cannot be converted to type float without "
                       r"overflow\) at epoch 1, step 1 \(lr 1e\+38, amp off\); lower train.lr .*nothing was saved$"):
        train_ingredient(ingredient, tmp_path / "out", Console(quiet=True))
    assert not (tmp_path / "out" / "tiny" / "00" / "model.safetensors").exists()


# 7. Ids that fit a folder name ----------------------------------------------------------------------------

def long_root(tmp_path, source, length=300):
    """A copy of `source` at a path whose folder names add up to `length` characters."""
    root = tmp_path
    while len(str(root)) < length:
        root = root / ("d" * min(200, length - len(str(root))))
    shutil.copytree(source, root)
    return root


def test_an_id_too_long_for_a_folder_name_is_cut_with_a_hash_and_trains(small_sketch_root, tmp_path):
    root = long_root(tmp_path, small_sketch_root)
    recipe = tiny_recipe(root, sweep={"data.root": [str(root)], "train.seed": [0, 1]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    listed = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"])
    assert listed.exit_code == 0, listed.output
    ids = [line.split("\t")[1] for line in listed.output.splitlines()]
    assert all(len(i.encode()) <= 255 and "~" in i for i in ids) and ids[0].endswith("-seed0")
    assert ids[0].split("-seed")[0][2:] == ids[1].split("-seed")[0][2:]  # the same value, the same cut part
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--ingredient", "0",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "out" / "tiny" / ids[0] / "model.safetensors").meta["id"] == ids[0]


def test_an_id_that_fits_is_never_changed(tmp_path):
    value = "y" * 240  # 00-<value> is 245 bytes: long, but a folder name may hold it
    [item] = expand_sweep(recipe_from_dict(tiny_recipe(tmp_path, sweep={"model.kwargs.note": [value]})))
    assert item.id == f"00-note{value}"


def test_an_id_too_long_even_cut_is_refused_at_load(tmp_path):
    sweep = {f"model.kwargs.key{i}": ["v" * 100] for i in range(8)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, sweep=sweep)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"])
    one_error_line(result, "ingredient 0", "model.kwargs.key0", "255", "sweep or search fewer keys")


# 8. soup calibrate through links -----------------------------------------------------------------------------

def test_calibrate_through_a_symlink_calibrates_the_file_it_names(trained, tmp_path):
    target = tmp_path / "kept" / "soup.safetensors"
    target.parent.mkdir()
    shutil.copy(ingredient_path(trained), target)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    result = CliRunner().invoke(cli, ["calibrate", str(link)])
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "calibration" in read_checkpoint(target).meta
    assert [p.name for p in target.parent.iterdir()] == ["soup.safetensors"]  # no temporary file left


def test_calibrate_refuses_a_hard_linked_file_before_any_work(trained, tmp_path):
    path = tmp_path / "a.safetensors"
    shutil.copy(ingredient_path(trained), path)
    os.link(path, tmp_path / "b.safetensors")
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["calibrate", str(path)])
    one_error_line(result, str(path), "2 hard links", "copy")
    assert "fitted" not in result.output and path.read_bytes() == before
    assert os.stat(path).st_nlink == 2 and "calibration" not in read_checkpoint(tmp_path / "b.safetensors").meta


# 9. Names printed whole and as written -------------------------------------------------------------------------

ODD = {"circle": "cir\ncle", "cross": "\u202ecross", "square": "[red]square"}


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory, small_sketch_root):
    """An ingredient trained on classes named with a newline, a right-to-left override and rich markup."""
    work = tmp_path_factory.mktemp("odd")
    shutil.copytree(small_sketch_root, work / "data")
    for split in ("train_images", "val_images"):
        for plain, odd in ODD.items():
            (work / "data" / split / plain).rename(work / "data" / split / odd)
    run_study(work, tiny_recipe(work / "data"))
    return work


def test_per_class_rows_show_odd_class_names_escaped_on_one_line(odd_names, monkeypatch):
    monkeypatch.setattr(soup.cli.base, "console", Console(width=200, highlight=False))
    path = next((odd_names / "checkpoints").rglob("model.safetensors"))
    assert set(ODD.values()) <= set(read_checkpoint(path).classes)
    result = CliRunner().invoke(cli, ["eval", str(path), "--per-class", "4"])
    assert result.exit_code == 0, result.output
    assert "cir\\ncle" in result.output and "\\u202ecross" in result.output and "[red]square" in result.output
    assert "\u202e" not in result.output and not any(line.strip().startswith("cle") for line in
                                                      result.output.splitlines())


def test_an_error_naming_an_odd_folder_stays_one_whole_line(odd_names, tmp_path):
    shutil.copytree(odd_names / "data", tmp_path / "data")
    (tmp_path / "data" / "train_images" / "em\npty\u202e").mkdir()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path / "data")))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    one_error_line(result, "em\\npty\\u202e", "class folder holds no images")


def test_a_soup_file_name_with_a_newline_and_markup_is_shown_as_written(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(soup.cli.base, "console", Console(width=200, highlight=False))
    soup_path = tmp_path / "x\ny[bold]\u2066.safetensors"
    a, b = str(ingredient_path(trained, 0)), str(ingredient_path(trained, 1))
    cooked = CliRunner().invoke(cli, ["cook", "--no-eval", a, b, "-o", str(soup_path)])
    assert cooked.exit_code == 0, cooked.output
    assert "x\\ny[bold]\\u2066.safetensors" in cooked.output
    result = CliRunner().invoke(cli, ["eval", str(soup_path), a])
    assert result.exit_code == 0, result.output
    assert "x\\ny[bold]\\u2066" in result.output and "\u2066" not in result.output

"""soup export: a soup as timm ships models, loaded back through timm offline with the same logits."""

import json
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner

import soup.ship.export as export_module
from soup.cli import cli
from soup.data.folders import load_split
from soup.models.backbones import model_from_checkpoint, trusting_hubs
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import recipe_from_dict

from conftest import run_study, tiny_recipe, tiny_vit_model


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_sketch_root):
    """Two tiny DinoV2-architecture ViT ingredients (1 epoch) and their greedy soup, calibrated."""
    work = tmp_path_factory.mktemp("export")
    recipe = tiny_recipe(small_sketch_root, model=tiny_vit_model(), data={"image_size": 28},
                         train={"batch_size": 8}, sweep={"train.seed": [0, 1]})
    ckpts = work / "checkpoints"  # soup train's default --out in `work`; the cook given absolute paths
    run_study(work, recipe, ["cook", "--greedy", str(ckpts / "tiny"), "-o", str(ckpts / "soups" / "greedy.safetensors"),
                             "--calibrate"])
    return work


def _images(checkpoint, count=4):
    cfg = recipe_from_dict(checkpoint.recipe).data
    split = load_split(cfg, "val", classes=checkpoint.classes)  # preprocessed as soup evaluates
    return torch.stack([split[i][0] for i in range(count)])


def _load_both_ways(folder, config):
    """timm's two offline ways: the folder itself, and the architecture name with the file as overlay."""
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    k = config["num_classes"]
    by_name = timm.create_model(config["architecture"], pretrained=True, num_classes=k,
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=k),
                                **config.get("model_args", {}))
    return by_folder.eval(), by_name.eval()


@pytest.mark.parametrize("which", ["soup", "ingredient"])
def test_export_loads_in_timm_with_the_same_logits(work, tmp_path, which):
    path = (work / "checkpoints" / "soups" / "greedy.safetensors" if which == "soup"
            else next((work / "checkpoints" / "tiny").glob("*/model.safetensors")))
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(path), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    checkpoint = read_checkpoint(path)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["num_classes"] == 4
    assert config["label_names"] == checkpoint.classes
    assert config["model_args"] == {"img_size": 28, "depth": 4, "embed_dim": 32, "num_heads": 2}
    assert config["pretrained_cfg"]["input_size"] == [3, 28, 28]
    assert config["pretrained_cfg"]["interpolation"] == "bilinear"
    assert config["pretrained_cfg"]["classifier"] == "head"
    images = _images(checkpoint)
    with torch.no_grad():
        ours = model_from_checkpoint(checkpoint)(images)
        for model in _load_both_ways(out, config):
            assert torch.allclose(model(images), ours, atol=1e-5)
    data_cfg = timm.data.resolve_data_config({}, model=_load_both_ways(out, config)[0])
    assert data_cfg["input_size"] == (3, 28, 28) and data_cfg["crop_mode"] == "squash"


def test_model_card_says_what_and_how(work, tmp_path):
    out = tmp_path / "exported"
    path = work / "checkpoints" / "soups" / "greedy.safetensors"
    assert CliRunner().invoke(cli, ["export", str(path), str(out), "--overwrite"]).exit_code == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm")
    for part in ("**greedy** soup", "| member | weight | settings |", "train.seed=", "Selection split: **val**",
                 "Calibration: temperature T =", "## Intended use", 'timm.create_model("local-dir:',
                 "```yaml", "vit_small_patch14_dinov2", "num_classes=4"):
        assert part in card, part
    assert yaml.safe_load(card.split("```yaml\n")[1].split("\n```")[0]) == read_checkpoint(path).recipe


def test_overwrite_rules(work, tmp_path):
    path = work / "checkpoints" / "soups" / "greedy.safetensors"
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(path), str(out)])
    assert result.exit_code == 2 and "not empty; add --overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert runner.invoke(cli, ["export", str(path), str(out), "--overwrite"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    ingredient = next((work / "checkpoints" / "tiny").glob("*/model.safetensors"))
    for folder, message in ((ingredient.parent, "ingredient folder"),
                            (ingredient.parent / "sub", "ingredient folder"),
                            (work.parent / "nowhere" / "x", None)):
        result = runner.invoke(cli, ["export", str(path), str(folder), "--overwrite"])
        if message:
            assert result.exit_code == 2 and message in result.output, result.output
            assert "Traceback" not in result.output
    root = recipe_from_dict(read_checkpoint(path).recipe).data.root
    result = runner.invoke(cli, ["export", str(path), f"{root}/exported"])
    assert result.exit_code == 2 and "data root" in result.output


def test_hub_backbone_of_unknown_layout_is_one_line(small_sketch_root, hub_dir, tmp_path):
    recipe = tiny_recipe(small_sketch_root, model={"backbone": f"hub:{hub_dir}:tiny_dinov2", "pretrained": False,
                                                   "kwargs": {"img_size": 28, "embed_dim": 32}},
                         data={"image_size": 28}, train={"batch_size": 8})
    run_study(tmp_path, recipe)
    runner = CliRunner()
    path = next((tmp_path / "checkpoints").glob("*/*/model.safetensors"))
    result = runner.invoke(cli, ["export", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "soup export knows the timm layout of DinoV2" in result.output
    assert not (tmp_path / "out").exists()


# A torch.hub entry named as DinoV2's, laid out as facebookresearch/dinov2's DinoVisionTransformer is (its
# names: cls_token, pos_embed, mask_token, blocks.N.ls1.gamma, norm), tiny.
DINOV2_HUBCONF = textwrap.dedent('''
    dependencies = ["torch", "timm"]
    import torch
    from timm.models.vision_transformer import VisionTransformer


    class DinoVisionTransformer(VisionTransformer):
        def __init__(self, img_size=518, embed_dim=384, depth=12, num_heads=6):
            super().__init__(img_size=img_size, patch_size=14, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, init_values=1e-5, num_classes=0)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))

        def forward(self, x):
            return self.forward_features(x)[:, 0]


    def dinov2_vits14(pretrained=True, **kwargs):
        return DinoVisionTransformer(**kwargs)
''')


def test_dinov2_hub_backbone_exports_as_timm_dinov2(small_sketch_root, tmp_path):
    hub = tmp_path / "dinov2_repo"
    hub.mkdir()
    (hub / "hubconf.py").write_text(DINOV2_HUBCONF)
    recipe = tiny_recipe(small_sketch_root, model={"backbone": f"hub:{hub}:dinov2_vits14", "pretrained": False,
                                                   "kwargs": {"img_size": 28, "embed_dim": 32, "depth": 2,
                                                              "num_heads": 2}},
                         data={"image_size": 28}, train={"batch_size": 8})
    run_study(tmp_path, recipe)
    runner = CliRunner()
    path = next((tmp_path / "checkpoints").glob("*/*/model.safetensors"))
    assert "backbone.mask_token" in read_checkpoint(path).state_dict()
    out = tmp_path / "out"
    result = runner.invoke(cli, ["export", str(path), str(out)])
    assert result.exit_code == 2 and "--trust-hub" in result.output  # metadata never chooses code to run
    result = runner.invoke(cli, ["export", str(path), str(out), "--trust-hub", str(hub)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2"
    checkpoint = read_checkpoint(path)
    images = _images(checkpoint)
    with trusting_hubs([str(hub)]), torch.no_grad():
        ours = model_from_checkpoint(checkpoint)(images)
    for model in _load_both_ways(out, config):
        with torch.no_grad():
            assert torch.allclose(model(images), ours, atol=1e-5)


@pytest.mark.parametrize("setup, message", [
    ("missing", "--push needs huggingface_hub, which is not installed: pip install 'soup[hub]'"),
    ("offline", "HF_HUB_OFFLINE is set, so nothing can be uploaded"),
    ("bad_name", "name the Hub repo as OWNER/NAME"),
])
def test_push_refused_before_any_work(work, tmp_path, monkeypatch, setup, message):
    if setup == "missing":
        monkeypatch.setattr(export_module, "huggingface_hub", None)
    if setup == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "not a repo" if setup == "bad_name" else "someone/tiny-soup"
    path = work / "checkpoints" / "soups" / "greedy.safetensors"
    result = CliRunner().invoke(cli, ["export", str(path), str(tmp_path / "out"), "--push", repo])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_push_without_network_is_one_line(work, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, **kwargs):
            raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(export_module.huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(export_module.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    path = work / "checkpoints" / "soups" / "greedy.safetensors"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(path), str(out), "--push", "someone/tiny-soup"])
    assert result.exit_code == 2, result.output
    assert "could not reach the Hugging Face Hub to push someone/tiny-soup" in result.output
    assert "nothing was uploaded" in result.output and "Traceback" not in result.output
    assert calls == [("create", "someone/tiny-soup")] and (out / "model.safetensors").is_file()


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_model_index_carries_soup_evals_figures(work, tmp_path):
    """Hugging Face's model-index: image-classification on the data root's val split, top-1 and its interval
    as `soup eval --json` gives them, the selection split named."""
    path = work / "checkpoints" / "soups" / "greedy.safetensors"
    out = tmp_path / "exported"
    assert CliRunner().invoke(cli, ["export", str(path), str(out)]).exit_code == 0
    card = (out / "README.md").read_text()
    result = CliRunner().invoke(cli, ["eval", str(path), "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    [entry] = _front_matter(card)["model-index"]
    [scored] = entry["results"]
    assert scored["task"]["type"] == "image-classification"
    root = read_checkpoint(path).recipe["data"]["root"]
    assert scored["dataset"] == {"name": Path(root).resolve().name, "type": "imagefolder", "split": "val"}
    [metric] = scored["metrics"]
    assert metric["type"] == "accuracy" and metric["value"] == row["top1"]
    interval = f"{row['top1']:.2%} (95% CI {row['top1_low']:.2%} to {row['top1_high']:.2%})"
    assert metric["name"] == f"top-1 {interval} on {row['n']} images; weights chosen on val"
    assert f"top-1 {interval} on {row['n']} images (the selection split" in card
    assert "base_model" not in _front_matter(card)  # trained here: no member came from the Hub

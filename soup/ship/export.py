"""`soup export`: a checkpoint as timm ships a model (model.safetensors in timm's key names, config.json as
timm's hub helpers write it, a model card), and optionally pushed to the Hugging Face Hub.

Everything is mapped, rebuilt in timm and checked against soup's own model (same logits on a few images)
before the first byte is written: a folder that loads in timm with other numbers is never shipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from soup.data.folders import SPLIT_FOLDERS
from soup.data.outputs import data_roots, ingredient_folder_of
from soup.errors import SoupError, one_line
from soup.ship.card import model_card
from soup.judge.evaluate import evaluate_rows, selection_split
from soup.judge.report import add_statistics
from soup.ship.staging import recover, replace_folder
from soup.models.backbones import is_network_error, model_from_checkpoint
from soup.models.checkpoint import Checkpoint, fp32_state
from soup.models.families import HubDinoV2
from soup.recipe.checks import parse_backbone
from soup.recipe.spec import DataConfig, Recipe, recipe_from_dict
from soup.score import stats
from soup.score.evaluator import Evaluator
from soup.text import printable

try:  # the `hub` extra: only --push needs it
    import huggingface_hub
except ImportError:
    huggingface_hub = None

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
HUB_HINT = "pip install 'soup[hub]' (or pip install huggingface_hub)"
TOLERANCE = 1e-4  # on logits, relative to their largest magnitude: float reordering, not a wrong map
# huggingface_hub's own rules (utils.validate_repo_id), for when it is not installed: OWNER/NAME, each 1 to 96
# ASCII letters, digits, - _ . not starting or ending with - or ., no -- or .., not ending in .git.
REPO_PART = r"(?=[A-Za-z0-9_])[A-Za-z0-9_.-]{1,96}(?<=[A-Za-z0-9_])"
REPO_ID = re.compile(f"{REPO_PART}/{REPO_PART}", re.ASCII)

# The family table (soup.models.families): hub entry points -> timm architectures, and the hub entry kwargs that
# configure DinoV2's own class and mean nothing to timm's (they never reach config.json).
HUB_ARCHITECTURES = HubDinoV2.exports
HUB_ONLY_KWARGS = HubDinoV2.hub_only_kwargs


@dataclass
class Export:
    """What goes into DIR, all of it computed and checked before anything is written."""

    architecture: str
    model_args: dict
    state: dict[str, torch.Tensor]
    config: dict
    card: str
    notes: list[str] = field(default_factory=list)  # what an earlier, interrupted export had left behind


def timm_architecture(checkpoint: Checkpoint, recipe: Recipe) -> tuple[str, dict]:
    """(timm architecture, timm model kwargs) that rebuild the checkpoint's network (`recipe`: its own,
    parsed). A hub backbone is named by its entry point (DinoV2's only); its kwargs are the recipe's, at the
    fine-tuned image size."""
    kind, _, entry = parse_backbone(recipe.model.backbone)
    if kind == "timm":
        return entry, dict(recipe.model.kwargs)
    arch = HUB_ARCHITECTURES.get(entry)
    if arch is None:
        raise SoupError(f"{checkpoint.path}: soup export knows the timm layout of DinoV2's torch.hub entry points "
                        f"({', '.join(sorted(HUB_ARCHITECTURES))}), not of {printable(recipe.model.backbone)}; "
                        "fine-tune a timm backbone (timm:<name>) to export it")
    kwargs = {k: v for k, v in recipe.model.kwargs.items() if k not in HUB_ONLY_KWARGS}
    # The position embedding is exported already resized to the training size (see _hub_state).
    return arch, {**kwargs, "img_size": recipe.data.image_size}


def _classifier_name(model: torch.nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def _hub_state(backbone: torch.nn.Module, state: dict, image_size: int) -> dict:
    """facebookresearch/dinov2's DinoVisionTransformer (block_chunks=0, as its hub entries build it) in
    timm's vision_transformer names. Most names agree (patch_embed.proj, cls_token, pos_embed,
    blocks.N.norm1/attn.qkv/attn.proj/ls1.gamma/norm2/mlp.fc1/mlp.fc2/ls2.gamma, norm); the differences:
    mask_token only serves masked pretraining and timm has none; the giant's SwiGLU halves are w12/w3 in
    DinoV2, fc1/fc2 in timm's SwiGLUPacked; registers are register_tokens in DinoV2, reg_token in timm,
    whose reg4 models add position to patches only, so the class token's position folds into it."""
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        out[re.sub(r"^(blocks\.\d+\.mlp\.)w(12|3)\.", lambda m: m[1] + ("fc1." if m[2] == "12" else "fc2."), key)] = value
    if "pos_embed" in out:
        out["pos_embed"] = _pos_embed_at(backbone, out["pos_embed"], image_size)
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _pos_embed_at(backbone: torch.nn.Module, pos_embed: torch.Tensor, image_size: int) -> torch.Tensor:
    """DinoV2 resizes its position embedding at every call, its own way (offset, no antialias); timm would
    resize differently. Resized here by DinoV2's own code, timm finds it at the size it runs at."""
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", 14)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    tokens = (image_size // patch) ** 2 + 1
    if pos_embed.shape[1] == tokens or not hasattr(backbone, "interpolate_pos_encoding"):
        return pos_embed
    with torch.no_grad():
        dummy = torch.zeros(1, tokens, pos_embed.shape[2], dtype=pos_embed.dtype)
        return backbone.interpolate_pos_encoding(dummy, image_size, image_size).detach().clone()


def timm_model(arch: str, model_args: dict, num_classes: int, state: dict | None = None) -> torch.nn.Module:
    """timm's `arch` with K classes, without pretrained weights (no download), `state` loaded strictly."""
    if not timm.is_model(arch):
        raise SoupError(f"timm {timm.__version__} has no model {arch}; upgrade timm (pip install -U timm)")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    except TypeError as err:
        raise SoupError(f"timm's {arch} does not take the model kwargs {model_args} ({err})") from None
    if state is not None:
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise SoupError(f"the mapped weights do not fit timm's {arch} (missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}); nothing was written")
    return model.eval()


def timm_state(checkpoint: Checkpoint, soup_model: torch.nn.Module, arch: str, model_args: dict,
               image_size: int) -> dict:
    """The checkpoint's weights under timm's names: `backbone.*` mapped per its source, `head.*` to timm's
    own classifier (fc, head, classifier, head.fc, ... whatever the architecture calls it)."""
    state = soup_model.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    kind, _, _ = parse_backbone(checkpoint.backbone)
    if kind == "hub":
        backbone = _hub_state(soup_model.backbone, backbone, image_size)
    with torch.device("meta"):  # names only: no memory, no initialisation
        classifier = _classifier_name(timm_model(arch, model_args, len(checkpoint.classes)))
    head = {f"{classifier}.{k[len('head.'):]}": v for k, v in state.items() if k.startswith("head.")}
    return fp32_state({**backbone, **head})


def check_same_logits(soup_model: torch.nn.Module, exported: torch.nn.Module, image_size: int, arch: str) -> float:
    """Both models on the same few images; the largest logit difference, or one line when they disagree."""
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = soup_model.eval()(images), exported.eval()(images)
    if not torch.isfinite(ours).all():  # no mapping's fault: the checkpoint's own logits are not numbers
        bad = next((key for key, value in soup_model.state_dict().items()
                    if value.is_floating_point() and not torch.isfinite(value).all()), None)
        raise SoupError("the checkpoint's own logits are NaN or infinite" +
                        (f": its tensor {bad} holds NaN or infinite values" if bad else " (its weights overflow)") +
                        "; nothing was written; export a checkpoint with finite weights")
    difference = (ours - theirs).abs().max().item()
    if not difference <= TOLERANCE * max(1.0, ours.abs().max().item()):
        raise SoupError(f"timm's {arch} with the exported weights gives other logits than the checkpoint (largest "
                        f"difference {difference:.3g}); nothing was written. Please report this with the backbone")
    return difference


def timm_config(checkpoint: Checkpoint, data: DataConfig, arch: str, model_args: dict,
                model: torch.nn.Module) -> dict:
    """config.json as timm's save_config_for_hf lays it out; pretrained_cfg describes soup's preprocessing
    (resize the whole image to SxS, bilinear, then normalise), which is what the weights were tuned on."""
    size = data.image_size
    default = timm.models.get_pretrained_cfg(arch)
    fixed = bool(default.fixed_input_size) if default is not None else False
    pretrained_cfg = {
        "input_size": [3, size, size], "interpolation": "bilinear", "mean": list(data.mean), "std": list(data.std),
        "crop_pct": 1.0, "crop_mode": "squash", "num_classes": len(checkpoint.classes),
        "classifier": _classifier_name(model), "first_conv": default.first_conv if default is not None else None,
        "fixed_input_size": fixed, "custom_load": False,
    }
    config = {"architecture": arch, "num_classes": len(checkpoint.classes),
              "num_features": int(getattr(model, "num_features", 0))}
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    config["label_names"] = list(checkpoint.classes)
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = {k: v for k, v in pretrained_cfg.items() if v is not None}
    return config


def card_figures(checkpoint: Checkpoint, recipe: Recipe, split: str = "val") -> dict | None:
    """The card's figures: `soup eval CKPT --json`'s top-1 and interval on the recipe's data root, or None
    when that root's split is not at hand (exported elsewhere than it was trained)."""
    root = Path(recipe.data.root)
    if not (root / SPLIT_FOLDERS[split]).is_dir():
        return None
    try:
        [row] = add_statistics(evaluate_rows([checkpoint], Evaluator(split)), stats.RESAMPLES, None)
    except SoupError as err:  # the data there cannot score it (other class folders): a model ships without figures
        return {"unavailable": one_line(err)}
    return {"dataset": root.resolve().name, "split": split, "top1": row["top1"], "low": row["top1_low"],
            "high": row["top1_high"], "n": row["n"], "selection": selection_split(checkpoint)}


def prepare_export(checkpoint: Checkpoint, repo_id: str | None = None) -> Export:
    """Map, rebuild in timm, compare logits, and render config and card; nothing written yet."""
    recipe = recipe_from_dict(checkpoint.recipe)
    arch, model_args = timm_architecture(checkpoint, recipe)
    try:
        json.dumps(model_args)
    except (TypeError, ValueError):
        raise SoupError(f"{checkpoint.path}: model.kwargs {model_args} cannot go into config.json") from None
    soup_model = model_from_checkpoint(checkpoint)
    state = timm_state(checkpoint, soup_model, arch, model_args, recipe.data.image_size)
    exported = timm_model(arch, model_args, len(checkpoint.classes), state)
    check_same_logits(soup_model, exported, recipe.data.image_size, arch)
    config = timm_config(checkpoint, recipe.data, arch, model_args, exported)
    card = model_card(checkpoint, config, repo_id, card_figures(checkpoint, recipe))
    return Export(arch, model_args, state, config, card)


def check_export_folder(folder: str | Path, checkpoint: Checkpoint, overwrite: bool) -> None:
    """Before any work: DIR is a folder soup may fill (see soup.data.outputs for the same rules on files)."""
    folder = Path(folder)
    target = folder.resolve()
    elsewhere = "export to another folder"
    if folder.exists() and not folder.is_dir():
        raise SoupError(f"{folder} exists and is not a folder; {elsewhere}")
    owner = ingredient_folder_of(target)
    if owner is not None:
        raise SoupError(f"{folder} lies in the ingredient folder {owner}, which `soup train` owns; {elsewhere}")
    for root in data_roots([checkpoint]):
        if target.is_relative_to(root):
            raise SoupError(f"{folder} lies in the data root {root}, which soup never writes into; {elsewhere}")
    for name in EXPORT_FILES:
        path = folder / name
        if path.resolve() == checkpoint.path.resolve():
            raise SoupError(f"{path} is the checkpoint being exported; {elsewhere}")
        if path.is_dir():
            raise SoupError(f"{path} is a folder, where the export writes its {name}; {elsewhere}")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise SoupError(f"{folder} exists and is not empty; add --overwrite to replace its "
                        f"{', '.join(EXPORT_FILES)} (nothing else in it), or {elsewhere}")


def _writers(export: Export) -> dict:
    config = json.dumps(export.config, indent=2, ensure_ascii=False) + "\n"
    return {
        # "format": "pt" is what timm and transformers write into the safetensors files they save.
        WEIGHTS_FILE: lambda tmp: save_file(export.state, str(tmp), metadata={"format": "pt"}),
        CONFIG_FILE: lambda tmp: tmp.write_text(config, encoding="utf-8"),
        CARD_FILE: lambda tmp: tmp.write_text(export.card, encoding="utf-8"),
    }


def write_export(export: Export, folder: str | Path) -> list[str]:
    """DIR holding the export whole, replaced in one step (soup.ship.staging): a new, empty or --overwrite
    folder alike, every other file in it kept. What leftovers of an interrupted export were put right."""
    return replace_folder(folder, _writers(export))


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(getattr(getattr(huggingface_hub, "constants", None), "HF_HUB_OFFLINE", False))


def repo_id_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse `repo_id` (checked by huggingface_hub's own validator when installed), or None."""
    if repo_id.count("/") != 1:
        return "name the Hub repo as OWNER/NAME"
    validate = getattr(getattr(huggingface_hub, "utils", None), "validate_repo_id", None)
    if validate is not None:
        try:
            validate(repo_id)
        except ValueError as err:  # huggingface_hub's HFValidationError
            return _first_line(err)
        return None
    if not REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return ("the Hub takes 1 to 96 ASCII letters, digits, -, _ and . on each side, not starting or ending "
                "with - or ., without -- or .., not ending in .git")
    return None


def check_push(repo_id: str) -> None:
    """Before any work: --push can work at all (a repo id the Hub accepts, installed, not offline)."""
    problem = repo_id_problem(repo_id)
    if problem is not None:
        raise SoupError(f"--push {printable(repo_id)}: the Hub would refuse this repo id ({problem}); name the Hub "
                        "repo as OWNER/NAME (letters, digits, -, _, .)")
    if huggingface_hub is None:
        raise SoupError(f"--push needs huggingface_hub, which is not installed: {HUB_HINT}; or export without "
                        "--push and upload the folder yourself")
    if _hub_offline():
        raise SoupError(f"--push {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or export "
                        "without --push and upload the folder later (huggingface-cli upload OWNER/NAME DIR)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return printable(text.splitlines()[0] if text else type(err).__name__)


def _refusal(err: BaseException) -> str | None:
    """The Hub's answer when it refused the push (HTTP 4xx, or its client's check of the request), else None."""
    errors = getattr(huggingface_hub, "errors", None)
    if isinstance(err, getattr(errors, "HFValidationError", ())):
        return f"it refused the request: {_first_line(err)}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, getattr(errors, "HfHubHTTPError", ())) and isinstance(status, int) and status < 500:
        return f"HTTP {status}: {_first_line(err)}"
    return None


def push_folder(folder: str | Path, repo_id: str) -> str:
    """Upload DIR's export files to the Hub model repo `repo_id` in one commit (all or none of them)."""
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          allow_patterns=list(EXPORT_FILES), commit_message="soup export")
    except Exception as err:
        refusal = _refusal(err)
        if refusal is not None:
            login = " log in (huggingface-cli login, or set HF_TOKEN) with write access, or check the repo id;"
            raise SoupError(f"the Hub refused the push to {repo_id} ({refusal});{login} nothing was uploaded; "
                            f"{folder} is complete") from None
        if isinstance(err, OSError) or is_network_error(err):  # any OSError: the upload's I/O failed
            raise SoupError(f"could not reach the Hugging Face Hub to push {repo_id} ({_first_line(err)}); nothing "
                            f"was uploaded; {folder} is complete: push it when online") from None
        raise
    return f"https://huggingface.co/{repo_id}"


def export_checkpoint(checkpoint: Checkpoint, folder: str | Path, overwrite: bool,
                      repo_id: str | None = None) -> Export:
    """Check DIR (and --push), build and check the export, then write it. Pushing is the caller's next step."""
    check_export_folder(folder, checkpoint, overwrite)
    notes = recover(folder, EXPORT_FILES)
    if notes:  # DIR may be back: checked again as it is now
        check_export_folder(folder, checkpoint, overwrite)
    if repo_id is not None:
        check_push(repo_id)
    export = prepare_export(checkpoint, repo_id)
    export.notes = notes + write_export(export, folder)
    return export

"""The model card (README.md) `soup export` writes: what the model is and how it was made, from the
checkpoint's metadata alone. Metadata comes from whoever made the file, so every name in it is printed with
soup.text.printable, and nothing recorded as missing is made up."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, read_checkpoint
from soup.models.records import Member
from soup.recipe.search import describe
from soup.score.compare import describe_difference
from soup.text import printable


def _cell(value) -> str:
    """A markdown table cell: one line, no column break, no HTML."""
    return printable(value).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(value) -> str:
    """A markdown code span showing `value` as written: inside one, `<` and `&` are literal (an entity would
    show as `&lt;`), so only the line breaks are escaped; the span's backticks outnumber any run inside."""
    text = printable(value)
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or text.startswith(" ") and text.endswith(" ") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, which then cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _settings(member: Member) -> str:
    """A member's sweep settings, read from its checkpoint's header when the file is still where the soup
    recorded it; a header only (no tensors, no code)."""
    if member.path is None or not Path(member.path).is_file():
        return "(checkpoint not at hand)"
    try:
        settings = read_checkpoint(member.path).record.settings
    except SoupError:
        return "(checkpoint unreadable)"
    if settings is None:
        return "(none recorded)"
    return describe(settings) or "(no sweep)"


def _members(checkpoint: Checkpoint) -> list[str]:
    record = checkpoint.record
    if checkpoint.kind == "ingredient" or record.method is None or not record.members:
        shown = describe(record.settings or {}) or "(no sweep)"
        return [f"One fine-tuned model (an ingredient), settings: {_cell(shown)}."]
    candidates = record.method.candidates
    lines = [f"A **{_cell(checkpoint.kind)}** soup: the weights of {len(record.members)} fine-tuned models (of "
             f"{len(candidates) if candidates is not None else '?'} candidates) averaged into one model.", "",
             "| member | weight | settings |", "|---|---|---|"]
    for member in record.members:
        lines.append(f"| {_cell(member.name)} | {member.weight:.4g} | {_cell(_settings(member))} |")
    return lines


def _number(value, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _results(checkpoint: Checkpoint) -> list[str]:
    record = checkpoint.record
    lines = []
    selection = record.selection
    if selection is not None:
        chose = " (it chose or fitted the weights, so this figure is optimistic)" if selection.chose else ""
        lines.append(f"- Selection split: **{_cell(selection.split)}**, top-1 {selection.top1:.2%} on "
                     f"{_cell(selection.n if selection.n is not None else '?')} images{chose}.")
    elif record.kind != "ingredient":
        lines.append("- Cooked without held-out data: no selection score recorded.")
    if record.val_acc is not None:
        lines.append(f"- Validation top-1: {record.val_acc:.2%} (last epoch).")
    versus = record.versus_best
    if versus is not None and versus.diff is not None:
        try:
            verdict = describe_difference(versus.dump())
        except (TypeError, ValueError, KeyError):
            verdict = f"{versus.diff * 100:+.2f} points"
        lines.append(f"- Against its best ingredient ({_cell(versus.ref or '?')}) on "
                     f"{_cell(versus.split or '?')}, which took no part in selection: {_cell(verdict)}.")
    calibration = record.calibration
    if calibration is not None and calibration.shown_temperature is not None:
        lines.append(f"- Calibration: temperature T = {calibration.shown_temperature:.4g} fitted on "
                     f"{_cell(calibration.split or '?')} (divide the logits by T for calibrated "
                     f"probabilities; ECE {_number(calibration.ece_before, '.3f') or '?'} → "
                     f"{_number(calibration.ece_after, '.3f') or '?'}). The weights do not include it.")
    else:
        lines.append("- Calibration: none recorded (use the logits as they are).")
    if record.bn_reset is not None:
        lines.append(f"- {_cell(record.bn_reset.describe())}.")
    return lines or ["- No scores recorded."]


def _loading(config: dict, repo_id: str | None) -> list[str]:
    arch, k = config["architecture"], config["num_classes"]
    kwargs = "".join(f", {key}={value!r}" for key, value in (config.get("model_args") or {}).items())
    lines = ["```python", "import timm", ""]
    if repo_id:
        lines += [f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)', ""]
    lines += ["# from a local copy of this folder, offline:",
              'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True)',
              "# or by architecture name:",
              f'model = timm.create_model("{arch}", pretrained=True, num_classes={k}{kwargs},',
              f'                          pretrained_cfg_overlay=dict(file="path/to/model.safetensors", '
              f'num_classes={k}))',
              "model.eval()",
              "cfg = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**cfg)  # resize to the full input size, then normalise",
              "```"]
    return lines


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _hub_ids(checkpoint: Checkpoint) -> list[str]:
    """The Hub ids the model's members came from (`soup import` of a Hugging Face cache folder records one),
    read from their headers; for an ingredient, its own."""
    records = [checkpoint.record]
    if checkpoint.kind != "ingredient" and checkpoint.record.method is not None:
        records = []
        for member in checkpoint.record.members:
            try:
                if member.path is not None and Path(member.path).is_file():
                    records.append(read_checkpoint(member.path).record)
            except SoupError:
                pass
    ids = [r.imported.hub_id for r in records if r.imported is not None and r.imported.hub_id is not None]
    return list(dict.fromkeys(i for i in ids if HUB_ID.fullmatch(i)))


def _interval(figures: dict) -> str:
    if figures.get("low") is None:
        return f"{figures['top1']:.2%}"
    return f"{figures['top1']:.2%} (95% CI {figures['low']:.2%} to {figures['high']:.2%})"


def _model_index(checkpoint: Checkpoint, figures: dict | None) -> list[str]:
    """Front matter Hugging Face reads: base_model (the members' Hub ids) and model-index (the figures of
    `soup eval --json` on the data root's split, the selection split named)."""
    extra: dict = {}
    hub_ids = _hub_ids(checkpoint)
    if hub_ids:
        extra["base_model"] = hub_ids
    if figures is not None and "unavailable" not in figures:
        chosen = f"; weights chosen on {figures['selection']}" if figures.get("selection") else ""
        metric = {"type": "accuracy", "name": f"top-1 {_interval(figures)} on {figures['n']} images{chosen}",
                  "value": figures["top1"]}
        result = {"task": {"type": "image-classification", "name": "Image Classification"},
                  "dataset": {"name": printable(figures["dataset"]), "type": "imagefolder", "split": figures["split"]},
                  "metrics": [metric]}
        extra["model-index"] = [{"name": printable(checkpoint.record.name or checkpoint.path.stem),
                                 "results": [result]}]
    return yaml.safe_dump(extra, sort_keys=False, allow_unicode=False).splitlines() if extra else []


def _figures_line(figures: dict | None) -> list[str]:
    if figures is None:
        return ["- soup eval: the data root was not at hand at export, so no figures are in model-index."]
    if "unavailable" in figures:
        return [f"- soup eval: the data root could not score this model at export ({_cell(figures['unavailable'])}), "
                "so no figures are in model-index."]
    chosen = (f" (the selection split: {_cell(figures['selection'])} chose the weights, so it is optimistic)"
              if figures.get("selection") == figures["split"] else "")
    return [f"- soup eval on {_cell(figures['dataset'])} {_cell(figures['split'])}: top-1 {_interval(figures)} "
            f"on {figures['n']} images{chosen}."]


def model_card(checkpoint: Checkpoint, config: dict, repo_id: str | None = None, figures: dict | None = None) -> str:
    """README.md for the exported folder (Hugging Face reads its front matter). `figures`: `soup eval`'s
    top-1 and interval on a split (soup.ship.export.card_figures), None when the data was not at hand."""
    recipe_yaml = yaml.safe_dump(checkpoint.recipe, sort_keys=False, allow_unicode=False)
    fence = _fence(recipe_yaml)
    pretrained = config["pretrained_cfg"]
    size = pretrained["input_size"][1]
    classes = ", ".join(_code(c) for c in checkpoint.classes)
    title = _cell(checkpoint.record.name or checkpoint.path.stem)
    lines = [
        "---", "library_name: timm", "pipeline_tag: image-classification",
        "tags: [image-classification, timm, model-soup]", *_model_index(checkpoint, figures), "---", "",
        f"# {title}", "",
        f"An image classifier for {len(checkpoint.classes)} classes, fine-tuned from "
        f"{_code(checkpoint.backbone)} with soup and exported in timm's layout as "
        f"{_code(config['architecture'])}.", "",
        "## How it was made", "", *_members(checkpoint), "",
        "## Results", "", *_results(checkpoint), *_figures_line(figures), "",
        f"Classes, in output order: {classes}.", "",
        "## Intended use", "",
        f"Classifying images into the classes above, resized whole (no crop) to {size}x{size} pixels, bilinear, "
        f"normalised with mean {pretrained['mean']} and std {pretrained['std']}: timm's data config in "
        "config.json does exactly this. The scores above come from the held-out splits of the data it was "
        "tuned on and say nothing about other images; check it on your own data before relying on it.", "",
        "## Loading with timm", "", *_loading(config, repo_id), "",
        "## Recipe", "", fence + "yaml", recipe_yaml.rstrip("\n"), fence, "",
    ]
    return "\n".join(lines)

"""`soup import`: checkpoints made by other tools written as soup ingredients, so that every later command
(cook, eval, inspect, plot, report, submit, export) takes them as it takes its own.

Everything is checked before the first byte is written: one architecture for all sources (from --model or
what they record), every tensor's name and shape against that model, the head's classes against the data
root's (rows put in the root's order where the source names its classes in another), and the start. The
start (--start FILE or pretrained) is rebuilt as `soup train` would build it (backbone from the file or
timm's pretrained weights, head from init_seed), so its fingerprint is what cooking's shared-start check,
Model Stock, --interpolate B and `soup inspect` compare with; a start FILE is stored beside the
ingredients as a plain weights file (model.weights), so the import does not depend on where it was. Without
a start, the ingredients record an unknown start (soup.models.records.Start.unknown) and the methods that
need the start refuse.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from soup.data.folders import class_list
from soup.data.outputs import check_output
from soup.errors import SoupError
from soup.models.backbones import KWARG_ERRORS, build_model, check_hub_trusted, fingerprint
from soup.models.checkpoint import is_soup_checkpoint, save_checkpoint
from soup.models.runs import OUT_DIR, ingredient_file
from soup.outside.checks import check_model_kwargs, checked_tensors
from soup.outside.layouts import Fitted, fit, source_key, timm_classifier
from soup.outside.offline import check_pretrained
from soup.models.records import Imported, Record, Start
from soup.outside.reading import Source, read_source
from soup.outside.settings import Given, Grid, built_for, built_side, common_kwargs, preprocessing, timm_meta
from soup.outside.writing import refuse_link, start_file_there, write_all
from soup.recipe.spec import DataConfig, ModelConfig, recipe_from_dict
from soup.text import printable, shown

PRETRAINED = "pretrained"


@dataclass
class Target:
    """The model the sources are fitted to: each tensor's shape and dtype, its classifier's name in timm's
    layout (None: soup's layout only), and who chose the architecture when a source did (its hub code
    must then be trusted; None: --model)."""

    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    classifier: str | None
    backbone: str
    recorded_in: str | None


@dataclass
class Planned:
    """One source, checked and fitted, with where it goes."""

    source: Source
    fitted: Fitted
    id: str
    path: Path
    reordered: bool = False


def _spec(model: str) -> str:
    return model if ":" in model else f"timm:{model}"


def _architecture(sources: list[Source], model: str | None) -> tuple[str, dict]:
    """(backbone spec, kwargs) for every source: --model, else the one architecture they all record; the
    kwargs they record compared as the model they build (soup.outside.settings)."""
    if model is None:
        unnamed = next((s for s in sources if s.arch is None), None)
        if unnamed is not None:
            raise SoupError(f"{unnamed.given}: records no architecture; name it with --model (a timm name such as "
                            "resnet50, or timm:NAME)")
        named = {_spec(s.arch): s for s in sources}
        if len(named) > 1:
            (a, first), (b, second) = list(named.items())[:2]
            raise SoupError(f"{first.given} is {a} ({first.arch_from}) but {second.given} is {b} ({second.arch_from}): "
                            "one import, one architecture; import each architecture separately")
    backbone = _spec(model or sources[0].arch)
    return backbone, common_kwargs(sources, backbone)


def _skeleton(backbone: str, kwargs: dict, classes: list[str], size: int, recorded_in: str | None) -> torch.nn.Module:
    return build_model(ModelConfig(backbone, pretrained=False, kwargs=kwargs), classes, size, pretrained=False,
                       recorded_in=recorded_in)


def _built(backbone: str, kwargs: dict, classes: list[str], sources: list[Source], given: Given,
           where: str, recorded_in: str | None) -> tuple[torch.nn.Module, dict, Grid | None]:
    """(the model the sources fit, random weights; its kwargs; the grid of their position embeddings),
    built at the size that grid says (timm's on the meta device first, a torch.hub one as it is)."""
    size = given.image_size or next((s.image_size for s in sources if s.image_size), None) or DataConfig("").image_size
    try:
        skeleton, probe = None, timm_meta(backbone, kwargs)
        if probe is None:
            skeleton = _skeleton(backbone, kwargs, classes, size, recorded_in)
            probe = skeleton.backbone
        grid = built_for(probe, sources, kwargs, backbone)
        if grid is not None and grid.size != built_side(probe):
            kwargs, skeleton = {**kwargs, "img_size": grid.size}, None
        return skeleton or _skeleton(backbone, kwargs, classes, size, recorded_in), kwargs, grid
    except SoupError as err:
        raise SoupError(f"{where}: {err}") from None
    except (TypeError, *KWARG_ERRORS) as err:  # timm asserts a pooling type, checks a size
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise SoupError(f"{where}: {backbone} does not take model kwargs {printable(str(kwargs))} "
                        f"({printable(reason)})") from None


def _slug(text: str) -> str:
    text = re.sub(r"(\.pth\.tar|\.[A-Za-z]+)$", "", text)
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)[:60] or "source"


def _in_root_order(fitted: Fitted, source: Source, classes: list[str]) -> bool:
    """Check the classes the source names against the root's; put the head's rows in the root's order when
    they are the same classes in another. Whether rows were reordered."""
    if source.classes is None or source.classes == classes:
        return False
    if sorted(source.classes) != sorted(classes):
        other = sorted(set(source.classes) ^ set(classes))
        raise SoupError(f"{source.given}: its classes are not the data root's ({len(source.classes)} vs "
                        f"{len(classes)}, e.g. {printable(other[0]) if other else 'a name twice'}); import it "
                        "with the data root it was fine-tuned on (--data)")
    order = torch.tensor([source.classes.index(c) for c in classes])
    for key in ("head.weight", "head.bias"):
        fitted.state[key] = fitted.state[key][order]
    return True


def _plan(sources: list[Source], target: Target, classes: list[str], out: Path, name: str, strip: str | None,
          root: Path) -> list[Planned]:
    planned: list[Planned] = []
    for index, source in enumerate(sources):
        twice = next((item.source for item in planned if item.source.file.resolve() == source.file.resolve()), None)
        if twice is not None:
            raise SoupError(f"{source.given} and {twice.given} are the same checkpoint ({source.file}); a soup counts "
                            "each ingredient once, so name it once")
        fitted = fit(source.state, target.shapes, target.classifier, str(source.given), target.backbone, strip)
        fitted.state = checked_tensors(str(source.given), fitted.state, target.dtypes,
                                       lambda key: source_key(fitted, key, target.classifier))
        reordered = _in_root_order(fitted, source, classes)
        ingredient_id = f"{index:02d}-{_slug(source.given.name)}"
        path = ingredient_file(out, name, ingredient_id)
        refuse_link(path)
        if path.exists() or path.parent.exists() and any(path.parent.iterdir()):
            raise SoupError(f"{path.parent} exists already; import under another --name or -o, or remove it")
        check_output(path, [s.given for s in sources], False, "imported ingredient", checkpoint=True, roots=[root])
        planned.append(Planned(source, fitted, ingredient_id, path, reordered))
    return planned


def _start_weights(start: str, target: Target, strip: str | None):
    """(weights file for model.weights, its tensors to store or None when it is used in place, record)."""
    path = Path(start)
    if path.is_file() and path.suffix == ".safetensors" and is_soup_checkpoint(path):
        return str(path.resolve()), None, {"kind": "file", "path": str(path.resolve()), "soup": True}
    source = read_source(path)
    fitted = fit(source.state, target.shapes, target.classifier, f"--start {start}", target.backbone, strip,
                 backbone_only=True)
    state = checked_tensors(f"--start {start}", fitted.state, target.dtypes,
                            lambda key: source_key(fitted, key, target.classifier))
    tensors = {k[len("backbone."):]: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in state.items()}
    record = {"kind": "file", "path": str(path.resolve()), "sha256": source.sha256, "format": source.format}
    return None, tensors, record


def _start(start: str | None, recipe: dict, classes: list[str], target: Target, out: Path, name: str,
           strip: str | None) -> tuple[str, dict, dict | None]:
    """(start fingerprint, start record, tensors to store at record["stored"] or None); sets the recipe's
    model.pretrained / model.weights so that soup rebuilds the same start later."""
    model = recipe["model"]
    if start is None:
        model["pretrained"] = False
        unknown = Start.unknown()
        return unknown.fingerprint, unknown.how, None
    tensors = None
    if start == PRETRAINED:
        check_pretrained(model["backbone"])
        model["pretrained"] = True
        record = {"kind": PRETRAINED, "backbone": model["backbone"]}
    else:
        in_place, tensors, record = _start_weights(start, target, strip)
        model["weights"] = in_place
    with tempfile.TemporaryDirectory() as scratch:
        if tensors is not None:  # rebuilt from a file as later commands will: the stored one
            model["weights"] = str(Path(scratch) / "start.safetensors")
            save_file(tensors, model["weights"])
        parsed = recipe_from_dict(recipe)
        try:
            built = build_model(parsed.model, classes, parsed.data.image_size, recorded_in=target.recorded_in)
        except SoupError as err:
            hint = "; or give the start's weights file with --start FILE" if start == PRETRAINED else ""
            raise SoupError(f"--start {start}: {err}{hint}") from None
        if tensors is not None:
            backbone = built.backbone.state_dict()
            changed = next((k for k in tensors if not torch.equal(backbone[k].float(), tensors[k].float())), None)
            if changed is not None:
                raise SoupError(f"--start {start}: timm's loader changed tensor {printable(changed)} on the way in; "
                                "give the start as the model's own state dict")
            # The folder resolved, not the file: a link at the file's name is refused, never followed.
            record["stored"] = str((out / name).resolve() / f"start-{record['sha256'][:16]}.safetensors")
            model["weights"] = record["stored"]
        return fingerprint(built), record, tensors


def _meta(item: Planned, recipe: dict, backbone: str, classes: list[str], start_fp: str, start: dict,
          ids: list[str], name: str, origin: dict) -> Record:
    source = item.source
    return Record(
        kind="ingredient", name=name, id=item.id, settings={}, recipe=recipe, backbone=backbone, classes=classes,
        start=Start(start_fp, start), seed=None, history=[], probe=None, sweep_ids=ids,
        imported=Imported.parse({"source": str(source.given.resolve()), "file": str(source.file.resolve()),
                                 "sha256": source.sha256, "format": source.format, "weights": source.weights,
                                 "layout": item.fitted.layout, "prefix": item.fitted.prefix,
                                 "left_out": item.fitted.left_out, "architecture_from": source.arch_from or "--model",
                                 "classes_reordered": item.reordered, "metric": source.metric, "epoch": source.epoch,
                                 "crop": source.crop, "hub_id": source.hub_id,
                                  "preprocessing_from": origin}))


def import_checkpoints(paths: list[Path], data_root: Path, model: str | None = None, start: str | None = None,
                       ema: bool = False, strip: str | None = None, out: Path = Path(OUT_DIR),
                       name: str = "imported", console: Console | None = None,
                       given: Given | None = None) -> list[Path]:
    """Read, check and fit every source, rebuild the start, then write the ingredients (and the start)."""
    console = console or Console()
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise SoupError(f"--name {printable(name)}: a folder name of letters, digits, '.', '-' and '_'")
    classes = class_list(data_root)
    sources = [read_source(Path(p), ema) for p in paths]
    for source in sources:  # before anything is built: nothing a source names is opened
        check_model_kwargs(printable(source.given), source.model_args)
    backbone, kwargs = _architecture(sources, model)
    recorded_in = None if model else f"{printable(sources[0].given)} ({sources[0].arch_from})"
    if recorded_in:  # an architecture a source chose: its hub code runs only where the user trusts it
        check_hub_trusted(backbone, recorded_in)
    where = model and "--model" or sources[0].arch_from
    given = given or Given()
    skeleton, sized, grid = _built(backbone, kwargs, classes, sources, given, where, recorded_in)
    chosen = preprocessing(Path(data_root), sources, backbone, sized, grid, given)
    if sized != kwargs:
        chosen.notes.insert(0, f"built {backbone} for {grid.size} px (img_size), as {grid.source.given}'s position "
                               f"embedding says: {grid}")
    kwargs = sized
    recipe = recipe_from_dict({"name": name, "data": vars(chosen.data),
                               "model": {"backbone": backbone, "pretrained": False, "kwargs": kwargs}}).to_dict()
    try:
        classifier = timm_classifier(backbone, kwargs, len(classes))
    except SoupError as err:
        raise SoupError(f"{where}: {err}") from None
    state = skeleton.state_dict()
    target = Target({k: v.shape for k, v in state.items()}, {k: v.dtype for k, v in state.items()}, classifier,
                    backbone, recorded_in)
    planned = _plan(sources, target, classes, Path(out), name, strip, Path(data_root))
    start_fp, start_record, start_tensors = _start(start, recipe, classes, target, Path(out), name, strip)
    ids = [item.id for item in planned]
    files = [(item.path, _writer(item, _meta(item, recipe, backbone, classes, start_fp, start_record, ids, name,
                                                   chosen.origin)))
             for item in planned]
    if start_tensors is not None and not start_file_there(Path(start_record["stored"]), start_tensors, start):
        files.insert(0, (Path(start_record["stored"]), lambda tmp: save_file(start_tensors, str(tmp))))
    write_all(files)
    for item in planned:
        _describe(item, console)
    for note in chosen.notes:
        console.print(f"  [yellow]note[/]: {shown(note)}")
    _describe_start(start_record, start_fp, len(planned), console)
    return [item.path for item in planned]


def _writer(item: Planned, meta: dict):
    return lambda tmp: save_checkpoint(tmp, item.fitted.state, meta)


def _describe(item: Planned, console: Console) -> None:
    source, fitted = item.source, item.fitted
    how = [source.format, f"{source.weights}" if source.weights != "whole file" else "", f"{fitted.layout}'s names"]
    if fitted.prefix:
        how.append(f"prefix {fitted.prefix!r} stripped")
    if fitted.left_out:
        count = len(fitted.left_out)
        how.append(f"{count} tensor{'s' if count != 1 else ''} outside it left out (e.g. {fitted.left_out[0]})")
    if item.reordered:
        how.append("head rows put in the data root's class order")
    console.print(f"  imported {shown(source.given)} ({shown(', '.join(h for h in how if h))}) as {shown(item.path)}")
    if source.crop:
        console.print(f"  [yellow]note[/]: {shown(source.given)} was evaluated with a centre crop ({source.crop}); "
                      "soup resizes whole images to the model's size, so its figures may differ a little")


def _describe_start(record: dict, start_fp: str, count: int, console: Console) -> None:
    if record["kind"] == "unknown":
        console.print(f"[yellow]the start is unknown[/] (no --start): cooking's shared-start check is off for these "
                      f"{count} ingredients, and Model Stock, --interpolate B and soup inspect's start distances "
                      "refuse them; import with --start FILE or --start pretrained to have them")
    else:
        where = record.get("stored") or record.get("path") or f"{record['backbone']}'s pretrained weights"
        console.print(f"  start: {shown(where)} (fingerprint {start_fp})")

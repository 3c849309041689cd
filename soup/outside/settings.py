"""What an imported model was built with and fed, where a source says it only in part.

Settings: sources of one architecture may record different model kwargs and still be one model (timm's
save_for_hf writes the defaults `in_chans: 3` and `global_pool: avg` into config.json; a plain state dict
records nothing), so kwargs are compared as timm resolves them: the model built on the meta device with
each (its modules, its traits, the attributes the kwargs set). Only sources that build different models
are refused, the two named.

Built size: a ViT's position embedding holds one token per patch of a G x G grid, after the class (and
register) tokens it embeds, so with P px patches it was built for G*P px. A timm ViT is rebuilt at that
size (img_size); being fixed-size, it is also fed that size. A torch.hub DinoV2 interpolates its position
embedding to any input (soup feeds it 224 px while it keeps 518 px), so there the grid gives the size it
is built at and never the size it was fed.

Input size, mean and std, in this order: --image-size/--mean/--std, what the sources record, the size a
fixed-size model takes, timm's pretrained_cfg for the architecture, soup's defaults. The last two are
assumptions and said in one line; an option overriding a recorded value is said too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import timm
import torch
from timm.models import get_model_traits
from torch import nn

from soup.errors import SoupError
from soup.outside.reading import Source
from soup.recipe.checks import IMAGE_SIZES
from soup.recipe.spec import DataConfig, parse_backbone
from soup.text import printable

# Training-only settings: two fine-tunes with other dropout rates are the same network at evaluation.
DROP_KEYS = ("drop_rate", "drop_path_rate", "drop_block_rate")


@dataclass
class Given:
    """--image-size, --mean, --std (None: not given)."""

    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


def _triple(option: str, text: str, low: float, low_open: bool) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    bound = "above" if low_open else "from"
    ok = len(values) == 3 and all(math.isfinite(v) and (v > low if low_open else v >= low) and v <= 1
                                  for v in values)
    if not ok:
        raise SoupError(f"{option} {printable(text)}: three numbers R,G,B {bound} {low:g} to 1 (soup reads pixels as "
                        "0..1), e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    return values


def parse_given(image_size: str | None, mean: str | None, std: str | None) -> Given:
    """The options as typed, checked: one line naming the option for a bad value."""
    size = None
    if image_size is not None:
        low, high = IMAGE_SIZES
        size = int(image_size) if image_size.strip().isdigit() else None
        if size is None or not low <= size <= high:
            raise SoupError(f"--image-size {printable(image_size)}: the side in pixels the model was fed, a whole "
                            f"number from {low} to {high}")
    return Given(size, _triple("--mean", mean, 0.0, False) if mean is not None else None,
                 _triple("--std", std, 0.0, True) if std is not None else None)


def _meta_timm(entry: str, kwargs: dict) -> nn.Module:
    with torch.device("meta"):  # structure only: no memory, no initialisation
        return timm.create_model(entry, pretrained=False, num_classes=1, **kwargs)


def _resolved(entry: str, kwargs: dict, keys: set[str], given) -> tuple:
    """What the model timm builds from `kwargs` (recorded by the source `given`) is, as far as its outputs go:
    its modules, tensor shapes, traits (img_size, in_chans, ...) and the attributes the kwargs name."""
    kwargs = {k: v for k, v in kwargs.items() if k not in DROP_KEYS and not k.endswith("_drop_rate")}
    try:
        model = _meta_timm(entry, kwargs)
    except Exception as err:  # timm raises what each model's constructor raises
        raise SoupError(f"{given}: timm:{entry} cannot be built with its recorded model kwargs "
                        f"{printable(str(kwargs))} ({printable(str(err).splitlines()[0] if str(err) else err)})") from None
    traits = {k: v for k, v in get_model_traits(model).items() if k != "num_classes"}
    attributes = {k: repr(getattr(model, k)) for k in sorted(keys) if isinstance(getattr(model, k, None),
                                                                                  (str, int, float, bool, tuple))}
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    return repr(model), shapes, repr(sorted(traits.items())), attributes


def _differing(entry: str | None, a: Source, b: Source, keys: set[str]) -> tuple[dict, dict]:
    """The settings that make `a`'s model another than `b`'s: each whose value in `b` changes `a`'s model
    (for timm; else every one recorded differently)."""
    differ = [k for k in dict.fromkeys([*a.model_args, *b.model_args]) if a.model_args.get(k) != b.model_args.get(k)]
    if entry is not None:
        wanted = _resolved(entry, a.model_args, keys, a.given)
        swapped = [{**{j: v for j, v in a.model_args.items() if j != k}, **({k: b.model_args[k]} if k in b.model_args
                                                                           else {})} for k in differ]
        differ = [k for k, kw in zip(differ, swapped) if _resolved(entry, kw, keys, b.given) != wanted] or differ
    unset = "timm's default" if entry is not None else "not recorded"
    return ({k: a.model_args.get(k, unset) for k in differ}, {k: b.model_args.get(k, unset) for k in differ})


def _sized(entry: str, source: Source) -> dict:
    """`source`'s kwargs with the img_size its position embedding says, where it records none."""
    if "img_size" in source.model_args:
        return source.model_args
    try:
        grid = _position_grid(_meta_timm(entry, source.model_args), source)
    except Exception:  # kwargs timm does not take: _resolved says so, naming the source
        return source.model_args
    return {**source.model_args, "img_size": grid.size} if grid is not None else source.model_args


def common_kwargs(sources: list[Source], backbone: str) -> dict:
    """The model kwargs all `sources` were built with (the first one's record of them), or one line naming
    the two that build different models."""
    first = sources[0]
    others = [s for s in sources[1:] if s.model_args != first.model_args]
    if not others:
        return dict(first.model_args)
    kind, _, entry = parse_backbone(backbone)
    entry = entry if kind == "timm" and timm.is_model(entry) else None
    keys = set().union(*(s.model_args for s in sources))
    if entry is not None:
        wanted = _resolved(entry, _sized(entry, first), keys, first.given)
        others = [s for s in others if _resolved(entry, _sized(entry, s), keys, s.given) != wanted]
    if others:
        a, b = _differing(entry, first, others[0], keys)
        raise SoupError(f"{first.given} and {others[0].given} are different {backbone} models: {first.given} was built "
                        f"with {printable(str(a))}, {others[0].given} with {printable(str(b))}; import them separately")
    return dict(first.model_args)


@dataclass
class Grid:
    """A source's position embedding: a `grid` x `grid` of `patch` px patches."""

    source: Source
    grid: int
    patch: int

    @property
    def size(self) -> int:
        return self.grid * self.patch

    def __str__(self) -> str:
        return f"{self.grid}x{self.grid} patches of {self.patch} px"


def _embedding(model: nn.Module) -> tuple[str, int, int, int] | None:
    """(name, patch px, tokens before the patches, side in px) of a ViT's position embedding (pos_embed
    beside its patch_embed, timm's and DinoV2's names), or None where the model has none."""
    params = dict(model.named_parameters())
    name = next((n for n, p in params.items() if n.rpartition(".")[2] == "pos_embed" and p.dim() == 3), None)
    if name is None:
        return None
    parent = name.rpartition(".")[0]
    try:
        embed = model.get_submodule(f"{parent}.patch_embed" if parent else "patch_embed")
    except AttributeError:
        return None
    patch, patches = getattr(embed, "patch_size", None), getattr(embed, "num_patches", None)
    if not (isinstance(patch, tuple) and len(set(patch)) == 1 and isinstance(patches, int)):
        return None
    return name, patch[0], params[name].shape[1] - patches, math.isqrt(patches) * patch[0]


def built_side(model: nn.Module) -> int | None:
    """The side in px a ViT's position embedding is built for (None: no position embedding)."""
    found = _embedding(model)
    return found[3] if found else None


def _position_grid(model: nn.Module, source: Source) -> Grid | None:
    """The grid of `source`'s position embedding for `model`'s, or None where the model has none or the
    source's is not one square grid."""
    found = _embedding(model)
    if found is None:
        return None
    name, patch, prefix, _ = found  # prefix: the class (and register) tokens it embeds too
    shapes = {tuple(v.shape) for k, v in source.state.items() if (k == name or k.endswith(f".{name}")) and v.dim() == 3}
    if len(shapes) != 1:
        return None
    tokens = shapes.pop()[1] - prefix
    grid = math.isqrt(max(tokens, 0))
    return Grid(source, grid, patch) if grid > 0 and grid * grid == tokens else None


def built_for(model: nn.Module, sources: list[Source], kwargs: dict, backbone: str) -> Grid | None:
    """The grid the sources' position embeddings agree on, or None where they have none; one line where
    they disagree, or where it is not the size the recorded kwargs build."""
    grids = [g for g in (_position_grid(model, s) for s in sources) if g is not None]
    other = next((g for g in grids if g.size != grids[0].size), None)
    if other is not None:
        first = grids[0]
        raise SoupError(f"{first.source.given} and {other.source.given} are {backbone} models built for different "
                        f"sizes (position embeddings of {first} and {other}); import them separately")
    if grids and "img_size" in kwargs and _side(kwargs["img_size"]) != grids[0].size:
        raise SoupError(f"{grids[0].source.given}: its position embedding is {grids[0]} ({grids[0].size} px) but its "
                        f"recorded model kwargs say img_size {printable(str(kwargs['img_size']))}; fix the record or "
                        "name the weights file alone")
    return grids[0] if grids else None


def _side(size) -> int | None:
    if isinstance(size, (list, tuple)) and size:
        size = size[-1]
    return size if isinstance(size, int) else None


def timm_meta(backbone: str, kwargs: dict) -> nn.Module | None:
    """The timm model `backbone` names, built on the meta device (None for a torch.hub one)."""
    kind, _, entry = parse_backbone(backbone)
    return _meta_timm(entry, kwargs) if kind == "timm" and timm.is_model(entry) else None


def fixed_size(model: nn.Module | None) -> int | None:
    """The one input size a timm model takes (a ViT without dynamic_img_size), else None."""
    traits = get_model_traits(model) if model is not None else {}
    return _side(traits.get("img_size")) if traits.get("fixed_input_size") else None


@dataclass
class Preprocessing:
    """The data section an import records, where each value came from, and what to say about it."""

    data: DataConfig
    origin: dict[str, str]  # image_size/mean/std -> where it came from
    notes: list[str]


def _recorded(sources: list[Source], name: str) -> tuple[object, Source] | None:
    values = {repr(getattr(s, name)): s for s in sources if getattr(s, name) is not None}
    if len(values) > 1:
        (a, first), (b, second) = list(values.items())[:2]
        raise SoupError(f"{first.given} was fine-tuned with {name} {a} but {second.given} with {b}; import "
                        "sources of one preprocessing together")
    return (getattr(next(iter(values.values())), name), next(iter(values.values()))) if values else None


def _shown(name: str, value) -> str:
    if name == "image_size":
        return f"{value} px"
    return f"{name} [{', '.join(f'{v:g}' for v in value)}]"


def _default(name: str, backbone: str, grid: Grid | None) -> tuple[object, str]:
    """(value, where) for what nothing records: the size a timm ViT that takes any size is built for, timm's
    pretrained_cfg, else soup's defaults."""
    kind, _, entry = parse_backbone(backbone)
    cfg = timm.models.get_pretrained_cfg(entry) if kind == "timm" and timm.is_model(entry) else None
    if name == "image_size" and grid is not None and kind == "timm":
        return grid.size, f"the size {backbone} is built for, by {grid.source.given}'s position embedding ({grid})"
    if cfg is not None:
        value = cfg.input_size[-1] if name == "image_size" else [float(v) for v in getattr(cfg, name)]
        return value, f"timm's pretrained_cfg for {entry}"
    return getattr(DataConfig(""), name), "soup's defaults, ImageNet's"


def preprocessing(root, sources: list[Source], backbone: str, kwargs: dict, grid: Grid | None,
                  given: Given) -> Preprocessing:
    """The input size, mean and std (see the module's docstring for the order they are taken in)."""
    fixed = fixed_size(timm_meta(backbone, kwargs))
    built = f" ({grid.source.given}'s position embedding is {grid})" if grid else ""
    data, origin, notes, assumed = DataConfig(str(root.resolve())), {}, [], []
    for name in [f.name for f in fields(Given)]:
        recorded, explicit = _recorded(sources, name), getattr(given, name)
        option = f"--{name.replace('_', '-')}"
        if explicit is not None:
            value, where = explicit, option
            if recorded is not None and recorded[0] != explicit:
                notes.append(f"{option} {_shown(name, explicit)} wins over the {_shown(name, recorded[0])} "
                             f"{recorded[1].given} records")
        elif recorded is not None:
            value, where = recorded[0], f"recorded by {recorded[1].given}"
        elif name == "image_size" and fixed:
            value, where = fixed, f"the only size {backbone} takes{built}"
        else:
            value, where = _default(name, backbone, grid)
            assumed.append((option, _shown(name, value), where))
        if name == "image_size" and fixed and value != fixed:
            raise SoupError(f"{where}: {value} px, but {backbone} as built takes {fixed} px only{built}; drop "
                            f"{option} or give {fixed}")
        setattr(data, name, value)
        origin[name] = where
    if assumed:
        interpolates = grid is not None and not fixed and any(option == "--image-size" for option, _, _ in assumed)
        notes.append(_assumption(assumed, f", though {backbone} takes other sizes too (its position embedding says "
                                          "what it is built for, not what it was fed)" if interpolates else ""))
    return Preprocessing(data, origin, notes)


def _assumption(assumed: list[tuple[str, str, str]], caveat: str) -> str:
    """One line: what was assumed, from where, and the options that set it."""
    groups: dict[str, list[str]] = {}
    for _, text, where in assumed:
        groups.setdefault(where, []).append(text)
    said = "; ".join(f"{', '.join(texts)} ({where})" for where, texts in groups.items())
    options = ", ".join(option for option, _, _ in assumed)
    return f"no source records its {options.replace('--', '').replace('-', ' ')}: assumed {said}{caveat}; set " \
           f"{options} if it was trained otherwise"

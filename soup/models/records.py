"""A checkpoint's story, typed: the one place that knows the soup metadata's keys.

Three stages write it (soup.train.loop, soup.cook.cooking, soup.outside.importing) and every later one
reads it; each builds or reads a `Record`, never the JSON dict. A record is checked and parsed once, where
the file is read (`parse`: soup.models.metadata refuses an edited field in one line), and dumped once,
where it is written (`Record.dump`, through soup.models.checkpoint.save_checkpoint). Its parts describe
themselves in the one line `soup inspect`, the report page and the model card print.

The JSON on disk is the one soup wrote before these types (its "format" field is the version): a file
written before still reads, and one written now reads in an older soup. Adding a field: see
docs/development.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from soup.errors import SoupError
from soup.models.metadata import check_metadata

FORMAT = "soup/1"  # the records' version, in every file; a file without it is read as this one
UNKNOWN_START = "unknown"  # start_fingerprint of an ingredient imported without its start (soup import)
TRAINED = ("ingredient", "probe")  # kinds `soup train` writes; any other kind is a soup method's name
TEMPERATURE_BOUNDS = (1e-3, 1e3)  # a fitted T outside these means logits that carry no usable scale


class Part:
    """A record inside the metadata (an object under one key): its declared fields typed, the keys it
    does not declare kept as written in `more`, so that a rewrite loses nothing. `dump` writes a field
    whose value is None only when it is in NULLS (the writers always wrote those)."""

    NULLS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls, value: dict | None):
        if value is None:
            return None
        names = {f.name for f in fields(cls)} - {"more"}
        return cls(**{k: v for k, v in value.items() if k in names},
                   more={k: v for k, v in value.items() if k not in names})

    def dump(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "more"}
        return {**{k: v for k, v in own.items() if v is not None or k in self.NULLS}, **self.more}


@dataclass(frozen=True)
class Probe(Part):
    """The probed start an ingredient began from (soup.train.probe): its id and val accuracy."""

    id: str | None = None
    val_acc: float | None = None
    more: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rung(Part):
    """A search.prune decision at a rung epoch (soup.train.prune): what was compared, and the verdict."""

    NULLS = ("epoch", "val_top1", "threshold", "rule", "pruned", "peers")
    epoch: int | None = None
    val_top1: float | None = None
    threshold: float | None = None
    rule: str | None = None
    pruned: bool = False
    peers: int | None = None
    more: dict = field(default_factory=dict)

    def describe(self) -> str:
        against = "probed start" if self.rule == "start" else "median of its peers"
        return f"pruned at epoch {self.epoch}: val {self.val_top1:.2%} below the {against} ({self.threshold:.2%})"


def first_pruned(history: list[dict]) -> Rung | None:
    """The rung decision that stopped a run with this epoch history (None: not pruned)."""
    return next((Rung.parse(e["rung"]) for e in history if isinstance(e.get("rung"), dict) and e["rung"].get("pruned")),
                None)


@dataclass(frozen=True)
class Selection(Part):
    """How a soup scored on the split that chose it (None: cooked without data)."""

    NULLS = ("split", "root", "chose")
    split: str = "?"
    root: str | None = None
    chose: bool | None = None
    top1: float | None = None
    top5: float | None = None
    loss: float | None = None
    n: int | None = None
    more: dict = field(default_factory=dict)

    @property
    def chose_weights(self) -> bool:
        """Whether these scores chose or fitted the weights (soups from before "chose" was recorded did)."""
        return self.chose is not False


@dataclass(frozen=True)
class BatchNormReset(Part):
    """Which BatchNorm layers of a soup got statistics of their own, and on which images (soup.cook.batchnorm)."""

    off: bool | None = None
    layers: list = field(default_factory=list)
    of_layers: int | None = None
    split: str | None = None
    images: int | None = None
    requested: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    more: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.off:
            return "BatchNorm statistics: the members' average, not re-estimated (--no-bn-reset)"
        if not self.layers:
            return "BatchNorm statistics: the members' own, kept as they are (no layer differed between members)"
        of = self.of_layers if self.of_layers is not None else len(self.layers)
        return (f"BatchNorm statistics: {len(self.layers)} of {of} layers re-estimated on {self.images} "
                f"{self.split or 'train'} images (seed {self.seed}, batches of {self.batch_size})")

    def images_only(self) -> dict:
        """The record without its per-layer list: which images, how measured."""
        return {k: v for k, v in self.dump().items() if k != "layers"}


@dataclass(frozen=True)
class Calibration(Part):
    """A temperature fitted on a split (soup calibrate, cook --calibrate) and what it changed."""

    temperature: Any = None  # checked where it is used (`checked_temperature`): the message names its range
    split: str | None = None
    images: int | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    more: dict = field(default_factory=dict)

    @property
    def shown_temperature(self) -> float | None:
        """The temperature when it is a number (to print), else None."""
        value = self.temperature
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def checked_temperature(self, path: Path) -> float:
        """The temperature, refused unless a number within TEMPERATURE_BOUNDS: a T of 1e-300 passes
        "finite positive" yet turns logits into infinities (NaN losses, changed ensemble votes)."""
        value, (low, high) = self.temperature, TEMPERATURE_BOUNDS
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not low <= value <= high:  # NaN fails the comparison too
            raise SoupError(f"{path}: metadata calibration.temperature is {value!r}, not a number from {low:g} to "
                            f"{high:g} (the range `soup calibrate` fits in); re-run `soup calibrate` on it")
        return float(value)


@dataclass(frozen=True)
class Versus(Part):
    """A soup against its best ingredient on a split that took no part in selection (soup.score.compare)."""

    split: str | None = None
    ref: str | None = None
    diff: float | None = None
    more: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Member(Part):
    """One ingredient of a soup and its weight."""

    name: str = "?"
    path: str | None = None
    weight: float = 0.0
    more: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Imported(Part):
    """Where `soup import` read an ingredient from (another tool's checkpoint)."""

    source: str | None = None
    file: str | None = None
    hub_id: str | None = None
    more: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Start:
    """The weights an ingredient was fine-tuned from: their fingerprint (UNKNOWN_START when `soup import`
    had no --start) and, for an import, how they were given (`how`, the metadata's "start")."""

    fingerprint: str
    how: dict | None = None

    @property
    def known(self) -> bool:
        return self.fingerprint != UNKNOWN_START

    @classmethod
    def unknown(cls) -> Start:
        return cls(UNKNOWN_START, {"kind": "unknown", "start_check": "off"})


@dataclass(frozen=True)
class MethodRecord:
    """What a soup method recorded: its members and candidates, each step it tried, and its own fields
    (declared beside the method, soup.cook: models/ knows no method), kept as written."""

    members: list[Member] = field(default_factory=list)
    candidates: list[str] | None = None
    steps: list[dict] = field(default_factory=list)
    own: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The method's own field `key` (e.g. the record a method declares beside itself)."""
        return self.own.get(key, default)


KNOWN = ("format", "kind", "name", "id", "settings", "recipe", "data_root", "backbone", "classes",
         "start_fingerprint", "seed", "val_history", "val_acc", "raw_val_acc", "probe", "pruned", "sweep_ids",
         "run", "start", "imported", "members", "candidates", "steps", "selection", "calibration", "versus_best",
         "bn_reset")


@dataclass(frozen=True)
class Record:
    """A checkpoint's soup metadata. `kind`: "ingredient", "probe" (both trained, or imported) or the name
    of the soup method that cooked it (then `method` holds what it recorded). `extra`: keys this version
    does not know, kept as written."""

    recipe: dict
    backbone: str
    classes: list[str]
    start: Start
    kind: str = "ingredient"
    name: str | None = None
    id: str | None = None
    settings: dict | None = None
    data_root: str | None = None  # where the recipe's data.root led when it was written (absolute)
    seed: int | None = None
    history: list[dict] = field(default_factory=list)  # one entry per epoch (val_history)
    val_acc: float | None = None
    raw_val_acc: float | None = None  # the raw trained weights' accuracy (val_acc's own without an EMA)
    probe: Probe | None = None
    pruned: Rung | None = None  # the rung decision that stopped it (search.prune), or None
    sweep_ids: list[str] | None = None  # the whole sweep, so that `soup cook` can name the missing
    run: dict | None = None  # how it ran (metrics.json)
    imported: Imported | None = None
    method: MethodRecord | None = None
    selection: Selection | None = None
    bn_reset: BatchNormReset | None = None
    calibration: Calibration | None = None
    versus_best: Versus | None = None
    extra: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED

    @property
    def members(self) -> list[Member]:
        return self.method.members if self.method is not None else []

    def dump(self) -> dict:
        """The JSON object stored in the file, as soup has always written it."""
        trained = self.trained
        parts = {
            "format": self.format, "kind": self.kind, "name": self.name, "id": self.id, "settings": self.settings,
            "recipe": self.recipe, "data_root": self.data_root, "backbone": self.backbone, "classes": self.classes,
            "start_fingerprint": self.start.fingerprint,
        }
        if trained:
            parts |= {"seed": self.seed, "val_history": self.history, "val_acc": self.val_acc,
                      "raw_val_acc": self.raw_val_acc, "probe": self.probe and self.probe.dump(),
                      "pruned": self.pruned and self.pruned.dump(), "sweep_ids": self.sweep_ids, "run": self.run}
        parts |= {"start": self.start.how, "imported": self.imported and self.imported.dump()}
        if self.method is not None:
            parts |= {"members": [m.dump() for m in self.method.members], "candidates": self.method.candidates,
                      "steps": self.method.steps, "selection": self.selection and self.selection.dump(),
                      **self.method.own}
        parts |= {"calibration": self.calibration and self.calibration.dump(),
                  "versus_best": self.versus_best and self.versus_best.dump(),
                  "bn_reset": self.bn_reset and self.bn_reset.dump()}
        nulls = ("seed", "probe", "pruned") if trained else ("selection",)
        return {k: v for k, v in parts.items() if v is not None or k in nulls} | self.extra

    def with_calibration(self, calibration: dict) -> Record:
        return replace(self, calibration=Calibration.parse(calibration))


def dumped(record: Record | dict) -> dict:
    """What a writer stores: a record dumped, or a metadata object given whole (a copy of another file's,
    as tests and tools write them), with the version first."""
    return record.dump() if isinstance(record, Record) else {"format": FORMAT, **record}


def parse(path: Path, meta: dict, head_rows: int | None = None, checked: bool = True) -> Record:
    """The record of the metadata `meta` of the file at `path`, checked (soup.models.metadata: one line
    naming the field soup cannot use) and parsed once; `head_rows` as check_metadata takes it. Unchecked
    (`checked` False: a Checkpoint built in memory, whose maker vouches for it), a missing required field
    reads as empty."""
    if checked:
        check_metadata(path, meta, head_rows)
    unknown = {k: v for k, v in meta.items() if k not in KNOWN}
    kind = meta.get("kind", "ingredient")
    history = meta.get("val_history") or []
    method = None
    if kind not in TRAINED:
        method = MethodRecord([Member.parse(m) for m in meta.get("members") or []], meta.get("candidates"),
                              meta.get("steps") or [], unknown)
    return Record(
        recipe=meta.get("recipe", {}), backbone=meta.get("backbone", ""), classes=meta.get("classes", []),
        start=Start(meta.get("start_fingerprint", UNKNOWN_START), meta.get("start")), kind=kind, name=meta.get("name"),
        id=meta.get("id"), settings=meta.get("settings"), data_root=meta.get("data_root"), seed=meta.get("seed"),
        history=history, val_acc=meta.get("val_acc"), raw_val_acc=meta.get("raw_val_acc"),
        probe=Probe.parse(meta.get("probe")),
        # Files written before the field existed: the decision their epochs recorded.
        pruned=Rung.parse(meta["pruned"]) if "pruned" in meta else first_pruned(history),
        sweep_ids=meta.get("sweep_ids"), run=meta.get("run"), imported=Imported.parse(meta.get("imported")),
        method=method, selection=Selection.parse(meta.get("selection")),
        bn_reset=BatchNormReset.parse(meta.get("bn_reset")), calibration=Calibration.parse(meta.get("calibration")),
        versus_best=Versus.parse(meta.get("versus_best")), extra=unknown if method is None else {},
        format=meta.get("format", FORMAT))

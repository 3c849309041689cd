"""Submission: predictions for every test image in a format the competition expects; by default `Id,Category`
rows, as the course's Kaggle page wants. A format is one writer in FORMATS (name -> writer): adding one is a
function decorated with `@submission_format("name")`, its test and a line in docs/shipping.md."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import torch

from soup.data.folders import TestImages, build_transform
from soup.data.outputs import check_output, data_roots
from soup.errors import SoupError
from soup.judge.evaluate import ensemble_logits, tta_logits
from soup.models.backbones import model_from_checkpoint
from soup.models.checkpoint import Checkpoint
from soup.models.files import atomic_path, write_text_atomic
from soup.models.inference import finite_logits, make_loader, predict, resolve_device
from soup.models.views import views_of
from soup.recipe.spec import recipe_from_dict
from soup.score.calibrate import temperature_of


def test_logits(checkpoint: Checkpoint, data_root: str | Path | None = None, device: torch.device | None = None,
                batch_size: int = 128, tta: str | None = None) -> tuple[list[str], torch.Tensor]:
    """(ids, logits) for the test images, with the same preprocessing as evaluation; with `tta`, the mean
    over its views of each view's logits after the checkpoint's temperature, as `soup eval --tta` scores."""
    device = device or resolve_device()
    cfg = recipe_from_dict(checkpoint.recipe).data
    images = TestImages(data_root if data_root is not None else cfg.root, build_transform(cfg))
    model = model_from_checkpoint(checkpoint).to(device)
    loader = make_loader(images, batch_size, 0, device)
    if tta is None:
        logits, ids = predict(model, loader, device)
        return ids, finite_logits(logits, str(checkpoint.path))
    per_view = [(finite_logits(logits, str(checkpoint.path)), ids)
                for logits, ids in (predict(model, loader, device, view) for view in views_of(tta))]
    return per_view[0][1], tta_logits([logits for logits, _ in per_view], temperature_of(checkpoint))


def predict_test(checkpoint: Checkpoint, data_root: str | Path | None = None, device: torch.device | None = None,
                 batch_size: int = 128, tta: str | None = None) -> tuple[list[str], list[int]]:
    """(ids, class indices) for the test images."""
    ids, logits = test_logits(checkpoint, data_root, device, batch_size, tta)
    return ids, logits.argmax(dim=1).tolist()


def predict_test_ensemble(checkpoints: list[Checkpoint], data_root: str | Path | None = None,
                          device: torch.device | None = None,
                          tta: str | None = None) -> tuple[list[str], list[int], dict]:
    """(ids, class indices, provenance) of the ensemble of `checkpoints`, which may differ in architecture
    but not in class list (see `ensemble_logits`); with `tta`, of each member's mean over the views."""
    if len(checkpoints) < 2:
        raise SoupError("--ensemble needs at least two checkpoints")
    members, ids = [], None
    temperatures = [temperature_of(c) for c in checkpoints]  # a bad one stops the command before any work
    for checkpoint, temperature in zip(checkpoints, temperatures):
        member_ids, logits = test_logits(checkpoint, data_root, device, tta=tta)
        if ids is not None and member_ids != ids:
            raise SoupError(f"--ensemble: {checkpoint.path} reads other test images than {checkpoints[0].path}; "
                            "pass --data ROOT so that all read the same ones")
        ids = member_ids
        # Calibrated members: a probability ensemble across architectures averages calibrated probabilities.
        members.append((checkpoint, logits if tta is not None else logits / temperature))
    combined, how = ensemble_logits(members)
    provenance = {"kind": "ensemble", "combined": how, "classes": checkpoints[0].classes,
                  "members": [_member(c) for c in checkpoints], "tta": tta}
    return ids, combined.argmax(dim=1).tolist(), provenance


def predict_submission(checkpoints: list[Checkpoint], data_root: str | Path | None = None,
                       ensemble: bool = False, tta: str | None = None) -> tuple[list[str], list[int], dict]:
    """(ids, class indices, provenance) from one checkpoint, or from the ensemble of several; with `tta`
    (soup.models.views), from the mean of logits over its views."""
    if len(checkpoints) > 1 and not ensemble:
        raise SoupError(f"{len(checkpoints)} checkpoints given; add --ensemble to average them, or name one")
    if ensemble:
        return predict_test_ensemble(checkpoints, data_root, tta=tta)
    (checkpoint,) = checkpoints
    ids, categories = predict_test(checkpoint, data_root, tta=tta)
    return ids, categories, {"kind": checkpoint.kind, "members": [_member(checkpoint)], "tta": tta}


def _member(checkpoint: Checkpoint) -> dict:
    return {"name": checkpoint.name, "path": str(checkpoint.path), "kind": checkpoint.kind,
            "backbone": checkpoint.backbone, "temperature": temperature_of(checkpoint)}


def provenance_path(submission: str | Path) -> Path:
    return Path(f"{submission}.json")


def check_submission_output(submission: str | Path, checkpoints: list[Checkpoint], overwrite: bool,
                            data_root: str | Path | None = None) -> str | None:
    """Before predicting: the CSV and its sidecar go where soup.data.outputs allows, never into a data root.
    What an interrupted earlier run left there (see `pair_problem`), refused without --overwrite, else
    returned to be said."""
    roots, inputs = data_roots(checkpoints, data_root), [c.path for c in checkpoints]
    paths = (Path(submission), provenance_path(submission))
    for path in paths:  # first where soup may never write, then what is there, then what --overwrite allows
        check_output(path, inputs, True, "submission", roots=roots)
    problem = pair_problem(submission)
    if problem is not None and not overwrite:
        there = f"{submission} exists: " if Path(submission).exists() else ""
        raise SoupError(f"{there}{problem}; add --overwrite to write both again, or write the submission elsewhere "
                        "with -o")
    for path in paths:
        check_output(path, inputs, overwrite, "submission", roots=roots)
    return problem


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_problem(submission: str | Path) -> str | None:
    """Whether the CSV and its provenance disagree. The provenance is written first and names the sha256 of
    the CSV about to replace the old one, so a run killed between the two renames leaves a provenance whose
    CSV is missing or another one: the pair never silently describes another submission."""
    csv_path, sidecar = Path(submission), provenance_path(submission)
    if not sidecar.is_file():
        return None
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("csv_sha256")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return f"{sidecar} is not a provenance soup wrote (unreadable JSON)"
    if not isinstance(recorded, str):
        return None  # written before soup recorded the CSV's hash: nothing to compare
    if not csv_path.is_file():
        return (f"{sidecar} describes a submission whose CSV {csv_path} was never written (an earlier soup submit "
                "was interrupted between its two files)")
    if _sha256(csv_path) != recorded:
        return (f"{csv_path} is not the submission {sidecar} describes (sha256 differs: an earlier soup submit was "
                "interrupted between its two files, or the CSV was edited)")
    return None


# A writer turns (test image ids, predicted class indices, the class names) into the file's bytes.
Writer = Callable[[list[str], list[int], list[str]], bytes]
FORMATS: dict[str, Writer] = {}
DEFAULT_FORMAT = "csv"


def submission_format(name: str) -> Callable[[Writer], Writer]:
    """Register a writer under `name` (what `soup submit --format` takes)."""
    def register(writer: Writer) -> Writer:
        FORMATS[name] = writer
        return writer
    return register


def submission_writer(name: str) -> Writer:
    """The writer of format `name`; an unknown name is one line listing the formats there are."""
    if name not in FORMATS:
        raise SoupError(f"--format {name!r} is not a submission format; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]


@submission_format(DEFAULT_FORMAT)
def id_category_csv(ids: list[str], categories: list[int], classes: list[str]) -> bytes:
    """The CSV Kaggle takes: `Id,Category` rows, the category a class index. UTF-8, whatever the locale; an id
    from a file name that is not valid UTF-8 keeps that name's bytes (the surrogates os.fsdecode made of them
    turn back into the same bytes)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["Id", "Category"])
    writer.writerows(zip(ids, categories))
    return text.getvalue().encode("utf-8", errors="surrogateescape")


def write_submission(path: str | Path, ids: list[str], categories: list[int], classes: list[str],
                     fmt: str = DEFAULT_FORMAT) -> Path:
    """The submission alone (the demo's; `soup submit` writes it with its provenance: `write_submission_pair`)."""
    _write_csv(path, submission_writer(fmt)(ids, categories, classes))
    return Path(path)


def write_submission_pair(path: str | Path, ids: list[str], categories: list[int], provenance: dict,
                          classes: list[str], fmt: str = DEFAULT_FORMAT) -> Path:
    """The provenance `<submission>.json`, naming the format and the sha256 of the submission, then the
    submission in format `fmt`: each replaced atomically, and after a kill between them `pair_problem` finds
    the mismatch. The submission itself stays exactly what the format writes. Returns the provenance's path."""
    data = submission_writer(fmt)(ids, categories, classes)
    provenance = {**provenance, "format": fmt}
    sidecar = provenance_path(path)
    write_text_atomic(sidecar, json.dumps({**provenance, "csv_sha256": hashlib.sha256(data).hexdigest()},
                                          indent=2) + "\n")
    _write_csv(path, data)
    return sidecar


def _write_csv(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)

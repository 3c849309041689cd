"""Backbones: torch.hub and timm models behind one classifier shape (`backbone` + linear `head`).

Every model soup builds is `Classifier(backbone, head)`, so state-dict keys read `backbone.*` and `head.*`
whatever the source. Weights come from torch.hub / timm when online, from a local file (`model.weights`)
when not, and from a soup checkpoint when a checkpoint is loaded for evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import sys
import zipfile
from contextvars import ContextVar
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, is_soup_checkpoint, read_checkpoint
from soup.recipe.spec import ModelConfig, parse_backbone, recipe_from_dict

# What model.weights reads: tensors only, never a pickle that runs code.
WEIGHT_FORMATS = "a .safetensors file, or a .pth/.pt/.bin file written by torch.save"
NETWORK_MODULES = ("urllib", "http", "socket", "ssl", "requests", "httpx", "httpcore", "huggingface_hub", "urllib3")


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


# huggingface_hub 2.x's and 1.x's HTTP clients: a failure to connect, resolve, proxy or time out is a
# TransportError there: no OSError, and httpx2's module name would match no list of network modules.
HTTP_CLIENTS = ("httpx2", "httpx")


def _transport_errors() -> tuple[type, ...]:
    # Only a loaded client can have raised its own error: no import here, so the hub extra stays optional.
    found = (getattr(sys.modules.get(name), "TransportError", None) for name in HTTP_CLIENTS)
    return tuple(t for t in found if isinstance(t, type))


def is_network_error(err: BaseException) -> bool:
    chain = [e for e in (err, err.__cause__, err.__context__) if e]
    return any(isinstance(e, (ConnectionError, TimeoutError, *_transport_errors())) for e in chain) or any(
        type(e).__module__.split(".")[0] in NETWORK_MODULES for e in chain
    )


def _offline_hint(spec: str) -> str:
    return (f"could not fetch {spec} (no network?). To run offline, set model.weights: <local .pth or "
            f".safetensors file>, or copy the repo and its weights into the torch.hub cache "
            f"({torch.hub.get_dir()}), or use hub:<local dir>:<entry>")


def _create_timm(name: str, pretrained: bool, kwargs: dict, weights_file: str | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise SoupError(f"model.backbone: timm has no model {name!r}; see timm.list_models()")
    if weights_file:
        # Read here (tensors only, one line on a bad file), then handed to timm's own loader, which adapts
        # position embeddings and formats. timm drops a classifier of another class count and then loads
        # leniently, ignoring keys that do not fit: the classifier goes here instead, so its load is strict.
        classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state = {k: v for k, v in _read_weight_file(weights_file).items() if k.rpartition(".")[0] not in classifier}
        kwargs = {**kwargs, "pretrained_cfg_overlay": dict(state_dict=state, num_classes=0)}
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as err:
        if not weights_file:
            raise
        detail = " ".join(str(err).split())
        raise SoupError(f"model.weights: {weights_file} does not fit timm:{name} "
                        f"({detail[:200]}{'...' if len(detail) > 200 else ''}); check model.backbone and "
                        "model.kwargs") from None
    if weights_file:  # timm keeps its pretrained config on the model: not a second copy of the weights
        getattr(model, "pretrained_cfg", {}).pop("state_dict", None)
    return model


# Hub code the user vouches for on the command line (--trust-hub): local folders or GitHub owner/repo.
_TRUSTED_HUBS: ContextVar[tuple[str, ...]] = ContextVar("trusted_hubs", default=())


@contextlib.contextmanager
def trusting_hubs(sources: Iterable[str]):
    """Within the block, rebuilding a checkpoint may run the hub code of `sources` (see `_trusted_hub`)."""
    token = _TRUSTED_HUBS.set(tuple(sources))
    try:
        yield
    finally:
        _TRUSTED_HUBS.reset(token)


def _hub_cache_copy(repo: str) -> Path | None:
    """The torch.hub cache's copy of GitHub `owner/name[:ref]`, named as torch.hub names it; without a ref,
    main or master, as torch.hub looks them up offline."""
    name, _, ref = repo.partition(":")
    if name.count("/") != 1:
        return None
    for branch in [ref] if ref else ["main", "master"]:
        folder = Path(torch.hub.get_dir()) / f"{name.replace('/', '_')}_{branch.replace('/', '_')}"
        if (folder / "hubconf.py").is_file():
            return folder
    return None


def _trusted_hub(source: str, spec: str, recorded_in: str | Path) -> str:
    """Where to load the hub code a checkpoint's metadata names, if the user trusts it: a folder or repo
    named with --trust-hub, or a copy already in the torch.hub cache (torch.hub trusts what it cached).
    Metadata is data: anything else, and any download of code it names, is refused."""
    trusted = _TRUSTED_HUBS.get()
    local = Path(source).expanduser()
    is_local = local.is_dir() or source.startswith((".", "/", "~"))
    if is_local:
        folder = local.resolve()
        if folder.parent == Path(torch.hub.get_dir()).resolve() or any(
                Path(t).expanduser().resolve() == folder for t in trusted):
            return source
    else:
        cached = _hub_cache_copy(source)
        if cached is not None:
            return str(cached)
        if source in trusted or source.partition(":")[0] in trusted:
            return source  # named on the command line: fetched as `soup train` would
    where = source if is_local else source.partition(":")[0]
    raise SoupError(f"{recorded_in}: its recorded backbone {spec} would run the code in {where}, which you have "
                    f"not trusted (a checkpoint never chooses code to run); if you trust it, add --trust-hub {where}")


def _create_hub(source: str, entry: str, pretrained: bool, kwargs: dict) -> nn.Module:
    local = Path(source).expanduser()
    if local.is_dir():
        return torch.hub.load(str(local), entry, source="local", pretrained=pretrained, **kwargs)
    if source.startswith((".", "/", "~")):
        raise SoupError(f"model.backbone: local hub directory {source} does not exist")
    return torch.hub.load(source, entry, source="github", trust_repo=True, pretrained=pretrained, **kwargs)


def _num_features(backbone: nn.Module, image_size: int) -> int:
    for attr in ("num_features", "embed_dim"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    with torch.no_grad():  # an unknown hub model: ask it
        was_training = backbone.training
        out = backbone.eval()(torch.zeros(1, 3, image_size, image_size))
        backbone.train(was_training)
    if out.dim() != 2:
        raise SoupError(f"backbone returns a tensor of shape {tuple(out.shape)}; a classifier needs (batch, "
                        "features): pick an entry point that returns pooled features")
    return out.shape[1]


def create_backbone(cfg: ModelConfig, image_size: int, pretrained: bool, weights_file: str | None = None,
                    recorded_in: str | Path | None = None):
    """The bare backbone (features out). `weights_file` is a raw (non-soup) weight file to start from.
    `recorded_in`: the checkpoint whose metadata named `cfg`, whose hub code then must be trusted."""
    kind, source, entry = parse_backbone(cfg.backbone)
    if kind == "hub" and recorded_in is not None:
        source = _trusted_hub(source, cfg.backbone, recorded_in)
    try:
        if kind == "timm":
            backbone = _create_timm(entry, pretrained, dict(cfg.kwargs), weights_file)
        else:
            backbone = _create_hub(source, entry, pretrained and not weights_file, dict(cfg.kwargs))
            if weights_file:
                _load_into(backbone, _read_weight_file(weights_file), weights_file, strict=True)
    except SoupError:
        raise
    except TypeError as err:
        raise SoupError(f"model.kwargs {cfg.kwargs}: {cfg.backbone} does not accept them ({err})") from None
    except Exception as err:
        if is_network_error(err):
            raise SoupError(_offline_hint(cfg.backbone)) from None
        if isinstance(err, (FileNotFoundError, ImportError)) and kind == "hub":
            raise SoupError(f"model.backbone {cfg.backbone}: {err}") from None
        if cfg.kwargs and isinstance(err, KWARG_ERRORS):
            raise SoupError(f"model.kwargs {cfg.kwargs}: {cfg.backbone} cannot be built with them "
                            f"({_first_line(err)})") from None
        raise
    return backbone, _num_features(backbone, image_size)


# What a model library raises for a kwarg value it cannot take (timm asserts a pooling type, checks a
# size), or for a file a kwarg names (checkpoint_path: missing, a pickle of more than tensors, other keys).
KWARG_ERRORS = (ValueError, AssertionError, KeyError, RuntimeError, OSError, pickle.UnpicklingError)


def _first_line(err: BaseException) -> str:
    # torch's own first line offers to unpickle anyway (timm re-raises it as a RuntimeError)
    if any(isinstance(e, pickle.UnpicklingError) for e in (err, err.__cause__, err.__context__)):
        return "a pickle of more than tensors, or a damaged file; nothing in it was run"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_hub_trusted(spec: str, recorded_in: str | Path) -> None:
    """Refuse, in one line naming `recorded_in`, a `hub:` backbone recorded there (not named by the user)
    whose code the user has not trusted (see `_trusted_hub`); a timm backbone passes."""
    kind, source, _ = parse_backbone(spec)
    if kind == "hub":
        _trusted_hub(source, spec, recorded_in)


def _check_weight_file(path: str | Path) -> None:
    """One line for a path that is no file to read weights from, before anything opens it (a FIFO's open
    would wait for a writer; /dev/zero's read would never end)."""
    path = Path(path)
    if not path.exists():
        raise SoupError(f"model.weights: {path} does not exist")
    if not path.is_file():
        raise SoupError(f"model.weights: {path} is not a regular file (a folder, device or pipe); name "
                        f"{WEIGHT_FORMATS}")


def _numpy_weights(path: Path) -> bool:
    """A NumPy .npy/.npz file, whatever its name: torch.load would fail on it with its own zip internals."""
    if path.suffix.lower() in (".npy", ".npz"):
        return True
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            return True
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # not a zip: torch.load says what it is
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)


def _read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    _check_weight_file(path)
    if _numpy_weights(path):
        raise SoupError(f"model.weights: {path} holds NumPy arrays (.npz/.npy), which soup does not read; give "
                        f"{WEIGHT_FORMATS} (a timm ViT's JAX .npz: timm.models.load_checkpoint(model, NPZ), "
                        "then save model.state_dict() with safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors each raise their own types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):  # torch's own first line offers to unpickle anyway
            first = "a pickle of more than tensors, or a damaged file; nothing in it was run"
        raise SoupError(f"model.weights: cannot read {path} as weights ({first}); only tensors are loaded "
                        "(torch.load weights_only=True)") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SoupError(f"model.weights: {path} does not hold a dict of tensors")
    return state


def _load_into(module: nn.Module, state: dict, source, strict: bool) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {result.missing_keys[:3]}")
    if strict and result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:3]}")
    if problems:
        raise SoupError(f"model.weights: {source} does not fit {type(module).__name__} "
                        f"({'; '.join(problems)}); check model.backbone and model.kwargs")


def build_model(cfg: ModelConfig, classes: list[str], image_size: int, pretrained: bool | None = None,
                load_weights: bool = True, recorded_in: str | Path | None = None) -> Classifier:
    """A classifier for `classes`, initialised as the recipe says.

    Everything not loaded from a file is drawn from `cfg.init_seed` (in a forked RNG), so every ingredient
    of a sweep starts from the same weights whatever its training seed. `recorded_in`: the checkpoint
    whose metadata holds `cfg` (not a recipe the user runs): its hub code must be trusted.
    """
    pretrained = cfg.pretrained if pretrained is None else pretrained
    weights = cfg.weights if load_weights else None
    soup_start: Checkpoint | None = None
    raw_weights = None
    if weights:
        _check_weight_file(weights)
        if is_soup_checkpoint(weights):
            soup_start = read_checkpoint(weights)
        else:
            raw_weights = weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        backbone, num_features = create_backbone(
            cfg, image_size, pretrained=pretrained and weights is None, weights_file=raw_weights,
            recorded_in=recorded_in)
        model = Classifier(backbone, num_features, len(classes))
    if soup_start is not None:
        state = soup_start.state_dict()
        _load_into(model.backbone, {k[len("backbone."):]: v for k, v in state.items()
                                    if k.startswith("backbone.")}, weights, strict=True)
        if soup_start.classes == list(classes):
            model.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    return model


def model_from_checkpoint(checkpoint: Checkpoint) -> Classifier:
    """Rebuild a checkpoint's architecture without downloading anything (no pretrained weights, hub code
    only where trusted), then load its weights."""
    recipe = recipe_from_dict(checkpoint.recipe)
    model = build_model(recipe.model, checkpoint.classes, recipe.data.image_size, pretrained=False,
                        load_weights=False, recorded_in=checkpoint.path)
    state = checkpoint.state_dict()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape: edited model.kwargs or image size
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise SoupError(f"{checkpoint.path}: weights do not fit the recorded recipe's {recipe.model.backbone} "
                        f"({detail[:200]}); the metadata was edited: re-create the file") from None
    if result.missing_keys or result.unexpected_keys:
        raise SoupError(f"{checkpoint.path}: weights do not fit {recipe.model.backbone} (missing "
                        f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval()


def train_mode(model: nn.Module, freeze_bn: bool = False) -> nn.Module:
    """The model in train mode; with `freeze_bn` (model.freeze_bn), every BatchNorm layer stays in eval mode
    and keeps the start's running statistics, while its weight and bias still train."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def freeze_prefix(backbone: nn.Module, fraction: float) -> tuple[int, int]:
    """Freeze the first `fraction` of the backbone's parameters (counted in elements, in parameter order,
    whole tensors only). Returns (frozen, total) parameter counts."""
    params = list(backbone.parameters())
    total = sum(p.numel() for p in params)
    budget = fraction * total
    frozen = 0
    for p in params:
        if frozen + p.numel() > budget + 0.5:
            break
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen, total


def fingerprint(model: nn.Module) -> str:
    """A short hash of every tensor of the model: equal fingerprints mean an identical starting point."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


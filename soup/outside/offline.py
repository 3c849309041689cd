"""`--start pretrained` without a network: one line at once, not a minute of retries.

huggingface_hub retries a request that cannot connect five times with growing waits, for each file name
timm tries, before it looks in its cache; offline, timm's pretrained weights take a minute to fail. So the
cache is looked at first (a copy there is used as it is, online or not), and where it holds none, one
connection to the Hub is tried with a short timeout: only when it connects does timm download, with the
retries that help on a flaky line.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

try:  # timm's own dependency, which timm fetches Hub weights with; without it timm uses URLs
    from huggingface_hub import constants, try_to_load_from_cache
except ImportError:  # pragma: no cover - timm installs it
    constants = try_to_load_from_cache = None

from soup.errors import SoupError
from soup.recipe.spec import parse_backbone

# The names timm's loader asks the Hub for, in its order (safetensors first).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin")
PROBE_SECONDS = 5.0


def _cached(hub_id: str, filename: str | None) -> bool:
    repo, _, revision = hub_id.partition("@")
    names = [filename] if filename else WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names)


def _reachable(host: str, port: int) -> str | None:
    """None when a connection to host:port opens within PROBE_SECONDS, else why not."""
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        return None
    except OSError as err:
        return str(err) or type(err).__name__


def check_pretrained(backbone: str) -> None:
    """Where timm's pretrained weights for `backbone` are neither cached nor reachable, one line now."""
    kind, _, entry = parse_backbone(backbone)
    cfg = timm.models.get_pretrained_cfg(entry) if kind == "timm" and timm.is_model(entry) else None
    if cfg is None:  # a torch.hub backbone: torch.hub does not retry
        return
    if cfg.hf_hub_id and constants is not None:
        if _cached(cfg.hf_hub_id, cfg.hf_hub_filename):
            return
        where, url = f"Hugging Face {cfg.hf_hub_id}, cache {constants.HF_HUB_CACHE}", constants.ENDPOINT
        if constants.HF_HUB_OFFLINE:
            raise SoupError(f"--start pretrained: timm's pretrained weights for {entry} are not in the local cache "
                            f"({where}) and HF_HUB_OFFLINE is set; give the start's weights file with --start FILE")
    elif cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return
        where, url = f"{cfg.url}, cache {cached.parent}", cfg.url
    else:
        return  # timm says there are none: its own error says so
    parsed = urlparse(url)
    why = _reachable(parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443))
    if why is not None:
        raise SoupError(f"--start pretrained: timm's pretrained weights for {entry} are not in the local cache "
                        f"({where}) and {parsed.hostname} cannot be reached ({why}); give the start's weights file "
                        "with --start FILE, or run once with a network")

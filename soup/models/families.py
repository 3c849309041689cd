"""Backbone families: what soup knows of a backbone's layout, described once for every stage that asks.

A family names a backbone's blocks in order (its *units*: a frozen prefix may be cut after any of them),
how the images reach the first unit (`stem`) and what follows the last one (`head`), its layer groups
for layer-wise lr decay, the names it exports under, whether it wants NHWC on CUDA and the image size,
mean and std its pretrained weights expect. soup.fast.prefix cuts the frozen prefix with it,
soup.train.schedule groups learning rates with it, soup.fast.build asks it about channels_last,
soup.ship.export about timm names and `soup train` about the data keys a recipe leaves out.

  timm      timm's VisionTransformer (DinoV2's timm port included): units are `blocks`
  dinov2    facebookresearch/dinov2's torch.hub DinoVisionTransformer: `blocks`, chunked or not
  swinv2    timm's SwinTransformerV2: each stage's patch merging, then its blocks (NHWC between them);
            a cut falls between blocks or between stages, before or after a merging
  blocks    any other backbone with one stack named `blocks`: layer decay only (no known stem to cut at)

Adding a family: one `Family` subclass here, listed in FAMILIES, plus a test (tests/models/test_families.py).
"""

from __future__ import annotations

import timm
from timm.data import resolve_data_config
from timm.models import group_parameters
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from soup.errors import SoupError
from soup.recipe.checks import parse_backbone


def flatten(stack: nn.Module) -> list[nn.Module]:
    """A stack of blocks in order; DinoV2's chunks (ModuleLists padded with Identity) flattened."""
    flat = []
    for block in stack:
        if isinstance(block, nn.ModuleList):
            flat += [b for b in block if not isinstance(b, nn.Identity)]
        else:
            flat.append(block)
    return flat


class Family:
    """The interface, with the ViT's answers as defaults (a block list named `blocks`)."""

    name = ""
    container = "blocks"  # the backbone's child holding the units
    post: tuple[str, ...] = ()  # the backbone's children that run after the units
    unused: tuple[str, ...] = ()  # parameters the forward never uses
    channels_last = False  # NHWC on CUDA: transformers convolve once (the patch embedding), not per layer

    def matches(self, backbone: nn.Module) -> bool:
        raise NotImplementedError

    def units(self, backbone: nn.Module) -> list[nn.Module]:
        """The blocks in forward order."""
        return flatten(getattr(backbone, self.container))

    def unit_names(self, backbone: nn.Module) -> list[str]:
        return [f"block{i}" for i in range(len(self.units(backbone)))]

    def stem(self, backbone: nn.Module, x):
        raise NotImplementedError

    def head(self, backbone: nn.Module, x):
        raise NotImplementedError

    def layers(self, backbone: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        """(name, parameters) of each layer between the stem and the head, in order, for layer decay:
        one per unit by default."""
        return [(name, list(unit.parameters())) for name, unit in zip(self.unit_names(backbone),
                                                                      self.units(backbone))]

    def cut_text(self, backbone: nn.Module, k: int) -> str:
        """What a prefix of k units caches, as printed."""
        return f"{k} blocks"

    def rest_text(self, backbone: nn.Module, k: int) -> str:
        """What runs after a cached prefix of k units (all of them, as for a probe)."""
        depth = len(self.units(backbone))
        return "no block: the final norm + head" if k >= depth else f"blocks {k}-{depth - 1} + head"


class TimmViT(Family):
    name = "timm"
    post = ("norm", "fc_norm", "head_drop", "head", "attn_pool")

    def matches(self, backbone):
        return isinstance(backbone, VisionTransformer) and isinstance(backbone.blocks, nn.Sequential)

    def stem(self, b, x):
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    def head(self, b, x):
        return b.forward_head(b.norm(x))


class HubDinoV2(Family):
    name = "dinov2"
    post = ("norm", "head")
    unused = ("mask_token",)  # masked pretraining's token: never used without masks
    # torch.hub entry points -> the timm architectures holding the same network (soup export).
    exports = {f"dinov2_vit{size}14{reg}": f"vit_{arch}_patch14{'_reg4' if reg else ''}_dinov2"
               for size, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
               for reg in ("", "_reg")}
    # Hub entry kwargs that configure DinoV2's own class and mean nothing to timm's.
    hub_only_kwargs = {"pretrained", "weights", "block_chunks", "interpolate_antialias", "interpolate_offset",
                       "init_values", "ffn_layer", "num_register_tokens", "patch_size"}
    # Its preprocessing as facebookresearch/dinov2's README and hub examples give it: ImageNet's mean and
    # std, 224 px (16 x 16 patches of 14 px).
    data = {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

    def matches(self, backbone):
        return all(hasattr(backbone, a) for a in ("prepare_tokens_with_masks", "blocks", "norm", "head"))

    def stem(self, b, x):
        return b.prepare_tokens_with_masks(x, None)

    def head(self, b, x):
        return b.head(b.norm(x)[:, 0])


class SwinV2(Family):
    """timm's SwinTransformerV2: patch_embed -> stages (patch merging, then blocks; NHWC) -> norm -> head."""

    name = "swinv2"
    container = "layers"
    post = ("norm", "head")

    def matches(self, backbone):
        return isinstance(backbone, SwinTransformerV2)

    def _parts(self, backbone) -> list[tuple[str, nn.Module]]:
        parts = []
        for s, stage in enumerate(backbone.layers):
            if not isinstance(stage.downsample, nn.Identity):
                parts.append((f"stage{s}.merge", stage.downsample))
            parts += [(f"stage{s}.block{j}", block) for j, block in enumerate(stage.blocks)]
        return parts

    def units(self, backbone):
        return [unit for _, unit in self._parts(backbone)]

    def unit_names(self, backbone):
        return [name for name, _ in self._parts(backbone)]

    def stem(self, b, x):
        return b.patch_embed(x)

    def head(self, b, x):
        return b.forward_head(b.norm(x))

    def layers(self, backbone):
        """timm's own grouping (`group_matcher`): each block a layer, a stage's patch merging joined to its
        first block; the stem and the final norm are left to the caller (embed and head, as for a ViT)."""
        named = dict(backbone.named_parameters())
        groups = group_parameters(backbone, backbone.group_matcher(coarse=False))
        stem_or_post = ("patch_embed.", "absolute_pos_embed", *(f"{p}." for p in self.post))
        found = []
        for names in groups.values():
            kept = [n for n in names if not n.startswith(stem_or_post)]
            if kept:
                block = next(n for n in kept if ".blocks." in n)
                stage, _, index = block.split(".")[1:4]
                found.append((f"stage{stage}.block{index}", [named[n] for n in kept]))
        return found

    def cut_text(self, backbone, k):
        return f"{k} blocks and mergings (through {self.unit_names(backbone)[k - 1]})"

    def rest_text(self, backbone, k):
        names = self.unit_names(backbone)
        if k >= len(names):
            return "no block: the final norm + head"
        return f"{names[k]} + head" if k == len(names) - 1 else f"{names[k]} to {names[-1]} + head"


class Blocks(Family):
    """Any other backbone with exactly one stack of modules named `blocks` somewhere below it (a ViT-like
    model soup has no cut for): layer decay only."""

    name = "blocks"

    @staticmethod
    def stacks(backbone: nn.Module) -> list[nn.Module]:
        return [m for name, m in backbone.named_modules()
                if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential))]

    def matches(self, backbone):
        return len(self.stacks(backbone)) == 1

    def units(self, backbone):
        return flatten(self.stacks(backbone)[0])


FAMILIES: tuple[Family, ...] = (TimmViT(), HubDinoV2(), SwinV2())
BLOCKS = Blocks()


def family_of(backbone: nn.Module) -> Family | None:
    """The family whose layout `backbone` itself has (the prefix cut needs its top level), or None."""
    return next((f for f in FAMILIES if f.matches(backbone)), None)


def find_family(backbone: nn.Module) -> tuple[Family, nn.Module] | None:
    """(family, module) of the backbone or, for a wrapper (a hub entry holding a timm model), of the first
    module below it that a family describes; else the `blocks` fallback when it applies; else None."""
    for module in backbone.modules():
        family = family_of(module)
        if family is not None:
            return family, module
    return (BLOCKS, backbone) if BLOCKS.matches(backbone) else None


def wants_channels_last(backbone: nn.Module) -> bool:
    """NHWC on CUDA: for a family, its rule; otherwise for any network that convolves (ResNet's BatchNorm
    or ConvNeXt's LayerNorm alike), since cuDNN's fast convolutions want NHWC."""
    family = next((f for m in backbone.modules() for f in FAMILIES if f.matches(m)), None)
    if family is not None:
        return family.channels_last
    return any(isinstance(m, nn.Conv2d) for m in backbone.modules())



def data_defaults(backbone: str, kwargs: dict) -> tuple[dict, str]:
    """({image_size, mean, std} the model expects, where they come from), or ({}, "") where soup knows none:
    a timm model's pretrained config (timm.data.resolve_data_config; the image size is `kwargs`' img_size
    when the recipe sets one), DinoV2's documented preprocessing for its hub entries."""
    try:
        kind, _, entry = parse_backbone(backbone)
    except SoupError:
        return {}, ""  # the recipe's own check says what is wrong with it
    if kind == "hub":
        if entry in HubDinoV2.exports:
            return dict(HubDinoV2.data), "DinoV2's documented preprocessing"
        return {}, ""
    cfg = timm.models.get_pretrained_cfg(entry) if timm.is_model(entry) else None
    if cfg is None:
        return {}, ""
    resolved = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    size = kwargs.get("img_size") if isinstance(kwargs, dict) else None
    size = size[-1] if isinstance(size, (list, tuple)) and size else size
    values = {"image_size": size if isinstance(size, int) else int(resolved["input_size"][-1]),
              "mean": [float(v) for v in resolved["mean"]], "std": [float(v) for v in resolved["std"]]}
    return values, f"timm's pretrained config of {entry}"

"""The key layouts of public self-supervised ResNet checkpoints, mapped to a torchvision ResNet backbone.

A checkpoint object is flattened to dotted keys (nested dicts such as ``state_dict``, ``model``, ``teacher``
join their keys with dots; values that are not tensors are left out). The backbone is then found at a
*prefix*: where torchvision's names begin (``<prefix>conv1.weight`` next to ``<prefix>layer1.0.conv1.weight``),
or where an ``nn.Sequential`` of a torchvision ResNet's children begins (``<prefix>0.weight`` = conv1 next to
``<prefix>4.0.conv1.weight`` = layer1.0.conv1; the children in torchvision's order, see :func:`resnet_children`).
Only the backbone's own children (conv1, bn1, layer1-4) are kept, so ``fc`` (the classifier, or MoCo v2/v3's
and SimSiam's projector) and other heads are dropped. Recognised (``LAYOUTS``, prefixes as the files hold them):

- torchvision, DINO's ResNet-50, VISSL's torchvision export, ``sepp export``: plain keys;
- MoCo v1/v2 (facebookresearch/moco): ``state_dict.module.encoder_q.`` (the key encoder ``encoder_k`` is not used);
- MoCo v3 ResNet (facebookresearch/moco-v3): ``state_dict.module.base_encoder.`` (not ``momentum_encoder``);
- SimSiam (facebookresearch/simsiam): ``state_dict.module.encoder.`` (``predictor`` dropped);
- VISSL's own checkpoints: ``classy_state_dict.base_model.model.trunk._feature_blocks.``;
- DINO training checkpoints: ``teacher.module.backbone.`` (the teacher, as DINO evaluates it, not ``student``);
- solo-learn: ``state_dict.backbone.``; lightly: ``backbone.`` of ``nn.Sequential(*list(resnet.children())[:-1])``;
- BYOL: lucidrains/byol-pytorch ``online_encoder.net.``, sthalles/PyTorch-BYOL
  ``online_network_state_dict.encoder.`` (a Sequential of children), and any other single backbone
  (e.g. ``net.``); target / momentum copies are passed over.

When several places hold a ResNet, momentum / target / key-encoder copies and a DINO student are passed over;
if that leaves more than one, or none is found, ``key_prefix`` (``--key-prefix``, ``model.key_prefix``) names
it. A file with no backbone gives one line that lists the key prefixes it holds.
"""
from __future__ import annotations

import fnmatch
from functools import lru_cache

import torch

from sepp.errors import SeppError

# (end of the prefix, kind, name): readable names of the layouts, the first that fits is used
LAYOUTS = (
    ("online_network_state_dict.encoder.", "sequential", "BYOL (sthalles/PyTorch-BYOL)"),
    ("backbone.", "sequential", "lightly"),
    ("encoder_q.", "named", "MoCo v1/v2"),
    ("base_encoder.", "named", "MoCo v3"),
    ("online_encoder.net.", "named", "BYOL (lucidrains/byol-pytorch)"),
    ("teacher.module.backbone.", "named", "DINO (teacher)"),
    ("encoder.", "named", "SimSiam"),
    ("_feature_blocks.", "named", "VISSL trunk"),
    ("backbone.", "named", "solo-learn"),
    ("", "named", "torchvision"),
    ("", "sequential", "Sequential of torchvision ResNet children"),
)
# parts of a prefix that mark a copy passed over when another backbone remains (momentum / EMA / target
# encoders, MoCo's key encoder, DINO's student)
SECONDARY = ("encoder_k", "student", "ema", "model_ema", "ema_model", "momentum*", "target*", "key_*")
_BACKBONE_CHILDREN = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


@lru_cache(maxsize=1)
def resnet_children() -> tuple[str, ...]:
    """Names of a torchvision ResNet's children in order (the indices of a Sequential built from them)."""
    from torchvision.models import resnet18

    return tuple(name for name, _ in resnet18().named_children())


def flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of nested dicts under its dotted key (``{"a": {"b": t}}`` -> ``{"a.b": t}``)."""
    out = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}{key}"] = value
            elif isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
    return out


def _kind(keys, prefix: str) -> str | None:
    """``named`` / ``sequential`` when a ResNet's keys begin at ``prefix``, else None."""
    if f"{prefix}conv1.weight" in keys and f"{prefix}layer1.0.conv1.weight" in keys:
        return "named"
    if f"{prefix}0.weight" in keys and f"{prefix}4.0.conv1.weight" in keys:
        return "sequential"
    return None


def candidates(keys) -> list[str]:
    """Every prefix at which a ResNet backbone begins, in key order."""
    found = []
    for key in keys:
        for stem in ("conv1.weight", "0.weight"):
            prefix = key[: -len(stem)]
            if key.endswith(stem) and (prefix == "" or prefix.endswith(".")) and prefix not in found \
                    and _kind(keys, prefix):
                found.append(prefix)
    return found


def key_prefixes(keys, limit: int = 8) -> str:
    """The places keys begin at, for an error line: up to the first ResNet child name, else two parts."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        cut = next((n for n, p in enumerate(parts) if p in _BACKBONE_CHILDREN), min(2, len(parts) - 1))
        head = ".".join(parts[:cut]) + "." if cut else "(plain)"
        counts[head] = counts.get(head, 0) + 1
    shown = [f"{p} ({n} keys)" for p, n in list(counts.items())[:limit]]
    return ", ".join(shown) + (", ..." if len(counts) > limit else "") if shown else "no tensors at all"


def _secondary(prefix: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for part in prefix.split(".") for pattern in SECONDARY)


def choose_prefix(keys) -> str:
    """The one backbone prefix of ``keys`` (see the module docstring), or one line saying why there is none."""
    found = candidates(keys)
    primary = [p for p in found if not _secondary(p)]
    if len(primary) == 1 or (not primary and len(found) == 1):
        return (primary or found)[0]
    if not found:
        raise SeppError(f"no ResNet backbone found in the encoder file; key prefixes found: {key_prefixes(keys)}; "
                        "pass --key-prefix (model.key_prefix) where its conv1.weight begins")
    raise SeppError(f"the encoder file holds ResNet backbones at {', '.join(repr(p) for p in found)}; "
                    "pass --key-prefix (model.key_prefix) with the one to use")


def layout_name(prefix: str, kind: str) -> str:
    """A readable name of the layout found at ``prefix`` (``kind``: named | sequential)."""
    name = next(n for tail, k, n in LAYOUTS if k == kind and prefix.endswith(tail))
    return f"{name} at {prefix!r}" if prefix else name


def backbone_state(obj, key_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict with torchvision names, layout name)`` of the ResNet backbone in a checkpoint object;
    ``key_prefix`` names where it begins (dotted, wrappers included, e.g. ``state_dict.module.encoder_q.``)."""
    keys = flatten(obj)
    if key_prefix is None:
        prefix = choose_prefix(keys)
    else:
        prefix = key_prefix if key_prefix == "" or key_prefix.endswith(".") else key_prefix + "."
        if _kind(keys, prefix) is None:
            raise SeppError(f"no ResNet backbone at key prefix {prefix!r} (no {prefix}conv1.weight with "
                            f"{prefix}layer1.0.conv1.weight); key prefixes found: {key_prefixes(keys)}")
    kind = _kind(keys, prefix)
    names = resnet_children()
    state = {}
    for key, value in keys.items():
        if not key.startswith(prefix):
            continue
        first, _, rest = key[len(prefix):].partition(".")
        if kind == "sequential":
            first = names[int(first)] if first.isdigit() and int(first) < len(names) else ""
        if first in _BACKBONE_CHILDREN and rest:
            state[f"{first}.{rest}"] = value
    return state, layout_name(prefix, kind)

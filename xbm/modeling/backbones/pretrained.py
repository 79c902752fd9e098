"""Pretrained weights for the backbones: a state-dict file, or the standard ImageNet weights.

MODEL.BACKBONE.PRETRAINED:
  ""          random initialisation;
  "imagenet"  resnet18/resnet50: torchvision's IMAGENET1K_V1 weights (the papers' era);
              bninception: the ImageNet port bn_inception-52deb4733.pth. The file is looked
              for in torch.hub's cache (`torch.hub.get_dir()/checkpoints/<file>`) and, only
              when missing, downloaded there with torch.hub.load_state_dict_from_url. Offline,
              the error names the file, the cache path to put it at, and its URL;
  a path      a state dict saved with torch.save (read with weights_only=True).

Loading is strict: the classifier of an ImageNet network (`fc.*`, `last_linear.*`) is
dropped with a logged warning naming its keys; any other unexpected, missing or
mis-shaped key is an error listing them. Two quirks of old files are accepted: no
BatchNorm `num_batches_tracked` entries (they predate PyTorch 0.4.1), and BatchNorm
vectors stored as (1, C) instead of (C,) (the BN-Inception port does this).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

BNINCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
CLASSIFIER_PREFIXES = ("fc.", "last_linear.")


class PretrainedWeightsError(RuntimeError):
    """The ImageNet weights are neither in the torch hub cache nor downloadable."""


def imagenet_url(arch: str) -> str:
    """Where the ImageNet weights of a backbone are published."""
    if arch == "bninception":
        return BNINCEPTION_URL
    if arch in ("resnet18", "resnet50"):
        from torchvision import models

        enum = {"resnet18": models.ResNet18_Weights, "resnet50": models.ResNet50_Weights}[arch]
        return enum.IMAGENET1K_V1.url
    raise ValueError(
        f"MODEL.BACKBONE.PRETRAINED 'imagenet' is not available for {arch!r} (no ImageNet weights); "
        "use '' (random init) or a path to a state dict"
    )


def hub_cache_path(url: str) -> Path:
    """The file torch.hub keeps a download of `url` in."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of `arch`, from the hub cache or, if absent, downloaded into it."""
    url = imagenet_url(arch)
    cached = hub_cache_path(url)
    if cached.is_file():
        return read_state_dict_file(cached)
    logger.warning("downloading the ImageNet weights of %s from %s into %s", arch, url, cached)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(cached.parent), map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as err:  # URLError, HTTPError, OSError, a hash mismatch: all mean "not available"
        raise PretrainedWeightsError(
            f"the ImageNet weights of {arch} ({cached.name}) are not in the torch hub cache ({cached}) and "
            f"downloading them from {url} failed: {err}. Download the file by hand and put it at {cached}, "
            "or set MODEL.BACKBONE.PRETRAINED to its path"
        ) from err
    return _as_state_dict(state, url)


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.BACKBONE.PRETRAINED: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, a truncated zip, objects refused by weights_only
        raise ValueError(f"MODEL.BACKBONE.PRETRAINED: cannot read {path} as a state dict: {err}") from err
    return _as_state_dict(state, str(path))


def _as_state_dict(state, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(
            f"{source}: expected a state dict of tensors; entries {not_tensors[:5]} are not tensors "
            "(a training checkpoint? save model.state_dict() of the backbone instead)"
        )
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` strictly (classifier keys dropped and reported)."""
    expected = model.state_dict()
    classifier = sorted(k for k in state if k.startswith(CLASSIFIER_PREFIXES) and k not in expected)
    if classifier:
        logger.warning("%s: dropping classifier weights the backbone does not use: %s", source, ", ".join(classifier))
    given = {k: v for k, v in state.items() if k not in classifier}
    unexpected = sorted(set(given) - set(expected))
    missing = sorted(k for k in set(expected) - set(given) if not k.endswith("num_batches_tracked"))
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    mismatched = []
    for key in sorted(set(given) & set(expected)):
        target_shape = expected[key].shape
        value = given[key]
        if value.shape != target_shape and value.dim() == len(target_shape) + 1 and value.shape[0] == 1 \
                and value.shape[1:] == target_shape:
            given[key] = value.squeeze(0)  # the BN-Inception port stores BN vectors as (1, C)
        elif value.shape != target_shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target_shape)}")
    if mismatched:
        problems.append(f"shape mismatches (file vs model): {_listing(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not fit the {type(model).__name__} backbone: " + "; ".join(problems))
    model.load_state_dict(given, strict=False)  # strict=False only for the num_batches_tracked checked above


def load_pretrained(model: nn.Module, arch: str, pretrained: str) -> None:
    """Apply MODEL.BACKBONE.PRETRAINED ("" | "imagenet" | path) to a freshly built backbone."""
    if not pretrained:
        return
    if pretrained.lower() == "imagenet":
        state, source = fetch_imagenet_state_dict(arch), f"ImageNet weights of {arch}"
    else:
        state, source = read_state_dict_file(pretrained), str(pretrained)
    load_backbone_weights(model, state, source)

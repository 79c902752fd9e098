"""Pretrained weights for the backbones: a state-dict file, or the standard ImageNet weights.

MODEL.BACKBONE.PRETRAINED:
  ""          random initialisation;
  "imagenet"  resnet18/resnet50: torchvision's IMAGENET1K_V1 weights (the papers' era);
              bninception: the ImageNet port bn_inception-52deb4733.pth. The file is looked
              for in torch.hub's cache (`torch.hub.get_dir()/checkpoints/<file>`) and, only
              when missing, downloaded there with torch.hub.load_state_dict_from_url. Offline,
              the error names the file, the cache path to put it at, and its URL;
  "hub"       timm backbones: the model's own pretrained weights (timm's pretrained config names their
              Hugging Face repository), read from the local Hugging Face cache only; downloaded there
              only with MODEL.BACKBONE.TIMM.HUB_DOWNLOAD True;
  a path      a state dict: .safetensors (safetensors' loader), or .pth / .pt / .bin saved with
              torch.save (read with weights_only=True); the dict may sit under a "state_dict" or
              "model" entry, and a "module." prefix (DataParallel / DDP) is removed.

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
    """A state dict file (.safetensors, or torch.save's format), read without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.BACKBONE.PRETRAINED: weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError(f"MODEL.BACKBONE.PRETRAINED: reading {path} needs the safetensors package "
                         "(pip install safetensors; the timm extra installs it)") from None
    except Exception as err:  # pickle errors, a truncated zip or header, objects refused by weights_only
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"MODEL.BACKBONE.PRETRAINED: cannot read {path} as a state dict: {reason}") from None
    return _as_state_dict(state, str(path))


# Entries a training script wraps its weights in (timm's and DINO's checkpoints: "state_dict", "model").
WRAPPERS = ("state_dict", "model")


def _as_state_dict(state, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"{source}: expected a state dict (name -> tensor), got {type(state).__name__}")
    wrapper = next((w for w in WRAPPERS if isinstance(state.get(w), Mapping)), None)
    if wrapper is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
        logger.info("%s: reading the state dict under its %r entry", source, wrapper)
        state = state[wrapper]
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


def timm_hub_weights(pretrained_cfg: Mapping, backbone: str, download: bool) -> Path:
    """The local file of a timm model's pretrained weights (MODEL.BACKBONE.PRETRAINED hub).

    timm publishes its weights on the Hugging Face hub (`hf_hub_id`: model.safetensors, or
    pytorch_model.bin for older uploads); a few configs give only a URL, kept in torch.hub's cache.
    Nothing is downloaded unless `download` (MODEL.BACKBONE.TIMM.HUB_DOWNLOAD) is True."""
    repo, url = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("url")
    if repo:
        return _hf_cached_weights(repo, backbone, download)
    if url:
        cached = hub_cache_path(url)
        if cached.is_file():
            return cached
        if download:
            torch.hub.download_url_to_file(url, str(cached))
            return cached
        raise PretrainedWeightsError(
            f"MODEL.BACKBONE.PRETRAINED hub: the weights of {backbone} are not in the torch hub cache ({cached}); "
            f"put the file from {url} there, give its path, or set MODEL.BACKBONE.TIMM.HUB_DOWNLOAD True")
    raise PretrainedWeightsError(f"MODEL.BACKBONE.PRETRAINED hub: timm publishes no weights for {backbone}; "
                                 "use '' (random init) or a path to a weights file")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hf_cached_weights(repo: str, backbone: str, download: bool) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):  # else None (not cached) or a marker that the repo has no such file
            return Path(found)
    if download:
        logger.warning("downloading the weights of %s from the Hugging Face repository %s", backbone, repo)
        errors = []
        for filename in HF_WEIGHT_FILES:
            try:
                return Path(hf_hub_download(repo, filename))
            except Exception as err:  # not found, offline, refused: try the next name, then report
                errors.append(f"{filename}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        raise PretrainedWeightsError(f"MODEL.BACKBONE.PRETRAINED hub: downloading the weights of {backbone} from "
                                     f"the Hugging Face repository {repo} failed ({'; '.join(errors)})")
    raise PretrainedWeightsError(
        f"MODEL.BACKBONE.PRETRAINED hub: the weights of {backbone} (Hugging Face repository {repo}, "
        f"{' or '.join(HF_WEIGHT_FILES)}) are not in the local cache {constants.HF_HUB_CACHE}; download them "
        "there (huggingface-cli download " + repo + "), give the path of a weights file, or set "
        "MODEL.BACKBONE.TIMM.HUB_DOWNLOAD True to let xbm download them")


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
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
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
        problems.append(f"{len(mismatched)} shape mismatches (file vs model): {_listing(mismatched)}")
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

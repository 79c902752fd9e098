"""Any model of the timm library as a backbone: MODEL.BACKBONE.NAME timm:<timm model name>.

    timm:vit_small_patch16_224.dino          ViT-S/16, DINO self-supervised weights (384-d CLS token)
    timm:vit_small_patch14_dinov2.lvd142m    ViT-S/14, DINOv2 weights
    timm:convnext_tiny, timm:resnet50.a1_in1k, ...

The model is `timm.create_model(name, num_classes=0, ...)`: its forward gives the pooled feature as the
model defines it (the class token after the final norm for a ViT, the average for a ConvNeXt), or the
pool MODEL.BACKBONE.POOLING names. Weights never download by themselves (xbm/modeling/backbones/pretrained.py:
a file, or PRETRAINED hub = the local Hugging Face cache). The pixels the weights expect (mean, std, input
size, interpolation, crop) come from timm's own data-config resolution of the model's pretrained config.

timm is an optional extra (`pip install -e '.[timm]'`): without it a config naming a timm backbone stops
before any data is read (xbm.config.checks.check_backbone), with one sentence naming the extra.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from ...input_convention import DEFAULT_CROP_PCT, DataConfig, InputConvention
from .build import BACKBONE_REGISTRY, TIMM_PREFIX
from .convnet import Backbone, refuse_resnet_keys
from .pretrained import load_backbone_weights, read_state_dict_file, timm_hub_weights

logger = logging.getLogger(__name__)

EXTRA = "pip install -e '.[timm]'"
MIN_VERSION = (1, 0)


def import_timm(backbone: str):
    """The timm module, or one sentence naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        # A ValueError like every other bad config value: the command lines report it in one sentence.
        raise ValueError(
            f"MODEL.BACKBONE.NAME {backbone} needs the timm library (timm >= 1.0), which is not installed: {EXTRA}"
        ) from None
    version = tuple(int(part) for part in timm.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_VERSION:
        raise ValueError(
            f"MODEL.BACKBONE.NAME {backbone} needs timm >= 1.0, found {timm.__version__}: {EXTRA}")
    return timm


def timm_model_name(backbone: str) -> str:
    """`vit_small_patch16_224.dino` of `timm:vit_small_patch16_224.dino`, checked against timm's registry."""
    name = backbone.strip()[len(TIMM_PREFIX):].strip()
    if not name:
        raise ValueError(f"MODEL.BACKBONE.NAME {backbone!r} names no model: write timm:<timm model name>, "
                         "e.g. timm:vit_small_patch16_224.dino")
    timm = import_timm(backbone)
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise ValueError(f"MODEL.BACKBONE.NAME {backbone!r}: timm {timm.__version__} has no model {architecture!r}; "
                         f"closest names: {', '.join(closest_names(timm, name)) or 'none'}")
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # timm: "Invalid pretrained tag (x) for y."
            tags = [n for n in timm.list_pretrained(architecture + ".*")]
            raise ValueError(f"MODEL.BACKBONE.NAME {backbone!r}: timm knows no weights {tag!r} for {architecture}; "
                             f"its tagged names: {', '.join(tags) or 'none'}") from None
    return name


def closest_names(timm, name: str, count: int = 5) -> list[str]:
    """The timm names (architectures and tagged weights) nearest to `name` by spelling."""
    candidates = sorted(set(timm.list_models()) | set(timm.list_pretrained()))
    return difflib.get_close_matches(name, candidates, n=count, cutoff=0.6)


def timm_data_config(backbone: str, kwargs: Mapping | None = None) -> DataConfig:
    """timm's own resolution (timm.data.resolve_data_config) of the model's pretrained config."""
    timm = import_timm(backbone)
    name = timm_model_name(backbone)
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    data = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    size = int(data["input_size"][-1])
    if kwargs and "img_size" in kwargs:  # an architecture built for another size (MODEL.BACKBONE.TIMM.KWARGS)
        img_size = kwargs["img_size"]
        size = int(img_size if isinstance(img_size, int) else img_size[-1])
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    if len(mean) == 1:  # a few grayscale configs give one value for all channels
        mean, std = mean * 3, std * 3
    return DataConfig(InputConvention("RGB", 1.0, mean, std), size, float(data.get("crop_pct") or DEFAULT_CROP_PCT),
                      str(data.get("interpolation") or "bicubic"))


@BACKBONE_REGISTRY.register(TIMM_PREFIX)
class TimmBackbone(Backbone):
    """A timm model without classifier; `out_features` = the width of what its forward returns."""

    def __init__(self, backbone: str, pooling: str = "", image_size: int | None = None, kwargs: Mapping | None = None,
                 fused_attn: bool = True, grad_checkpointing: bool = False, freeze_patch_embed: bool = False):
        super().__init__(pooling=None)
        timm = import_timm(backbone)
        self.backbone_name = backbone
        self.model_name = timm_model_name(backbone)
        self.model = self._create(timm, pooling, image_size, dict(kwargs or {}))
        self.out_features = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):  # timm's attention layers carry this switch
                module.fused_attn = bool(fused_attn)
        if grad_checkpointing:
            try:
                self.model.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError, AttributeError) as err:
                raise ValueError(f"MODEL.BACKBONE.TIMM.GRAD_CHECKPOINTING: timm model {self.model_name} does not "
                                 f"support activation checkpointing ({err or type(err).__name__})") from None
        if freeze_patch_embed:
            patch_embed = getattr(self.model, "patch_embed", None)
            if not isinstance(patch_embed, nn.Module):
                raise ValueError(f"MODEL.BACKBONE.TIMM.FREEZE_PATCH_EMBED: timm model {self.model_name} has no "
                                 "patch embedding (patch_embed); keep it False")
            patch_embed.requires_grad_(False)

    def _create(self, timm, pooling: str, image_size: int | None, kwargs: dict) -> nn.Module:
        if pooling:
            kwargs["global_pool"] = pooling
        default_size = timm_data_config(self.backbone_name, kwargs).input_size
        if image_size and image_size != default_size:
            kwargs["img_size"] = image_size  # a ViT's position embedding is built for (and resampled to) this size
        try:
            return timm.create_model(self.model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err) or "img_size" not in kwargs:
                raise ValueError(f"MODEL.BACKBONE.TIMM.KWARGS: timm model {self.model_name} refuses them: {err}") \
                    from None
        except AssertionError as err:  # timm asserts on a global pool it does not know
            raise ValueError(f"MODEL.BACKBONE.POOLING {pooling!r} does not fit timm model {self.model_name}: {err}") \
                from None
        # A convolutional model takes any input size and has no img_size argument.
        del kwargs["img_size"]
        return self._create(timm, pooling, None, kwargs)

    @classmethod
    def from_config(cls, cfg) -> "TimmBackbone":
        """MODEL.BACKBONE.NAME, POOLING and TIMM.*; the input side of INPUT.IMAGE_SIZE (0: the model's own,
        which is what xbm.data.image_steps.input_geometry resolves it to as well)."""
        spec = cfg.MODEL.BACKBONE
        refuse_resnet_keys(spec)
        size = int(cfg.INPUT.IMAGE_SIZE)
        if size < 0:
            raise ValueError(f"INPUT.IMAGE_SIZE must be >= 0 (0: the backbone's), got {size}")
        t = spec.TIMM
        return cls(spec.NAME, pooling=spec.POOLING, image_size=size or None, kwargs=dict(t.KWARGS),
                   fused_attn=t.FUSED_ATTN, grad_checkpointing=t.GRAD_CHECKPOINTING,
                   freeze_patch_embed=t.FREEZE_PATCH_EMBED)

    @classmethod
    def data_config(cls, backbone: str, kwargs: Mapping | None = None) -> DataConfig:
        return timm_data_config(backbone, kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.model_name} expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.model(x)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this backbone) that timm excludes from weight decay."""
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in names}

    def load_weights(self, spec) -> None:
        """MODEL.BACKBONE.PRETRAINED "" | hub | a weights file, into the timm model (strict; the classifier
        dropped, a ViT's position embedding resampled to this input size, both logged)."""
        pretrained, hub_download = spec.PRETRAINED, spec.TIMM.HUB_DOWNLOAD
        if not pretrained:
            return
        if pretrained.lower() == "imagenet":
            raise ValueError(f"MODEL.BACKBONE.PRETRAINED imagenet is for xbm's ResNets and BN-Inception; for "
                             f"{self.backbone_name} use hub (timm's own weights, from the local Hugging Face cache) "
                             "or a path to a weights file")
        if pretrained.lower() == "hub":
            path = timm_hub_weights(self.model.pretrained_cfg, self.backbone_name, hub_download)
        else:
            path = pretrained
        state = read_state_dict_file(path)
        state = self._drop_classifier(state, str(path))
        state = self._resample_position_embedding(state, str(path))
        load_backbone_weights(self.model, state, str(path))

    def _drop_classifier(self, state: dict, source: str) -> dict:
        classifier = self.model.pretrained_cfg.get("classifier") or ()
        prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
        expected = self.model.state_dict()
        dropped = sorted(k for k in state if prefixes and k.startswith(prefixes) and k not in expected)
        if dropped:
            logger.warning("%s: dropping classifier weights the backbone does not use: %s", source, ", ".join(dropped))
        return {k: v for k, v in state.items() if k not in dropped}

    def _resample_position_embedding(self, state: dict, source: str) -> dict:
        """A ViT's absolute position embedding trained at another input size, interpolated to this one."""
        target = self.model.state_dict().get("pos_embed")
        given = state.get("pos_embed")
        if target is None or given is None or given.shape == target.shape or given.dim() != 3:
            return state
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(self.model, "no_embed_class", False) else int(getattr(self.model, "num_prefix_tokens", 1))
        grid = tuple(self.model.patch_embed.grid_size)
        state = dict(state)
        state["pos_embed"] = resample_abs_pos_embed(given, new_size=list(grid), num_prefix_tokens=prefix)
        logger.info("%s: position embedding %s resampled to %s for a %s-patch grid (bicubic, timm)", source,
                    tuple(given.shape), tuple(state["pos_embed"].shape), "x".join(map(str, grid)))
        return state


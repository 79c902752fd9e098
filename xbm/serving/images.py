"""Images in, pixels out: finding image files, decoding them, and the test-time transform as data.

`describe_transform` turns the checkpoint's test transform (xbm.data.transforms.build_transforms)
into a list of plain steps that `preprocess` replays with PIL and numpy alone, so an exported
model gets exactly the input the PyTorch model got, without torchvision or the training code.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

# PIL decodes these; anything else in a folder is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# The resize filters `preprocess` replays, by the name a described step records.
_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _interpolation_names() -> dict:
    from torchvision import transforms as T

    return {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}


class ImageInputError(ValueError):
    """An image file or folder that cannot be used (the message names it)."""


def find_images(folder: str) -> list[str]:
    """The image files under `folder` (recursively, hidden entries skipped), sorted, as absolute paths."""
    if not os.path.isdir(folder):
        raise ImageInputError(f"image folder {folder} does not exist")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.abspath(os.path.join(root, f)) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise ImageInputError(
            f"folder {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively)")
    return sorted(found)


def image_paths(path: str) -> list[str]:
    """One image file, or the images of a folder."""
    if os.path.isdir(path):
        return find_images(path)
    if not os.path.isfile(path):
        raise ImageInputError(f"image {path} does not exist")
    return [os.path.abspath(path)]


def load_image(path: str) -> Image.Image:
    """The image decoded in full as RGB, or ImageInputError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"cannot decode image {path}: {err}") from None


def describe_transform(transform) -> list[dict]:
    """The steps of a test transform built by build_transforms, as JSON-ready dicts.

    Known steps: ToRGB, Resize (an int: shorter side; a pair: exact size; bilinear, or bicubic recorded
    as "interpolation": "bicubic"), CenterCrop and the final BackboneInput (channel order, value range, mean/std).
    Anything else (random augmentation) has no fixed replay and is refused.
    """
    from torchvision import transforms as T

    from ..data.transforms import BackboneInput, ToRGB

    steps: list[dict] = []
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, ToRGB):
            steps.append({"op": "to_rgb"})
        elif isinstance(step, T.Resize):
            interpolation = _interpolation_names().get(step.interpolation)
            if interpolation is None or step.max_size is not None:
                raise ValueError(f"cannot describe {step!r}: only bilinear or bicubic resizing without max_size "
                                 "is replayed")
            size = step.size
            if isinstance(size, int) or len(size) == 1:
                described = {"op": "resize_shorter", "size": int(size if isinstance(size, int) else size[0])}
            else:
                described = {"op": "resize", "height": int(size[0]), "width": int(size[1])}
            # Bilinear is the default of a step without the field, the only resize sidecars and index
            # manifests held before the field existed: its steps stay as they were, so that an index built
            # then still matches its model's steps (gallery.check_same_model compares them as data).
            if interpolation != "bilinear":
                described["interpolation"] = interpolation
            steps.append(described)
        elif isinstance(step, T.CenterCrop):
            steps.append({"op": "center_crop", "height": int(step.size[0]), "width": int(step.size[1])})
        elif isinstance(step, BackboneInput):
            c = step.convention
            steps.append({"op": "normalize", "channel_order": c.channel_order, "max_value": float(c.max_value),
                          "mean": [float(v) for v in c.mean], "std": [float(v) for v in c.std]})
        else:
            raise ValueError(f"cannot describe the test transform step {step!r} as data")
    if not steps or steps[-1]["op"] != "normalize":
        raise ValueError("the test transform does not end in BackboneInput (the tensor conversion)")
    return steps


def input_summary(steps: list[dict], image_size: int) -> dict:
    """What a caller of the exported model must feed it: size, layout, channel order, range, mean/std."""
    norm = steps[-1]
    return {
        "shape": ["batch", 3, image_size, image_size],
        "layout": "NCHW",
        "dtype": "float32",
        "height": image_size,
        "width": image_size,
        "channel_order": norm["channel_order"],
        "value_range": [0.0, norm["max_value"]],
        "mean": norm["mean"],
        "std": norm["std"],
        "formula": "(pixel / 255 * value_range[1] - mean) / std, per channel in channel_order",
        "steps": steps,
    }


def _resample(step: dict) -> int:
    """The PIL filter of a resize step: torchvision's Resize of a PIL image calls PIL's resize with it. Steps
    written before the field existed (only bilinear was described then) have no "interpolation"."""
    name = step.get("interpolation", "bilinear")
    if name not in _PIL_FILTERS:
        raise ValueError(f"unknown interpolation {name!r} in a resize step (known: {', '.join(_PIL_FILTERS)})")
    return _PIL_FILTERS[name]


def _resize_shorter(image: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
    # torchvision's rule for Resize(int): the shorter side becomes `size`, the longer one
    # int(size * long / short), truncated.
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    img_w, img_h = image.size
    if width > img_w or height > img_h:
        raise ImageInputError(f"image of size {img_w}x{img_h} is smaller than the {width}x{height} centre crop")
    top, left = int(round((img_h - height) / 2.0)), int(round((img_w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def preprocess(image: Image.Image, steps: list[dict]) -> np.ndarray:
    """Replay the described steps on a PIL image: a (3, H, W) float32 array."""
    for step in steps:
        op = step["op"]
        if op == "to_rgb":
            image = image.convert("RGB")
        elif op == "resize_shorter":
            image = _resize_shorter(image, int(step["size"]), _resample(step))
        elif op == "resize":
            size = (int(step["width"]), int(step["height"]))
            if image.size != size:
                image = image.resize(size, _resample(step))
        elif op == "center_crop":
            image = _center_crop(image, int(step["height"]), int(step["width"]))
        elif op == "normalize":
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            if step["max_value"] != 255.0:
                pixels = pixels * np.float32(step["max_value"] / 255.0)
            if step["channel_order"] == "BGR":
                pixels = pixels[::-1]
            mean = np.asarray(step["mean"], dtype=np.float32)[:, None, None]
            std = np.asarray(step["std"], dtype=np.float32)[:, None, None]
            return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)
        else:
            raise ValueError(f"unknown preprocessing step {op!r}")
    raise ValueError("the preprocessing steps do not end in 'normalize'")

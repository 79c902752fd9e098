"""The training loader: augmented batch i is a pure function of (seed, i), whatever the worker
count, the global RNG's history or where the stream starts (what exact resume needs)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from xbm.config import get_cfg
from xbm.data.datasets.list_dataset import ListDataset
from xbm.data.loader import SeededItems, build_train_loader, sample_seeds
from xbm.data.sampler import MPerClassBatchSampler
from xbm.data.transforms import build_transforms

NUM_CLASSES, PER_CLASS = 6, 3


@pytest.fixture(scope="module")
def augmented_set(tmp_path_factory):
    """Noise images under the natural-image train transform (resize, random crop, random flip)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    lines = []
    for index in range(NUM_CLASSES * PER_CLASS):
        pixels = rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{index}.png")
        lines.append(f"{index}.png,{index // PER_CLASS}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = get_cfg()
    cfg.DATA.NAME, cfg.MODEL.BACKBONE.NAME = "list", "resnet50"
    cfg.INPUT.RESIZE, cfg.INPUT.IMAGE_SIZE = 20, 16
    return ListDataset(root, "train", transform=build_transforms(cfg, train=True))


def _batches(dataset, start, count, workers, seed=3):
    sampler = MPerClassBatchSampler(dataset.labels, 4, 2, seed=seed, start_batch=start)
    loader = iter(build_train_loader(dataset, sampler, num_workers=workers))
    return [next(loader) for _ in range(count)]


def test_seeded_item_depends_on_its_seed_only_and_leaves_the_global_rngs_alone(augmented_set):
    items = SeededItems(augmented_set)
    first = items[(4, 123)][0]
    torch.rand(7), random.random()  # move both global RNGs
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    assert torch.equal(items[(4, 123)][0], first)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    # a batch fetched at once (the DataLoader's path) holds what single fetches give
    batch = items.__getitems__([(4, 123), (9, 7), (4, 8)])
    assert all(torch.equal(b[0], items[item][0]) for b, item in zip(batch, [(4, 123), (9, 7), (4, 8)]))
    # the transform is random: other seeds give other crops of the same image
    others = [items[(4, seed)][0] for seed in range(1, 6)]
    assert sum(not torch.equal(other, first) for other in others) >= 4


def test_sample_seeds_differ_within_and_across_batches():
    seeds = [s for number in range(50) for s in sample_seeds(0, number, 8)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** 64 for s in seeds)
    assert sample_seeds(0, 7, 8) == sample_seeds(0, 7, 8) != sample_seeds(1, 7, 8)


def test_batch_is_the_same_from_any_start_and_any_worker_count(augmented_set):
    from_zero = _batches(augmented_set, start=0, count=5, workers=0)
    torch.manual_seed(99)  # a resumed run's global RNG is not the uninterrupted run's
    resumed = _batches(augmented_set, start=3, count=2, workers=2)
    for (images, labels, ids), (ref_images, ref_labels, ref_ids) in zip(resumed, from_zero[3:]):
        assert torch.equal(labels, ref_labels) and torch.equal(ids, ref_ids)
        assert torch.equal(images, ref_images)


def test_loader_yields_each_items_dataset_index(augmented_set):
    """The third element is the items' indices in the dataset: the sampler's batch, and each image is
    that item's image under its sample seed."""
    sampler = MPerClassBatchSampler(augmented_set.labels, 4, 2, seed=3)
    expected = [batch for _, batch in zip(range(3), sampler)]
    items = SeededItems(augmented_set)
    for number, (images, labels, ids) in enumerate(_batches(augmented_set, start=0, count=3, workers=0)):
        assert ids.dtype == torch.int64 and ids.tolist() == expected[number]
        assert labels.tolist() == [int(augmented_set.labels[i]) for i in expected[number]]
        seeds = sample_seeds(3, number, len(ids))
        assert torch.equal(images[1], items[(int(ids[1]), seeds[1])][0])


def test_training_does_not_consume_the_global_rng(augmented_set):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _batches(augmented_set, start=0, count=3, workers=0)
    assert torch.equal(torch.rand(3), expected)

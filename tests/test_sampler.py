import collections

import numpy as np
import pytest

from xbm.data.sampler import MPerClassBatchSampler


def _labels(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_hold_m_images_of_distinct_classes():
    labels = _labels([5, 6, 7, 8, 9, 10, 11, 12, 4, 6])
    sampler = MPerClassBatchSampler(labels, batch_size=12, num_instances=4, seed=3)
    for batch in _take(sampler, 20):
        assert len(batch) == 12
        counts = collections.Counter(labels[i] for i in batch)
        assert sorted(counts.values()) == [4, 4, 4]
        # with enough images, no image twice in a class's draw
        assert len(set(batch)) == 12


def test_classes_drawn_without_replacement_within_an_epoch():
    labels = _labels([4] * 10)
    sampler = MPerClassBatchSampler(labels, batch_size=8, num_instances=4, seed=0)
    assert sampler.batches_per_epoch == 5
    batches = _take(sampler, 10)
    for epoch in (batches[:5], batches[5:]):
        seen = [labels[i] for b in epoch for i in b[::4]]
        assert sorted(seen) == list(range(10))


def test_small_classes_are_drawn_with_replacement():
    labels = _labels([2, 2, 2])
    sampler = MPerClassBatchSampler(labels, batch_size=4, num_instances=4, seed=0)
    batch = _take(sampler, 1)[0]
    assert len(batch) == 4 and len({labels[i] for i in batch}) == 1


def test_stream_is_a_function_of_seed_and_batch_number():
    labels = _labels([5, 9, 4, 7, 6, 8, 5, 4])
    full = _take(MPerClassBatchSampler(labels, 8, 4, seed=5), 12)
    resumed = _take(MPerClassBatchSampler(labels, 8, 4, seed=5, start_batch=7), 5)
    assert resumed == full[7:12]
    other_seed = _take(MPerClassBatchSampler(labels, 8, 4, seed=6), 12)
    assert other_seed != full


def test_ranks_take_disjoint_interleaved_batches():
    labels = _labels([6] * 12)
    single = _take(MPerClassBatchSampler(labels, 8, 4, seed=1), 6)
    rank0 = _take(MPerClassBatchSampler(labels, 8, 4, seed=1, rank=0, world_size=2), 3)
    rank1 = _take(MPerClassBatchSampler(labels, 8, 4, seed=1, rank=1, world_size=2), 3)
    assert rank0 == single[0::2] and rank1 == single[1::2]


def test_bad_arguments():
    labels = _labels([4, 4, 4])
    with pytest.raises(ValueError, match="multiple of DATA.NUM_INSTANCES"):
        MPerClassBatchSampler(labels, 10, 4)
    with pytest.raises(ValueError, match="needs 4 classes"):
        MPerClassBatchSampler(labels, 16, 4)

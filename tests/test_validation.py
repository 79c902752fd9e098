import numpy as np
import pytest

from xbm.data.validation import LabelledSubset, split_validation


class Items:
    def __init__(self, labels, tag):
        self.labels = np.asarray(labels)
        self.tag = tag

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.tag, i), int(self.labels[i])


def test_split_is_class_disjoint_and_covers_everything():
    labels = np.repeat([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], 3)
    train, val = split_validation(Items(labels, "aug"), Items(labels, "plain"), 0.3, seed=1)
    train_classes = set(labels[train.indices])
    val_classes = set(labels[val.indices])
    assert len(val_classes) == 3 and not train_classes & val_classes
    assert sorted(np.concatenate([train.indices, val.indices]).tolist()) == list(range(30))
    # relabelled 0..C-1, consistent with the original classes
    assert sorted(set(val.labels.tolist())) == [0, 1, 2]
    for i in range(len(val)):
        (tag, original), label = val[i]
        assert tag == "plain" and label == val.labels[i]
        assert labels[original] == sorted(val_classes)[label]
    assert train[0][0][0] == "aug"


def test_split_is_deterministic():
    labels = np.repeat(np.arange(20), 2)
    a = split_validation(Items(labels, ""), Items(labels, ""), 0.25, seed=3)[1].indices
    b = split_validation(Items(labels, ""), Items(labels, ""), 0.25, seed=3)[1].indices
    assert np.array_equal(a, b)


def test_bad_fractions():
    labels = np.repeat(np.arange(3), 2)
    with pytest.raises(ValueError, match="DATA.VAL_FRACTION"):
        split_validation(Items(labels, ""), Items(labels, ""), 0.0)
    with pytest.raises(ValueError, match="leaves 0 validation classes"):
        split_validation(Items(labels, ""), Items(labels, ""), 0.1)


def test_labelled_subset_relabels():
    subset = LabelledSubset(Items([5, 7, 5, 9], ""), [1, 3])
    assert subset.labels.tolist() == [0, 1] and len(subset) == 2

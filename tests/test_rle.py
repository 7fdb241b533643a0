"""Kaggle DSB-2018 run-length encoding: hand-checked cases, round trips, and COCO RLE from the same runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nucleus_seg.utils.rle import coco_rle_counts, label_runs, rle_decode, rle_encode, rle_encode_labels


def test_hand_checked_column_major_one_based():
    # Kaggle numbers pixels down each column, then across: 1 4 7 / 2 5 8 / 3 6 9.
    mask = np.array([[0, 1, 0],
                     [1, 1, 0],
                     [0, 0, 1]], dtype=bool)
    # ones at pixel 2 (col 0), pixels 4-5 (col 1 rows 0-1), pixel 9 (col 2 row 2)
    assert rle_encode(mask) == "2 1 4 2 9 1"


def test_run_continues_from_bottom_of_one_column_to_top_of_the_next():
    mask = np.array([[0, 1],
                     [1, 0]], dtype=bool)  # pixels: 1=(0,0) 2=(1,0) 3=(0,1) 4=(1,1)
    assert rle_encode(mask) == "2 2"


def test_empty_full_and_non_square():
    assert rle_encode(np.zeros((4, 3), bool)) == ""
    assert rle_encode(np.ones((2, 3), bool)) == "1 6"
    tall = np.zeros((5, 2), bool)
    tall[4, 0] = tall[0, 1] = True  # pixel 5 and pixel 6: one run across the column break
    assert rle_encode(tall) == "5 2"


def test_labels_encoded_in_one_pass_match_per_mask_encoding():
    labels = np.array([[1, 1, 0, 2],
                       [0, 1, 2, 2],
                       [3, 0, 0, 2]])
    encoded = rle_encode_labels(labels)
    assert list(encoded) == [1, 2, 3]
    for k, rle in encoded.items():
        assert rle == rle_encode(labels == k)
    assert encoded[1] == "1 1 4 2"  # (0,0); then (0,1),(1,1) = pixels 4, 5
    assert encoded[3] == "3 1"


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_round_trip(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask)
    values = [int(v) for v in rle.split()]
    starts, lengths = values[0::2], values[1::2]
    assert all(s >= 1 for s in starts) and all(n >= 1 for n in lengths)
    assert all(s1 > s0 + n0 for s0, n0, s1 in zip(starts, lengths, starts[1:]))  # separated, ascending
    assert sum(lengths) == int(mask.sum())


@settings(max_examples=40, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 10), st.integers(1, 10)), elements=st.integers(0, 4)))
def test_coco_counts_match_pycocotools(labels):
    from pycocotools import mask as mask_util

    ids, starts, lengths = label_runs(labels)
    h, w = labels.shape
    for k in np.unique(ids):
        sel = ids == k
        counts = coco_rle_counts(starts[sel], lengths[sel], h * w)
        ours = mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        ref = mask_util.encode(np.asfortranarray((labels == k).astype(np.uint8)))
        assert ours["counts"] == ref["counts"]


@pytest.mark.parametrize("rle", ["1", "0 2", "3 2 4 1", "5 1 2 1", "9 2", "1 x"])
def test_decode_refuses_bad_runs(rle):
    with pytest.raises(ValueError, match="RLE"):
        rle_decode(rle, (3, 3))


def test_asymmetric_non_square_masks_by_hand():
    """Masks that are not their own transpose: a row-major encoder gives other runs ('1 1 4 2' here)."""
    mask = np.array([[1, 0, 0],
                     [1, 1, 0]], dtype=bool)  # 2 rows x 3 columns
    assert rle_encode(mask) == "1 2 4 1"  # column 0: pixels 1-2; column 1: pixel 4 (row 1)
    tall = np.array([[0, 1],
                     [0, 1],
                     [1, 0]], dtype=bool)  # 3 rows x 2 columns
    assert rle_encode(tall) == "3 3"  # pixel 3 (col 0, row 2), then pixels 4-5 (col 1, rows 0-1)
    for m in (mask, tall):
        np.testing.assert_array_equal(rle_decode(rle_encode(m), m.shape), m)
    labels = np.array([[2, 0, 0, 1],
                       [2, 2, 0, 1]])
    assert rle_encode_labels(labels) == {1: "7 2", 2: "1 2 4 1"}

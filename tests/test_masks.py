"""Stored masks: each run of identical rows and columns kept once, and expanded back pixel for pixel."""
import io

import numpy as np
from PIL import Image

from pneumo_tf.records import masks
from pneumo_tf.records.boxes import rasterize

RSNA_BOXES = ((0.2, 0.3, 0.45, 0.7), (0.55, 0.25, 0.8, 0.66))


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0


def test_collapse_then_expand_gives_any_mask_back():
    rng = np.random.default_rng(0)
    for shape, density in (((40, 70), 0.5), ((1, 9), 0.3), ((33, 1), 0.3), ((64, 64), 0.0), ((64, 64), 1.0)):
        mask = rng.random(shape) < density
        collapsed, row_repeats, col_repeats = masks.collapse(mask)
        assert sum(row_repeats) == shape[0] and sum(col_repeats) == shape[1]
        np.testing.assert_array_equal(masks.expand(collapsed, row_repeats, col_repeats), mask)
        # Collapsed rows (and columns) differ from their neighbours: nothing left to merge.
        assert (collapsed[1:] != collapsed[:-1]).any(axis=1).all()
        assert (collapsed[:, 1:] != collapsed[:, :-1]).any(axis=0).all()


def test_a_box_union_collapses_to_its_edges():
    # At 1024 px box A spans rows 307-716 and columns 205-460, box B rows 256-675 and columns
    # 563-818: rows change at 256, 307, 676 and 717 and columns at 205, 461, 563 and 819.
    collapsed, row_repeats, col_repeats = masks.collapse(rasterize(RSNA_BOXES, 1024, 1024))
    assert row_repeats == (256, 51, 369, 41, 307) and col_repeats == (205, 256, 102, 256, 205)
    assert collapsed.astype(int).tolist() == [
        [0, 0, 0, 0, 0],  # above both
        [0, 0, 0, 1, 0],  # B only
        [0, 1, 0, 1, 0],  # A and B
        [0, 1, 0, 0, 0],  # A only
        [0, 0, 0, 0, 0],  # below both
    ]


def test_encode_stores_the_rasterised_union_losslessly():
    for boxes, height, width in ((RSNA_BOXES, 1024, 1024), (RSNA_BOXES, 100, 37), ((), 1024, 1024), ((), 7, 5)):
        encoded, row_repeats, col_repeats = masks.encode(boxes, height, width)
        collapsed = decode_png(encoded)
        expanded = masks.expand(collapsed, row_repeats, col_repeats)
        np.testing.assert_array_equal(expanded, rasterize(boxes, height, width))
    # No boxes: one empty pixel standing for the whole image, whatever its size.
    assert masks.encode((), 1024, 1000)[1:] == ((1024,), (1000,))
    assert decode_png(masks.encode((), 1024, 1000)[0]).tolist() == [[False]]
    # A 1024-px RSNA mask is stored in under a hundred bytes (the full-size 1-bit PNG took ~660).
    assert len(masks.encode(RSNA_BOXES, 1024, 1024)[0]) < 100


def test_png_1bit_decodes_to_the_array():
    mask = np.random.default_rng(1).random((13, 21)) < 0.4  # widths not a multiple of 8 pad the last byte
    np.testing.assert_array_equal(decode_png(masks.png_1bit(mask)), mask)

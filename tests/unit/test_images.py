"""geco.images: uint8 conversion, stacking, nearest-neighbour upscaling and labelled grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from geco.images import (
    grid,
    hstack_images,
    labeled_grid,
    resize_nearest,
    to_uint8,
    upscale_factor,
    upscale_nearest,
    vstack_images,
)
from geco.tracking import image_grid

PAD = 2


def _random(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)  # never pure white


def test_to_uint8_rounds_and_clamps():
    img = torch.tensor([[[0.0, 1.0], [-0.5, 2.0]], [[0.5, 0.2], [0.999, 0.001]], [[1 / 255, 254.6 / 255], [0.0, 1.0]]])
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [0, 255]])
    np.testing.assert_array_equal(out[..., 1], [[128, 51], [255, 0]])
    np.testing.assert_array_equal(out[..., 2], [[1, 255], [0, 255]])


def test_stacking_sizes():
    a, b = _random(4, 5), _random(7, 3, 1)
    h = hstack_images([a, b], pad=PAD)
    assert h.shape == (7 + 2 * PAD, 5 + 3 + 3 * PAD, 3)
    np.testing.assert_array_equal(h[PAD:PAD + 4, PAD:PAD + 5], a)
    np.testing.assert_array_equal(h[PAD:PAD + 7, 2 * PAD + 5:2 * PAD + 8], b)
    v = vstack_images([a, b])
    assert v.shape == (11, 5, 3) and (v[4:, 3:] == 255).all()


def test_nearest_upscale_is_exact():
    img = _random(3, 4)
    up = upscale_nearest(img, 5)
    assert up.shape == (15, 20, 3)
    for y in range(15):
        for x in range(20):
            assert (up[y, x] == img[y // 5, x // 5]).all()
    assert upscale_nearest(img, 1) is img
    np.testing.assert_array_equal(resize_nearest(img, (6, 8)), upscale_nearest(img, 2))
    np.testing.assert_array_equal(resize_nearest(up, (3, 4)), img)
    assert upscale_factor([_random(16, 16), _random(48, 32)], 128) == 8  # the smallest side decides
    assert upscale_factor([_random(200, 300)], 128) == 1 and upscale_factor([_random(16, 16)], 0) == 1
    with pytest.raises(ValueError):
        upscale_nearest(img, 0)


def test_grid_layout():
    a, b, c = _random(4, 6), _random(5, 3, 1), _random(2, 2, 2)
    out = grid([[a, b], [c]], pad=PAD)
    # column widths 6 and 3, row heights 5 and 2
    assert out.shape == (5 + 2 + 3 * PAD, 6 + 3 + 3 * PAD, 3)
    np.testing.assert_array_equal(out[PAD:PAD + 4, PAD:PAD + 6], a)
    np.testing.assert_array_equal(out[PAD:PAD + 5, 2 * PAD + 6:2 * PAD + 9], b)
    np.testing.assert_array_equal(out[2 * PAD + 5:2 * PAD + 7, PAD:PAD + 2], c)
    assert (out[2 * PAD + 5:, 2 * PAD + 6:] == 255).all()  # the missing cell stays background
    assert grid([[a]], pad=PAD, cols=3).shape[1] == 6 + 4 * PAD  # empty columns still take their gaps


def test_labeled_grid_upscales_and_labels():
    rows = [[_random(16, 16, i), _random(48, 32, i + 10)] for i in range(2)]  # two objects
    out = labeled_grid(rows, ["input", "teacher"], min_tile=128)
    k = 8  # 16 px -> 128 px
    body_h = 2 * 48 * k + 3 * PAD
    header_h = out.shape[0] - body_h
    assert out.dtype == np.uint8 and out.shape[1] == 16 * k + 32 * k + 3 * PAD and 8 <= header_h <= 40
    body = out[header_h:]
    np.testing.assert_array_equal(body[PAD:PAD + 128, PAD:PAD + 128], upscale_nearest(rows[0][0], k))
    y1, x1 = 2 * PAD + 48 * k, 2 * PAD + 128
    np.testing.assert_array_equal(body[y1:y1 + 48 * k, x1:x1 + 32 * k], upscale_nearest(rows[1][1], k))
    # the labels are drawn: dark pixels in the header over each column, none in the gaps
    header = out[:header_h]
    for x0, w in ((PAD, 128), (2 * PAD + 128, 256)):
        assert (header[:, x0:x0 + w] < 128).any()
    assert (header[:, :PAD] == 255).all()
    # large pictures are left at their size; fewer pictures than labels is fine, more is not
    big = labeled_grid([[_random(200, 300)]], ["a", "b"], min_tile=128)
    assert big.shape[1] == 300 + 3 * PAD and (big[-200 - PAD:-PAD, PAD:PAD + 300] == _random(200, 300)).all()
    with pytest.raises(ValueError, match="column labels"):
        labeled_grid([[_random(4, 4)] * 3], ["a", "b"])


def test_image_grid_keeps_its_layout():
    imgs = [_random(16, 16, i) for i in range(9)] + [_random(32, 8, 9)]  # the last one is resized to 16x16
    out = image_grid(imgs, cols=4, min_tile=0)
    assert out.shape == (3 * (16 + PAD) + PAD, 4 * (16 + PAD) + PAD, 3)
    np.testing.assert_array_equal(out[PAD:PAD + 16, PAD:PAD + 16], imgs[0])
    y, x = PAD + 2 * (16 + PAD), PAD + (16 + PAD)  # image 9: row 2, column 1
    np.testing.assert_array_equal(out[y:y + 16, x:x + 16], resize_nearest(imgs[9], (16, 16)))
    assert (out[y:, x + 16 + PAD:] == 255).all()  # the rest of the last row is background
    up = image_grid(imgs, cols=4)  # default: tiles of at least 128 px
    assert up.shape == (3 * (128 + PAD) + PAD, 4 * (128 + PAD) + PAD, 3)
    assert image_grid([], cols=3).shape == (8, 8, 3)

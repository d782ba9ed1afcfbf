import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from raycv.annotation.tiling import blend_weights, predict_tiled, tile_grid


def _coverage(height: int, width: int, grid: list[tuple[int, int, int, int]]) -> np.ndarray:
    hits = np.zeros((height, width), dtype=np.int32)
    for y0, x0, h, w in grid:
        hits[y0 : y0 + h, x0 : x0 + w] += 1
    return hits


@pytest.mark.parametrize(("height", "width"), [(300, 420), (128, 128), (129, 1000), (1000, 97)])
def test_grid_covers_every_pixel_with_whole_tiles_inside_the_image(height, width):
    grid = tile_grid(height, width, tile=128, overlap=32)
    assert (_coverage(height, width, grid) >= 1).all()
    assert {(h, w) for _, _, h, w in grid} == {(min(128, height), min(128, width))}
    assert all(y0 >= 0 and x0 >= 0 and y0 + h <= height and x0 + w <= width for y0, x0, h, w in grid)
    assert max(y0 + h for y0, _, h, _ in grid) == height
    assert max(x0 + w for _, x0, _, w in grid) == width
    assert grid == sorted(grid)


def test_grid_steps_by_tile_minus_overlap_and_shifts_the_last_tile_back():
    grid = tile_grid(300, 420, tile=128, overlap=32)
    assert sorted({y0 for y0, *_ in grid}) == [0, 96, 172]
    # 288 + 128 = 416 falls short of 420, so one more tile, flush with the edge
    assert sorted({x0 for _, x0, *_ in grid}) == [0, 96, 192, 288, 292]
    assert len(grid) == 15


def test_image_smaller_than_a_tile_is_one_tile_of_its_own_size():
    assert tile_grid(50, 70, tile=128, overlap=32) == [(0, 0, 50, 70)]
    assert tile_grid(128, 128, tile=128, overlap=32) == [(0, 0, 128, 128)]


@pytest.mark.parametrize(("tile", "overlap"), [(128, 128), (128, -1), (0, 0)])
def test_grid_rejects_an_overlap_that_does_not_fit_the_tile(tile, overlap):
    with pytest.raises(ValueError, match="0 <= overlap < tile"):
        tile_grid(300, 300, tile=tile, overlap=overlap)


def test_blend_weights_fade_interior_sides_only_and_stay_positive():
    wt = blend_weights(64, 80, 16, top=True, bottom=False, left=False, right=True)
    assert wt.shape == (64, 80) and wt.dtype == np.float32
    assert (wt > 0).all() and wt.max() == 1.0
    assert wt[32, 40] == 1.0
    assert wt[0, 40] == pytest.approx(0.5 / 16) and wt[-1, 40] == 1.0  # top faded, bottom is the border
    assert wt[32, 0] == 1.0 and wt[32, -1] == pytest.approx(0.5 / 16)  # left is the border, right faded
    assert (np.diff(wt[:16, 40]) > 0).all()
    # two tiles overlapping by exactly `overlap` px sum to 1 across the overlap
    row = blend_weights(1, 64, 16, top=False, bottom=False)[0]
    ramp_out, ramp_in = row[-16:], row[:16]
    np.testing.assert_allclose(ramp_out + ramp_in, 1.0, rtol=1e-6)
    assert (blend_weights(8, 8, 0) == 1).all()


K = 5


def _conv_net() -> nn.Module:
    """A small fixed conv net (receptive field 5x5): translation-equivariant away from its zero padding."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, K, 3, padding=1))
    return net.eval()


def _seam_setup():
    net = _conv_net()
    image = np.random.default_rng(0).integers(0, 256, size=(300, 420, 3), dtype=np.uint8)

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
        return net(x).softmax(dim=1).numpy()

    def read(y0, x0, h, w):
        return image[y0 : y0 + h, x0 : x0 + w]

    untiled = predict(image[None])[0].argmax(axis=0)
    return predict, read, untiled


def _naive_stitch(predict, read, height, width):
    """No blending: each tile's argmax pasted over the previous ones."""
    out = np.zeros((height, width), dtype=np.uint8)
    for y0, x0, h, w in tile_grid(height, width, tile=128, overlap=32):
        out[y0 : y0 + h, x0 : x0 + w] = predict(read(y0, x0, h, w)[None])[0].argmax(axis=0)
    return out


def test_blended_tiles_match_the_untiled_prediction():
    predict, read, untiled = _seam_setup()
    tiled = predict_tiled(predict, read, 300, 420, num_classes=K, tile=128, overlap=32, batch_size=3)
    assert tiled.shape == (300, 420) and tiled.dtype == np.uint8
    blended = float((tiled == untiled).mean())
    naive = float((_naive_stitch(predict, read, 300, 420) == untiled).mean())
    assert blended >= 0.999, blended
    assert naive < 0.995, naive  # the padding at tile edges does show without blending
    assert blended > naive


def test_batch_size_does_not_change_the_result():
    predict, read, _ = _seam_setup()
    one = predict_tiled(predict, read, 300, 420, num_classes=K, tile=128, overlap=32, batch_size=1)
    many = predict_tiled(predict, read, 300, 420, num_classes=K, tile=128, overlap=32, batch_size=64)
    assert np.array_equal(one, many)


def test_image_smaller_than_a_tile_is_predicted_whole():
    predict, read, _ = _seam_setup()
    tiled = predict_tiled(predict, read, 100, 420, num_classes=K, tile=128, overlap=32, batch_size=2)
    whole = predict(read(0, 0, 100, 420)[None])[0].argmax(axis=0)
    assert tiled.shape == (100, 420)
    assert (tiled == whole).mean() >= 0.999


# A virtual scene whose right answer is known everywhere: class = (x // 37 + 2 * (y // 53)) % K6.
K6, SIDE = 6, 6000
_ROW_CLASS = ((2 * (np.arange(SIDE) // 53)) % K6).astype(np.uint8)
_COL_CLASS = ((np.arange(SIDE) // 37) % K6).astype(np.uint8)
_SUM_MOD = (np.arange(2 * K6) % K6).astype(np.uint8)


def _scene_labels(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    return _SUM_MOD[_ROW_CLASS[y0 : y0 + h, None] + _COL_CLASS[None, x0 : x0 + w]]


def _scene_read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    return _scene_labels(y0, x0, h, w)[:, :, None]


def _scene_predict(batch: np.ndarray) -> np.ndarray:
    """A cheap stand-in model: score 1 for the class equal to the pixel value, 0 for the others."""
    return (batch[:, None, :, :, 0] == np.arange(K6, dtype=np.uint8)[None, :, None, None]).astype(np.float32)


def test_large_scene_is_predicted_exactly_with_a_band_sized_accumulator():
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = predict_tiled(
            _scene_predict, _scene_read, SIDE, SIDE, num_classes=K6, tile=256, overlap=32, batch_size=4
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole_accumulator = K6 * SIDE * SIDE * 4  # 864 MB
    print(
        f"peak traced memory {peak / 1e6:.1f} MB vs a whole-image accumulator of {whole_accumulator / 1e6:.0f} MB"
    )
    assert peak < whole_accumulator / 4
    # the output alone is SIDE * SIDE bytes; the rest is about one band of 256 rows
    assert peak < SIDE * SIDE + 256 * SIDE * (K6 * 4 + 8) + 16 * 2**20
    for y0 in range(0, SIDE, 1000):  # compare in bands to keep the check itself small
        assert np.array_equal(out[y0 : y0 + 1000], _scene_labels(y0, 0, 1000, SIDE))


def test_predict_with_the_wrong_output_shape_names_the_expected_one():
    def bad_predict(batch):
        return np.zeros((batch.shape[0], 3, 8, 8), dtype=np.float32)

    with pytest.raises(ValueError, match=r"expected \(2, 6, 64, 64\)"):
        predict_tiled(bad_predict, _scene_read, 100, 100, num_classes=6, tile=64, overlap=8, batch_size=2)


def test_read_without_a_channel_axis_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="add a channel axis"):
        predict_tiled(
            _scene_predict, _scene_labels, 100, 100, num_classes=6, tile=64, overlap=8, batch_size=2
        )

import numpy as np
import torch

from raycv.data.transforms import augment_pair, normalize, resize_mask, to_tensor_resized


def test_resize_keeps_labels_and_range():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, 15:] = 255
    t = to_tensor_resized(image, (10, 15))
    assert t.shape == (3, 10, 15) and float(t.min()) >= 0 and float(t.max()) <= 1
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 15:] = 3
    m = resize_mask(mask, (10, 15))
    assert m.dtype == torch.int64 and set(m.unique().tolist()) == {0, 3}
    assert normalize(torch.ones(3, 2, 2), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eq(1).all()


def test_pair_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    image[4:12, 2:10] = 255  # a white square with label 1
    mask[4:12, 2:10] = 1
    for seed in range(20):
        t, m = augment_pair(
            image,
            mask,
            (32, 32),
            np.random.default_rng(seed),
            hflip=0.5,
            vflip=0.5,
            rotate=30,
            crop_scale=0.5,
        )
        assert t.shape == (3, 32, 32) and m.shape == (32, 32)
        labels = set(m.unique().tolist())
        assert labels <= {0, 1, 255}  # nearest neighbour only: no blended labels; 255 = rotated-in corners
        bright = t.mean(dim=0) > 0.3
        inside = m == 1
        if inside.sum() > 20:  # the square's label covers bright pixels wherever it went
            assert bright[inside].float().mean() > 0.8
    t, m = augment_pair(image, mask, (16, 16), rng, color_jitter=0.5)  # colour never touches the labels
    assert torch.equal(m, resize_mask(mask, (16, 16)))

import numpy as np
import torch

from raycv.data.transforms import augment_pair, normalize, per_band, resize_mask, to_tensor_resized


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


def test_resize_is_within_one_level_of_torch_antialiased_bilinear():
    """The shared resize (Pillow, uint8) against torch's antialiased bilinear in float, shrinking and
    enlarging, on noise (the worst case) and on smooth gradients."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    diffs = []
    for h, w, size in [
        (300, 451, (224, 224)),
        (97, 64, (32, 32)),
        (40, 23, (112, 96)),
        (256, 256, (256, 256)),
    ]:
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        ramp = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1).astype(np.uint8)
        for image in (noise, ramp):
            ours = (to_tensor_resized(image, size) * 255).round().to(torch.int32)
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            ref = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            diff = (ours - (ref.clamp(0, 1) * 255).round().to(torch.int32)).abs()
            assert ours.shape == (3, *size) and int(diff.max()) <= 1
            diffs.append(float(diff.float().mean()))
    assert np.mean(diffs) < 0.25
    same = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert torch.equal(
        (to_tensor_resized(same, (8, 8)) * 255).round().to(torch.uint8).permute(1, 2, 0),
        torch.from_numpy(same),
    )


def test_the_annotation_read_and_write_tasks_do_not_import_torch():
    """Read and write tasks start in fresh Ray workers: importing torch and torchvision there cost ~4 CPU-s
    and ~300 MB each."""
    import subprocess
    import sys

    code = (
        "import sys, raycv.annotation.read, raycv.annotation.write, ray.data.block; "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_per_band_statistics_repeat_rgb_cyclically():
    assert per_band((0.1, 0.2, 0.3), 3) == (0.1, 0.2, 0.3)
    assert per_band((0.1, 0.2, 0.3), 4) == (0.1, 0.2, 0.3, 0.1)
    assert per_band([0.1, 0.2, 0.3], 6) == (0.1, 0.2, 0.3) * 2
    assert per_band((0.1, 0.2, 0.3), 1) == ((0.1 + 0.2 + 0.3) / 3,)

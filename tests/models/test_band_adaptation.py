"""load_weights on another band count: RGB (or grey) input convs adapted by timm's rule, not left random."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from timm.models._manipulate import adapt_input_conv as timm_adapt_input_conv
from torch import nn

from raycv.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, per_band
from raycv.models import Adapted, LoadReport, adapt_input_conv, create_model, load_weights


def _pair(make: Callable[[int], nn.Module], bands: int) -> tuple[nn.Module, nn.Module, LoadReport]:
    """An RGB model with random weights, and a ``bands`` model loaded from its state_dict (both in eval)."""
    torch.manual_seed(0)
    rgb = make(3).eval()
    torch.manual_seed(1)  # another initialisation: whatever matches below came from the RGB weights
    banded = make(bands)
    report = load_weights(banded, rgb.state_dict())
    return rgb, banded.eval(), report


def _raycv_resnet18(in_channels: int) -> nn.Module:
    return create_model("resnet18", num_classes=5, in_channels=in_channels)


def _timm_resnet18(in_channels: int) -> nn.Module:
    return timm.create_model("resnet18", num_classes=5, pretrained=False, in_chans=in_channels)


@pytest.mark.parametrize("make", [_raycv_resnet18, _timm_resnet18], ids=["torchvision", "timm"])
def test_six_bands_repeating_rgb_give_the_rgb_output(make) -> None:
    """The issue's test: bands R, G, B, R, G, B, normalised per band as the card says, on the adapted model."""
    rgb, six, report = _pair(make, 6)
    assert report.adapted == [Adapted("conv1.weight", 3, 6)]
    assert report.skipped == report.missing == report.unexpected == []
    assert "conv1.weight" in report.loaded
    assert "adapted (input channels): conv1.weight 3->6" in report.summary()
    x = torch.rand(2, 3, 64, 64)
    six_x = normalize(torch.cat([x, x], 1), per_band(IMAGENET_MEAN, 6), per_band(IMAGENET_STD, 6))
    with torch.no_grad():
        expected = rgb(normalize(x, IMAGENET_MEAN, IMAGENET_STD))
        got = six(six_x)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_one_band_grey_gives_the_rgb_output_of_the_same_grey() -> None:
    rgb, grey, report = _pair(_raycv_resnet18, 1)
    assert report.adapted == [Adapted("conv1.weight", 3, 1)]
    g = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), rgb(g.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)


def test_four_bands_load_every_tensor_with_the_stem_adapted() -> None:
    rgb, four, report = _pair(_raycv_resnet18, 4)
    assert report.adapted == [Adapted("conv1.weight", 3, 4)]
    assert len(report.loaded) == len(rgb.state_dict()) and report.skipped == []
    source = rgb.state_dict()["conv1.weight"]
    assert four.conv1.weight.shape == (64, 4, 7, 7)
    assert torch.equal(four.conv1.weight, timm_adapt_input_conv(4, source))
    with torch.no_grad():
        assert four(torch.rand(2, 4, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("bands", [1, 2, 4, 6, 13])
def test_the_rule_is_timms(bands: int) -> None:
    weight = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_conv(weight, bands), timm_adapt_input_conv(bands, weight))
    half = weight.half()
    adapted = adapt_input_conv(half, bands)
    assert adapted.dtype == torch.float16 and torch.equal(adapted, timm_adapt_input_conv(bands, half))


def test_a_grey_stem_spreads_over_the_bands() -> None:
    weight = torch.randn(8, 1, 3, 3)
    assert torch.equal(adapt_input_conv(weight, 1), weight)
    torch.testing.assert_close(adapt_input_conv(weight, 4), weight.repeat(1, 4, 1, 1) / 4)


def test_other_band_counts_are_refused_or_skipped() -> None:
    with pytest.raises(ValueError, match=r"only 3 \(RGB\) or 1 \(grey\)"):
        adapt_input_conv(torch.randn(8, 4, 3, 3), 6)
    with pytest.raises(ValueError, match="4-D conv weight"):
        adapt_input_conv(torch.randn(8, 3), 6)
    # a 4-band checkpoint into a 6-band model: no rule, so the stem keeps its own initialisation
    source = _raycv_resnet18(4).state_dict()
    report = load_weights(_raycv_resnet18(6), source)
    assert report.skipped == ["conv1.weight"] and report.adapted == []


def test_only_convs_that_take_the_image_are_adapted() -> None:
    """A deeper conv that goes from 3 to another count than the bands' is another width, not another band count."""
    rgb = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 1), nn.Conv2d(3, 4, 1))
    six = nn.Sequential(nn.Conv2d(6, 8, 3), nn.Conv2d(8, 5, 1), nn.Conv2d(5, 4, 1))
    report = load_weights(six, rgb.state_dict())
    assert report.adapted == [Adapted("0.weight", 3, 6)]
    assert report.skipped == ["1.weight", "1.bias", "2.weight"]

"""load_weights across heads of another size, checkpoint forms, and freezing all but the head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raycv.models import create_model, freeze_backbone, head_module_names, load_weights


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    """A resnet18 with 10 classes, as a state_dict."""
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10).state_dict()


def _assert_loaded_all_but_the_head(source_state: dict[str, torch.Tensor], state: dict) -> None:
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=3)
    head_before = model.fc.weight.detach().clone()
    report = load_weights(model, state)
    assert report.skipped == ["fc.weight", "fc.bias"]
    assert report.loaded == [key for key in source_state if not key.startswith("fc.")]
    assert report.unexpected == report.missing == []
    target = model.state_dict()
    for key in report.loaded:
        assert torch.equal(target[key], source_state[key]), key
    assert torch.equal(model.fc.weight, head_before)  # the 3-class head keeps its own initialisation


def test_loads_everything_but_a_head_of_another_size(source_state: dict[str, torch.Tensor]) -> None:
    _assert_loaded_all_but_the_head(source_state, source_state)


def test_strips_the_ddp_prefix(source_state: dict[str, torch.Tensor]) -> None:
    _assert_loaded_all_but_the_head(source_state, {f"module.{k}": v for k, v in source_state.items()})


def test_accepts_a_raycv_checkpoint(source_state: dict[str, torch.Tensor]) -> None:
    checkpoint = {"model": source_state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    _assert_loaded_all_but_the_head(source_state, checkpoint)


def test_reports_unexpected_and_missing_keys(source_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in source_state.items() if k != "layer4.1.bn2.bias"}
    state["extra.weight"] = torch.zeros(2)
    model = create_model("resnet18", num_classes=10)
    report = load_weights(model, state)
    assert (report.unexpected, report.missing, report.skipped) == (
        ["extra.weight"],
        ["layer4.1.bn2.bias"],
        [],
    )
    assert len(report.loaded) == len(source_state) - 1
    assert report.summary() == (
        f"loaded {len(source_state) - 1} tensors; unexpected: extra.weight; missing: layer4.1.bn2.bias"
    )


def test_nothing_matching_raises(source_state: dict[str, torch.Tensor]) -> None:
    model = create_model("simple_cnn", num_classes=10)
    with pytest.raises(ValueError, match="the architecture probably differs"):
        load_weights(model, source_state)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("resnet18", "fc"),
        ("vgg11", "classifier.6"),
        ("vit_b_16", "heads.head"),
        ("swin_t", "head"),
        ("squeezenet1_0", "classifier.1"),
        ("mobilenet_v3_small", "classifier.3"),
        ("simple_cnn", "classifier.4"),
        ("test_classifier", "classifier"),
    ],
)
def test_head_module_names(name: str, head: str) -> None:
    assert head_module_names(create_model(name, num_classes=4)) == [head]


def test_freeze_backbone_trains_only_the_head() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3)
    assert freeze_backbone(model) == ["fc.weight", "fc.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["fc.weight", "fc.bias"]


def test_freeze_backbone_of_squeezenet_keeps_its_final_conv() -> None:
    model = create_model("squeezenet1_0", num_classes=3)
    assert freeze_backbone(model) == ["classifier.1.weight", "classifier.1.bias"]

"""train.grad_accum_steps: k batches per optimiser step, one DDP all-reduce per step."""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from raycv.cli import main
from raycv.data.synthetic import write_imagefolder
from raycv.storage import Storage
from raycv.training.step import GradientAccumulation, batches_of
from tests._util import write_yaml

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def test_a_window_of_k_batches_is_one_step_on_their_union():
    """5 batches with k=2: steps after batches 2, 4 and 5 equal plain steps on [1+2], [3+4], [5]."""
    batches = _batches(5)
    model, ref = _net(), _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    steps = []
    opt.step = (lambda step: lambda *a, **k: (steps.append(1), step(*a, **k))[1])(opt.step)  # count steps
    acc = GradientAccumulation(model, opt, None, steps=2, batches=5)
    for i, (x, y) in enumerate(batches):
        with acc.window(i):
            acc.backward(i, nn.functional.cross_entropy(model(x), y))
    for group in ([0, 1], [2, 3], [4]):
        x = torch.cat([batches[j][0] for j in group])
        y = torch.cat([batches[j][1] for j in group])
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    assert len(steps) == 3
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
    assert all(p.grad is None for p in model.parameters())  # zeroed after the last step
    assert [acc.ends_window(i) for i in range(5)] == [False, True, False, True, True]
    assert batches_of(list(range(10)), 4) == 3


def test_ddp_all_reduces_once_per_window():
    """A real DDP model (gloo, one rank): the gradient all-reduce hook runs on the last backward of each
    window only (k=4: 2 of 8 batches), and the weights match those of k=1 steps on merged batches."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        counts = []
        for k in (1, 4):
            ddp = nn.parallel.DistributedDataParallel(_net())
            calls = []

            def counting_hook(state, bucket, calls=calls):
                calls.append(1)
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            acc = GradientAccumulation(ddp, opt, None, steps=k, batches=8)
            for i, (x, y) in enumerate(_batches(8)):
                with acc.window(i):
                    acc.backward(i, nn.functional.cross_entropy(ddp(x), y))
            counts.append(len(calls))
            if k == 4:
                merged = copy.deepcopy(_net())
                ref_opt = torch.optim.SGD(merged.parameters(), lr=0.1)
                b = _batches(8)
                for w in (0, 4):
                    ref_opt.zero_grad()
                    x, y = (
                        torch.cat([b[j][0] for j in range(w, w + 4)]),
                        torch.cat([b[j][1] for j in range(w, w + 4)]),
                    )
                    nn.functional.cross_entropy(merged(x), y).backward()
                    ref_opt.step()
                for p, q in zip(ddp.module.parameters(), merged.parameters(), strict=True):
                    assert torch.allclose(p, q, atol=1e-6)
        assert counts[0] > 0 and counts[0] == 4 * counts[1]
    finally:
        dist.destroy_process_group()


def test_grad_accum_steps_must_be_positive(tmp_path, capsys):
    cfg = write_yaml(
        tmp_path,
        "t.yaml",
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": str(tmp_path)},
            "train": {"grad_accum_steps": 0},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "train.grad_accum_steps" in err and "0" in err


@pytest.mark.timeout(600)
def test_training_with_accumulation_learns(tmp_path, ray_local):
    """2 Ray Train workers, batches of 4, a step every 2 batches (effective batch 16): >= 0.9 accuracy."""
    data = str(tmp_path / "shapes")
    write_imagefolder(data, n_per_class=80, size=32, seed=1)
    cfg = write_yaml(
        tmp_path,
        "train.yaml",
        {
            "model": {"arch": "test_classifier"},
            "data": {"train": data, "image_size": 32, "val_fraction": 0.25},
            "train": {"epochs": 12, "batch_size": 4, "grad_accum_steps": 2, "lr": 0.006, "seed": 0},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "output": {"dir": str(tmp_path / "run")},
        },
    )
    assert main(["train", cfg]) == 0
    card = json.loads(STORE.read_bytes(str(tmp_path / "run" / "model.json")))
    assert card["config"]["train"]["grad_accum_steps"] == 2
    assert card["best_metrics"]["accuracy"] >= 0.9, card["best_metrics"]  # 0.97 when written

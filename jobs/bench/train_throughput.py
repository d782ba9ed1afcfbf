"""Ray Train DDP img/s of `raycv train` against a plain single-process torch loop, per worker-core.

Both sides train the same model (same registry builder, seed, optimizer, batch size, transforms and
augmentation of the classification Task's transforms) on the same train/val split of the same generated
imagefolder, and both time an epoch the same way: the training pass plus the validation pass. The Ray side
is the real :func:`raycv.training.loop.run_training` (its ``metrics.jsonl`` ``epoch_s``); the plain side is a
``torch.utils.data.DataLoader`` (no workers) over the same files held in memory, one process with
``cpus_per_worker`` torch threads. Epoch 1 is reported but left out of the steady figures (it reads the
files and warms up). The plain loop runs in its own process at the niceness of Ray's workers (read from
one with psutil; Ray starts them at nice 15), so on a machine shared with other work both sides get the
same share of the CPU. Per worker-core ratio = (Ray img/s / workers) / plain img/s. Target: >= 0.95.

A second baseline is the plain loop given all the ranks' cores (``workers x cpus_per_worker`` torch
threads in one process): what a user gets without Ray Train on the same cores, so Ray img/s / its img/s is
the per-core ratio with the same cores on both sides (the first ratio assumes that one plain loop per core
would scale perfectly).

A third baseline runs ``--workers`` plain loops side by side (one process each, each on its shard of the
images): the ranks' layout without DDP, so the ratio against it is what the communication and Ray cost
when the cores are shared (on a machine with fewer free cores than workers, the single plain loop gets a
core to itself while the ranks take turns, which the first ratio counts against Ray). Both sides also
record their CPU seconds per epoch (Ray: rank 0's ``epoch_cpu_s``): images per CPU-second compares what
each does with the CPU it was given, whatever else ran on the machine.

    python -m jobs.bench.train_throughput --n 600 --epochs 3 --json train.json
    python -m jobs.bench.train_throughput --device cuda --workers 8 --arch resnet50 --image-size 224 \\
        --n 20000 --batch-size 128 --amp --address auto --json train_gpu.json
"""

from __future__ import annotations

import os
import statistics
import time

from . import _common as C

TARGET = ">= 0.95 per worker-core"


def parse_args(argv: list[str] | None = None) -> C.argparse.Namespace:
    p = C.base_parser(__doc__.split("\n")[0], n=600, arch="resnet18", image_size=64, src_size=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="also the torch threads of each")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument(
        "--no-side-by-side",
        action="store_true",
        help="skip the second baseline: one plain loop per worker, all at once, each on its shard",
    )
    p.add_argument("--amp", action="store_true", help="GPU: bf16 autocast (fp16 + GradScaler without bf16)")
    p.add_argument(
        "--grad-accum-steps",
        type=int,
        default=1,
        help="train.grad_accum_steps: a step (and a DDP all-reduce) every k batches, in both loops",
    )
    return p.parse_args(argv)


def train_config(args: C.argparse.Namespace, data: str, out: str) -> object:
    from raycv.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "task": "classification",
            "model": {"arch": args.arch},
            "data": {"train": data, "val_fraction": args.val_fraction, "image_size": args.image_size},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "amp": args.amp,
                "grad_accum_steps": args.grad_accum_steps,
            },
            "scaling": {
                "num_workers": args.workers,
                "use_gpu": args.device == "cuda",
                "cpus_per_worker": args.cpus_per_worker,
            },
            "storage": {"endpoint_url": args.endpoint_url},
            "output": {"dir": out, "max_failures": 0},
        }
    )


def plain_loop(
    cfg: object, device: str, threads: int, shard: tuple[int, int] = (0, 1)
) -> tuple[list[float], int, list[float]]:
    """Train ``cfg`` in this process with a plain torch loop.

    Returns (epoch seconds, train images, CPU seconds of this process per epoch).

    ``shard`` = (k, n): train and validate on every n-th image from the k-th only (one of n independent
    loops run side by side, the layout of n DDP ranks without their communication).
    """
    import numpy as np
    import torch

    from raycv.data.images import decode_image
    from raycv.models import create_model
    from raycv.storage import Storage
    from raycv.tasks.registry import StepContext, get_task
    from raycv.training.dataset import plan_dataset
    from raycv.training.step import GradientAccumulation

    torch.set_num_threads(threads)
    plan = plan_dataset(cfg)  # type: ignore[arg-type]
    k, n = shard
    plan["train"], plan["val"] = plan["train"][k::n], plan["val"][k::n]
    t = cfg.train  # type: ignore[attr-defined]
    store = Storage(endpoint_url=cfg.storage.endpoint_url)  # type: ignore[attr-defined]
    data = {s.uri: store.read_bytes(s.uri) for s in plan["train"] + plan["val"]}
    task = get_task("classification")
    train_tf, eval_tf = task.transforms(cfg.data.size_hw, t.augment)  # type: ignore[attr-defined]

    class Files(torch.utils.data.Dataset):
        def __init__(self, rows: list, tf: object, seed: int) -> None:
            self.rows, self.tf, self.seed = rows, tf, seed

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> tuple:
            sample = self.rows[i]
            image = decode_image(data[sample.uri], sample.uri)
            return self.tf(image, sample.label, np.random.default_rng(self.seed + i))  # type: ignore[operator]

    torch.manual_seed(t.seed)
    h, _ = cfg.data.size_hw  # type: ignore[attr-defined]
    model = create_model(cfg.model.arch, num_classes=plan["num_classes"], image_size=h).to(device)  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    ctx = StepContext(
        device=device, num_classes=plan["num_classes"], rng=np.random.default_rng(0), augment=t.augment
    )
    use_amp = device == "cuda" and t.amp
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    val = torch.utils.data.DataLoader(Files(plan["val"], eval_tf, 0), batch_size=t.batch_size)
    seconds: list[float] = []
    cpu: list[float] = []
    for epoch in range(t.epochs):
        train = torch.utils.data.DataLoader(
            Files(plan["train"], train_tf, epoch * 100_003),
            batch_size=t.batch_size,
            shuffle=True,
            drop_last=False,
        )
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.train()
        acc = GradientAccumulation(model, opt, scaler, t.grad_accum_steps, len(train))  # as raycv's loop
        for i, (x, y) in enumerate(train):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=amp_dtype, enabled=use_amp):
                loss = task.loss(model, x, y, ctx)
            acc.backward(i, loss)
        sched.step()
        model.eval()
        with torch.no_grad():
            for x, _y in val:
                model(x.to(device)).argmax(dim=1).cpu()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - cpu0)
    return seconds, len(plan["train"]), cpu


def _steady(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def main(argv: list[str] | None = None) -> dict:
    import json

    from raycv import storage
    from raycv.data import synthetic
    from raycv.models import saved
    from raycv.storage import Storage
    from raycv.training.loop import run_training

    args = parse_args(argv)
    threads = max(1, int(args.cpus_per_worker))
    with C.workdir(args.workdir) as wd:
        data = args.input or os.path.join(wd, f"imagefolder-{args.n}x{args.src_size}.{args.format}")
        if not args.input:
            synthetic.write_imagefolder(
                data, n_per_class=max(2, args.n // 3), size=args.src_size, ext=f".{args.format}"
            )
        out = os.path.join(wd, f"run-{time.time_ns()}")
        with C.ray_session(args.address, args.num_cpus):
            worker_nice = C.ray_worker_niceness()
            plain_cfg = train_config(args, data, os.path.join(wd, "unused"))
            plain_nice, (plain_s, n_train, plain_cpu) = C.call_niced(
                worker_nice, plain_loop, plain_cfg, args.device, threads, omp_threads=threads
            )
            cores = max(1, int(args.workers * args.cpus_per_worker))
            _, (all_s, _, _) = C.call_niced(
                worker_nice, plain_loop, plain_cfg, args.device, cores, omp_threads=cores
            )
            side = []
            if not args.no_side_by_side:  # the same processes competing for the same cores as the ranks
                calls = [
                    ((plain_cfg, args.device, threads), {"shard": (k, args.workers)})
                    for k in range(args.workers)
                ]
                side = [
                    r
                    for _, r in C.call_niced_concurrently(worker_nice, plain_loop, calls, omp_threads=threads)
                ]
            result = run_training(train_config(args, data, out), args.address)  # type: ignore[arg-type]
        text = Storage(endpoint_url=args.endpoint_url).read_bytes(storage.join(out, saved.METRICS)).decode()
        history = [json.loads(line) for line in text.splitlines() if line.strip()]
        ray_s = [float(r["epoch_s"]) for r in history]
        ray_cpu = [float(r["epoch_cpu_s"]) for r in history]  # rank 0's process
    # Every rank runs ceil(n / workers) images an epoch (the shards are padded to equal length).
    ray_images = -(-n_train // args.workers) * args.workers
    ray_rate = [ray_images / s for s in ray_s]
    plain_rate = [n_train / s for s in plain_s]
    ray_steady, plain_steady = _steady(ray_rate), _steady(plain_rate)
    all_steady = _steady([n_train / s for s in all_s])
    # Side by side: each loop's img/s over epochs 2+, averaged over the loops (= per process).
    side_steady = statistics.mean(_steady([n / s for s in secs]) for secs, n, _ in side) if side else None
    # Images per CPU-second: what each side gets done with the CPU time it was given (a shared machine
    # decides how much that is); rank 0 stands for the ranks.
    ray_per_cpu_s = _steady([ray_images / args.workers / c for c in ray_cpu])
    plain_per_cpu_s = _steady([n_train / c for c in plain_cpu])
    results = {
        "train_images": n_train,
        "epochs": args.epochs,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "grad_accum_steps": args.grad_accum_steps,
        "ray_epoch_s": ray_s,
        "plain_epoch_s": plain_s,
        "ray_images_per_s": ray_steady,
        "plain_images_per_s": plain_steady,
        "ray_images_per_s_per_worker": ray_steady / args.workers,
        "per_worker_core_ratio": ray_steady / args.workers / plain_steady,
        "first_epoch_ratio": ray_rate[0] / args.workers / plain_rate[0],
        "plain_all_cores_threads": cores,
        "plain_all_cores_epoch_s": all_s,
        "plain_all_cores_images_per_s": all_steady,
        "per_core_ratio_same_cores": ray_steady / all_steady,
        "side_by_side_epoch_s": [secs for secs, _, _ in side],
        "side_by_side_images_per_s_per_process": side_steady,
        "per_worker_ratio_side_by_side": C.ratio(ray_steady / args.workers, side_steady),
        "ray_epoch_cpu_s_rank0": ray_cpu,
        "plain_epoch_cpu_s": plain_cpu,
        "ray_images_per_cpu_s_per_worker": ray_per_cpu_s,
        "plain_images_per_cpu_s": plain_per_cpu_s,
        "per_cpu_second_ratio": ray_per_cpu_s / plain_per_cpu_s,
        "ray_cpu_share": _steady([c / s for c, s in zip(ray_cpu, ray_s, strict=True)]),
        "plain_cpu_share": _steady([c / s for c, s in zip(plain_cpu, plain_s, strict=True)]),
        "ray_total_duration_s": result.duration_s,
        "ray_worker_niceness": worker_nice,
        "plain_niceness": plain_nice,
        "driver_niceness": os.nice(0),
    }
    return C.print_and_report(
        "train_throughput",
        args,
        results,
        title=f"train throughput: {args.arch} @ {args.image_size}, batch {args.batch_size}/worker "
        f"(a step every {args.grad_accum_steps}), "
        f"{args.workers} DDP worker(s) x {args.cpus_per_worker} CPU vs 1 process x {threads} thread(s)",
        rows=[
            ("train images / epoch", n_train),
            ("plain loop epoch s", " ".join(f"{s:.1f}" for s in plain_s)),
            ("Ray Train epoch s", " ".join(f"{s:.1f}" for s in ray_s)),
            ("plain img/s (epochs 2+)", plain_steady),
            ("Ray Train img/s (epochs 2+)", ray_steady),
            ("Ray Train img/s per worker", results["ray_images_per_s_per_worker"]),
            ("per worker-core ratio", results["per_worker_core_ratio"]),
            ("per worker-core ratio, epoch 1", results["first_epoch_ratio"]),
            (f"plain loop on all {cores} cores ({cores} threads) img/s", all_steady),
            ("per-core ratio, same cores (Ray / that loop)", results["per_core_ratio_same_cores"]),
            (f"{args.workers} plain loops side by side, img/s each", C.fmt(side_steady)),
            ("per worker ratio vs side by side", C.fmt(results["per_worker_ratio_side_by_side"], ".3f")),
            (
                "CPU s / epoch s: Ray rank 0, plain",
                f"{results['ray_cpu_share']:.2f}, {results['plain_cpu_share']:.2f}",
            ),
            ("img per CPU-second: Ray per worker, plain", f"{ray_per_cpu_s:.1f}, {plain_per_cpu_s:.1f}"),
            ("per CPU-second ratio", results["per_cpu_second_ratio"]),
            ("raycv train total s (incl. start-up)", result.duration_s),
            ("niceness: Ray workers, plain loop", f"{worker_nice}, {plain_nice}"),
        ],
        target=TARGET,
    )


if __name__ == "__main__":
    main()

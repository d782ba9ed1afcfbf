"""The ``raycv`` command: parse, validate, call the library, print a one-screen summary.

Exit codes: 0 success; 2 bad usage or invalid config (one message, no traceback, nothing started);
1 runtime failure (a short message and where to look).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from raycv.errors import ConfigError, RaycvError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"raycv: error: {message}\n")


def _add_config_args(p: argparse.ArgumentParser, address: bool = True) -> None:
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key.path=value",
        help="override any config key (value parsed as YAML); repeatable",
    )
    if address:
        p.add_argument(
            "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raycv", description="Distributed training and bulk annotation of image archives on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_config_args(sub.add_parser("train", help="train a model with Ray Train (SPEC §3)"))
    _add_config_args(sub.add_parser("annotate", help="annotate an image archive into Parquet with Ray Data"))
    ev = sub.add_parser("evaluate", help="metrics of a trained run on a labelled dataset, as JSON")
    _add_config_args(ev, address=False)
    ev.add_argument("--split", choices=["val", "all"], default="val")
    demo = sub.add_parser("demo", help="end to end on generated data with a local Ray (minutes on a CPU)")
    demo.add_argument("--workdir", default="raycv-demo")
    models = sub.add_parser("models", help="list the model registry")
    models.add_argument("--task", default=None)
    models.add_argument("pattern", nargs="?", default="*")
    return parser


def _validated(args: argparse.Namespace, kind: str) -> Any:
    from raycv.config import check_paths, load_config

    cfg = load_config(args.config, args.overrides, kind=kind)  # type: ignore[arg-type]
    check_paths(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from raycv.training import run_training

    cfg = _validated(args, "train")
    result = run_training(cfg, args.address)
    shown = ", ".join(f"{k}={v}" for k, v in result.best_metrics.items())
    print(
        f"\nraycv train: done in {result.duration_s:.1f}s, {result.epochs} epochs\n"
        f"  best: {shown}\n  run directory: {result.run_dir} (model.json, model.pt, metrics.jsonl)"
    )
    return EXIT_OK


def cmd_annotate(args: argparse.Namespace) -> int:
    from raycv.annotation import run_annotation

    s = run_annotation(_validated(args, "annotate"), args.address)
    print(
        f"\nraycv annotate: {s.total} images: {s.ok} ok, {s.error} error, {s.skipped} skipped "
        f"in {s.duration_s:.1f}s ({s.images_per_s:.1f} img/s)\n"
        f"  output: {s.output}/images (Parquet), summary: {s.output}/_summary.json\n"
        f"  run_id={s.run_id} model_id={s.model_id}"
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from raycv.evaluation import evaluate

    print(json.dumps(evaluate(_validated(args, "train"), args.split), indent=2))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from raycv.demo import run_demo

    run_demo(args.workdir)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from raycv.models import TASKS, get_model_info, list_models

    if args.task is not None and args.task not in TASKS:
        raise ConfigError("--task", args.task, f"Choose one of {', '.join(TASKS)}.")
    names = list_models(args.pattern, task=args.task)
    width = max((len(n) for n in names), default=4)
    print(f"{'name':<{width}}  {'task':<22} {'source':<12} min_size")
    for name in names:
        info = get_model_info(name)
        print(f"{name:<{width}}  {info.task:<22} {info.source:<12} {info.min_input_size}")
    print(f"\n{len(names)} models")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "annotate": cmd_annotate,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"raycv: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RaycvError, FileNotFoundError, PermissionError) as exc:
        print(
            f"raycv {args.command}: {type(exc).__name__}: {exc}\n"
            "  (Ray's logs: /tmp/ray/session_latest/logs, or the dashboard's job page)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("raycv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

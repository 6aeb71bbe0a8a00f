"""The ``medfed`` command: one face over the parts.

Sub-commands parse arguments, validate them and call one function of a part;
known input errors end in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _positive(kind: type) -> callable:
    """An argparse type for numbers > 0 (argparse then prints the one-line error)."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pooled (centralised) training: the upper bound a federation is compared with",
        description="Train a MedViTV2 variant on one dataset's pooled training split, select the epoch "
        "by the mean of validation ACC and AUC (averaged over a trailing window of epochs) and report "
        "test ACC/AUC.",
    )
    p.add_argument("--dataset", default="breastmnist", help="MedMNIST 2D flag (default: breastmnist)")
    p.add_argument("--data-root", default=None, help="folder with the official .npz files (default: the embedded BreastMNIST)")
    p.add_argument("--model", default="nano", help="variant: nano, tiny, small, base, large (default: nano)")
    p.add_argument("--img-size", type=int, default=28, choices=(28, 64, 128, 224))
    from medfed.config import TrainConfig

    train = TrainConfig()  # defaults shared with the experiment config's train section
    p.add_argument("--epochs", type=_positive(int), default=100)
    p.add_argument("--batch-size", type=_positive(int), default=train.batch_size)
    p.add_argument("--optimizer", default=train.optimizer, choices=("adamw", "sgd"))
    p.add_argument("--lr", type=_positive(float), default=train.lr)
    p.add_argument("--weight-decay", type=float, default=train.weight_decay)
    p.add_argument("--loss-weighting", default=None, choices=("none", "sqrt", "balanced"),
                   help="class weighting of the loss (default: balanced)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--hflip-p", type=float, default=None,
                   help="mirroring probability in training (default: 0.5)")
    p.add_argument("--selection-window", type=_positive(int), default=None,
                   help="epochs averaged when selecting the epoch by validation (default: epochs // 10, 1..5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--out", default="runs/train", help="run folder for model.safetensors and metrics.json")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from medfed.client.task import TrainSettings
    from medfed.train import train_pooled

    model = args.model if args.model.startswith("medvit_v2_") else f"medvit_v2_{args.model}"
    settings = TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay,
    )
    recipe = {"label_smoothing": args.label_smoothing, "hflip_p": args.hflip_p, "selection_window": args.selection_window}
    if args.loss_weighting is not None:
        recipe["loss_weighting"] = args.loss_weighting
    train_pooled(
        dataset=args.dataset, data_root=args.data_root, model_name=model, img_size=args.img_size,
        settings=settings, out_dir=args.out, seed=args.seed, device=args.device, **recipe,
    )


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a whole federation on this machine (Flower simulation engine)",
        description="Run an experiment YAML through Flower's simulation engine. With no arguments: a small "
        "3-site FedAvg federation on the embedded BreastMNIST that finishes on a CPU in a few minutes.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: the built-in small federation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rounds=5 --set train.lr=0.01 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run from its last complete round")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> None:
    from medfed.config import load_config
    from medfed.simulation import simulate

    if args.resume is not None:
        run_dir = Path(args.resume)
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"No config.yaml in {run_dir}: --resume needs a medfed run folder.")
        cfg = load_config(args.config or config, args.overrides)
        simulate(cfg, run_dir=run_dir, resume=True)
    else:
        cfg = load_config(args.config, args.overrides)
        simulate(cfg)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild report.html and figures from a run folder")
    p.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from medfed.server.report import build_report, print_summary

    path = build_report(args.run_dir)
    print_summary(args.run_dir)
    print(f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfed",
        description="Federated learning of MedViTV2 for medical image classification, on Flower.",
    )
    from medfed import __version__

    parser.add_argument("--version", action="version", version=f"medfed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_simulate(sub)
    _add_report(sub)
    return parser


def _is_input_error(err: BaseException) -> bool:
    """medfed's input errors (each one line: what was expected, what to do) and missing files."""
    from medfed.errors import MedfedError

    return isinstance(err, (MedfedError, FileNotFoundError))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("medfed: interrupted; a simulation can continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only known input errors become one line
        if _is_input_error(err):
            print(f"medfed {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

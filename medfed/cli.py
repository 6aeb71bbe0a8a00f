"""The ``medfed`` command: one face over the parts.

Sub-commands parse arguments, validate them and call one function of a part;
known input errors end in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from medfed.errors import MedfedWarning
from medfed.server.run_files import CONFIG_FILE, MODEL_FILE

__all__ = ["main"]


def _positive(kind: type) -> callable:
    """An argparse type for finite numbers > 0 (argparse then prints the one-line error)."""

    def parse(text: str):
        value = kind(text)
        if not 0 < value < float("inf"):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _number(ok: callable, what: str) -> callable:
    """An argparse float type for values where ``ok(value)`` (argparse prints the one-line error)."""

    def parse(text: str) -> float:
        value = float(text)
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def _seed(text: str) -> int:
    """An argparse type for seeds: ints from 0 to ``MAX_SEED``, as the experiment config takes."""
    from medfed.config import MAX_SEED

    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an int from 0 to {MAX_SEED}, got {text}")
    return value


_seed.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"


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
    p.add_argument("--img-size", type=int, default=28, choices=(28, 64, 128, 224), help="(default: 28)")
    from medfed.config import TrainConfig

    train = TrainConfig()  # defaults shared with the experiment config's train section

    p.add_argument("--epochs", type=_positive(int), default=100, help="(default: 100)")
    p.add_argument("--batch-size", type=_positive(int), default=train.batch_size, help=f"(default: {train.batch_size})")
    p.add_argument("--optimizer", default=train.optimizer, choices=("adamw", "sgd"), help=f"(default: {train.optimizer})")
    p.add_argument("--lr", type=_positive(float), default=train.lr, help=f"learning rate (default: {train.lr:g})")
    p.add_argument("--weight-decay", type=_number(lambda v: 0 <= v < float("inf"), "a number >= 0"),
                   default=train.weight_decay, help=f"(default: {train.weight_decay:g})")
    p.add_argument("--loss-weighting", default=None, choices=("none", "sqrt", "balanced"),
                   help="class weighting of the loss (default: balanced)")
    p.add_argument("--label-smoothing", type=_number(lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0,
                   help="(default: 0)")
    p.add_argument("--hflip-p", type=_number(lambda v: 0 <= v <= 1, "in [0, 1]"), default=None,
                   help="mirroring probability in training (default: 0.5)")
    p.add_argument("--selection-window", type=_positive(int), default=None,
                   help="epochs averaged when selecting the epoch by validation (default: epochs // 10, 1..5)")
    p.add_argument("--seed", type=_seed, default=0, help="(default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--out", default="runs/train", help="run folder for model.safetensors and metrics.json; one "
                   "that already holds a run, or private keys, is refused (default: runs/train)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from medfed.client.task import TrainSettings
    from medfed.train import train_pooled

    if args.selection_window is not None and args.selection_window > args.epochs:
        from medfed.errors import MedfedError

        raise MedfedError(f"--selection-window {args.selection_window} is longer than the run (--epochs "
                          f"{args.epochs}); give at most {args.epochs}.")
    from medfed.models import registered_name

    model = registered_name(args.model)
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
        help="simulate a whole federation on this machine (in-process, or Flower's Ray engine)",
        description="Run an experiment YAML as a simulated federation (simulation.engine: inprocess runs "
        "the sites one after the other in this process; ray runs them on Flower's simulation engine; auto, the "
        "default, picks per machine). With no arguments: a small "
        "3-site FedAvg federation on the embedded BreastMNIST that finishes on a CPU in a few minutes.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: the built-in small federation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set rounds=5 --set train.lr=0.01 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run from its last complete round")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> None:
    from flwr.supercore.logger import update_console_handler

    from medfed.config import load_config
    from medfed.simulation import simulate

    # Flower's log lines carry colour codes: noise in a log file or a pipe.
    update_console_handler(colored=sys.stderr.isatty())

    if args.resume is not None:
        run_dir = Path(args.resume)
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"No {CONFIG_FILE} in {run_dir}: --resume needs a medfed run folder.")
        cfg = load_config(args.config or config, args.overrides, run_folder=args.config is None)
        args.run_dir = run_dir  # for the hint after an interrupt
        run_dir = simulate(cfg, run_dir=run_dir, resume=True)
    else:
        cfg = load_config(args.config, args.overrides)
        args.run_dir = Path(cfg.output_dir) / cfg.name
        run_dir = simulate(cfg)
    print(f"run folder: {run_dir}\nreport: {run_dir / 'report.html'}")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild report.html and figures from a run folder")
    p.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from medfed.server.report import build_report, print_summary

    path = build_report(args.run_dir)
    print_summary(args.run_dir)
    print(f"report: {path}")


def _add_sites(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sites",
        help="preview a federation's sites without training (montage, sizes, class and group mix, corruptions)",
        description="Build every site of an experiment as the simulation would and write DIR/sites.png (the same "
        "training images through each site's profile) and DIR/sites.json, and print the same as a table. "
        "Scenarios: federation.scenario=iid, label-skew, quantity-skew, scanner-shift, scanner-and-label-shift, "
        "group-shift, unseen-hospital.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: the built-in small federation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set federation.scenario=scanner-shift (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for sites.png and sites.json")
    p.set_defaults(func=_run_sites)


def _run_sites(args: argparse.Namespace) -> None:
    from rich.console import Console

    from medfed._io import check_output_folder
    from medfed.config import load_config
    from medfed.sites.preview import PREVIEW_IMAGE, PREVIEW_JSON, preview_sites, sites_table

    cfg = load_config(args.config, args.overrides)
    summary = preview_sites(cfg, check_output_folder(args.out, "--out"))
    Console(width=max(Console().width, 130)).print(sites_table(summary))
    print(f"wrote {Path(args.out) / PREVIEW_IMAGE} and {Path(args.out) / PREVIEW_JSON}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="robustness: test ACC, AUC and balanced error under every corruption and severity (MedMNIST-C)",
        description="Evaluate a model on its dataset's test split, clean and under image corruptions at "
        "severities 1..5; print a table and write robustness.json and robustness.png.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a federated run folder (its final model.safetensors)")
    source.add_argument("--model", metavar="FILE", help="a medfed train output (model.safetensors or its folder)")
    p.add_argument("--dataset", default=None,
                   help="MedMNIST flag (--model; default: from its metrics.json, which it must match)")
    p.add_argument("--data-root", default=None,
                   help="folder with the official .npz files (--model; with --run: instead of the run's data.root)")
    p.add_argument("--img-size", type=int, default=None, choices=(28, 64, 128, 224),
                   help="image size (--model; default: from metrics.json, which it must match)")
    p.add_argument("--model-name", default=None,
                   help="variant, e.g. nano (--model; default: from metrics.json, which it must match)")
    p.add_argument("--corruptions", default="default",
                   help="'default' (the dataset's MedMNIST-C corruptions), 'all', or names separated by commas")
    p.add_argument("--severities", default="1,2,3,4,5", help="severities to run, e.g. 1,3,5")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the corruptions' random draws (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the run or model folder)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from rich.console import Console

    from medfed._io import check_output_folder
    from medfed.robustness import evaluate_robustness, model_from_file, model_from_run, robustness_table

    if args.run is not None:
        for flag, value in (("--dataset", args.dataset), ("--img-size", args.img_size),
                            ("--model-name", args.model_name)):
            if value is not None:
                from medfed.errors import MedfedError

                raise MedfedError(f"{flag} is for --model: --run takes it from the run's config.yaml; leave it out.")
        spec, out = model_from_run(args.run, args.data_root), args.out or args.run
    else:
        spec = model_from_file(args.model, args.dataset, args.data_root, args.img_size, args.model_name)
        out = args.out or spec.weights.parent
    try:
        severities = tuple(int(s) for s in args.severities.split(","))
    except ValueError:
        severities = ()
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities):
        from medfed.errors import MedfedError

        raise MedfedError(f"--severities must be numbers in 1..5 separated by commas. Got {args.severities!r}.")
    names = args.corruptions if args.corruptions in ("default", "all") else args.corruptions.split(",")
    check_output_folder(out, "--out")  # before the work, not after it
    result = evaluate_robustness(spec, names, severities, seed=args.seed, out_dir=out)
    if result["adapted"]:
        print(f"{result['adapted']}.")
    Console(width=max(Console().width, 100)).print(robustness_table(result))
    print(f"wrote {Path(out) / 'robustness.json'} and {Path(out) / 'robustness.png'}")
def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs", help="make the CA, the server certificate and one key per site for a real federation",
        description="Write a certificate authority, the server's TLS certificate and one ECDSA key pair per "
        "site into DIR. Give each site its folder DIR/sites/NAME; keep DIR/ca.key offline.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--server-host", required=True, metavar="HOST",
                   help="DNS name or IP address the sites use to reach the server")
    p.add_argument("--sites", required=True, metavar="NAME[,NAME...]", help="comma-separated site names")
    p.add_argument("--force", action="store_true", help="replace the whole folder: a new CA, new keys for every site listed, sites no longer listed "
                   "removed (each site then needs its new folder)")
    p.set_defaults(func=_run_certs)


def _run_certs(args: argparse.Namespace) -> None:
    from medfed.deploy.certs import make_certs

    sites = [name.strip() for name in args.sites.split(",") if name.strip()]
    written = make_certs(args.out, args.server_host, sites, force=args.force)
    out = Path(args.out)
    print(f"medfed certs: wrote {len(written)} files to {out}")
    print(f"  server: keep {out / 'ca.key'} offline; the server uses ca.crt, server.crt, server.key, trusted_sites.txt")
    for name in sites:
        print(f"  site {name}: copy {out / 'sites' / name} to the site (its site.key must stay there)")


def _add_server(sub: argparse._SubParsersAction) -> None:
    from medfed.deploy.superlink import DEFAULT_ADDRESS

    p = sub.add_parser(
        "server", help="run the federation's server (Flower SuperLink) and the experiment on it",
        description="Start Flower's SuperLink with TLS and site keys, wait for the sites, run the experiment. "
        "Ctrl-C stops it; --resume continues from the last complete round.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: the built-in small federation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--certs", default=None, metavar="DIR", help="the folder 'medfed certs' wrote")
    p.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"where to listen; the one port sites connect to (default: {DEFAULT_ADDRESS})")
    p.add_argument("--run-dir", default=None, metavar="DIR", help="run folder (default: OUTPUT_DIR/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last complete round")
    p.add_argument("--join-timeout", type=_positive(float), default=None, metavar="SECONDS",
                   help="after this long, start with the sites connected if they make the quorum "
                   "(federation.min_sites), else stop (default: wait for all sites)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site keys: a test on a closed network only")
    p.set_defaults(func=_run_server)


def _run_server(args: argparse.Namespace) -> None:
    from medfed.config import load_config
    from medfed.deploy.superlink import run_server

    config = args.config
    if args.resume:
        if args.run_dir is None:
            raise FileNotFoundError("--resume needs --run-dir DIR, the run folder to continue.")
        stored = Path(args.run_dir) / CONFIG_FILE
        if not stored.is_file():
            raise FileNotFoundError(f"No {CONFIG_FILE} in {args.run_dir}: --resume needs a medfed run folder.")
        config = config or stored
    cfg = load_config(config, args.overrides, run_folder=bool(args.resume) and args.config is None)
    args.run_dir = args.run_dir or Path(cfg.output_dir) / cfg.name  # run_server's default; for the hint
    run_dir = run_server(cfg, certs=args.certs, address=args.address, run_dir=args.run_dir, resume=args.resume,
                         insecure=args.insecure, join_timeout_s=args.join_timeout)
    print(f"medfed server: the study is finished; report {run_dir / 'report.html'}, model {run_dir / MODEL_FILE}. "
          "The sites' clients may be stopped (they keep trying to reach the server).", flush=True)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client", help="run one site of a real federation (Flower SuperNode)",
        description="Check the site's data, then connect to the server and train when it asks. Only model "
        "weights and metrics leave the site.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    p.add_argument("--site", required=True, metavar="NAME", help="this site's name, as given to 'medfed certs'")
    p.add_argument("--data", required=True, metavar="PATH", help="the site's data folder")
    p.add_argument("--certs", default=None, metavar="DIR", help="this site's folder from 'medfed certs'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the site keeps its strategy's local state, in SITE/RUN-KEY inside it (default: ./medfed-state)")
    p.add_argument("--max-wait", type=_positive(float), default=None, metavar="SECONDS",
                   help="give up when the server is unreachable for this long (default: keep trying)")
    p.add_argument("--held-out", action="store_true",
                   help="this site only evaluates the global model and never trains (an unseen hospital)")
    p.add_argument("--allow-strategy", action="append", default=[], metavar="MODULE:CLASS",
                   help="run this plug-in strategy's code at the site if the study uses it (repeatable; default: "
                        "medfed's registered strategies only)")
    p.add_argument("--no-pooled-test-metrics", dest="pooled_test_metrics", action="store_false",
                   help="never send histograms of this site's test scores: a study that asks for them "
                        "(federation.pooled_test_metrics) leaves the site out")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site key: a test on a closed network only")
    p.set_defaults(func=_run_client)


def _run_client(args: argparse.Namespace) -> None:
    from medfed.deploy.supernode import run_client

    run_client(server=args.server, site=args.site, data=args.data, certs=args.certs, insecure=args.insecure,
               device=args.device, max_wait_s=args.max_wait, state_dir=args.state_dir, held_out=args.held_out,
               allowed_strategies=args.allow_strategy, pooled_test_metrics=args.pooled_test_metrics)


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
    _add_sites(sub)
    _add_evaluate(sub)
    _add_certs(sub)
    _add_server(sub)
    _add_client(sub)
    return parser


def _is_input_error(err: BaseException) -> bool:
    """medfed's input errors (each one line: what was expected, what to do) and missing files."""
    from medfed.errors import MedfedError

    # A path that is a file where a folder is expected (or the reverse) is the same kind of mistake.
    return isinstance(err, (MedfedError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                            PermissionError))


def _interrupted_message(args: argparse.Namespace) -> str:
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:  # interrupted before the run folder was known
        return "medfed: interrupted"
    from medfed.server.run_files import CONFIG_FILE

    if args.command in ("simulate", "server") and not (Path(run_dir) / CONFIG_FILE).is_file():
        # e.g. a server stopped while it waited for its sites: --resume would find no run there.
        return (f"medfed: interrupted before the run started ({CONFIG_FILE} is not in {run_dir} yet); nothing to "
                "resume: run the same command again")
    step = _resume_step(args)
    return f"medfed: interrupted; {step}" if step else "medfed: interrupted"


def _resume_step(args: argparse.Namespace) -> str:
    """``continue with medfed ... --resume ...`` for a simulate or server run that has begun; "" otherwise."""
    from medfed.server.run_files import CONFIG_FILE

    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or args.command not in ("simulate", "server") or not (Path(run_dir) / CONFIG_FILE).is_file():
        return ""
    if args.command == "simulate":
        from medfed.simulation.run import resume_step

        return resume_step(run_dir)
    return (f"continue with {_server_resume_command(args)} "
            f"(medfed report {shlex.quote(str(run_dir))} reports the rounds done)")


def _disk_full_message(args: argparse.Namespace, err: OSError) -> str:
    """One line for a full disk: run files are written whole or not at all, so nothing written before is lost."""
    where = f" writing {err.filename}" if err.filename else ""
    step = _resume_step(args) or "run the command again"
    return (f"medfed {args.command}: error: {err.strerror or err}{where}; files already written are intact (each is "
            f"replaced whole or not at all): free space, then {step}")


def _server_resume_command(args: argparse.Namespace) -> str:
    """The ``medfed server`` line that continues this server's run with the same sites."""
    from medfed.deploy.superlink import resume_command

    return resume_command(args.run_dir, certs=args.certs, address=args.address, join_timeout_s=args.join_timeout,
                          insecure=args.insecure)


_python_show_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """medfed's own warnings as one line (no source line); others as Python shows them."""
    if issubclass(category, MedfedWarning):
        print(f"medfed: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    from medfed.deploy.processes import interrupt_on_sigterm

    args = build_parser().parse_args(argv)
    # Flower sends usage events to its servers unless told not to (read when flwr is first
    # imported, and inherited by every process medfed starts): off unless the user turned it on.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    shown_by, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        with interrupt_on_sigterm():  # a scheduler's SIGTERM gets Ctrl-C's clean-up and message
            args.func(args)
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only known input errors become one line
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(_disk_full_message(args, err), file=sys.stderr)
            return 1
        if _is_input_error(err):
            print(f"medfed {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        warnings.showwarning = shown_by
    return 0


if __name__ == "__main__":
    sys.exit(main())

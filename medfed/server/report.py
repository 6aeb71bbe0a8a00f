"""The report of a run, built from its metrics log (:mod:`medfed.server.metrics_log`):
HTML page, figures, terminal table.

:func:`build_report` writes ``report.html`` (self-contained: CSS inline, figures embedded as
base64) and ``figures/*.png``; :func:`summary_table` / :func:`print_summary` give a
one-screen summary in the terminal.

Figures: the core ones (:data:`FIGURE_NAMES`) always; then every figure registered
with :func:`register_figure` whose function has something to draw for this run (held-out
sites, patient groups, pooled vs mean, ...); then every ``*.png`` the run directory
itself holds (e.g. ``sites.png``, the site preview a simulation writes). A part of
medfed adds a figure to the report by registering it; nothing here lists them.

Two federation-level test results are shown and named apart: **pooled** (metrics of the
union of the training sites' test sets, ``"evaluate_pooled"``), the headline when the run
has it, and **mean of sites** (the strategy's sample-weighted mean of the per-site
metrics, the round line's ``"evaluate"``). The strategy leaves a site out of that mean
where its metric is undefined (NaN: AUC on a test split of one class), so a mean that
covers only part of the sites says so ("AUC over 1 of 4 sites, 10 of 156 examples").
Held-out sites appear as sites with "(held out)" and count in neither.
"""

from __future__ import annotations

import base64
import html
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from medfed.errors import MedfedError
from medfed.server.metrics_log import RunMetrics, load_run_metrics
from medfed.server.run_files import CONFIG_FILE, METRICS_FILE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURE_NAMES",
    "register_figure",
    "ReportError",
    "RunSummary",
    "SiteSummary",
    "build_report",
    "print_summary",
    "summarize",
    "summary_table",
]

#: Figures written to ``RUN_DIR/figures/<name>.png``, in report order.
FIGURE_NAMES = ("acc", "auc", "loss", "confusion", "bytes", "wall_time")


class ReportError(MedfedError):
    """A run has nothing to report yet."""


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSummary:
    """Final evaluate results of one site, or of the federation ("pooled", "mean of sites").

    ``server_round`` is the last round with an evaluate result for it (None: never evaluated);
    metrics are None when absent. ``num_examples`` is the number of test examples.
    ``coverage`` (means of sites only) maps a metric whose mean leaves sites out (their
    value is NaN) to ``(sites with a value, sites, their examples, all examples)``.
    """

    name: str
    server_round: int | None
    acc: float | None
    auc: float | None
    balanced_acc: float | None
    loss: float | None
    num_examples: int | None
    held_out: bool = False
    coverage: Mapping[str, tuple[int, int, int, int]] = field(default_factory=dict)
    #: Pooled rows: how far the AUC from score histograms may be from the exact AUC.
    auc_error_bound: float | None = None


@dataclass(frozen=True)
class RunSummary:
    """One-screen summary of a run.

    Attributes
    ----------
    name : str
        Run name (config "name", else the run directory's name).
    rounds_done : int
        Number of completed rounds (those with a round record).
    last_round : int
        Highest round number, finished or not.
    global_row : SiteSummary
        "mean of sites": the strategy's sample-weighted mean of the training sites' metrics,
        last round with evaluate results.
    sites : list[SiteSummary]
        One per site, natural order.
    wall_time_s : float
        Sum of the rounds' wall times, in seconds.
    bytes_sent, bytes_received : int
        Payload bytes server -> sites and sites -> server over all rounds.
    """

    name: str
    rounds_done: int
    last_round: int
    global_row: SiteSummary
    sites: list[SiteSummary]
    wall_time_s: float
    bytes_sent: int
    bytes_received: int
    pooled_row: SiteSummary | None = None
    held_out_row: SiteSummary | None = None
    #: The strategy's name when its sites evaluate with weights of their own (Local-only,
    #: FedBN): its pooled row then pools several models' scores.
    own_models: str | None = None
    #: The last round when it has site results but no round record (the run stopped
    #: during it, or is still in it); None when the last round finished.
    incomplete_round: int | None = None
    #: The rounds the run's last start asked for (None: its log has no start record), and
    #: whether that start reached its end.
    planned_rounds: int | None = None
    finished: bool = True

    @property
    def headline(self) -> SiteSummary:
        """The federation's result to read first: pooled when the run has it, else the mean of sites."""
        return self.pooled_row or self.global_row

    def federation_rows(self) -> list[SiteSummary]:
        """The rows below the sites: the headline first, then the other mean(s)."""
        rows = [self.headline, self.global_row, self.held_out_row]
        return [row for index, row in enumerate(rows) if row is not None and all(row is not r for r in rows[:index])]

    @property
    def megabytes_exchanged(self) -> float:
        """Bytes sent plus received, in MB (10**6 bytes)."""
        return (self.bytes_sent + self.bytes_received) / 1e6


def summarize(run_dir: str | Path) -> RunSummary:
    """Compute the :class:`RunSummary` of a run directory.

    Raises
    ------
    MetricsLogError
        If the run directory has no metrics.jsonl, or it is malformed.
    ReportError
        If it holds no round yet.
    """
    run_dir = Path(run_dir)
    return _summarize(run_dir, load_run_metrics(run_dir))


def _summarize(run_dir: Path, run: RunMetrics) -> RunSummary:
    if not run.rounds:
        raise ReportError(
            f"{run_dir / METRICS_FILE} holds no round results yet: wait for the first round to finish."
        )
    sites = [_site_summary(run, site) for site in run.sites]
    own_models = _sites_keep_weights(run_dir)
    return RunSummary(
        name=_run_name(run_dir),
        rounds_done=len(run.round_records),
        last_round=run.rounds[-1],
        incomplete_round=None if run.rounds[-1] in run.round_records else run.rounds[-1],
        global_row=_global_summary(run),
        sites=sites,
        wall_time_s=float(sum(_round_wall_time(run, r) or 0.0 for r in run.rounds)),
        bytes_sent=sum(_round_bytes(run, r, "bytes_sent") for r in run.rounds),
        bytes_received=sum(_round_bytes(run, r, "bytes_received") for r in run.rounds),
        pooled_row=_phase_summary(run, "evaluate_pooled", POOLED_OWN_MODELS if own_models else "pooled"),
        held_out_row=_phase_summary(run, "held_out", "held-out mean"),
        own_models=own_models,
        planned_rounds=_planned_rounds(run),
        finished=run.finished or not run.starts,
    )


def _planned_rounds(run: RunMetrics) -> int | None:
    planned = run.starts[-1].get("num_rounds") if run.starts else None
    return planned if isinstance(planned, int) and not isinstance(planned, bool) else None


#: The pooled row's name when the sites evaluate with weights of their own.
POOLED_OWN_MODELS = "pooled (own models)"


def _sites_keep_weights(run_dir: Path) -> str | None:
    """The run's strategy name when its sites keep weights of their own between rounds, else None."""
    name = _config_value(run_dir, "strategy", "name")
    if not isinstance(name, str):
        return None
    try:
        from medfed.strategies import ClientHooks, client_hooks_for

        hooks = client_hooks_for(name)
    except Exception:  # an unknown plug-in must not stop the report
        return None
    return name if hooks.local_state is not ClientHooks.local_state else None


def _phase_summary(run: RunMetrics, phase: str, name: str) -> SiteSummary | None:
    """The last round's ``phase`` aggregate of the round lines, or None when the run has none."""
    for server_round in reversed(run.rounds):
        metrics = run.aggregate(server_round, phase)
        if metrics:
            count = metrics.get("num_examples")
            coverage = _coverage(run, server_round, "evaluate", held_out=True) if phase == "held_out" else {}
            return SiteSummary(
                name=name, server_round=server_round, acc=_number(metrics.get("acc")), auc=_number(metrics.get("auc")),
                balanced_acc=_number(metrics.get("balanced_acc")), loss=_number(metrics.get("loss")),
                num_examples=int(count) if isinstance(count, (int, float)) else None, coverage=coverage,
                auc_error_bound=_number(metrics.get("auc_error_bound")),
            )
    return None


#: The metrics of the summary, with their names in tables, figures and coverage notes.
_METRIC_NAMES = {"acc": "ACC", "auc": "AUC", "balanced_acc": "Bal. ACC", "loss": "loss"}


def _coverage(
    run: RunMetrics, server_round: int, phase: str, *, held_out: bool = False
) -> dict[str, tuple[int, int, int, int]]:
    """The metrics whose mean over the (held-out or training) sites of a round leaves sites out.

    metric -> (sites with a finite value, sites with a record, their examples, all their
    examples), for the metrics some site has and some other site lacks or has as NaN.
    """
    records = [run.site_record(server_round, phase, site) for site in run.sites]
    records = [r for r in records if r is not None and bool(r.get("held_out", False)) == held_out]
    coverage = {}
    for metric in _METRIC_NAMES:
        present = [r for r in records if _finite((r.get("metrics") or {}).get(metric))]
        if present and len(present) < len(records):
            coverage[metric] = (
                len(present), len(records),
                sum(r.get("num_examples", 0) for r in present), sum(r.get("num_examples", 0) for r in records),
            )
    return coverage


def _coverage_text(row: SiteSummary) -> str:
    """ "AUC over 1 of 4 sites, 10 of 156 examples" for each metric the mean leaves sites out of ("" if none)."""
    return "; ".join(
        f"{_METRIC_NAMES[metric]} over {sites} of {total_sites} sites, {examples} of {total_examples} examples"
        for metric, (sites, total_sites, examples, total_examples) in row.coverage.items()
    )


def _site_summary(run: RunMetrics, site: str) -> SiteSummary:
    for server_round in reversed(run.rounds):
        record = run.site_record(server_round, "evaluate", site)
        if record is not None:
            metrics = record.get("metrics") or {}
            return SiteSummary(
                name=site,
                server_round=server_round,
                acc=_number(metrics.get("acc")),
                auc=_number(metrics.get("auc")),
                balanced_acc=_number(metrics.get("balanced_acc")),
                loss=_number(metrics.get("loss")),
                num_examples=record.get("num_examples"),
                held_out=bool(record.get("held_out", False)),
            )
    return SiteSummary(site, None, None, None, None, None, None)


#: The name of the strategy's sample-weighted mean of the sites' metrics, in tables and figures.
MEAN_OF_SITES = "mean of sites"


def _global_summary(run: RunMetrics) -> SiteSummary:
    for server_round in reversed(run.rounds):
        metrics = run.aggregate(server_round, "evaluate")
        if metrics:
            records = [run.site_record(server_round, "evaluate", site) for site in run.sites]
            counts = [r["num_examples"] for r in records
                      if r is not None and "num_examples" in r and not r.get("held_out")]
            return SiteSummary(
                name=MEAN_OF_SITES,
                server_round=server_round,
                acc=_number(metrics.get("acc")),
                auc=_number(metrics.get("auc")),
                balanced_acc=_number(metrics.get("balanced_acc")),
                loss=_number(metrics.get("loss")),
                num_examples=sum(counts) if counts else None,
                coverage=_coverage(run, server_round, "evaluate"),
            )
    return SiteSummary(MEAN_OF_SITES, None, None, None, None, None, None)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _finite(value: Any) -> bool:
    number = _number(value)
    return number is not None and math.isfinite(number)


def _round_wall_time(run: RunMetrics, server_round: int) -> float | None:
    return _number(run.round_records.get(server_round, {}).get("wall_time_s"))


def _round_bytes(run: RunMetrics, server_round: int, key: str) -> int:
    """A round's bytes from its round record, else the sum over its site records."""
    record = run.round_records.get(server_round, {})
    if key in record:
        return _count(record[key])
    return sum(_count(value.get(key, 0)) for (r, _, _), value in run.site_records.items() if r == server_round)


def _count(value: Any) -> int:
    """A byte count as an int; 0 for what is none (NaN or null in a hand-edited or damaged log)."""
    return int(value) if _finite(value) else 0


def _class_names(run_dir: Path) -> list[str] | None:
    """The class names of the run's MedMNIST dataset (config ``data.dataset``), or None when unknown."""
    from medfed._medmnist_info import INFO_2D  # medfed's copy of medmnist.INFO: no torch, no medmnist

    flag = _config_value(run_dir, "data", "dataset")
    labels = INFO_2D[flag]["label"] if isinstance(flag, str) and flag in INFO_2D else None
    return [labels[str(index)] for index in range(len(labels))] if labels else None


def _run_name(run_dir: Path) -> str:
    name = _config_value(run_dir, "name")
    return name if isinstance(name, str) and name else run_dir.resolve().name


def _config_value(run_dir: Path, *keys: str) -> Any:
    """``config.yaml``'s value at ``keys`` (None when absent): a missing or broken config.yaml
    must not stop the report, whose figures then fall back (numbered classes, the folder's name)."""
    try:
        import yaml

        value = yaml.safe_load(_read_config(run_dir) or "")
    except Exception:
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _read_config(run_dir: Path) -> str | None:
    path = run_dir / CONFIG_FILE
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _metric_cells(row: SiteSummary) -> list[str]:
    """ACC, AUC, balanced ACC, loss; "*" marks a mean that leaves sites out (see :func:`_coverage_text`),
    "±b" a pooled AUC that may be up to ``b`` from the exact one (see :func:`_coverage_notes`)."""
    cells = [
        _fmt(getattr(row, metric)) + ("*" if metric in row.coverage and _fmt(getattr(row, metric)) != "–" else "")
        for metric in _METRIC_NAMES
    ]
    if _shows_bound(row):
        cells[list(_METRIC_NAMES).index("auc")] += f" ±{row.auc_error_bound:.3f}"
    return cells


def _shows_bound(row: SiteSummary) -> bool:
    return _finite(row.auc) and _finite(row.auc_error_bound) and row.auc_error_bound >= 0.0005


def _coverage_notes(summary: RunSummary) -> list[str]:
    """One note per federation row whose mean leaves sites out: "* mean of sites: AUC over 1 of 4 sites, ..."."""
    notes = [f"* {row.name}: {_coverage_text(row)}" for row in summary.federation_rows() if row.coverage]
    bounded = [row.name for row in summary.federation_rows() if _shows_bound(row)]
    if bounded:
        notes.append(f"± {bounded[0]} AUC: from the sites' score histograms; the exact "
                     "AUC lies within ± this bound (scores that share a bin count as ties)")
    if summary.own_models and summary.pooled_row is not None:
        notes.append(f"{POOLED_OWN_MODELS}: each site's test images scored by that site's own model "
                     f"({summary.own_models} keeps weights at the sites); no one model scores them all")
    return notes


def _rounds_text(summary: RunSummary) -> str:
    """ "1 round", "3 rounds (last: 5)", "no round completed · round 1 not finished",
    "3 of 4 rounds · run not finished" (stopped after a round, without its end)."""
    done = summary.rounds_done
    text = f"{done} round{'' if done == 1 else 's'}" if done else "no round completed"
    if summary.incomplete_round is not None:
        return f"{text} · round {summary.incomplete_round} not finished"
    if not summary.finished and summary.planned_rounds is not None:  # killed after a round, even its last
        text = f"{done} of {summary.planned_rounds} rounds · run not finished"
    return text if summary.last_round == done else f"{text} (last: {summary.last_round})"


def summary_table(run_dir: str | Path) -> Table:
    """A rich table: per-site final evaluate ACC/AUC/balanced ACC/loss/examples, then the federation's.

    The federation's rows: "pooled" (bold, when the run has it), "mean of sites" and
    "held-out mean". The caption gives the rounds done, the total wall time and the MB
    exchanged, and the coverage of a mean that leaves sites out.
    """
    summary = summarize(run_dir)
    table = Table(
        title=f"medfed run {summary.name}",
        caption="\n".join([
            f"{_rounds_text(summary)} · {summary.wall_time_s:.1f} s wall time · "
            f"{summary.megabytes_exchanged:.2f} MB exchanged",
            *_coverage_notes(summary),
        ]),
    )
    for header in ("Site", "Round", "ACC", "AUC", "Bal. ACC", "Loss", "Examples"):
        table.add_column(header, justify="left" if header == "Site" else "right")
    for row in [*summary.sites, *summary.federation_rows()]:
        table.add_row(
            row.name + (" (held out)" if row.held_out else ""),
            "–" if row.server_round is None else str(row.server_round),
            *_metric_cells(row),
            "–" if row.num_examples is None else str(row.num_examples),
            style="bold" if row is summary.headline else None,
            end_section=row is summary.sites[-1] if summary.sites else False,
        )
    return table


def print_summary(run_dir: str | Path, console: Console | None = None) -> None:
    """Print :func:`summary_table` to ``console`` (default: a new stdout console)."""
    (console or Console()).print(summary_table(run_dir))


# --------------------------------------------------------------------------------------
# Figures and HTML
# --------------------------------------------------------------------------------------


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/figures/*.png``; return the HTML path.

    Raises
    ------
    MetricsLogError
        If the run directory has no metrics.jsonl, or it is malformed.
    ReportError
        If it holds no round yet.
    """
    run_dir = Path(run_dir)
    run = load_run_metrics(run_dir)
    summary = _summarize(run_dir, run)
    for folder in (run_dir, run_dir / "figures"):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ReportError(
                f"Cannot write the report into {folder}: no write permission; copy the run folder somewhere "
                "writable and run medfed report on the copy."
            )
    figure_dir = run_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    figures = list(zip(FIGURE_NAMES, _make_figures(run, _class_names(run_dir))))
    for name, (_, draw) in _REGISTERED.items():
        figure = draw(run, _new_figure)
        if figure is not None:
            figures.append((name, figure))
    png_paths = []
    for name, figure in figures:
        png_path = figure_dir / f"{name}.png"
        figure.savefig(png_path, dpi=100, bbox_inches="tight")
        png_paths.append(png_path)
    # Images the run directory holds itself (the site preview, a robustness figure ...).
    png_paths += sorted(run_dir.glob("*.png"))
    html_path = run_dir / "report.html"
    html_path.write_text(_html(summary, run, png_paths, _read_config(run_dir)), encoding="utf-8")
    return html_path


# name -> (caption, draw(run, new_figure) -> Figure | None); filled by register_figure.
_REGISTERED: dict[str, tuple[str, Any]] = {}

#: Captions of images the run directory may hold itself (others are captioned by name).
RUN_DIR_IMAGE_CAPTIONS = {
    "sites": "The sites of this federation: the same training images through each site's profile "
             "(its corruption chain, and its patient groups' own shift); see sites.json.",
}


def register_figure(name: str, caption: str):
    """Add a figure to every report: ``@register_figure("held_out", "caption")``.

    The decorated function takes ``(run: RunMetrics, new_figure)`` (``new_figure(width,
    height)`` gives an Agg-backed Figure) and returns a Figure, or None when the run
    has nothing for it (the report then leaves it out). Figures appear after the core
    ones, in registration order, as ``figures/<name>.png``.
    """

    if name in FIGURE_NAMES:
        raise ValueError(f"Report figure {name!r} is one of the report's own ({', '.join(FIGURE_NAMES)}); "
                         "register it under another name.")

    def decorator(draw):
        if name in _REGISTERED:
            warnings.warn(f"Report figure {name!r} registered twice; the later one is used.", stacklevel=2)
        _REGISTERED[name] = (caption, draw)
        return draw

    return decorator


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _make_figures(run: RunMetrics, class_names: list[str] | None = None) -> list[Figure]:
    # Figure objects with the Agg canvas directly: no pyplot, so no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
        figure = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(figure)
        return figure

    colors = {site: f"C{index % 10}" for index, site in enumerate(run.sites)}
    figures = []
    for metric, label in (("acc", "Accuracy"), ("auc", "AUC")):
        figure = new_figure()
        _plot_metric(figure.add_subplot(), run, "evaluate", metric, colors, f"Test {label} per round")
        figures.append(figure)
    figure = new_figure(10.0, 4.0)
    train_axes, evaluate_axes = figure.subplots(1, 2)
    _plot_metric(train_axes, run, "train", "loss", colors, "Train loss per round")
    _plot_metric(evaluate_axes, run, "evaluate", "loss", colors, "Test loss per round")
    figures.append(figure)
    figures.append(_confusion_figure(run, new_figure, class_names))
    figures.append(_bytes_figure(run, new_figure()))
    figures.append(_wall_time_figure(run, new_figure()))
    return figures


def _series(run: RunMetrics, values: list[Any]) -> tuple[list[int], list[float]]:
    """Keep the rounds that have a number (others are gaps)."""
    pairs = [(r, float(v)) for r, v in zip(run.rounds, values) if _number(v) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot_metric(
    axes: Axes, run: RunMetrics, phase: str, metric: str, colors: dict[str, str], title: str
) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_title(title)
    plotted = False
    x, y = _round_series(run, "evaluate_pooled", metric) if phase == "evaluate" else ([], [])
    if x:
        axes.plot(x, y, label="pooled", **_POOLED_STYLE)
        plotted = True
    x, y = _round_series(run, phase, metric)
    if x:
        axes.plot(x, y, label=MEAN_OF_SITES + _coverage_label(run, phase, metric), **_MEAN_STYLE)
        plotted = True
    for site in run.sites:
        records = [run.site_record(r, phase, site) for r in run.rounds]
        x, y = _series(run, [(rec.get("metrics") or {}).get(metric) if rec else None for rec in records])
        if x:
            held_out = any(rec.get("held_out") for rec in records if rec)
            axes.plot(x, y, color=colors[site], linewidth=1.2, marker=".", alpha=0.85,
                      linestyle="--" if held_out else "-", label=f"{site} (held out)" if held_out else site)
            plotted = True
    if not plotted:
        _no_data(axes, f"No {phase} {metric} in this run")
        return
    axes.set_xlabel("round")
    axes.set_ylabel(metric)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one round: one tick, "1"
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2 if len(run.sites) > 6 else 1)


#: How the federation's lines are drawn in every figure: pooled (the headline) black dots on
#: top of the mean of sites' grey hollow squares, so that both show where they coincide.
_POOLED_STYLE: dict[str, Any] = {"color": "black", "linewidth": 2.5, "marker": "o", "markersize": 6, "zorder": 3}
_MEAN_STYLE: dict[str, Any] = {
    "color": "0.5", "linewidth": 2.0, "marker": "s", "markersize": 9, "markerfacecolor": "none", "zorder": 2.5,
}


def _coverage_label(run: RunMetrics, phase: str, metric: str, *, held_out: bool = False) -> str:
    """" (AUC over 1 of 4 sites)" when the mean of sites of ``metric`` leaves sites out ("" when it never does)."""
    aggregate = "held_out" if held_out else phase
    rounds = [r for r in run.rounds if _finite(run.aggregate(r, aggregate).get(metric))]
    partial = [c[metric] for r in rounds if metric in (c := _coverage(run, r, phase, held_out=held_out))]
    if not partial:
        return ""
    name = _METRIC_NAMES[metric]
    if len(partial) == len(rounds) and len({(sites, total) for sites, total, _, _ in partial}) == 1:
        return f" ({name} over {partial[0][0]} of {partial[0][1]} sites)"
    return f" ({name} over part of the sites in {len(partial)} of {len(rounds)} rounds)"


def _tick_names(names: list[str] | None, count: int) -> list[str]:
    """Short class names for a confusion matrix's ``count`` rows (indices when the names do not fit it)."""
    if names is None or len(names) != count:
        return [str(index) for index in range(count)]
    return [name if len(name) <= 14 else name[:13].rstrip(" ,") + "…" for name in names]


def _confusion_figure(run: RunMetrics, new_figure: Any, class_names: list[str] | None = None) -> Figure:
    with_confusion = [
        key[0] for key, record in run.site_records.items() if key[1] == "evaluate" and "confusion" in record
    ]
    if not with_confusion:
        figure = new_figure()
        _no_data(figure.add_subplot(), "No confusion matrices in this run")
        return figure
    last_round = max(with_confusion)
    entries = []
    for site in run.sites:
        record = run.site_record(last_round, "evaluate", site)
        if record is not None and "confusion" in record:
            name = f"{site} (held out)" if record.get("held_out") else site
            entries.append((name, np.asarray(record["confusion"], dtype=np.int64)))
    columns = min(len(entries), 4)
    rows = math.ceil(len(entries) / columns)
    figure = new_figure(3.0 * columns + 0.5, 2.9 * rows + 0.5)
    figure.suptitle(f"Test confusion matrices, round {last_round} (rows: true, columns: predicted)")
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, (site, matrix) in zip(grid, entries):
        title, names = site, _tick_names(class_names, matrix.shape[-1])
        if matrix.ndim == 3:  # multi-label: per-label [L, 2, 2], shown summed (micro)
            title, names = f"{site} (sum of {matrix.shape[0]} labels)", ["negative", "positive"]
            matrix = matrix.sum(axis=0)
        axes.imshow(matrix, cmap="Blues", vmin=0)
        axes.set_title(title, fontsize="medium")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (true, predicted), count in np.ndenumerate(matrix):
            axes.text(
                predicted, true, str(count), ha="center", va="center", fontsize="small",
                color="white" if count > threshold else "black",
            )
        small = "x-small" if len(names) > 4 else "small"
        axes.set_xticks(range(matrix.shape[1]), names, fontsize=small, rotation=90 if len(names) > 2 else 0)
        axes.set_yticks(range(matrix.shape[0]), names, fontsize=small)
    for axes in grid[len(entries):]:
        axes.set_visible(False)
    return figure


def _bytes_figure(run: RunMetrics, figure: Figure) -> Figure:
    axes = figure.add_subplot()
    axes.set_title("Payload exchanged per round")
    sent = np.array([_round_bytes(run, r, "bytes_sent") for r in run.rounds]) / 1e6
    received = np.array([_round_bytes(run, r, "bytes_received") for r in run.rounds]) / 1e6
    if not (sent.any() or received.any()):
        _no_data(axes, "No byte counts in this run")
        return figure
    positions = np.arange(len(run.rounds))
    axes.bar(positions - 0.2, sent, width=0.4, label="server → sites")
    axes.bar(positions + 0.2, received, width=0.4, label="sites → server")
    axes.set_xticks(positions, [str(r) for r in run.rounds])
    axes.set_xlabel("round")
    axes.set_ylabel("MB (10⁶ bytes)")
    axes.set_ylim(0, 1.25 * max(sent.max(), received.max()))  # headroom for the legend
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", ncols=2)
    return figure


def _wall_time_figure(run: RunMetrics, figure: Figure) -> Figure:
    axes = figure.add_subplot()
    axes.set_title("Wall time per round")
    times = [_round_wall_time(run, r) for r in run.rounds]
    if all(t is None for t in times):
        _no_data(axes, "No wall times in this run")
        return figure
    positions = np.arange(len(run.rounds))
    axes.bar(positions, [t or 0.0 for t in times], width=0.6, color="C2")
    axes.set_xticks(positions, [str(r) for r in run.rounds])
    axes.set_xlabel("round")
    axes.set_ylabel("seconds")
    axes.grid(axis="y", alpha=0.3)
    return figure


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray")
    axes.set_xticks([])
    axes.set_yticks([])


_FIGURE_CAPTIONS = {
    "acc": "Test accuracy per round: pooled test set (black, when the sites send score histograms), mean of "
           "sites (grey: the sample-weighted mean of the sites' accuracy) and per site (held-out sites dashed).",
    "auc": "Test AUC per round: pooled test set (black, when the sites send score histograms), mean of sites "
           "(grey: the sample-weighted mean of the sites' AUC, leaving out sites where it is undefined, e.g. a "
           "test split of one class; the legend says when it covers only part of the sites) and per site "
           "(held-out sites dashed).",
    "loss": "Train and test loss per round: mean of sites (grey) and per site.",
    "confusion": "Per-site test confusion matrices of the last round that has them (held-out sites marked).",
    "bytes": "Model payload sent to and received from the sites per round.",
    "wall_time": "Wall time per round.",
}

def _groups_html(run: RunMetrics) -> str:
    """Per-group pooled ACC/AUC and ES-ACC/ES-AUC of the last round that has them ("" without groups)."""
    for server_round in reversed(run.rounds):
        pooled = run.aggregate(server_round, "evaluate_pooled")
        if "es_acc" not in pooled:
            continue
        names = next((s.get("groups") for s in reversed(run.starts) if s.get("groups")), None) or []
        count = sum(1 for key in pooled if key.startswith("acc_group_"))
        rows = []
        for g in range(count):
            name = html.escape(names[g]) if g < len(names) else f"group {g}"
            n = pooled.get(f"n_group_{g}")
            rows.append(f"<tr><td>{name}</td><td>{_fmt(_number(pooled.get(f'acc_group_{g}')))}</td>"
                        f"<td>{_fmt(_number(pooled.get(f'auc_group_{g}')))}</td><td>{'–' if n is None else int(n)}</td></tr>")
        rows.append(f'<tr class="global"><td>all (ES-ACC / ES-AUC)</td><td>{_fmt(_number(pooled.get("acc")))} '
                    f'({_fmt(_number(pooled.get("es_acc")))})</td><td>{_fmt(_number(pooled.get("auc")))} '
                    f'({_fmt(_number(pooled.get("es_auc")))})</td><td>{pooled.get("num_examples", "–")}</td></tr>')
        return (
            f"<h2>Patient groups</h2><p>Pooled test metrics per group, round {server_round}; equity-scaled "
            "ES-ACC = ACC / (1 + sum<sub>g</sub> |ACC<sub>g</sub> - ACC|), ES-AUC alike.</p>"
            "<table><thead><tr><th>Group</th><th>ACC</th><th>AUC</th><th>Examples</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    if next((s.get("groups") for s in reversed(run.starts) if s.get("groups")), None):
        return ("<h2>Patient groups</h2><p>No per-group pooled figures: they need the sites' score histograms, "
                "which a study sends only with <code>federation.pooled_test_metrics: true</code> (off by default), "
                "and an evaluated round; each site's per-group ACC/AUC are in <code>metrics.jsonl</code>.</p>")
    return ""


# --------------------------------------------------------------------------------------
# Figures beyond the core ones: each draws only when the run has what it shows.
# --------------------------------------------------------------------------------------


def _round_series(run: RunMetrics, phase: str, key: str) -> tuple[list[int], list[float]]:
    return _series(run, [run.aggregate(r, phase).get(key) for r in run.rounds])


def _finish_round_axes(axes: Axes, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_title(title)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one round: one tick, "1"
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


@register_figure("pooled_vs_mean", "Federation test ACC and AUC per round: the pooled test set's (black dots) "
                 "and the sample-weighted mean of the sites' metrics (grey squares; a site whose metric is "
                 "undefined is left out of the mean, and the legend says so).")
def _pooled_figure(run: RunMetrics, new_figure: Any) -> Figure | None:
    if not any(run.aggregate(r, "evaluate_pooled") for r in run.rounds):
        return None
    figure = new_figure(10.0, 4.0)
    for axes, metric in zip(figure.subplots(1, 2), ("acc", "auc")):
        x, y = _round_series(run, "evaluate_pooled", metric)
        if x:
            axes.plot(x, y, label="pooled", **_POOLED_STYLE)
        x, y = _round_series(run, "evaluate", metric)
        if x:
            axes.plot(x, y, label=MEAN_OF_SITES + _coverage_label(run, "evaluate", metric), **_MEAN_STYLE)
        _finish_round_axes(axes, f"Federation test {metric.upper()}")
    return figure


@register_figure("held_out", "Held-out sites (never trained on) against the federation's own test sets: "
                 "test ACC and AUC of the global model per round.")
def _held_out_figure(run: RunMetrics, new_figure: Any) -> Figure | None:
    if not any(run.aggregate(r, "held_out") for r in run.rounds):
        return None
    figure = new_figure(10.0, 4.0)
    for axes, metric in zip(figure.subplots(1, 2), ("acc", "auc")):
        for phase, style, label in (("evaluate", "-", "training sites (mean)"), ("held_out", "--", "held-out sites")):
            x, y = _round_series(run, phase, metric)
            if x:
                coverage = _coverage_label(run, "evaluate", metric, held_out=phase == "held_out")
                axes.plot(x, y, linestyle=style, marker="o", label=label + coverage)
        _finish_round_axes(axes, f"Test {metric.upper()}: unseen vs training sites")
    return figure


@register_figure("groups", "Pooled test ACC and AUC per patient group and round, with the equity-scaled "
                 "ES-ACC / ES-AUC (black, dashed).")
def _groups_figure(run: RunMetrics, new_figure: Any) -> Figure | None:
    if not any("es_acc" in run.aggregate(r, "evaluate_pooled") for r in run.rounds):
        return None
    names = next((s.get("groups") for s in reversed(run.starts) if s.get("groups")), None) or []
    count = max(sum(1 for k in run.aggregate(r, "evaluate_pooled") if k.startswith("acc_group_")) for r in run.rounds)
    figure = new_figure(10.0, 4.0)
    for axes, metric in zip(figure.subplots(1, 2), ("acc", "auc")):
        for g in range(count):
            x, y = _round_series(run, "evaluate_pooled", f"{metric}_group_{g}")
            if x:
                axes.plot(x, y, marker=".", label=names[g] if g < len(names) else f"group {g}")
        x, y = _round_series(run, "evaluate_pooled", f"es_{metric}")
        if x:
            axes.plot(x, y, color="black", linestyle="--", marker="o", label=f"ES-{metric.upper()}")
        _finish_round_axes(axes, f"Per-group test {metric.upper()} (pooled)")
    return figure


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.global td { font-weight: bold; border-top: 2px solid #999; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: 0.9rem; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; }
"""


def _left_out_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """(round, phase, site, reason) of a dropout, or of a site left out for its data."""
    if record["event"] == "site_left_out":
        return (f"{record.get('round', '')}–", "all", record.get("site", ""),
                f"{record.get('reason', '')}; left out until its data fits")
    if record["event"] == "site_admitted":
        return (record.get("round", ""), "all", record.get("site", ""), "its data fits the study now; taken back")
    return tuple(record.get(key, "") for key in ("round", "phase", "site", "reason"))


def _dropouts_html(run: RunMetrics) -> list[str]:
    """A table of the sites left out of rounds, of the rounds retried for lack of a quorum,
    and of the rounds that kept the global model (an aggregate that was not finite) or
    skipped their evaluation (too few sites connected)."""
    notes = [(r, what, run.round_records[r][what]) for r in run.rounds for what in ("model_kept", "evaluation_skipped")
             if run.round_records.get(r, {}).get(what)]
    if not run.left_out and not run.quorum_misses and not notes:
        return []
    escape = html.escape
    rows = [
        "<tr>" + "".join(f"<td>{escape(str(value))}</td>" for value in _left_out_row(record)) + "</tr>"
        for record in run.left_out
    ]
    rows += [
        f"<tr><td>{escape(str(r.get('round', '')))}</td><td>train</td><td>–</td><td>quorum missed: "
        f"{escape(str(r.get('sites', '')))} site(s) {escape(str(r.get('stage', '')))}, needed "
        f"{escape(str(r.get('needed', '')))}; round retried</td></tr>"
        for r in run.quorum_misses
    ]
    rows += [
        f"<tr><td>{escape(str(r))}</td><td>{'train' if what == 'model_kept' else 'evaluate'}</td><td>–</td><td>"
        f"{'global model kept' if what == 'model_kept' else 'evaluation skipped'}: {escape(str(reason))}</td></tr>"
        for r, what, reason in notes
    ]
    headers = "".join(f"<th>{h}</th>" for h in ("Round", "Phase", "Site", "Reason"))
    return ["<h2>Sites left out</h2>", f"<table><thead><tr>{headers}</tr></thead><tbody>{''.join(rows)}</tbody></table>"]


def _html(summary: RunSummary, run: RunMetrics, png_paths: list[Path], config: str | None) -> str:
    escape = html.escape
    rows = []
    for row in [*summary.sites, *summary.federation_rows()]:
        cells = [
            escape(row.name + (" (held out)" if row.held_out else "")),
            "–" if row.server_round is None else str(row.server_round),
            *_metric_cells(row),
            "–" if row.num_examples is None else str(row.num_examples),
        ]
        css_class = ' class="global"' if row is summary.headline else ""
        rows.append(f"<tr{css_class}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    notes = "".join(
        f'<p class="note">{escape(note)}; the other sites\' value is undefined (NaN, e.g. AUC on a test split '
        "of one class) and left out of the mean.</p>"
        for note in _coverage_notes(summary)
    )
    headers = "".join(f"<th>{h}</th>" for h in ("Site", "Round", "ACC", "AUC", "Balanced ACC", "Loss", "Examples"))
    resumes = [s.get("resumed_from_round") for s in run.starts if s.get("resumed_from_round")]
    meta = [escape(_rounds_text(summary))]
    if run.starts and run.starts[0].get("time"):
        meta.append(f"started {escape(str(run.starts[0]['time']))}")
    if resumes:
        meta.append("resumed from round " + ", ".join(escape(str(r)) for r in resumes))
    totals = (
        f"Total wall time {summary.wall_time_s:.1f} s · sent {summary.bytes_sent / 1e6:.2f} MB · "
        f"received {summary.bytes_received / 1e6:.2f} MB · {summary.megabytes_exchanged:.2f} MB exchanged "
        "(1 MB = 10<sup>6</sup> bytes)"
    )
    figures = []
    for png_path in png_paths:
        name = png_path.stem
        encoded = base64.b64encode(png_path.read_bytes()).decode("ascii")
        caption = escape(
            _FIGURE_CAPTIONS.get(name) or (_REGISTERED[name][0] if name in _REGISTERED else None)
            or RUN_DIR_IMAGE_CAPTIONS.get(name, name)
        )
        figures.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{escape(name)}" '
            f'title="{escape(png_path.parent.name + "/" if png_path.parent.name == "figures" else "")}'
            f'{escape(png_path.name)}"><figcaption>{caption}</figcaption></figure>'
        )
    config_html = (
        f"<pre>{escape(config)}</pre>" if config is not None else f"<p>No {CONFIG_FILE} in the run directory.</p>"
    )
    title = f"medfed report: {escape(summary.name)}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>',
        "<h2>Summary</h2>",
        "<p>Final test results: each site's last evaluated round; <b>pooled</b> (the federation's result, when "
        "sites send score histograms): the metrics of the union of the training sites' test sets (ACC exact, AUC "
        "from histograms); <b>mean of sites</b>: the sample-weighted mean of the training sites' metrics, over "
        "the sites where a metric is defined (* marks a mean that leaves sites out); <b>held-out mean</b>: the "
        "sites that never train.</p>",
        f"<table><thead><tr>{headers}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        notes,
        _groups_html(run),
        f"<p>{totals}</p>",
        *_dropouts_html(run),
        '<h2>Figures</h2><div class="figures">',
        *figures,
        "</div>",
        f"<h2>Configuration</h2>{config_html}",
        "</body></html>",
    ])

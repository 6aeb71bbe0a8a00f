"""Tests for medfed.server.report: the summary and HTML report, and how they read a run's metrics log
(resumes, duplicates, damaged lines)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from medfed.server.metrics_log import MetricsLog, MetricsLogError, load_run_metrics
from medfed.server.report import FIGURE_NAMES, ReportError, build_report, print_summary, summarize, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("site-0", "site-1", "site-2")
EVAL_EXAMPLES = {"site-0": 10, "site-1": 20, "site-2": 30}
WALL_TIMES = {1: 10.0, 2: 12.5, 3: 11.0}


def _site_acc(site_index: int, server_round: int) -> float:
    return 0.5 + 0.1 * site_index + 0.01 * server_round


def _round_records(server_round: int, *, evaluate: bool = True) -> list[dict]:
    """The records the server writes for one round of the synthetic 3-site run."""
    records = []
    for index, site in enumerate(SITES):
        records.append({
            "event": "site", "round": server_round, "phase": "train", "site": site, "num_examples": 100,
            "metrics": {"loss": 1.0 / server_round + index, "acc": _site_acc(index, server_round)},
            "bytes_sent": 100_000, "bytes_received": 200_000, "time_s": 1.0,
        })
    if evaluate:
        for index, site in enumerate(SITES):
            acc = _site_acc(index, server_round)
            records.append({
                "event": "site", "round": server_round, "phase": "evaluate", "site": site,
                "num_examples": EVAL_EXAMPLES[site],
                "metrics": {
                    "loss": 0.9 - 0.1 * server_round, "acc": acc, "auc": acc + 0.05, "balanced_acc": acc - 0.05,
                },
                "confusion": [[server_round, 2], [3, 4 + index]],
                "bytes_sent": 100_000, "bytes_received": 0,
            })
    accs = [_site_acc(i, server_round) for i in range(3)]
    weights = [EVAL_EXAMPLES[s] for s in SITES]
    global_acc = float(np.average(accs, weights=weights))
    records.append({
        "event": "round", "round": server_round, "wall_time_s": WALL_TIMES[server_round],
        "bytes_sent": 1_000_000, "bytes_received": 2_000_000,
        "train": {"loss": 1.0 / server_round + 1.0, "acc": 0.6},
        "evaluate": {
            "loss": 0.9 - 0.1 * server_round, "acc": global_acc,
            "auc": global_acc + 0.05, "balanced_acc": global_acc - 0.05,
        } if evaluate else {},
    })
    return records


def _write_run(
    run_dir: Path, records: list[dict], config: str | None = "name: synthetic-fedavg\nrounds: 3\n"
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")
    for record in records:
        log.write(record)
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    return run_dir


def _three_round_records() -> list[dict]:
    records = [{"event": "start", "time": "2025-01-01T00:00:00", "resumed_from_round": 0, "num_rounds": 3}]
    for server_round in (1, 2, 3):
        records += _round_records(server_round)
    records.append({"event": "end", "time": "2025-01-01T00:01:00", "rounds_done": 3})
    return records


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "runs" / "synthetic-fedavg", _three_round_records())


# ---------------------------------------------------------------------------- summary


def test_summary_values_match_hand_computed(run_dir: Path) -> None:
    # Execute
    summary = summarize(run_dir)

    # Assert
    assert summary.name == "synthetic-fedavg"
    assert summary.rounds_done == 3 and summary.last_round == 3
    assert summary.wall_time_s == pytest.approx(33.5)  # 10 + 12.5 + 11
    assert summary.bytes_sent == 3_000_000 and summary.bytes_received == 6_000_000
    assert summary.megabytes_exchanged == pytest.approx(9.0)
    assert [s.name for s in summary.sites] == list(SITES)
    site_1 = summary.sites[1]
    assert site_1.server_round == 3
    assert site_1.acc == pytest.approx(0.63)  # 0.5 + 0.1 + 0.03
    assert site_1.auc == pytest.approx(0.68)
    assert site_1.balanced_acc == pytest.approx(0.58)
    assert site_1.num_examples == 20
    # Global: (10*0.53 + 20*0.63 + 30*0.73) / 60 = 39.8 / 60
    assert summary.global_row.acc == pytest.approx(39.8 / 60)
    assert summary.global_row.loss == pytest.approx(0.6)
    assert summary.global_row.num_examples == 60


def test_summary_table_renders_values_and_caption(run_dir: Path) -> None:
    # Prepare
    console = Console(file=io.StringIO(), width=200, color_system=None)

    # Execute
    print_summary(run_dir, console=console)
    text = console.file.getvalue()

    # Assert
    table = summary_table(run_dir)
    assert [c.header for c in table.columns] == ["Site", "Round", "ACC", "AUC", "Bal. ACC", "Loss", "Examples"]
    assert table.row_count == 4
    assert "medfed run synthetic-fedavg" in text
    cells = r"\s*│\s*".join
    assert re.search(cells(["site-1", "3", r"0\.6300", r"0\.6800", r"0\.5800", r"0\.6000", "20"]), text)
    assert re.search(cells(["mean of sites", "3", r"0\.6633", r"0\.7133", r"0\.6133", r"0\.6000", "60"]), text)
    assert "global" not in text and "*" not in text  # every site has every metric: no coverage note
    assert "3 rounds · 33.5 s wall time · 9.00 MB exchanged" in text


def _label_skew_records() -> list[dict]:
    """One round of 4 sites under label skew: only site-1's test split holds both classes (AUC defined)."""
    sites = {"site-0": (105, 0.0, math.nan, 0.0), "site-1": (10, 0.1, 1.0, 0.5),
             "site-2": (1, 1.0, math.nan, 1.0), "site-3": (40, 1.0, math.nan, 1.0)}
    records: list[dict] = [{"event": "start", "resumed_from_round": 0, "num_rounds": 1}]
    for site, (count, acc, auc, balanced_acc) in sites.items():
        records.append({
            "event": "site", "round": 1, "phase": "evaluate", "site": site, "num_examples": count,
            "metrics": {"loss": 0.7, "acc": acc, "auc": auc, "balanced_acc": balanced_acc},
        })
    records.append({
        "event": "round", "round": 1, "wall_time_s": 1.0, "train": {"loss": 0.69},
        # The strategy's NaN-skipping weighted mean: its AUC is site-1's alone.
        "evaluate": {"loss": 0.7262, "acc": 0.2692, "auc": 1.0, "balanced_acc": 0.2949},
        "evaluate_pooled": {"acc": 0.2692, "auc": 0.4782, "balanced_acc": 0.5, "num_examples": 156},
    })
    return records


def test_pooled_is_the_headline_and_a_partial_mean_of_sites_says_its_coverage(tmp_path: Path) -> None:
    # Prepare
    run_dir = _write_run(tmp_path / "skew", _label_skew_records())
    console = Console(file=io.StringIO(), width=200, color_system=None)

    # Execute
    summary = summarize(run_dir)
    print_summary(run_dir, console=console)
    html = build_report(run_dir).read_text(encoding="utf-8")

    # Assert: the summary
    assert summary.headline is summary.pooled_row
    assert summary.global_row.name == "mean of sites"
    assert summary.global_row.coverage == {"auc": (1, 4, 10, 156)}
    # the terminal table: pooled first, the partial AUC starred and explained, no "global"
    text = console.file.getvalue()
    cells = r"\s*│\s*".join
    pooled = re.search(cells(["pooled", "1", r"0\.2692", r"0\.4782", r"0\.5000", "–", "156"]), text)
    mean = re.search(cells(["mean of sites", "1", r"0\.2692", r"1\.0000\*", r"0\.2949", r"0\.7262", "156"]), text)
    assert pooled and mean and pooled.start() < mean.start()
    assert "* mean of sites: AUC over 1 of 4 sites, 10 of 156 examples" in text
    assert "global" not in text
    # the HTML: the pooled row is the bold one, the note is under the table
    assert '<tr class="global"><td>pooled</td>' in html
    assert "<td>mean of sites</td><td>1</td><td>0.2692</td><td>1.0000*</td>" in html
    assert "* mean of sites: AUC over 1 of 4 sites, 10 of 156 examples; the other sites' value is undefined" in html


@pytest.mark.parametrize(("strategy", "own_models"), [("local", True), ("fedbn", True), ("fedavg", False)])
def test_pooled_says_when_it_pools_the_sites_own_models(tmp_path: Path, strategy: str, own_models: bool) -> None:
    # Local-only and FedBN sites evaluate with weights of their own: their pooled scores
    # come from several models, so no single model has the pooled AUC.
    run_dir = _write_run(tmp_path / strategy, _label_skew_records(), config=f"name: x\nstrategy: {{name: {strategy}}}\n")
    console = Console(file=io.StringIO(), width=250, color_system=None)
    summary = summarize(run_dir)
    print_summary(run_dir, console=console)
    text = console.file.getvalue()
    assert summary.pooled_row.name == ("pooled (own models)" if own_models else "pooled")
    note = f"pooled (own models): each site's test images scored by that site's own model ({strategy} keeps weights"
    assert (note in " ".join(text.split())) is own_models


def _legends(figure) -> list[list[str]]:
    return [[t.get_text() for t in axes.get_legend().get_texts()] for axes in figure.axes if axes.get_legend()]


def test_figures_draw_pooled_and_name_the_mean_of_sites_with_its_coverage(tmp_path: Path) -> None:
    from medfed.server.report import _REGISTERED, _make_figures, _new_figure

    # Prepare
    run_dir = _write_run(tmp_path / "skew", _label_skew_records())
    run = load_run_metrics(run_dir)

    # Execute
    acc, auc = _make_figures(run)[:2]
    pooled_vs_mean = _REGISTERED["pooled_vs_mean"][1](run, _new_figure)
    html = build_report(run_dir).read_text(encoding="utf-8")

    # Assert: the legends
    sites = ["site-0", "site-1", "site-2", "site-3"]
    assert _legends(acc) == [["pooled", "mean of sites", *sites]]
    assert _legends(auc) == [["pooled", "mean of sites (AUC over 1 of 4 sites)", *sites]]
    assert _legends(pooled_vs_mean) == [
        ["pooled", "mean of sites"], ["pooled", "mean of sites (AUC over 1 of 4 sites)"],
    ]
    # the captions: no "global" left
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", html)
    assert not any("global" in caption.lower() for caption in captions)
    assert any(caption.startswith("Test AUC per round: pooled test set (black") for caption in captions)


def test_one_round_figures_have_integer_ticks_and_tell_pooled_from_mean(tmp_path: Path) -> None:
    from matplotlib.lines import Line2D

    from medfed.server.report import _REGISTERED, _make_figures, _new_figure

    # Prepare: one round, where pooled and mean of sites have the same ACC.
    run = load_run_metrics(_write_run(tmp_path / "one", _label_skew_records()))

    # Execute
    figures = [*_make_figures(run), _REGISTERED["pooled_vs_mean"][1](run, _new_figure)]

    # Assert: every round axis shows the one round, as "1".
    for figure in figures:
        figure.canvas.draw()
    round_axes = [axes for figure in figures for axes in figure.axes if axes.get_xlabel() == "round"]
    assert len(round_axes) == 7  # acc, auc, 2 x loss, bytes, wall time, 2 x pooled_vs_mean
    for axes in round_axes:
        low, high = sorted(axes.get_xlim())
        ticks = zip(axes.get_xticklabels(), axes.get_xticks())
        shown = [label.get_text() for label, tick in ticks if low <= tick <= high]
        assert shown == ["1"], (axes.get_title(), shown)
    # the single points of pooled and mean of sites differ in marker and colour
    for axes in figures[-1].axes:
        lines = {line.get_label(): line for line in axes.get_lines() if isinstance(line, Line2D)}
        pooled, mean = lines["pooled"], next(v for k, v in lines.items() if k.startswith("mean of sites"))
        assert pooled.get_marker() != mean.get_marker()
        assert pooled.get_color() != mean.get_color()


def test_mean_of_sites_is_the_headline_without_pooled_metrics(run_dir: Path) -> None:
    summary = summarize(run_dir)
    assert summary.pooled_row is None
    assert summary.headline is summary.global_row
    assert summary.federation_rows() == [summary.global_row]
    assert '<tr class="global"><td>mean of sites</td>' in build_report(run_dir).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("keep", "rounds_done", "text"),
    [("all", 1, "1 round · "), ("sites", 0, "no round completed · round 1 not finished · ")],
)
def test_rounds_are_counted_and_pluralised(tmp_path: Path, keep: str, rounds_done: int, text: str) -> None:
    # Prepare: a one-round run, or one stopped during round 1 (its site records written, no round record).
    records = [r for r in _round_records(1) if keep == "all" or r["event"] == "site"]
    run_dir = _write_run(tmp_path / keep, records)
    console = Console(file=io.StringIO(), width=200, color_system=None)

    # Execute
    summary = summarize(run_dir)
    print_summary(run_dir, console=console)
    html = build_report(run_dir).read_text(encoding="utf-8")

    # Assert
    assert summary.rounds_done == rounds_done and summary.last_round == 1
    assert text in console.file.getvalue()
    assert f'<p class="meta">{text.removesuffix(" · ")}</p>' in html
    assert "1 rounds" not in console.file.getvalue() + html


def test_run_name_falls_back_to_directory_without_config(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "my-run", _round_records(1), config=None)
    assert summarize(run_dir).name == "my-run"


# ---------------------------------------------------------------------------- report


def test_build_report_writes_html_and_figures(run_dir: Path) -> None:
    # Execute
    html_path = build_report(run_dir)

    # Assert
    assert html_path == run_dir / "report.html"
    html = html_path.read_text(encoding="utf-8")
    assert "<title>medfed report: synthetic-fedavg</title>" in html
    assert "rounds: 3" in html  # the config is shown
    assert html.count("<img ") == len(FIGURE_NAMES) == 6
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    for name, encoded in zip(FIGURE_NAMES, embedded):
        png = (run_dir / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE), name
        assert base64.b64decode(encoded) == png, name
    assert "0.6633" in html  # global final ACC in the summary table
    assert "https://" not in html and "http://" not in html  # self-contained


def test_build_report_confusion_grid_uses_last_round(run_dir: Path) -> None:
    import matplotlib.image

    # Execute
    build_report(run_dir)

    # Assert: the confusion grid is a valid, wide image (3 panels side by side).
    image = matplotlib.image.imread(run_dir / "figures" / "confusion.png")
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]
    run = load_run_metrics(run_dir)
    assert run.site_record(3, "evaluate", "site-2")["confusion"] == [[3, 2], [3, 6]]


def test_confusion_panels_name_the_classes_and_mark_held_out_sites(tmp_path: Path) -> None:
    from medfed.server.report import _class_names, _confusion_figure, _new_figure

    # Prepare: BreastMNIST (classes "malignant", "normal, benign") with a held-out site.
    records = _round_records(1)
    records.insert(0, {
        "event": "site", "round": 1, "phase": "evaluate", "site": "site-3", "num_examples": 5, "held_out": True,
        "metrics": {"acc": 0.6}, "confusion": [[1, 1], [1, 2]],
    })
    run_dir = _write_run(tmp_path / "breast", records, config="name: breast\ndata:\n  dataset: breastmnist\n")
    run = load_run_metrics(run_dir)

    # Execute
    names = _class_names(run_dir)
    figure = _confusion_figure(run, _new_figure, names)
    figure.canvas.draw()

    # Assert
    assert names == ["malignant", "normal, benign"]
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["site-0", "site-1", "site-2", "site-3 (held out)"]
    for axes in panels:
        assert [t.get_text() for t in axes.get_xticklabels()] == names
        assert [t.get_text() for t in axes.get_yticklabels()] == names
    # Without a known dataset (here: no data.dataset in the config) the classes stay numbered.
    assert _class_names(_write_run(tmp_path / "plain", _round_records(1))) is None


def test_report_without_evaluate_single_round_and_partial_sites(tmp_path: Path) -> None:
    # Prepare: one round, no evaluate (fraction_evaluate 0), a site that only trained,
    # and a multi-label confusion of shape [L, 2, 2] in a second run.
    records = _round_records(1, evaluate=False)
    run_dir = _write_run(tmp_path / "no-eval", records)

    # Execute
    html = build_report(run_dir).read_text(encoding="utf-8")
    summary = summarize(run_dir)

    # Assert
    assert html.count("<img ") == 6
    assert all((run_dir / "figures" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE) for name in FIGURE_NAMES)
    assert summary.rounds_done == 1
    assert summary.global_row.acc is None and summary.global_row.server_round is None
    assert [s.server_round for s in summary.sites] == [None, None, None]
    text = io.StringIO()
    print_summary(run_dir, console=Console(file=text, width=200, color_system=None))
    assert re.search(r"mean of sites\s*│\s*–\s*│\s*–", text.getvalue())


def test_sites_in_some_rounds_and_multilabel_confusion(tmp_path: Path) -> None:
    # Prepare: site-3 only evaluates in round 1 and has a multi-label confusion [2, 2, 2].
    records = _round_records(1) + _round_records(2)
    records.insert(0, {
        "event": "site", "round": 1, "phase": "evaluate", "site": "site-3", "num_examples": 5,
        "metrics": {"acc": 0.2, "auc": 0.3}, "confusion": np.arange(8).reshape(2, 2, 2),
    })
    records.insert(1, {  # "site-10" sorts after "site-3" (natural order)
        "event": "site", "round": 2, "phase": "train", "site": "site-10", "num_examples": 5, "metrics": {"loss": 1.0},
    })
    run_dir = _write_run(tmp_path / "partial", records)

    # Execute
    html = build_report(run_dir).read_text(encoding="utf-8")
    summary = summarize(run_dir)

    # Assert
    assert html.count("<img ") == 6
    assert [s.name for s in summary.sites] == ["site-0", "site-1", "site-2", "site-3", "site-10"]
    site_3 = summary.sites[3]
    assert (site_3.server_round, site_3.acc, site_3.auc, site_3.num_examples) == (1, 0.2, 0.3, 5)
    assert summary.sites[4].server_round is None
    assert summary.global_row.server_round == 2
    assert summary.global_row.num_examples == 60  # site-3 did not evaluate in round 2


def test_missing_metrics_is_a_metrics_log_error(tmp_path: Path) -> None:
    expected = rf"^No metrics\.jsonl in {re.escape(str(tmp_path))}: is this a medfed run directory\?$"
    with pytest.raises(MetricsLogError, match=expected):
        build_report(tmp_path)
    with pytest.raises(MetricsLogError, match="No metrics.jsonl in"):
        summary_table(tmp_path)


def test_run_without_rounds_is_a_report_error(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "fresh", [{"event": "start", "resumed_from_round": 0, "num_rounds": 3}])
    with pytest.raises(ReportError, match="holds no round results yet"):
        summarize(run_dir)


# ---------------------------------------------------------------------------- reading


def test_truncated_last_line_is_skipped_with_one_notice(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a killed run's partial last write.
    path = run_dir / "metrics.jsonl"
    number_of_lines = len(path.read_text().splitlines())
    with open(path, "a") as handle:
        handle.write('{"event": "round", "round": 4, "wall_ti')

    # Execute: what `medfed report` does, reading the file twice.
    summary = summarize(run_dir)
    build_report(run_dir)
    print_summary(run_dir, console=Console(file=io.StringIO(), width=200))

    # Assert: identical to the complete run of 3 rounds, and one clean line on stderr.
    assert summary.last_round == 3
    assert summary.wall_time_s == pytest.approx(33.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        rf"medfed: warning: skipped the partially written last line {number_of_lines + 1} of "
        rf"{re.escape(str(path))} \(the run was probably stopped mid-write\)\.",
        lines[0],
    )


def test_malformed_middle_line_names_file_and_line(run_dir: Path) -> None:
    # Prepare
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the end off line 3
    path.write_text("\n".join(lines) + "\n")

    # Execute / Assert
    with pytest.raises(MetricsLogError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        build_report(run_dir)


@pytest.mark.parametrize(
    ("line", "match"),
    [('{"event": "round", "round": null}', "the 'round' of a 'round' record must be an integer, got null"),
     ('{"event": "site", "round": "1", "phase": "train", "site": "a"}',
      "the 'round' of a 'site' record must be an integer, got \"1\""),
     ('{"event": "site", "round": 1, "phase": "train", "site": "a", "num_examples": null}',
      "the 'num_examples' of a 'site' record must be an integer, got null"),
     ('{"event": "round", "round": 1, "evaluate": [0.5]}',
      "the 'evaluate' of a 'round' record must be an object or null, got [0.5]"),
     ('{"event": "site", "round": 1, "phase": "evaluate", "site": "a", "confusion": [[1, "x"], [0, 2]]}',
      "the 'confusion' of a 'site' record must be a matrix of integer counts, got [[1, \"x\"], [0, 2]]"),
     ('{"event": "site", "round": 1, "phase": "evaluate", "site": "a", "confusion": [[1, 0], [2]]}',
      "the 'confusion' of a 'site' record must be a matrix of integer counts, got [[1, 0], [2]]")],
)
def test_record_of_wrong_type_is_a_report_error_naming_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    # Prepare: a record that parses but that the report cannot use.
    run_dir = tmp_path / "typed"
    run_dir.mkdir()
    records = [json.dumps(r) for r in _round_records(1)]
    (run_dir / "metrics.jsonl").write_text("\n".join([*records[:2], line, *records[2:]]) + "\n")

    # Execute / Assert: one MetricsLogError (one line in the CLI), not a TypeError.
    with pytest.raises(MetricsLogError, match=rf"metrics\.jsonl, line 3: {re.escape(match)}; fix or delete that line\.$"):
        build_report(run_dir)


def test_resume_later_records_win_and_stale_rounds_are_dropped(tmp_path: Path) -> None:
    # Prepare: the first run finished rounds 1-2, then was killed during round 3 after
    # site-1 and site-2 had evaluated; the resumed run re-ran round 3 where only site-0
    # and site-1 evaluated (site-1 with new values).
    first = [{"event": "start", "resumed_from_round": 0, "num_rounds": 3}]
    first += _round_records(1) + _round_records(2)
    stale = [r for r in _round_records(3) if r["event"] == "site" and r["site"] != "site-0"]
    for record in stale:
        record["metrics"] = {**record["metrics"], "acc": 0.01}
    resumed = [{"event": "start", "resumed_from_round": 2, "num_rounds": 3}]
    resumed += [r for r in _round_records(3) if r.get("site") != "site-2"]
    run_dir = _write_run(tmp_path / "resumed", first + stale + resumed)

    # Execute
    summary = summarize(run_dir)
    run = load_run_metrics(run_dir)

    # Assert
    assert run.site_record(3, "evaluate", "site-1")["metrics"]["acc"] == pytest.approx(0.63)
    assert run.site_record(3, "evaluate", "site-2") is None  # stale record of the killed round
    assert [s.server_round for s in summary.sites] == [3, 3, 2]
    assert summary.sites[2].acc == pytest.approx(0.72)  # site-2's round-2 value
    assert summary.rounds_done == 3
    assert summary.wall_time_s == pytest.approx(33.5)
    assert len(run.starts) == 2


def test_duplicate_records_later_wins(tmp_path: Path) -> None:
    # Prepare: the same round record written twice.
    first, second = _round_records(1)[-1], _round_records(1)[-1]
    second["wall_time_s"] = 99.0
    run_dir = _write_run(tmp_path / "dup", _round_records(1)[:-1] + [first, second])

    # Execute
    summary = summarize(run_dir)

    # Assert
    assert summary.wall_time_s == 99.0
    assert summary.rounds_done == 1


def test_sites_left_out_are_listed_in_the_report(tmp_path):
    # Prepare: one round in which site-2 sent no reply.
    records = [
        {"event": "start", "time": "t", "resumed_from_round": 0, "num_rounds": 1},
        {"event": "site", "round": 1, "phase": "train", "site": "site-1", "num_examples": 4, "metrics": {"loss": 1.0}},
        {"event": "dropout", "round": 1, "phase": "train", "site": "site-2", "reason": "no reply within 60 s"},
        {"event": "round", "round": 1, "wall_time_s": 1.0, "train": {"loss": 1.0}, "evaluate": {}},
        {"event": "end", "time": "t", "rounds_done": 1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Execute
    run = load_run_metrics(tmp_path)
    html = build_report(tmp_path).read_text()
    # Assert
    assert [(d["round"], d["site"]) for d in run.left_out] == [(1, "site-2")]
    assert "Sites left out" in html and "no reply within 60 s" in html


def test_a_resume_drops_the_dropouts_of_the_rounds_it_ran_again(tmp_path):
    # Prepare: site-2 missed round 2, the run was killed and resumed from round 1, and round 2 ran again in full.
    records = [{"event": "start", "time": "t", "resumed_from_round": 0, "num_rounds": 2}, *_round_records(1),
               {"event": "dropout", "round": 1, "phase": "train", "site": "site-1", "reason": "no reply within 60 s"},
               {"event": "dropout", "round": 2, "phase": "evaluate", "site": "site-2", "reason": "no reply within 60 s"},
               {"event": "start", "time": "t", "resumed_from_round": 1, "num_rounds": 2}, *_round_records(2),
               {"event": "end", "time": "t", "rounds_done": 2}]
    run_dir = _write_run(tmp_path / "resumed", records)
    # Execute
    run = load_run_metrics(run_dir)
    html = build_report(run_dir).read_text()
    # Assert: round 1's dropout stays (that round was not run again)
    assert [(d["round"], d["site"]) for d in run.left_out] == [(1, "site-1")]
    assert "<td>2</td><td>evaluate</td><td>site-2</td>" not in html


@pytest.mark.parametrize(("ended", "text"), [(False, "2 of 3 rounds · run not finished"), (True, "2 rounds (last: 2)")])
def test_a_run_stopped_between_rounds_says_it_did_not_finish(tmp_path, ended, text):
    # Prepare: a 3-round run killed after round 2 (or, for contrast, one whose end says it stopped there).
    records = [{"event": "start", "time": "t", "resumed_from_round": 0, "num_rounds": 3},
               *_round_records(1), *_round_records(2)]
    records += [{"event": "end", "time": "t", "rounds_done": 2}] if ended else []
    run_dir = _write_run(tmp_path / "stopped", records)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    # Execute
    print_summary(run_dir, console=console)
    html = build_report(run_dir).read_text()
    # Assert
    caption = console.file.getvalue()
    assert (text in caption) == (not ended) and ("not finished" in html) == (not ended)
    assert summarize(run_dir).finished == ended


def test_a_nan_byte_count_of_an_older_log_counts_as_none(tmp_path):
    # Prepare: logs written before medfed wrote standard JSON could hold NaN.
    records = _three_round_records()
    next(r for r in records if r["event"] == "round")["bytes_sent"] = math.nan
    run_dir = tmp_path / "nan-bytes"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert summarize(run_dir).bytes_sent == 2_000_000
    assert build_report(run_dir).is_file()


def test_the_pooled_auc_shows_how_far_its_histograms_may_be_from_the_exact_auc(tmp_path):
    # Prepare
    records = _label_skew_records()
    records[-1]["evaluate_pooled"]["auc_error_bound"] = 0.0912
    run_dir = _write_run(tmp_path / "bound", records)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    # Execute
    print_summary(run_dir, console=console)
    html = build_report(run_dir).read_text(encoding="utf-8")
    # Assert
    text = console.file.getvalue()
    assert re.search(r"pooled\s*│\s*1\s*│\s*0\.2692\s*│\s*0\.4782 ±0\.091\s*│", text)
    assert "± pooled AUC: from the sites' score histograms; the exact AUC lies within ± this bound" in " ".join(text.split())
    assert "0.4782 ±0.091" in html
    assert "±" not in re.search(r"mean of sites.*", text).group(0)


def test_a_run_killed_after_its_last_round_but_before_its_end_is_not_finished(tmp_path):
    records = [r for r in _three_round_records() if r["event"] != "end"]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_summary(_write_run(tmp_path / "killed", records), console=console)
    assert "3 of 3 rounds · run not finished" in console.file.getvalue()


def test_a_plugin_figure_cannot_take_a_core_figures_name() -> None:
    from medfed.server.report import register_figure

    with pytest.raises(ValueError, match="'confusion' is one of the report's own"):
        register_figure("confusion", "mine")


def test_the_pooled_and_held_out_rows_are_the_last_rounds(tmp_path: Path) -> None:
    # A mutation that read the rounds oldest-first showed round 1 as the run's result.
    records = _three_round_records()
    for record in records:
        if record["event"] == "round":
            r = record["round"]
            record["evaluate_pooled"] = {"acc": 0.5 + 0.1 * r, "auc": 0.6, "num_examples": 60}
            record["held_out"] = {"acc": 0.1 * r, "auc": 0.5, "num_examples": 7}
    # Execute
    summary = summarize(_write_run(tmp_path / "run", records))
    # Assert
    assert (summary.pooled_row.server_round, summary.pooled_row.acc) == (3, pytest.approx(0.8))
    assert (summary.held_out_row.server_round, summary.held_out_row.acc) == (3, pytest.approx(0.3))


def test_the_mean_of_sites_counts_the_training_sites_examples_only(tmp_path: Path) -> None:
    # Prepare: the last round also evaluates a held-out hospital (5 examples).
    records = _three_round_records()
    end = records.pop()
    records.append({"event": "site", "round": 3, "phase": "evaluate", "site": "unseen", "num_examples": 5,
                    "held_out": True, "metrics": {"loss": 0.5, "acc": 0.4, "auc": 0.5, "balanced_acc": 0.5}})
    records.append(end)
    # Execute
    summary = summarize(_write_run(tmp_path / "run", records))
    # Assert
    assert summary.global_row.num_examples == sum(EVAL_EXAMPLES.values())


def test_a_round_without_its_round_line_counts_its_sites_bytes(tmp_path: Path) -> None:
    # A run killed after its sites replied but before the round line: the bytes come from the site lines.
    records = [r for r in _three_round_records()[:-1] if not (r["event"] == "round" and r["round"] == 3)]
    # Execute
    summary = summarize(_write_run(tmp_path / "run", records))
    # Assert: rounds 1-2 from their round lines, round 3 as the sum of its 6 site lines.
    assert summary.bytes_sent == 2 * 1_000_000 + 6 * 100_000
    assert summary.bytes_received == 2 * 2_000_000 + 3 * 200_000


def test_a_grouped_study_without_pooled_figures_says_where_its_group_figures_are(tmp_path: Path) -> None:
    # Pooled per-group figures need the sites' score histograms, off by default (privacy):
    # the section says so instead of vanishing.
    records = _three_round_records()
    records[0] = {**records[0], "groups": ["female", "male"]}
    run_dir = _write_run(tmp_path / "grouped", records)
    # Execute
    html_text = build_report(run_dir).read_text()
    # Assert
    assert "Patient groups" in html_text and "federation.pooled_test_metrics: true</code> (off by default)" in html_text
    plain = _write_run(tmp_path / "plain", _three_round_records())
    assert "Patient groups" not in build_report(plain).read_text()

"""The run's metrics log, ``RUN_DIR/metrics.jsonl``: written as things happen, read back
whatever a crash or a resume left in it.

The server appends one JSON object per line (:class:`MetricsLog`); events are
``"start"``, ``"site"`` (one site's train or evaluate result), ``"round"`` (the
sample-weighted aggregate of a round), ``"dropout"``, ``"site_left_out"``,
``"site_admitted"``, ``"quorum_missed"``, ``"stopped"`` and ``"end"``.

Reading tolerates what crashes and resumes leave behind:

* a partially written last line (the run was killed mid-write) is skipped with a one-line
  warning on stderr, printed once per file however often the file is read;
* a ``"start"`` record with ``resumed_from_round = R`` discards the earlier records of rounds
  after ``R`` (those rounds were run again), and for the same (event, round, phase, site)
  the later record wins (:func:`load_run_metrics`).

The report (:mod:`medfed.server.report`), the ServerApp (sites left out by an earlier
start), ``medfed server``'s end-of-run check and the benchmarks read it through
:func:`read_metrics` and :func:`load_run_metrics`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed._io import json_text
from medfed.errors import MedfedError, MedfedWarning
from medfed.server.run_files import METRICS_FILE

__all__ = ["MetricsLog", "MetricsLogError", "RunMetrics", "load_run_metrics", "parse_line", "read_metrics"]


class MetricsLogError(MedfedError):
    """A run directory has no metrics log, or its log cannot be read."""


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSON-lines log; every record is flushed and fsynced as it is written.

    Opening the log repairs what a killed writer may have left: a last line without its
    newline is dropped (with a warning) unless it is complete JSON, in which case the
    newline is added, so that new records never glue onto a broken one.

    Parameters
    ----------
    path : str or Path
        Usually ``RUN_DIR/metrics.jsonl``; created on the first write. Its directory must exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._repair_last_line()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line of standard JSON: NumPy scalars and arrays become
        numbers and lists, NaN and +-inf ``null`` (:func:`medfed._io.json_text`)."""
        line = json_text(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _repair_last_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if _parses_as_json_object(tail):
            with open(self.path, "ab") as handle:
                handle.write(b"\n")
            return
        warnings.warn(
            f"Dropped a partially written last line ({len(tail)} bytes) from {self.path}, "
            "left by a run that was stopped mid-write.",
            MedfedWarning, stacklevel=3,
        )
        with open(self.path, "r+b") as handle:
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())


def _parses_as_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read all records of a metrics log, in file order.

    Parameters
    ----------
    path : str or Path
        A ``metrics.jsonl`` file.

    Returns
    -------
    list[dict]
        One dict per non-blank line. A metric written as ``null`` (undefined, or not finite)
        reads back as NaN, as do the ``NaN`` of logs written before medfed wrote standard
        JSON. A last line that is not valid JSON (a killed run's partial write) is skipped
        with a one-line warning on stderr (once per file and process).

    Raises
    ------
    MetricsLogError
        If the file is missing, any other line is not a JSON object with an "event" key,
        or a record lacks a key the report needs or holds one of the wrong type
        (e.g. ``"round": null``); the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsLogError(f"No {path.name} at {path}: is this a medfed run directory?")
    lines = path.read_bytes().split(b"\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = parse_line(line)
        except (UnicodeDecodeError, ValueError) as error:
            if index == len(numbered) - 1:
                _notice_once(
                    (str(path.resolve()), number, len(lines)),
                    f"skipped the partially written last line {number} of {path} "
                    "(the run was probably stopped mid-write).",
                )
                continue
            raise MetricsLogError(
                f"{path}, line {number}: not valid JSON ({error}); fix or delete that line."
            ) from error
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise MetricsLogError(
                f"{path}, line {number}: expected a JSON object with an 'event' key, "
                f"got {line[:60].decode('utf-8', 'replace')!r}; fix or delete that line."
            )
        for key in _REQUIRED_KEYS.get(record["event"], ()):
            if key not in record:
                raise MetricsLogError(
                    f"{path}, line {number}: a {record['event']!r} record needs the key {key!r}; "
                    "fix or delete that line."
                )
        for key, (kinds, wanted) in _KEY_TYPES.get(record["event"], {}).items():
            value = record.get(key)
            if key in record and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
                raise MetricsLogError(
                    f"{path}, line {number}: the {key!r} of a {record['event']!r} record must be {wanted}, "
                    f"got {json.dumps(value)[:40]}; fix or delete that line."
                )
        if "confusion" in record and not _is_count_matrix(record["confusion"]):
            raise MetricsLogError(
                f"{path}, line {number}: the 'confusion' of a {record['event']!r} record must be a matrix of "
                f"integer counts, got {json.dumps(record['confusion'])[:40]}; fix or delete that line."
            )
        records.append(record)
    return records


#: The keys whose value is a table of metrics (name -> number, null where undefined).
_METRIC_TABLES = {"site": ("metrics",), "round": ("train", "evaluate", "evaluate_pooled", "held_out")}


def parse_line(line: bytes | str) -> Any:
    """One line of the log as written: the nulls of a record's metric tables read as NaN.

    Raises
    ------
    ValueError
        If the line is not valid JSON (``UnicodeDecodeError`` if its bytes are not UTF-8).
    """
    record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    if isinstance(record, dict):
        for key in _METRIC_TABLES.get(record.get("event"), ()):  # type: ignore[arg-type]
            table = record.get(key)
            if isinstance(table, dict):
                record[key] = {name: float("nan") if value is None else value for name, value in table.items()}
    return record


def _is_count_matrix(value: Any) -> bool:
    """Whether ``value`` is a (nested) list of integers of one shape, as a confusion matrix is written."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return False
    return isinstance(value, list) and array.size > 0 and array.dtype.kind in "iu"


_REQUIRED_KEYS = {"site": ("round", "phase", "site"), "round": ("round",)}
_NUMBER = ((int, float), "a number")
_TABLE = ((dict, type(None)), "an object or null")
#: The types of the keys the report reads, where present: (accepted types, in words).
_KEY_TYPES: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "site": {
        "round": ((int,), "an integer"), "phase": ((str,), "a string"), "site": ((str,), "a string"),
        "num_examples": ((int,), "an integer"), "metrics": _TABLE, "confusion": ((list,), "a list"),
        "bytes_sent": _NUMBER, "bytes_received": _NUMBER,
    },
    "round": {
        "round": ((int,), "an integer"), "wall_time_s": ((int, float, type(None)), "a number or null"),
        "bytes_sent": _NUMBER, "bytes_received": _NUMBER,
        "train": _TABLE, "evaluate": _TABLE, "evaluate_pooled": _TABLE, "held_out": _TABLE,
    },
}
#: Notices already printed, so that reading a file twice (report, then summary) says it once.
_NOTICED: set[tuple[Any, ...]] = set()


def _notice_once(key: tuple[Any, ...], message: str) -> None:
    """Print ``message`` as one line on stderr, once per ``key`` in this process."""
    if key not in _NOTICED:
        _NOTICED.add(key)
        print(f"medfed: warning: {message}", file=sys.stderr)


@dataclass
class RunMetrics:
    """The metrics of a run after resolving resumes and duplicates.

    A resume from round ``r`` drops the round, site and dropout records of the rounds
    after ``r``: they were run again.

    Attributes
    ----------
    rounds : list[int]
        All rounds with a round or site record, ascending.
    sites : list[str]
        All site names, in natural order ("site-2" before "site-10").
    round_records : dict[int, dict]
        The aggregated ``"round"`` record of each round.
    site_records : dict[tuple[int, str, str], dict]
        ``(round, phase, site) -> "site" record``; phase is "train" or "evaluate".
    starts, ends : list[dict]
        The ``"start"`` and ``"end"`` records in file order.
    """

    rounds: list[int] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    round_records: dict[int, dict[str, Any]] = field(default_factory=dict)
    site_records: dict[tuple[int, str, str], dict[str, Any]] = field(default_factory=dict)
    starts: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)
    #: ``"dropout"`` records (a site left out of a round: no reply, error, rejected update)
    #: and ``"site_left_out"``/``"site_admitted"`` records (a deployed site whose data
    #: does not fit the study, and its return), in file order.
    left_out: list[dict[str, Any]] = field(default_factory=list)
    #: ``"quorum_missed"`` records, in file order.
    quorum_misses: list[dict[str, Any]] = field(default_factory=list)
    #: Whether the last start was followed by an ``"end"``: False for a run still going,
    #: stopped, or killed, even between rounds.
    finished: bool = False

    def site_record(self, server_round: int, phase: str, site: str) -> dict[str, Any] | None:
        """The site record of that round and phase, or None."""
        return self.site_records.get((server_round, phase, site))

    def aggregate(self, server_round: int, phase: str) -> dict[str, Any]:
        """The round's aggregated metrics of one phase ({} when absent)."""
        return self.round_records.get(server_round, {}).get(phase) or {}


def load_run_metrics(run_dir: str | Path) -> RunMetrics:
    """Read ``RUN_DIR/metrics.jsonl`` and resolve resumes and duplicate records.

    Raises
    ------
    MetricsLogError
        If the run directory has no metrics.jsonl, or it is malformed.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MetricsLogError(f"No {METRICS_FILE} in {run_dir}: is this a medfed run directory?")
    run = RunMetrics()
    for record in read_metrics(path):
        event = record["event"]
        if event == "start":
            run.starts.append(record)
            resumed_from = record.get("resumed_from_round")
            if isinstance(resumed_from, int):
                # Rounds after the checkpoint were run again: their old records are stale.
                run.round_records = {r: v for r, v in run.round_records.items() if r <= resumed_from}
                run.site_records = {k: v for k, v in run.site_records.items() if k[0] <= resumed_from}
                run.left_out = [r for r in run.left_out if not _after(r, resumed_from)]
            run.finished = False
        elif event == "end":
            run.ends.append(record)
            run.finished = True
        elif event == "round":
            run.round_records[int(record["round"])] = record
        elif event == "site":
            run.site_records[(int(record["round"]), str(record["phase"]), str(record["site"]))] = record
        elif event in ("dropout", "site_left_out", "site_admitted"):
            run.left_out.append(record)
        elif event == "quorum_missed":
            run.quorum_misses.append(record)
    run.rounds = sorted(set(run.round_records) | {key[0] for key in run.site_records})
    run.sites = sorted({key[2] for key in run.site_records}, key=_natural_key)
    return run


def _after(record: dict[str, Any], server_round: int) -> bool:
    """A dropout of a round after ``server_round`` (one that a resume ran again)."""
    return record["event"] == "dropout" and isinstance(record.get("round"), int) and record["round"] > server_round


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

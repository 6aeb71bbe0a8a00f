"""Continuing a run from its last complete round.

Flower's ``Strategy.start`` always counts rounds from 1 and has no start-round argument.
A resumed run therefore

1. reads ``RUN_DIR/checkpoint.safetensors`` (global arrays after round ``R``, the
   strategy's state, the RNG state),
2. builds the strategy afresh and puts its state back
   (:func:`medfed.strategies.load_strategy_state`),
3. wraps it in :class:`RoundOffsetStrategy`, which adds ``R`` to every round number
   the strategy and the sites see, and
4. calls ``start`` with the checkpoint's arrays and the ``rounds - R`` rounds left.

The wrapper also keeps held-out sites (:mod:`medfed.server.held_out`) out of training
and out of the federation's evaluation aggregate.

Sites derive their local seeds from the true round number, the server restores the
Python and NumPy RNG states that node sampling uses, and replies are aggregated in a
fixed order (:class:`medfed.server.recording.RecordingGrid`): so a resumed run repeats
the rounds an uninterrupted run would have made, bit for bit on a CPU.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed._io import check_output_folder, json_text
from medfed.errors import MedfedError
from medfed.config import (
    RESUME_MAY_CHANGE, ExperimentConfig, absolute_path, config_to_dict, load_config, save_config,
    read_yaml_mapping, with_absolute_paths,
)
from medfed.server.checkpoint import Checkpoint, checkpoint_model_shapes, checkpoint_state, load_checkpoint
from medfed.server.held_out import NodeView, SiteRoster
from medfed.server.metrics_log import read_metrics
from medfed.server.delegating_strategy import DelegatingStrategy
from medfed.server.recording import RoundRecorder
from medfed.server.run_files import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE

__all__ = [
    "ResumeError",
    "RoundOffsetStrategy",
    "check_checkpoint_fits",
    "check_run_dir",
    "get_rng_state",
    "prepare_run_dir",
    "rounds_phrase",
    "run_key_of",
    "set_rng_state",
]

# Count lists in evaluate replies that only serve pooled-test metrics.
_POOLING_COUNTS = ("score-hist", "confusion-group-")



class ResumeError(MedfedError):
    """A run directory cannot be started or resumed as asked."""


class RoundOffsetStrategy(DelegatingStrategy):
    """Delegate to ``strategy`` with round numbers shifted by ``offset``.

    It also reports each round's start and aggregated metrics to a
    :class:`RoundRecorder`. Every other attribute is read from the wrapped strategy.

    Parameters
    ----------
    strategy : Strategy
        The experiment's strategy (state already restored when resuming).
    offset : int
        Rounds completed before this ``start`` call (0 for a fresh run).
    recorder : RoundRecorder
        Receives round starts and aggregated metrics.
    roster : SiteRoster, optional
        Who each node is (:class:`medfed.server.held_out.SiteRoster`). Held-out sites are
        never sampled for training and are evaluated every round; sites whose data does not
        fit the study are left out of both. The strategy samples from the nodes listed by
        site name, with Python's ``random`` seeded from ``seed``, the round and the phase,
        so the same sites are drawn on every engine and in every run.
    seed : int
        The experiment's seed.
    """

    def __init__(
        self, strategy: Strategy, offset: int, recorder: RoundRecorder, roster: SiteRoster | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(strategy)
        self.offset = offset
        self.recorder = recorder
        self.roster = roster if roster is not None else SiteRoster(grid=None)
        self.seed = seed

    def start(self, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``Strategy.start``, whose first log line names the experiment's strategy."""
        name = _StrategyName(type(_innermost(self.strategy)).__name__)
        FLOWER_LOGGER.addFilter(name)
        try:
            return super().start(*args, **kwargs)
        finally:
            FLOWER_LOGGER.removeFilter(name)

    @property
    def held_out_nodes(self) -> frozenset[int]:
        # Held-out sites never train: the strategy samples from a grid without them,
        # and their evaluation replies stay out of the federation's aggregate.
        return self.roster.held_out_nodes

    def _view(self, grid: Grid) -> Grid:
        return NodeView(grid, self.held_out_nodes | set(self.roster.left_out), self.roster.names)

    @contextmanager
    def _sampling(self, server_round: int, phase: str) -> Iterator[None]:
        """Seed Python's ``random`` (Flower's node sampling) for this round and phase; restore it after."""
        state = random.getstate()
        random.seed(f"medfed-sampling-{self.seed}-{server_round}-{phase}")
        try:
            yield
        finally:
            random.setstate(state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        self.recorder.round_started(server_round)
        self.roster.refresh()  # sites that joined since, or fixed their data
        with self._sampling(server_round, "train"):
            return list(self.strategy.configure_train(server_round, arrays, config, self._view(grid)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round + self.offset, replies)
        self.recorder.aggregated("train", metrics)
        if arrays is None and getattr(self.strategy, "model_kept", None):
            self.recorder.model_kept(self.strategy.model_kept)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.offset
        self.roster.refresh()  # a site that joined during training is checked before it is sent anything
        with self._sampling(server_round, "evaluate"):
            messages = list(self.strategy.configure_evaluate(server_round, arrays, config, self._view(grid)))
        # The training sites are sampled (fraction_evaluate); the held-out sites, apart, are
        # evaluated in every round that evaluates at all.
        if messages and self.held_out_nodes:
            connected = set(grid.get_node_ids())
            messages += [
                Message(content=messages[0].content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
                for node_id in sorted(self.held_out_nodes) if node_id in connected
            ]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # By node id, and by the reply's own word (in case the start-of-run query missed it).
        replies = [r for r in replies if r.metadata.src_node_id not in self.held_out_nodes and not _says_held_out(r)]
        metrics = self.strategy.aggregate_evaluate(server_round + self.offset, replies)
        self.recorder.aggregated("evaluate", metrics)
        if metrics is not None:
            # Summed histograms served the recorder's pooled figures; kept in Flower's
            # history they would fill its end-of-run summary with numbers.
            metrics = MetricRecord({k: v for k, v in metrics.items() if not k.startswith(_POOLING_COUNTS)})
        return metrics


class _StrategyName(logging.Filter):
    """Flower logs "Starting <class> strategy:" with the class ``start`` was called on: the
    wrapper's, which says nothing to a user; name the experiment's strategy instead."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Starting %s strategy:":
            record.args = (self.name,)
        return True


def _innermost(strategy: Strategy) -> Strategy:
    while isinstance(strategy, DelegatingStrategy):
        strategy = strategy.strategy
    return strategy


def _says_held_out(reply: Message) -> bool:
    if reply.has_error() or "site" not in reply.content.config_records:
        return False
    return bool(reply.content.config_records["site"].get("held-out", False))


def get_rng_state() -> dict[str, Any]:
    """The Python and NumPy global RNG states as JSON-compatible lists (node sampling uses them)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "", *,
                 stored_only: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, current value) of the keys that differ, but those a resume may
    change; with ``stored_only``, keys that ``stored`` does not hold (a checkpoint written by a
    medfed before the key existed) are not compared."""
    found = []
    for key in sorted(set(stored) | set(current)):
        dotted = f"{prefix}{key}"
        if stored_only and key not in stored:
            continue
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and dotted != "strategy.params":
            found += _differences(a, b, dotted + ".", stored_only=stored_only)
        elif a != b and dotted not in RESUME_MAY_CHANGE:
            found.append((dotted, a, b))
    return found


_MAY_CHANGE = [key for key in RESUME_MAY_CHANGE if key != "rounds"]
_MAY_CHANGE_IN_WORDS = f"only rounds may grow, and {', '.join(_MAY_CHANGE[:-1])} and {_MAY_CHANGE[-1]} may change"


def _missing_keys(reference: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of ``reference`` that ``found`` lacks (``strategy.params`` is one key)."""
    missing = []
    for key, value in reference.items():
        dotted = f"{prefix}{key}"
        if key not in found:
            missing.append(dotted)
        elif isinstance(value, dict) and isinstance(found[key], dict) and dotted != "strategy.params":
            missing += _missing_keys(value, found[key], dotted + ".")
    return missing


def _check_config_file_complete(path: Path, recorded: Mapping[str, Any] | None) -> None:
    """Refuse a run folder's ``config.yaml`` that is empty or lacks keys: medfed writes every key
    there, and :func:`load_config` would quietly give a missing key its default (an empty file:
    the built-in federation), which the resume would then write back over the run's config.

    The keys checked are the top-level ones (the same in every medfed) and, where the
    checkpoint records the run's config, every key it records.
    """
    raw = read_yaml_mapping(path)
    reference: dict[str, Any] = {f.name: None for f in fields(ExperimentConfig)}
    reference.update(recorded or {})
    missing = _missing_keys(reference, raw)
    if not missing:
        return
    what = "is empty" if not raw else f"lacks the key '{missing[0]}'"
    raise ResumeError(
        f"Cannot resume: {path} {what}, but medfed writes every key of the run's config there (the file is damaged); "
        "restore it from a backup or a copy of the run folder, then resume."
    )


def _checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The JSON state of the run's checkpoint (None without one), read without the arrays.

    Raises
    ------
    CheckpointError
        A checkpoint that is truncated, corrupt or of another format.
    """
    path = run_dir / CHECKPOINT_FILE
    return checkpoint_state(path)[1] if path.exists() else None


def _recorded_config(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The config a checkpoint's state records (None from a medfed that did not record it)."""
    recorded = (state or {}).get("config")
    return recorded if isinstance(recorded, dict) else None


#: The checkpoint state's key of the run key (:mod:`medfed.client.site_state`).
RUN_KEY_STATE = "run_key"


def run_key_of(run_dir: Path, state: Mapping[str, Any] | None) -> str | None:
    """The key of the run in ``run_dir``, under which its sites keep their local state.

    Read from the checkpoint's ``state`` (:data:`RUN_KEY_STATE`), else (a checkpoint of a
    medfed that did not store it there, or none) from the first ``"start"`` record of
    ``metrics.jsonl``, which is ``""`` for a run begun before medfed made keys.

    Returns
    -------
    str or None
        None when the run has neither a checkpoint nor a start record (a new key is made).

    Raises
    ------
    ResumeError
        The checkpoint's key differs from the log's (a checkpoint copied from another run
        of the same study: its sites' state is not this run's); or a checkpoint, but the
        key is in neither place: a new key would leave the sites'
        state behind (FedBN's BatchNorm, Local-only's models) and the run would go on
        differently from an uninterrupted one, while the server cannot tell whether the
        sites keep any.
    MetricsLogError
        A ``metrics.jsonl`` that cannot be read.
    """
    kept = state.get(RUN_KEY_STATE) if state is not None else None
    path = Path(run_dir) / METRICS_FILE
    logged = next((str(record.get("run_key", "")) for record in (read_metrics(path) if path.is_file() else [])
                   if record["event"] == "start"), None)
    if isinstance(kept, str):
        if logged is not None and logged != kept:  # the log is this folder's; the checkpoint came from elsewhere
            raise ResumeError(
                f"Cannot resume {run_dir}: its {CHECKPOINT_FILE} was written by another run than its {METRICS_FILE} "
                "(their run keys differ); put back this run's checkpoint, or start the run afresh in a new folder."
            )
        return kept
    if logged is not None:
        return logged
    if state is not None:
        raise ResumeError(
            f"Cannot resume {run_dir}: its run key, under which the sites keep their local state, is neither in its "
            f"{CHECKPOINT_FILE} (written by an older medfed) nor in a 'start' line of its {METRICS_FILE}; put back "
            f"that file's first line from a backup, or start the run afresh in a new folder."
        )
    return None


def _check_recorded_config(run_dir: Path, recorded: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Refuse a resume whose config differs from the one its checkpoint was made with, by the rule
    of ``config.yaml`` (:data:`RESUME_MAY_CHANGE`): an edited ``config.yaml`` must not change the run."""
    recorded = json.loads(json.dumps(recorded))  # a copy
    for section, key in (("data", "root"), ("model", "init_from")):  # compared resolved, as config.yaml's
        if isinstance(recorded.get(section), dict) and isinstance(recorded[section].get(key), str):
            recorded[section][key] = absolute_path(recorded[section][key])
    current = json.loads(json_text(config_to_dict(with_absolute_paths(cfg))))  # as the checkpoint stores it
    diffs = _differences(recorded, current, stored_only=True)
    if diffs:
        key, old, new = diffs[0]
        raise ResumeError(
            f"Cannot resume {run_dir}: its {CHECKPOINT_FILE} was made with {key}={old!r} but this run asks for "
            f"{key}={new!r} (was {CONFIG_FILE} edited?); resume with the config the run was made with "
            f"({_MAY_CHANGE_IN_WORDS})."
        )
    rounds = recorded.get("rounds")
    if isinstance(rounds, int) and cfg.rounds < rounds:
        raise ResumeError(
            f"Cannot resume {run_dir} with rounds={cfg.rounds}: its {CHECKPOINT_FILE} was made with rounds={rounds}; "
            "'rounds' may only grow."
        )


def check_checkpoint_fits(run_dir: Path, reference: Mapping[str, np.ndarray],
                          shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a checkpoint whose model arrays are not this run's: another name or shape
    (a checkpoint copied from another run, another model or strategy).

    Parameters
    ----------
    run_dir : Path
        The run folder; nothing to check without a checkpoint in it.
    reference : Mapping[str, np.ndarray]
        This run's initial model arrays (:func:`medfed.server.server_app.initial_model_arrays`).
    shapes : Mapping[str, tuple], optional
        The checkpoint's array names and shapes, when already loaded; else read from its header.

    Raises
    ------
    ResumeError
        Naming the first array that does not fit.
    """
    run_dir = Path(run_dir)
    if shapes is None:
        if not (run_dir / CHECKPOINT_FILE).exists():
            return
        shapes = checkpoint_model_shapes(run_dir / CHECKPOINT_FILE)
    misfit = None
    for key, array in reference.items():
        if key not in shapes:
            misfit = f"it has no array {key!r}"
        elif tuple(shapes[key]) != tuple(np.shape(array)):
            misfit = f"its array {key!r} has shape {list(shapes[key])}, the model's {list(np.shape(array))}"
        if misfit:
            break
    else:
        extra = [key for key in shapes if key not in reference]
        if extra:
            misfit = f"its array {extra[0]!r} is not in the model"
    if misfit:
        raise ResumeError(
            f"Cannot resume {run_dir}: the model in its {CHECKPOINT_FILE} does not fit this run's model ({misfit}); "
            "the checkpoint is another run's: put back this run's own, or start afresh in a new folder."
        )


def check_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> ExperimentConfig | None:
    """Check, without writing, that ``run_dir`` can be started (or resumed) with ``cfg``.

    Returns
    -------
    ExperimentConfig or None
        The stored config when resuming, else None.

    Raises
    ------
    ResumeError
        A fresh run whose directory already holds a run; a resume without a stored
        config, with an empty or incomplete one, with a config that differs from the
        stored one or from the one its checkpoint was made with (other than the keys in
        ``RESUME_MAY_CHANGE``) or with fewer rounds than already done.
    CheckpointError
        A resume whose checkpoint is truncated, corrupt or of another format.
    """
    run_dir = Path(run_dir)
    check_output_folder(run_dir, "the run folder: output_dir and name, or --run-dir")
    finished = finished_rounds(run_dir)
    if not resume:
        if finished is not None:
            raise ResumeError(
                f"{run_dir} already holds a finished run ({rounds_phrase(finished)}); start the new run in another folder "
                "(the run folder is output_dir/name: e.g. --set name=NEW), or resume that one with more rounds "
                "(--resume with --set rounds=N)."
            )
        if (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists():
            raise ResumeError(
                f"{run_dir} already holds a run; continue it with --resume (medfed simulate --resume {run_dir}, "
                f"or medfed server --resume --run-dir {run_dir}), or start the new run in another folder."
            )
        return None
    if not (run_dir / CONFIG_FILE).is_file():
        raise ResumeError(f"Cannot resume {run_dir}: it has no {CONFIG_FILE}; is it a medfed run directory?")
    state = _checkpoint_state(run_dir)
    recorded = _recorded_config(state)
    _check_config_file_complete(run_dir / CONFIG_FILE, recorded)
    stored = load_config(run_dir / CONFIG_FILE, run_folder=True)
    # A path given relative (an older run folder, or --config beside --resume) is the same path.
    diffs = _differences(config_to_dict(with_absolute_paths(stored)), config_to_dict(with_absolute_paths(cfg)))
    if diffs:
        key, old, new = diffs[0]
        raise ResumeError(
            f"Cannot resume {run_dir}: its {CONFIG_FILE} has {key}={old!r} but this run asks for {key}={new!r}; "
            f"resume with the stored config ({_MAY_CHANGE_IN_WORDS})."
        )
    if cfg.rounds < stored.rounds:
        raise ResumeError(
            f"Cannot resume {run_dir} with rounds={cfg.rounds}: its {CONFIG_FILE} asks for {stored.rounds}; "
            "'rounds' may only grow."
        )
    if recorded is not None:
        _check_recorded_config(run_dir, recorded, cfg)
    if state is not None:
        run_key_of(run_dir, state)  # the sites will find their state again
    if finished is not None and finished >= cfg.rounds:
        raise ResumeError(
            f"{run_dir} has already finished its {rounds_phrase(finished)}; to train on, resume with more rounds "
            f"(--set rounds={finished + 1} or more)."
        )
    return stored


def rounds_phrase(count: int) -> str:
    """``"1 round"``, ``"3 rounds"``."""
    return f"{count} round{'' if count == 1 else 's'}"


def finished_rounds(run_dir: Path) -> int | None:
    """The rounds of the run in ``run_dir`` if its last record says it finished, else None."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_bytes().splitlines()
        last = json.loads(next(line for line in reversed(lines) if line.strip()))
    except (OSError, StopIteration, ValueError):  # none, empty, or a partly written last line
        return None
    if isinstance(last, dict) and last.get("event") == "end" and isinstance(last.get("rounds_done"), int):
        return last["rounds_done"]
    return None


@dataclass
class RunStart:
    """Where a run starts: round 0, or the last complete round of a checkpoint."""

    completed_rounds: int = 0
    checkpoint: Checkpoint | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> RunStart:
    """Check the run directory, write ``config.yaml`` and read the checkpoint to resume from.

    A resumed run without a checkpoint (killed before its first round finished) starts
    from round 0.
    """
    run_dir = Path(run_dir)
    check_run_dir(cfg, run_dir, resume)
    start = RunStart()
    if resume and (run_dir / CHECKPOINT_FILE).exists():
        # Read before config.yaml is written: a resume that fails leaves the run as it was.
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
        start = RunStart(checkpoint.server_round, checkpoint, list(checkpoint.state.get("history", [])))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    return start

"""The files of a run folder, named in one place.

``medfed simulate`` and ``medfed server`` write all four; ``medfed train`` writes
:data:`MODEL_FILE` beside its own ``metrics.json``.
"""

import json
from pathlib import Path

__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "METRICS_FILE", "MODEL_FILE", "REGISTERED_SITES_FILE",
           "TRAIN_METRICS_FILE", "read_registered_sites"]

#: The experiment as run (what ``--resume`` checks against and reloads).
CONFIG_FILE = "config.yaml"
#: The last complete round: global arrays, strategy state, RNG state (written atomically).
CHECKPOINT_FILE = "checkpoint.safetensors"
#: The final global model.
MODEL_FILE = "model.safetensors"
#: One JSON object per line, as things happen (:mod:`medfed.server.metrics_log`).
METRICS_FILE = "metrics.jsonl"
#: ``medfed train``'s result: test and validation metrics, history, recipe (one JSON object).
TRAIN_METRICS_FILE = "metrics.json"
#: ``medfed server`` (with TLS): node id -> the site name its key is registered under,
#: ``{"<node id>": "<name>"}``, rewritten when registrations change.
REGISTERED_SITES_FILE = "flower/registered_sites.json"


def read_registered_sites(run_dir: str | Path) -> dict[int, str] | None:
    """Node id -> registered site name, from :data:`REGISTERED_SITES_FILE`; None without one
    (simulation, ``--insecure``) or while it cannot be read."""
    try:
        data = json.loads((Path(run_dir) / REGISTERED_SITES_FILE).read_text(encoding="utf-8"))
        return {int(node_id): str(name) for node_id, name in data.items()}
    except (OSError, ValueError, AttributeError):
        return None

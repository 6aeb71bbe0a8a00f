"""The files of a run folder, named in one place.

``medfed simulate`` and ``medfed server`` write all four; ``medfed train`` writes
:data:`MODEL_FILE` beside its own ``metrics.json``.
"""

__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "METRICS_FILE", "MODEL_FILE"]

#: The experiment as run (what ``--resume`` checks against and reloads).
CONFIG_FILE = "config.yaml"
#: The last complete round: global arrays, strategy state, RNG state (written atomically).
CHECKPOINT_FILE = "checkpoint.safetensors"
#: The final global model.
MODEL_FILE = "model.safetensors"
#: One JSON object per line, as things happen (:mod:`medfed.server.metrics_log`).
METRICS_FILE = "metrics.jsonl"

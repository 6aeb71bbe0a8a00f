"""FairLoRA with patient groups, end to end in one process: sites with site folders whose
CSV carries a group column; some sites lack a group. The run reports per-group metrics,
ES-ACC and ES-AUC, and the server averages each S row by that group's counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from medfed.client.client_app import app as client_app
from medfed.client.site_state import SITE_STATE_DIR_KEY
from medfed.config import to_run_config
from medfed.server.checkpoint import save_arrays
from medfed.server.server_app import RESUME_KEY, RUN_DIR_KEY, initial_model_arrays
from medfed.server.server_app import app as server_app
from medfed.simulation.local import LocalGrid


def _site_folder(root: Path, groups: list[int], seed: int) -> Path:
    """A 28 px grayscale site: brightness tells the class; one CSV with split and group columns."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = ["filename,label,group,split"]
    for i in range(16):
        label, split = i % 2, "test" if i >= 12 else "train"
        image = (rng.integers(0, 80, size=(28, 28)) + 100 * label).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{label},{groups[i % len(groups)]},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def one_thread():
    # Deployed sites (data-path) keep torch's thread count; on a shared CI core more
    # threads only oversubscribe it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_fairlora_with_groups_reports_equity_scaled_metrics(tiny_root, tiny_config, tmp_path):
    # Prepare: a backbone, and three sites: groups {0}, {0, 1}, {1}.
    cfg0 = tiny_config(tiny_root, tmp_path)
    backbone = tmp_path / "backbone.safetensors"
    save_arrays(backbone, initial_model_arrays(cfg0))
    cfg = tiny_config(tiny_root, tmp_path, rounds=1, strategy={"name": "fairlora", "params": {"num_groups": 2}},
                      model={"name": "medvit_v2_nano", "init_from": str(backbone)})
    sites = [_site_folder(tmp_path / f"s{i}", groups, seed=i) for i, groups in enumerate([[0], [0, 1], [1]])]
    run_dir = tmp_path / "run"
    nodes = [{"data-path": str(site), "site-name": f"hospital-{i}"} for i, site in enumerate(sites)]
    grid = LocalGrid(client_app, nodes, {**to_run_config(cfg), SITE_STATE_DIR_KEY: str(run_dir / "site-state")})
    server_config = {**to_run_config(cfg), RUN_DIR_KEY: str(run_dir), RESUME_KEY: False}
    # Execute
    server_app(grid=grid, context=Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                          run_config=server_config))
    # Assert
    rounds = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"round"' in l]
    evaluate = rounds[-1]["evaluate"]
    assert {"acc-group-0", "acc-group-1", "es-acc", "es-auc"} <= set(evaluate)
    assert evaluate["es-acc"] <= evaluate["acc"] + 1e-12
    sites_train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if '"site"' in l and '"train"' in l]
    counts = {r["site"]: (r["metrics"]["num-examples-group-0"], r["metrics"]["num-examples-group-1"])
              for r in sites_train if r["round"] == 1}
    assert counts == {"hospital-0": (12, 0), "hospital-1": (6, 6), "hospital-2": (0, 12)}

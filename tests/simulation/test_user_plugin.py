"""A user's strategy plug-in, named by its import path, gets the same client hooks and
reply checks as medfed's own. The class below is the README's example."""

from __future__ import annotations

import numpy as np
from flwr.serverapp import strategy as flwr_strategy

from medfed.server.checkpoint import load_arrays
from medfed.server.server_app import initial_model_arrays
from medfed.simulation.local import run_local
from medfed.strategies import ClientHooks, MedfedStrategy, client_hooks_for, create_strategy

# --- README example: each site keeps its own classifier head (FedPer-style) ---------------
import torch
from torch import nn


class LocalHeadHooks(ClientHooks):
    """Send everything but the head; keep the head at the site between rounds."""

    def _is_head(self, key: str) -> bool:
        return key.startswith(self.config.get("head-prefix", "head."))

    def sent_arrays(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if not self._is_head(k)}

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if self._is_head(k)}


class LocalHead(MedfedStrategy, flwr_strategy.FedAvg):
    """FedAvg of the body; heads stay personal."""

    client_hooks = LocalHeadHooks

    def __init__(self, *, head_prefix: str = "head.", **kwargs):
        super().__init__(**kwargs)
        self.head_prefix = head_prefix

    def client_params(self) -> dict:
        return {"head-prefix": self.head_prefix}  # sent to the sites with every instruction
# --- end of the README example ------------------------------------------------------------


def test_user_plugin_by_import_path_gets_its_hooks_and_the_reply_checks():
    name = f"{__name__}:LocalHead"
    strategy = create_strategy(name, {"head_prefix": "head."}, num_sites=3)
    assert client_hooks_for(name) is LocalHeadHooks
    assert isinstance(strategy, MedfedStrategy) and strategy.client_params() == {"head-prefix": "head."}


def test_user_plugin_keeps_the_heads_at_the_sites(tiny_root, tiny_config, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_root, tmp_path, strategy={"name": f"{__name__}:LocalHead"})
    initial = initial_model_arrays(cfg)
    # Execute
    run_dir = run_local(cfg)
    # Assert: the server's head never moved; each site has its own.
    final = load_arrays(run_dir / "model.safetensors")
    np.testing.assert_array_equal(final["head.weight"], initial["head.weight"])
    assert not np.array_equal(final["stem.0.0.weight"], initial["stem.0.0.weight"])
    heads = sorted((run_dir / "site-state").glob("site-*/*/round-000002.safetensors"))
    assert len(heads) == 3

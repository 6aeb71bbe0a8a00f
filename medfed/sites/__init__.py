"""How a federation's sites are built from one dataset: the multi-center domain-shift simulator.

Real federations fail not on clean IID splits but because every hospital has its own
scanner, protocol, case mix, size and patients. This package makes that shift explicit,
controllable, seeded and visible:

* :mod:`medfed.sites.partition`: splitting sample indices among sites (IID, Dirichlet
  label skew, shares per class);
* :mod:`medfed.sites.corruptions`: MedMNIST-C-style image corruptions (acquisition shift);
* :mod:`medfed.sites.profiles`: site profiles (corruption chain, class mix, size, patient
  groups, held-out), the federation plan built from the experiment, and the site datasets;
* ``medfed/sites/scenarios/*.yaml``: named scenarios, documented YAML a user can copy;
* :mod:`medfed.sites.preview`: the montage and summary of ``medfed sites``.

It knows no network and no model: it imports :mod:`medfed.data`, NumPy, SciPy and
scikit-image, never Flower or :mod:`medfed.models`. Both the ClientApp (a simulated site
builds its own data from its partition id and the experiment) and the launcher use it.
Submodules are imported on use, so that ``import medfed.sites`` stays light.
"""

from __future__ import annotations

__all__ = ["corruptions", "partition", "profiles"]

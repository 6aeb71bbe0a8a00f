"""Every deploy test runs in its own temporary folder, so what a command writes in its
working folder by default (a site's ./medfed-state) never lands in the repository."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

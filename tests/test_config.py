"""Configs are found by name in a checkout and in an installed wheel (nucleus_seg/configs)."""

from __future__ import annotations

import pytest


def test_bundled_config_by_name_from_any_folder(tmp_path, monkeypatch):
    from nucleus_seg.config import get_nucleus_cfg

    monkeypatch.chdir(tmp_path)  # no configs/ here: the bundled one is found by its name
    cfg = get_nucleus_cfg("nucleus_R101_FPN_scratch.yaml", ["SOLVER.BASE_LR", "0.003"])
    assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[8], [16], [32], [64], [128]]
    assert cfg.SOLVER.BASE_LR == 0.003
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        get_nucleus_cfg("no_such.yaml")

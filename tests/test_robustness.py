"""benchmarks/robustness.py: the variants are what they claim, and the suite runs end to end on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import boundary_sweep  # noqa: E402
import robustness  # noqa: E402
import significance_sweep  # noqa: E402


def random_model_args(cfg, tmp_path) -> list[str]:
    """``--config-file`` and ``--weights`` of ``cfg`` with seeded random weights, as the benchmarks take them."""
    from detectron2.modeling import build_model

    config = tmp_path / "cfg.yaml"
    config.write_text(cfg.dump())
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "w.pth")
    return ["--config-file", str(config), "--weights", str(tmp_path / "w.pth")]


def test_photometric_variants_do_what_they_say(dsb_sample):
    image, labels = dsb_sample
    dim = robustness.photometric(image, labels, "dim16")
    assert dim.dtype == np.uint16 and np.percentile(dim, 1) >= 80 and np.percentile(dim, 99.9) <= 520
    saturated = robustness.photometric(image, labels, "saturated8")
    ids = np.unique(labels[labels > 0])
    clipped = np.mean([saturated[labels == i].max() == 255 for i in ids])
    assert saturated.dtype == np.uint8 and 0.03 <= clipped <= 0.08
    flat = robustness.photometric(np.full((64, 128), 1000, np.uint16), np.zeros((64, 128), int), "ramp")
    assert flat[:, -1].mean() / flat[:, 0].mean() == pytest.approx(3.0, rel=0.02)  # +-50% across the field
    blurred = robustness.photometric(image, labels, "blur2")
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(image.astype(np.float32), axis=1)).mean()
    for kind in robustness.BACKGROUND:
        field = robustness.background(kind, 24.0)
        assert field.shape == (512, 512) and field.dtype == np.uint16


@pytest.mark.slow
def test_the_suite_scores_variants_and_background_fields(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("NUCLEUS_DATASETS", str(tmp_path / "datasets"))
    tiny_cfg.NUCLEUS.PREDICT.DIAMETER = -1.0
    line = robustness.main([*random_model_args(tiny_cfg, tmp_path), "--zooms", "0.5",
                            "--variants", "gamma2", "--background", "haze", "--output", str(tmp_path / "out")])
    rows = line["datasets"]["nucleus_dsb_sample"]
    assert set(rows) == {"x0.5", "gamma2"}
    assert rows["x0.5"]["true_diameter"] == pytest.approx(rows["gamma2"]["true_diameter"] / 2, rel=0.1)
    assert rows["x0.5"]["watershed_dsb"] > 0.1 and "estimated_diameter" in rows["x0.5"]
    # at IoU 0.5 the watershed finds most of the sample's nuclei at x0.5; the random model's figures are rates too
    assert rows["x0.5"]["watershed_recall50"] > 0.3 and 0 < rows["x0.5"]["watershed_precision50"] <= 1
    assert all(0 <= rows[v][k] <= 1 for v in rows for k in ("recall50", "precision50"))
    assert rows["gamma2"]["image_diameter"] > 0 and rows["x0.5"]["image_diameter"] < rows["gamma2"]["true_diameter"]
    haze = line["background"]["haze"]
    assert set(haze) == {"detections", "detections_rules_off", "detections_at_known_diameter", "known_diameter",
                         "watershed_detections"}
    assert haze["detections"] <= haze["detections_rules_off"]  # the rules only remove
    assert haze["known_diameter"] == pytest.approx(rows["gamma2"]["true_diameter"], rel=0.01)
    assert set(line["summary"]["nucleus_dsb_sample"]) == {"mean_dsb", "min_dsb", "below_bar"}
    assert json.loads((tmp_path / "out" / "robustness.json").read_text())["datasets"] == line["datasets"]
    assert (tmp_path / "out" / "robustness_grid.png").stat().st_size > 10_000


def test_the_summary_reads_background_fields_alone():
    """--zooms "" --variants "" (background fields only) leaves a dataset with no rows: summarised as nothing,
    not a crash after the suite's work is done."""
    report = {"datasets": {"nucleus_dsb_sample": {}},
              "background": {"noise": {"detections": 3, "watershed_detections": 900}}}
    summary = robustness.summarize(report)
    assert summary == {"background_max_detections": 3}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["significance", "edge"])
def test_the_significance_sweep_judges_one_prediction_at_every_threshold(tiny_cfg, tmp_path, rule):
    """benchmarks/significance_sweep.py: each threshold keeps a subset of the one below it, on images and fields."""
    line = significance_sweep.main([*random_model_args(tiny_cfg, tmp_path),
                                    "--dataset", "nucleus_dsb_sample", "--images", "1", "--variants", "gamma2",
                                    "--background", "noise", "--thresholds", "0,5,50", "--rule", rule])
    assert line["benchmark"] == "significance_sweep" and set(line["background"]) == {"noise"}
    assert line["variant"].startswith(f"rule {rule};")
    for variant in ("clean", "gamma2"):
        (dsb0, n0), (_, n5), (dsb50, n50) = line[variant].values()
        assert n0 >= n5 >= n50 and n0 > 0 and 0 <= dsb50 <= 1 and 0 <= dsb0 <= 1
    counts = list(line["background"]["noise"].values())
    assert counts == sorted(counts, reverse=True)


def test_the_significance_sweep_judges_the_labels_own_outlines_without_a_model(tmp_path):
    """--on-labels: the share of the sample's 125 labelled nuclei each threshold drops, growing with it; noise
    lowers every nucleus's significance, so more are dropped than clean."""
    line = significance_sweep.main(["--config-file", "configs/nucleus_R18_FPN_cpu_demo.yaml", "--dataset",
                                    "nucleus_dsb_sample", "--variants", "noise_snr5", "--rule", "edge",
                                    "--on-labels", "--thresholds", "0,5,1e9", "--save", str(tmp_path / "l.jsonl")])
    assert line["variant"].startswith("rule edge on labels;") and "background" not in line
    for variant in ("clean", "noise_snr5"):
        assert line[variant]["nuclei"] == 125
        shares = list(line[variant]["dropped"].values())
        assert shares == sorted(shares) and shares[-1] > 0.9
    assert line["noise_snr5"]["dropped"]["5"] > line["clean"]["dropped"]["5"]


@pytest.mark.slow
def test_the_boundary_sweep_scores_each_setting_on_one_prediction(tiny_cfg, tmp_path):
    """benchmarks/boundary_sweep.py: every level x band x smoothing scored; level 0 is the prediction as made,
    whatever the widths; the module's widths are back to their values after the sweep."""
    from nucleus_seg.inference import boundaries

    line = boundary_sweep.main([*random_model_args(tiny_cfg, tmp_path),
                                "--dataset", "nucleus_dsb_sample", "--images", "1", "--variants", "",
                                "--levels", "0,0.4", "--bands", "0.0625,0.125", "--smooths", "0.0625"])
    scores = line["clean"]
    assert set(scores) == {"0/0.0625/0.0625", "0/0.125/0.0625", "0.4/0.0625/0.0625", "0.4/0.125/0.0625"}
    assert scores["0/0.0625/0.0625"] == scores["0/0.125/0.0625"]
    assert all(0 <= v <= 1 for v in scores.values())
    assert (boundaries.BAND_PER_DIAMETER, boundaries.SMOOTH_PER_DIAMETER) == (1 / 16, 1 / 16)

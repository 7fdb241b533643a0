"""`make demo`'s script end to end with a few iterations: every phase runs, the model is the only checkpoint
left, and summary.json and the closing lines say what a newcomer needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHORT = " ".join([
    "SOLVER.MAX_ITER 3 SOLVER.WARMUP_ITERS 1 SOLVER.STEPS (2,) NUCLEUS.TRAIN.TIME_BUDGET_MINUTES 0.0",
    "NUCLEUS.SYNTH.NUM_TRAIN 4 NUCLEUS.SYNTH.NUM_VAL 2 NUCLEUS.SYNTH.SIZE 128 INPUT.NUCLEUS.CROP_SIZE 128",
    "DATALOADER.NUM_WORKERS 0 MODEL.RPN.POST_NMS_TOPK_TRAIN 64 MODEL.RPN.PRE_NMS_TOPK_TEST 200",
    "MODEL.RPN.POST_NMS_TOPK_TEST 100 TEST.DETECTIONS_PER_IMAGE 20",
])


@pytest.mark.slow
def test_the_demo_runs_every_phase_and_leaves_one_model(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               NUCLEUS_DATASETS=str(tmp_path / "datasets"), NUCLEUS_DEMO_OUT=str(out), NUCLEUS_DEMO_OPTS=SHORT,
               MPLBACKEND="Agg")
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "demo" and set(summary["minutes"]) == {"setup", "data", "training", "evaluation"}
    assert 0 <= summary["dsb_sample"] <= 1 and summary["watershed_sample"] == pytest.approx(0.3315, abs=0.01)
    assert isinstance(summary["bfloat16"], bool) and summary["cpu"]
    assert sorted(p.name for p in (out / "train").glob("*.pth")) == ["model_final.pth"]  # nothing else kept
    text = proc.stdout
    assert "real DSB-2018 sample, DSB score: model" in text and "nucleus-predict --config-file" in text
    for phase in ("1/4", "2/4", "3/4", "4/4"):
        assert f"] {phase} " in text, phase
    assert (out / "predict" / "image_labels.tif").is_file() and (out / "eval" / "nucleus_dsb_sample").is_dir()

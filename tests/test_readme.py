"""The README's Python API runs as written (on the CPU here), with the files `make demo` leaves."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from detectron2.modeling import build_model

README = Path(__file__).resolve().parent.parent / "README.md"
SAMPLE = Path(__file__).resolve().parent.parent / "nucleus_seg" / "data" / "sample" / "image.tif"


def python_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {heading}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_snippet_runs_as_written(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = tmp_path / "output" / "demo" / "train"
    train.mkdir(parents=True)
    (train / "config.yaml").write_text(tiny_cfg.dump())  # what make demo leaves: its config and weights
    torch.manual_seed(0)
    torch.save({"model": build_model(tiny_cfg).state_dict()}, train / "model_final.pth")
    (tmp_path / "nucleus_seg" / "data" / "sample").mkdir(parents=True)
    (tmp_path / "nucleus_seg" / "data" / "sample" / "image.tif").symlink_to(SAMPLE)
    scope: dict = {}
    exec(compile(python_block("Python API"), "README.md", "exec"), scope)
    assert scope["instances"].image_size == (512, 512)
    assert scope["labels"].shape == (512, 512) and scope["large"].labels.shape == (512, 512)
    assert scope["predictor"].device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert len(scope["outlines"]) == int(scope["large"].labels.max())
    assert (tmp_path / "sample_rois.zip").stat().st_size > 0 and (tmp_path / "sample.geojson").stat().st_size > 0

"""Which weight average (``NUCLEUS.TRAIN.EMA_DECAY``) for the CPU demo: one ``nucleus-train`` run of the demo
config (its time budget, its data), with averages at several decays kept beside the raw weights and each saved
at the end, then every set scored on synthetic validation images (never the real sample).

    python benchmarks/demo_ema_sweep.py --output /tmp/ema_sweep --decays 0.99,0.995,0.998 \\
        --val-root /tmp/demo_ds --val-images 16

Prints one JSON line per weight set and a summary line (the raw weights are ``model_final.pth``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from nucleus_seg.cli.train import main as nucleus_train
from nucleus_seg.engine import trainer as trainer_module
from nucleus_seg.engine.hooks import WeightAverage


class SavedAverage(WeightAverage):
    """An average that never goes into the model; saved as ``model_ema_<decay>.pth`` when training ends."""

    def apply(self) -> None:
        pass

    def after_train(self) -> None:
        path = Path(self.trainer.cfg.OUTPUT_DIR) / f"model_ema_{self.decay:g}.pth"
        torch.save({"model": self.average, "iteration": self.trainer.iter}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R18_FPN_cpu_demo.yaml")
    parser.add_argument("--output", required=True)
    parser.add_argument("--decays", default="0.99,0.995,0.998")
    parser.add_argument("--val-root", required=True, help="NUCLEUS_DATASETS for the validation set")
    parser.add_argument("--val-images", type=int, default=16)
    parser.add_argument("opts", nargs="*", default=[])
    args = parser.parse_args()
    decays = [float(d) for d in args.decays.split(",")]
    train_dir = Path(args.output) / "train"

    build_hooks = trainer_module.NucleusTrainer.build_hooks

    def with_averages(self):
        hooks = build_hooks(self)
        return [SavedAverage(d) for d in decays] + hooks

    trainer_module.NucleusTrainer.build_hooks = with_averages
    started = time.time()
    status = nucleus_train(["--config-file", args.config_file, "--overwrite", "OUTPUT_DIR", str(train_dir),
                            "DATASETS.TEST", "()", "NUCLEUS.TRAIN.EMA_DECAY", "0.0", *args.opts])
    if status:
        raise SystemExit(f"nucleus-train exited with {status}")
    train_minutes = (time.time() - started) / 60
    weights = {"raw": train_dir / "model_final.pth"} | {
        f"ema {d:g}": train_dir / f"model_ema_{d:g}.pth" for d in decays}
    env = dict(os.environ, NUCLEUS_DATASETS=args.val_root)
    nucleus_eval = str(Path(sys.executable).with_name("nucleus-eval"))
    scores = {}
    for name, path in weights.items():
        out = Path(args.output) / "eval" / name.replace(" ", "_")
        subprocess.run([nucleus_eval, "--config-file", str(train_dir / "config.yaml"), "--dataset", "nucleus_synth_val",
                        "--output", str(out), "MODEL.WEIGHTS", str(path),
                        "NUCLEUS.SYNTH.NUM_VAL", str(args.val_images)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "nucleus_synth_val" / "metrics.json").read_text())
        scores[name] = round(metrics["dsb_score"], 4)
        print(json.dumps({"benchmark": "demo_ema_sweep", "weights": name, "synth_val_dsb": scores[name],
                          "ap50": round(metrics.get("ap50", float("nan")), 4)}), flush=True)
    print(json.dumps({"benchmark": "demo_ema_sweep", "config": args.config_file,
                      "train_minutes": round(train_minutes, 2), "val_images": args.val_images, "synth_val_dsb": scores,
                      "selection": "synthetic validation only, never the real sample"}))


if __name__ == "__main__":
    main()

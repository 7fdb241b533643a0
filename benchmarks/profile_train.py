"""Where a training step's time goes: torch.profiler over a few iterations of NucleusTrainer.

Prints data wait vs step time and the top operators by CUDA and by CPU time (a table, not JSON: this
is for deciding what to optimise, not a result to compare).

    python benchmarks/profile_train.py --iters 40 --profile-iters 8
    python benchmarks/profile_train.py --gaps 25   # also: where the GPU idles, charged to the host's frames
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_dataset  # noqa: E402
from profile_infer import gap_report  # noqa: E402


def main() -> None:
    import torch
    from detectron2.engine import HookBase

    from nucleus_seg.config import get_nucleus_cfg
    from nucleus_seg.engine.trainer import NucleusTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/nucleus_R101_FPN_scratch.yaml")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--profile-iters", type=int, default=8)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "nucleus_bench"))
    parser.add_argument("--gaps", type=int, default=0, metavar="N",
                        help="record Python stacks too, and report the N host frames where the GPU idles longest")
    parser.add_argument("--trace", default="", help="where to keep that timeline (chrome trace, .json.gz)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    cfg = get_nucleus_cfg(args.config_file, args.opts)
    cfg.DATASETS.TRAIN = (benchmark_dataset(Path(args.data_root), 128),)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER = args.iters
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.OUTPUT_DIR = tempfile.mkdtemp()
    start = args.iters - args.profile_iters - 2

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(wait=start, warmup=1, active=args.profile_iters, repeat=1),
        with_stack=bool(args.gaps),
    )

    class Step(HookBase):
        def before_train(self):
            prof.start()

        def after_step(self):
            prof.step()

        def after_train(self):
            prof.stop()

    trainer = NucleusTrainer(cfg)
    trainer.register_hooks([Step()])
    trainer.train()
    hist = trainer.storage.history
    print(f"median s/iter {hist('time').median(20):.4f}  data_time {hist('data_time').median(20):.4f}")
    averages = prof.key_averages()
    for key in ("device_time_total", "cpu_time_total", "self_cpu_time_total"):
        print(f"--- top by {key} over {args.profile_iters} iterations")
        try:
            print(averages.table(sort_by=key, row_limit=25, max_name_column_width=60))
        except Exception as exc:  # sort keys differ between torch versions
            print(f"(cannot sort by {key}: {exc})")
    if args.gaps:
        trace = args.trace or os.path.join(tempfile.gettempdir(), "train_trace.json.gz")
        prof.export_chrome_trace(trace)
        print(gap_report(trace, args.gaps))


if __name__ == "__main__":
    main()

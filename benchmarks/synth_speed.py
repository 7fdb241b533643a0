"""Synthetic generator speed on ONE core: ``generate_image`` at 512x512 (goal >= 20 images/s), and the
writers: DSB layout (generation + one PNG per nucleus) and label layout (generation + one 16-bit label PNG,
what the built-in synthetic sets use). Prints one JSON line.

    .venv/bin/python benchmarks/synth_speed.py [--num 100] [--size 512] [--style fluorescence]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100, help="images to time generate_image on")
    parser.add_argument("--write-num", type=int, default=20, help="images to time the DSB writer on")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--style", default="fluorescence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, honestly
    import cv2

    cv2.setNumThreads(1)
    from nucleus_seg.data.synth import generate_image, image_rng, write_dataset

    generate_image(image_rng(args.seed, 9, 0), args.size, args.style)  # warm-up (imports, caches)
    nuclei = 0
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(args.num):
        _, label = generate_image(image_rng(args.seed, 0, i), args.size, args.style)
        nuclei += int(label.max())
    gen_s, gen_cpu = time.perf_counter() - start, time.process_time() - cpu

    write: dict[str, float] = {}
    for layout in ("dsb", "labels"):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_dataset(os.path.join(tmp, "out"), args.write_num, size=args.size, style=args.style,
                          seed=args.seed, progress=False, workers=1, layout=layout)
            write[layout] = time.perf_counter() - start

    print(json.dumps({
        "benchmark": "synth_speed", "size": args.size, "style": args.style, "cores": 1,
        "images": args.num, "mean_nuclei": round(nuclei / args.num, 1),
        "generate_images_per_s": round(args.num / gen_s, 2), "goal_images_per_s": 20,
        "generate_images_per_cpu_s": round(args.num / gen_cpu, 2),
        "write_dsb_images_per_s": round(args.write_num / write["dsb"], 2),
        "write_labels_images_per_s": round(args.write_num / write["labels"], 2),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

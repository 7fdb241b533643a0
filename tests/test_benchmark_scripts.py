"""The benchmark scripts (predict_throughput.py, adapt_suite.py, writer_throughput.py, ...): what they compare and
report, on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from nucleus_seg.config import get_nucleus_cfg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import adapt_suite  # noqa: E402
import infer_throughput  # noqa: E402
import predict_stages  # noqa: E402
import predict_throughput  # noqa: E402
import profile_infer  # noqa: E402
import trace_predict  # noqa: E402
import train_throughput  # noqa: E402
import writer_throughput  # noqa: E402


def test_nucleus_predict_writes_what_the_plain_loop_writes_in_fp32(tmp_path, monkeypatch):
    """Both sides end to end on two small 16-bit TIFFs; with AMP off the label images must agree exactly. NMS as
    on a GPU (the parallel fixed point, 20 groups to a chunk: a batch of 8 is 40 RPN groups), so the fast-path
    check covers that path."""
    from nucleus_seg.modeling import fast_inference

    monkeypatch.setattr(fast_inference, "SERIAL_NMS_DEVICES", ())
    monkeypatch.setattr(fast_inference, "NMS_CHUNK", 20 * 1000 * 1000)
    result = predict_throughput.main([
        "--config-file", "configs/nucleus_R18_FPN_cpu_demo.yaml", "--num-images", "8", "--size", "192",
        "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
        "NUCLEUS.PREDICT.AMP", "False", "NUCLEUS.PREDICT.SCORE_THRESH", "0.3", "TEST.DETECTIONS_PER_IMAGE", "30",
        "DATALOADER.NUM_WORKERS", "0", "--variant", "batch1", "NUCLEUS.PREDICT.BATCH_SIZE=1",
        "--profile", str(tmp_path / "profile.txt"),
    ])
    for side in ("plain_loop", "nucleus_predict", "nucleus_predict+batch1", "nucleus_predict+profiled"):
        assert result[side]["img_per_s"] > 0
        assert len(list((tmp_path / "out" / side).glob("*_labels.tif"))) == 8
        assert 0 < result[side]["first_output_s"] < result[side]["seconds"]  # the first label file, then the rest
        assert result[side]["steady_img_per_s"] > 0
    assert result["nucleus_predict"]["writer_wait_s"] >= 0 and "writer_wait_s" not in result["plain_loop"]
    # no writer processes on the CPU: no image is left to them when the model is done
    assert result["nucleus_predict"]["images_left_for_writers"] == 0 and "model_done_s" not in result["nucleus_predict"]
    assert result["variant_overrides"]["nucleus_predict+batch1"] == ["NUCLEUS.PREDICT.BATCH_SIZE", "1"]
    # the profiled side (cProfile slows it) is reported, not counted
    assert result["predict_speedup_variants"].keys() == {"nucleus_predict", "nucleus_predict+batch1"}
    assert (tmp_path / "out" / "nucleus_predict" / "submission.csv").is_file()  # every output format
    agreement = result["agreement"]
    assert agreement["matched_instances"] > 0 and agreement["max_count_diff_frac"] == 0
    assert agreement["median_iou"] == pytest.approx(1.0)
    fast = result["fast_path_agreement"]  # batched NMS and half GroupNorm vs detectron2's own, same crops
    assert fast["crops"] == 8 and fast["instances"] > 0 and fast["max_count_diff_frac"] == 0
    assert fast["median_iou"] == pytest.approx(1.0)
    profile = (tmp_path / "profile.txt").read_text()  # the nucleus-predict side's own functions, profiled
    assert "predict_files" in profile and "_forward" in profile


def test_predict_stages_times_every_stage_of_the_tiled_path(tmp_path):
    """Each stage of nucleus-predict's path, timed alone on small tiled images (2x2 tiles of 128 px)."""
    result = predict_stages.main([
        "--config-file", "configs/nucleus_R18_FPN_cpu_demo.yaml", "--num-images", "2", "--size", "192",
        "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--variant", "small",
        "NUCLEUS.PREDICT.TILE_SIZE", "128", "NUCLEUS.PREDICT.TILE_OVERLAP", "32", "TEST.DETECTIONS_PER_IMAGE", "30",
    ])
    stages = result["ms_per_image"]
    assert set(stages) == {"read", "normalize", "forward_tiles", "detect_tiles", "predict_large", "tile_batcher",
                           "stitch", "forward_whole", "predict_labels_whole", "write_labels", "write_overlay",
                           "write_csv", "write_submission", "write_coco", "write_all"}
    assert all(ms > 0 for ms in stages.values())
    assert result["variant"] == "small" and result["tile_size"] == 128
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:1] == ["field_0000_labels.tif"]


def test_gpu_idle_time_is_charged_to_the_innermost_host_frame_running_then(tmp_path):
    """A timeline of kernels on two streams with idle time between: 30 us of idle inside ``nms`` (nested in
    ``forward``), 20 us in ``forward`` after ``nms`` returned, 5 us of which in a torch frame inside it."""
    import gzip
    import json

    def event(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}

    events = [
        event("python_function", "detectron2/modeling/x.py(1): forward", 0, 100),
        event("python_function", "nucleus_seg/modeling/fast_inference.py(9): nms", 10, 40),
        event("python_function", "torch/nn/modules/module.py(5): _call_impl", 75, 5),
        event("cuda_runtime", "cudaStreamSynchronize", 12, 8),
        event("python_function", "threading.py(1): run", 0, 500, tid=2),  # a helper thread: not the main one
        event("python_function", "nucleus_seg/data/io.py(3): normalize", 0, 90, tid=2),
        event("kernel", "k1", 0, 20, tid=7),
        event("kernel", "k2", 15, 5, tid=8),  # overlaps k1 on another stream: one busy interval
        event("gpu_memcpy", "copy", 50, 20, tid=7),
        event("kernel", "k3", 90, 20, tid=7),
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert profile_infer.busy_intervals(events) == [(0, 20), (50, 70), (90, 110)]
    report = profile_infer.gap_report(str(trace), 5)
    assert "host window 0.10 ms" in report and "idle 0.05 ms in 2 gaps" in report  # 20-50, 70-90 in 0-100
    lines = report.splitlines()
    project = lines[lines.index("--- GPU idle time by innermost nucleus_seg/detectron2 frame (ms, share of idle)") + 1:]
    assert project[0].split() == ["0.03", "60.0%", "nucleus_seg/modeling/fast_inference.py(9):", "nms"]
    assert project[1].split() == ["0.02", "40.0%", "detectron2/modeling/x.py(1):", "forward"]
    python = lines[lines.index("--- GPU idle time by innermost Python frame (ms, share of idle)") + 1:]
    assert [line.split()[:2] for line in python[:3]] == [["0.03", "60.0%"], ["0.01", "30.0%"], ["0.01", "10.0%"]]
    assert "_call_impl" in python[2]  # 75-80 inside forward: the torch frame is innermost there


def test_nucleus_predicts_gpu_gaps_are_charged_to_each_threads_stage_and_op():
    """Two host threads: the main one in a stage range (``ns:forward``, an op inside it), a stream thread waiting
    in another; gaps under the floor are ignored, and a thread idle through every gap is left out."""

    def event(cat, name, ts, dur, tid):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}

    events = [
        event("kernel", "k1", 0, 100, 7), event("kernel", "k2", 300, 100, 7),  # gap 100-300
        event("kernel", "k3", 450, 50, 7), event("kernel", "k4", 520, 80, 7),  # gap 400-450; 500-520 too short
        event("user_annotation", "ns:forward", 0, 600, 1),
        event("cpu_op", "aten::nonzero", 150, 100, 1),  # inside the 100-300 gap: 100 us of it
        event("user_annotation", "ns:wait_future", 90, 400, 2),
        event("cpu_op", "aten::copy_", 0, 10, 3),  # a thread busy only while the GPU is
    ]
    found = trace_predict.analyse(events, min_gap_us=30)
    assert found["gaps"] == 2 and found["gap_ms"] == 0.2 and found["gpu_busy_ms"] == 0.3
    assert found["span_ms"] == 0.6 and found["gpu_busy_percent"] == 55.0
    assert set(found["gap_ms_by_thread"]) == {"1", "2"}
    main = found["gap_ms_by_thread"]["1"]
    assert main["stage"] == [["ns:forward", 0.2]]
    assert dict(main["op"]) == {"aten::nonzero": 0.1, "(none)": 0.1}
    assert found["gap_ms_by_thread"]["2"]["stage"] == [["ns:wait_future", 0.2]]
    assert "error" in trace_predict.analyse([e for e in events if e["cat"] != "kernel"])


def test_speed_variants_name_what_they_change_and_typos_stop_before_any_timing():
    assert train_throughput.parse_variants("1x8,3x8+compile") == [
        (1, 8, []), (3, 8, ["NUCLEUS.TRAIN.COMPILE", "True"])]
    # the like-for-like loss variant: vanilla's precision and data, as overrides that the config accepts
    (_, _, overrides), = train_throughput.parse_variants("1x8+fp16+d2aug")
    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", overrides)
    assert cfg.NUCLEUS.TRAIN.AMP_DTYPE == "float16" and tuple(cfg.INPUT.NUCLEUS.SCALE_RANGE) == (1.0, 1.0)
    assert cfg.INPUT.NUCLEUS.NOISE_PROB == cfg.INPUT.NUCLEUS.BLUR_PROB == 0.0 and not cfg.INPUT.NUCLEUS.ROT90
    assert infer_throughput.parse_variant("32+cl+compile") == (32, {"cl", "compile"})
    for bad in ("3x8+fast", "3by8"):
        with pytest.raises(SystemExit, match="--variants"):
            train_throughput.parse_variants(bad)
    with pytest.raises(SystemExit, match="--variants"):
        infer_throughput.parse_variant("32cl")


@pytest.mark.parametrize("procs,batch", [(1, 8), (3, 8), (1, 16), (2, 16)])
def test_more_images_per_step_follow_the_linear_scaling_rule_in_images(procs, batch):
    """3 processes x 8 images or 1 x 16: batch and LR x3 or x2, warm-up and LR steps a third or half as many
    iterations (the same images), as nucleus-train's auto scaling does; 1 x 8 keeps the config's schedule. The
    trainer's own auto scaling then changes nothing."""
    import argparse

    from detectron2.engine import DefaultTrainer

    base = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml")
    scale = procs * batch // base.SOLVER.IMS_PER_BATCH
    args = argparse.Namespace(config_file="configs/nucleus_R101_FPN_scratch.yaml", opts=[], num_gpus=1,
                              procs_per_gpu=procs, batch=batch, iters=40)
    cfg = train_throughput._cfg(args, "/tmp/unused", "some_dataset")
    solver = cfg.SOLVER
    images, lr, warmup, steps = solver.IMS_PER_BATCH, solver.BASE_LR, solver.WARMUP_ITERS, solver.STEPS
    assert images == batch * procs and lr == pytest.approx(base.SOLVER.BASE_LR * scale)
    assert warmup == round(base.SOLVER.WARMUP_ITERS / scale) and solver.MAX_ITER == 40
    assert steps == tuple(round(s / scale) for s in base.SOLVER.STEPS)
    rescaled = DefaultTrainer.auto_scale_workers(cfg, procs).SOLVER  # what the trainer does next: nothing
    again = rescaled.IMS_PER_BATCH, rescaled.BASE_LR
    assert again == (images, lr)


def test_adapt_suite_summary_applies_the_bars_and_subtracts_the_control_arms():
    rows = [
        {"target": "x1", "control": False, "dsb_before": 0.60, "gain": -0.02},
        {"target": "noise", "control": False, "dsb_before": 0.30, "gain": 0.12},
        {"target": "easy", "control": False, "dsb_before": 0.80, "gain": 0.00},
        {"target": "noise", "control": True, "dsb_before": 0.30, "gain": 0.05},
    ]
    summary = adapt_suite.summarize(rows)
    assert summary["targets_below_0.70"] == 2 and summary["mean_gain_below_0.70"] == pytest.approx(0.05)
    assert summary["bar_mean_gain_0.05"] and not summary["bar_no_loss_over_0.01"]
    assert summary["x1_gain"] == -0.02 and not summary["bar_x1_not_worse"]
    assert summary["gain_over_control"] == {"noise": pytest.approx(0.07)}


def test_adapt_suite_settings_are_typed_and_a_bad_one_is_refused():
    assert adapt_suite.parse_settings(["unexplained=false", "confident=0.7", "rounds=3"]) == {
        "unexplained": False, "confident": 0.7, "rounds": 3}
    for bad in ("nonsense=1", "unexplained=maybe", "confident"):
        with pytest.raises(SystemExit, match="--set"):
            adapt_suite.parse_settings([bad])


def test_adapt_suite_targets_are_the_real_sample_variants_and_unseen_synthetic_styles():
    (image, labels), = adapt_suite.target_pairs("x1")
    (noisy, same_labels), = adapt_suite.target_pairs("noise_snr5")
    assert image.shape == noisy.shape and np.array_equal(labels, same_labels) and not np.array_equal(image, noisy)
    he = adapt_suite.target_pairs("synth_he", count=2)
    assert len(he) == 2 and he[0][0].ndim == 3 and he[0][1].max() > 0  # colour H&E fields with their labels
    clean = adapt_suite.target_pairs("synth_fluorescence", count=2)
    noisy = adapt_suite.target_pairs("synth_fluorescence+noise_snr5", count=2)
    assert all(np.array_equal(a[1], b[1]) and not np.array_equal(a[0], b[0]) for a, b in zip(clean, noisy))
    for nonsense in ("nonsense", "synth_fluorescence+nonsense"):
        with pytest.raises(SystemExit, match="unknown target"):
            adapt_suite.target_pairs(nonsense)


def test_a_refused_target_is_reported_with_the_starting_models_score(tiny_cfg, tmp_path, monkeypatch):
    """One target adaptation refuses (here: an estimate that would blow the image up) must not end the suite."""
    import torch
    from detectron2.modeling import build_model

    from nucleus_seg.engine.adapt import AdaptSettings
    from nucleus_seg.inference.predictor import NucleusPredictor
    from nucleus_seg.inference.scale import ScaleChoice

    cfg = tiny_cfg.clone()
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "start.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "start.pth")
    cfg.NUCLEUS.PREDICT.DIAMETER = -1.0
    cfg.NUCLEUS.PREDICT.TRAIN_DIAMETER = 32.0
    monkeypatch.setattr(NucleusPredictor, "estimate_diameter",
                        lambda self, image, name="image": ScaleChoice(14.0, 2.3, 2.8, True, []))
    row, _ = adapt_suite.run_target(cfg, "x1", tmp_path / "out", AdaptSettings(iters=1, synthetic=0))
    assert "would rescale it x14.0" in row["refused"]
    assert row["gain"] == 0 and row["iterations"] == []
    # where a change would come from, before and after: the same weights, the same figures
    labels = adapt_suite.target_pairs("x1")[0][1]
    assert row["before"] == row["after"] and row["before"]["n_true"] == len(np.unique(labels)) - 1
    assert row["before"]["diameter"] == 2.3 and 10 < row["before"]["true_diameter"] < 40
    assert 0 <= row["before"]["f1_50"] <= 1 and row["before"]["n_pred"] >= 0


def test_writer_throughput_times_each_process_count_on_the_same_synthetic_detections(tmp_path):
    """Two process counts, every default format; the detections are the same each time (seeded) and stitch into as
    many nuclei as they hold; a format nucleus-predict does not know stops the run before any work."""
    results = writer_throughput.main(["--writers", "1,2", "--num-images", "1", "--size", "160", "--nuclei", "12",
                                      "--data-root", str(tmp_path)])
    assert [r["writers"] for r in results] == [1, 2]
    assert all(r["img_per_s"] > 0 and r["ms_per_img"] > 0 for r in results)
    found = writer_throughput.dense_detections(160, 12)
    assert len(found.instances[0].scores) == 12
    pred, cut = found.stitch()
    assert cut == 0 and 0 < len(pred) <= 12
    np.testing.assert_array_equal(writer_throughput.dense_detections(160, 12).stitch()[0].labels, pred.labels)
    with pytest.raises(SystemExit):
        writer_throughput.main(["--formats", "labels,tiff", "--data-root", str(tmp_path)])


def test_every_benchmark_line_names_device_config_weights_and_variant(capsys):
    import common

    sources = [p for p in Path(common.__file__).parent.glob("*.py") if p.name != "common.py"]
    emitting = [p for p in sources if "emit(" in p.read_text()]
    assert len(emitting) >= 8
    for path in emitting:
        text = path.read_text()
        missing = [key for key in common.NAMED if f'"{key}"' not in text and key != "device"]
        assert not missing, f"{path.name} emits lines without {missing}"
        assert "device_facts()" in text, f"{path.name} does not name the device"
    common.emit({"benchmark": "x", "device": "cpu", "config": "c"}, None)
    assert "warning: benchmark line without weights, variant" in capsys.readouterr().err


def test_the_wheelhouse_refuses_to_leave_out_a_version_the_package_caps(capsys):
    """``--exclude setuptools`` shipped a wheelhouse whose install failed on the GPU node (its setuptools 81
    against ``setuptools<81``); it is refused before any download, and uncapped projects may still go."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import wheelhouse

    reqs = wheelhouse.requirements(False)
    assert wheelhouse.capped_exclusions({"setuptools", "numpy", "scikit-image"}, reqs) == ["setuptools<81"]
    assert wheelhouse.capped_exclusions({"faster-coco-eval"}, reqs) == ["faster-coco-eval>=1.6,<2"]
    assert wheelhouse.capped_exclusions({"scikit-image", "tifffile"}, reqs) == []
    with pytest.raises(SystemExit) as exc:
        wheelhouse.main(["--exclude", "numpy,setuptools", "--out", "/nonexistent/never-made"])
    assert exc.value.code == 2 and "setuptools<81" in capsys.readouterr().err

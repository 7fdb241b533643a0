"""nucleus-train on CPU: the real R101-FPN model (tiny_cfg) for a few iterations on generated data."""

from __future__ import annotations

import json

import cv2
import pytest
import torch

from nucleus_seg.cli.evaluate import main as eval_main
from nucleus_seg.cli.train import EXIT_DIVERGED, main
from nucleus_seg.data.catalog import register_datasets_from_cfg
from nucleus_seg.engine.trainer import NucleusTrainer, divergence_message, prepare_cfg
from nucleus_seg.modeling.precision import cpu_has_native_bfloat16

TINY_SYNTH = {"NUCLEUS.SYNTH.NUM_TRAIN": 2, "NUCLEUS.SYNTH.NUM_VAL": 1, "NUCLEUS.SYNTH.SIZE": 128}


def config_file(cfg, tmp_path, **overrides) -> str:
    """tiny_cfg (plus overrides) as a YAML for the command line."""
    cfg = cfg.clone()
    cfg.merge_from_list([str(x) for kv in {**TINY_SYNTH, **overrides}.items() for x in kv])
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path)


def read_json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_train_writes_checkpoints_curves_metrics_and_eval_only_reproduces(tiny_cfg, tmp_path, synth_root):
    # DATASETS.TRAIN empty: the synthetic default, registered from NUCLEUS.SYNTH and generated on use
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "()", "DATASETS.TEST": "('nucleus_synth_val', 'nucleus_dsb_sample')",
        "SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 2, "SOLVER.CHECKPOINT_PERIOD": 100,
        "NUCLEUS.TRAIN.TIME_BUDGET_MINUTES": 60.0})
    out = tmp_path / "out"
    assert main(["--config-file", yaml]) == 0
    # the budget counts from the launch (data generation included); the saved config keeps no start time
    assert "counts from launch" in (out / "log.txt").read_text()
    assert "TIME_BUDGET_START: 0.0" in (out / "config.yaml").read_text()

    assert list(synth_root.glob("nucleus_synth/*/train/*"))  # generated where NUCLEUS_DATASETS says
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 2
    assert (out / "last_checkpoint").read_text() == "model_final.pth"  # model_best does not hijack --resume
    assert (out / "model_best.pth").is_file()
    assert list(out.glob("events.out.tfevents.*"))
    for png in ("training_loss.png", "training_lr.png", "training_eval.png"):
        image = cv2.imread(str(out / png))
        assert image is not None and image.shape[1] == 800, png

    final = read_json(out / "final_metrics.json")
    assert final["completed"] and final["iteration"] == 3 and final["error"] is None
    assert final["losses"]["total_loss"] > 0
    assert set(final["eval"]) == {"nucleus_synth_val", "nucleus_dsb_sample"}
    assert final["best"]["metric"] == "nucleus_synth_val/nucleus/dsb_score"
    trained_score = final["eval"]["nucleus_synth_val"]["nucleus"]["dsb_score"]
    assert 0.0 <= trained_score <= 1.0

    # --eval-only on the final weights gives the score the end-of-training evaluation gave
    out2 = tmp_path / "eval"
    assert main(["--config-file", yaml, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                 "DATASETS.TEST", "('nucleus_synth_val',)", "OUTPUT_DIR", str(out2)]) == 0
    evaluated = read_json(out2 / "eval_metrics.json")
    assert evaluated["results"]["nucleus"]["dsb_score"] == pytest.approx(trained_score)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_an_interrupted_run_with_its_schedule(tiny_cfg, tmp_path, synth_root):
    from detectron2.engine import HookBase
    from detectron2.solver import build_lr_scheduler

    overrides = {"DATASETS.TRAIN": "('nucleus_synth_train',)", "DATASETS.TEST": "()",
                 "SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.STEPS": "(2,)",
                 "SOLVER.WARMUP_ITERS": 3, "NUCLEUS.TRAIN.EMA_DECAY": 0.9}
    yaml = config_file(tiny_cfg, tmp_path, **overrides)
    cfg = tiny_cfg.clone()
    cfg.merge_from_file(yaml)
    out = tmp_path / "out"

    class StopAt(HookBase):  # a kill between iterations 1 and 2 (checkpoint model_0000001 exists)
        def before_step(self):
            if self.trainer.iter == 2:
                raise Interrupted("killed")

    trainer = NucleusTrainer(cfg)
    trainer.register_hooks([StopAt()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(Interrupted):
        trainer.train()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    saved = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert saved["trainer"]["hooks"]["WeightAverage"]["updates"] == 2  # the weight average resumes too
    stopped = read_json(out / "final_metrics.json")
    assert not stopped["completed"] and "Interrupted" in stopped["error"]
    del trainer

    assert main(["--config-file", yaml, "--resume"]) == 0
    final = read_json(out / "final_metrics.json")
    assert final["completed"] and final["start_iter"] == 2 and final["iteration"] == 4
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 3

    # the LR of the last iteration is the uninterrupted schedule's (warm-up and step kept their place)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert final["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    assert final["lr"] != pytest.approx(cfg.SOLVER.BASE_LR)  # i.e. the schedule is not trivially flat


@pytest.mark.slow
def test_divergence_exits_nonzero_naming_cause_and_remedy(tiny_cfg, tmp_path, synth_root, capfd):
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "('nucleus_synth_train',)", "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 4,
        "SOLVER.BASE_LR": 1e30, "SOLVER.WARMUP_ITERS": 0})
    assert main(["--config-file", yaml]) == EXIT_DIVERGED
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "Training diverged" in text and "SOLVER.BASE_LR" in text and "lower it" in text
    final = read_json(tmp_path / "out" / "final_metrics.json")
    assert not final["completed"] and final["error"].startswith("FloatingPointError")


def test_divergence_message_puts_frozen_bn_without_weights_first(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.WEIGHTS", ""])
    exc = FloatingPointError("Loss became infinite or NaN at iteration=7!")
    lines = divergence_message(cfg, exc).splitlines()
    assert "iteration=7" in lines[0]
    assert "FrozenBN" in lines[2] and "nucleus_R101_FPN_scratch.yaml" in lines[2]
    assert "SOLVER.BASE_LR" in lines[3]


def test_prepare_cfg_switches_amp_and_device_to_what_the_machine_has(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda", "DATASETS.TRAIN", "()"])
    cfg.freeze()
    ready = prepare_cfg(cfg)
    cuda = torch.cuda.is_available()
    assert ready.SOLVER.AMP.ENABLED is (cuda or cpu_has_native_bfloat16())
    device = ready.MODEL.DEVICE
    assert device == ("cuda" if cuda else "cpu")
    assert ready.DATASETS.TRAIN == ("nucleus_synth_train",) and ready.is_frozen()
    assert cfg.SOLVER.AMP.ENABLED  # the input config is left alone
    cfg = cfg.clone()
    cfg.defrost()
    cfg.NUCLEUS.TRAIN.AMP_DTYPE = "float16"  # no float16 training on CPU
    assert prepare_cfg(cfg).SOLVER.AMP.ENABLED is cuda


def test_unknown_dataset_is_named(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["DATASETS.TRAIN", "('nucleus_no_such_set',)"])
    with pytest.raises(KeyError, match="DATASETS.TRAIN names dataset 'nucleus_no_such_set'"):
        register_datasets_from_cfg(cfg)


def test_curves_after_resume_keep_the_later_record_and_skip_a_cut_line(tmp_path):
    from nucleus_seg.engine.hooks import plot_training_curves, read_metrics

    lines = [{"iteration": 19, "total_loss": 3.0, "loss_cls": 1.0, "lr": 0.01},
             {"iteration": 39, "total_loss": 2.0, "loss_cls": 0.9, "lr": 0.01},
             {"iteration": 39, "nucleus/dsb_score": 0.1},  # evaluation of the same iteration
             {"iteration": 39, "total_loss": 1.5, "loss_cls": 0.8, "lr": 0.01}]  # rerun after --resume
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"iteration": 59, "total_lo'
    (tmp_path / "metrics.json").write_text(text)
    records = read_metrics(tmp_path / "metrics.json")
    assert [r["iteration"] for r in records] == [19, 39]
    assert records[1]["total_loss"] == 1.5 and records[1]["nucleus/dsb_score"] == 0.1
    history = {"total_loss": [(40, 1.4), (41, 1.3)]}
    written = plot_training_curves(tmp_path / "metrics.json", tmp_path, history)
    assert sorted(p.name for p in written) == ["training_eval.png", "training_loss.png", "training_lr.png"]
    assert all(cv2.imread(str(p)) is not None for p in written)


def test_version_prints_the_report(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("nucleus_seg ") and "detectron2 " in printed and "torch " in printed


@pytest.mark.slow
def test_two_process_gloo_training_through_launch(tiny_cfg, tmp_path, synth_root):
    """`nucleus-train --num-gpus 2` on CPU: detectron2's launch() starts two gloo ranks; the batch is
    split between them, gradients are all-reduced by DDP, and only rank 0 writes files."""
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "()", "DATASETS.TEST": "()", "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 2,
        "SOLVER.CHECKPOINT_PERIOD": 100})
    out = tmp_path / "out"
    assert main(["--config-file", yaml, "--num-gpus", "2", "--dist-url", "auto"]) == 0
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] == 1
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [1]  # written once (rank 0), not twice


@pytest.mark.slow
def test_two_processes_sharing_one_device_through_procs_per_gpu(tiny_cfg, tmp_path, synth_root):
    """`--procs-per-gpu 2`: two gloo ranks on one device (here the CPU), the batch split between them."""
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "()", "DATASETS.TEST": "()", "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": 2,
        "SOLVER.CHECKPOINT_PERIOD": 100})
    out = tmp_path / "out"
    assert main(["--config-file", yaml, "--num-gpus", "1", "--procs-per-gpu", "2", "--dist-url", "auto"]) == 0
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 1
    assert "World size: 2" in (out / "log.txt").read_text()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [1]


def test_ranks_sharing_gpus_map_to_consecutive_devices():
    from nucleus_seg.utils.dist import device_for_local_rank

    assert [device_for_local_rank(r, 2) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [device_for_local_rank(r, 1) for r in range(3)] == [0, 1, 2]


def test_synthetic_data_is_generated_once_before_the_processes_start(tiny_cfg, tmp_path, monkeypatch):
    """Several local processes would each generate the same images; the launcher makes them first."""
    from detectron2.data import DatasetCatalog

    from nucleus_seg.data.catalog import generate_synthetic_data

    cfg = tiny_cfg.clone()
    cfg.merge_from_list([str(x) for kv in TINY_SYNTH.items() for x in kv])
    cfg.DATASETS.TRAIN = ("nucleus_synth_train",)
    cfg.DATASETS.TEST = ("nucleus_synth_val", "nucleus_dsb_sample")
    root = tmp_path / "datasets"
    monkeypatch.setenv("NUCLEUS_DATASETS", str(root))
    generate_synthetic_data(cfg)
    images = {p: p.stat().st_mtime_ns for p in root.rglob("images/*.png")}
    assert len(images) == 3  # 2 train + 1 val
    generate_synthetic_data(cfg)  # a rank (or a rerun) reuses them
    assert {p: p.stat().st_mtime_ns for p in root.rglob("images/*.png")} == images
    assert len(DatasetCatalog.get("nucleus_synth_train")) == 2


@pytest.mark.slow
def test_training_time_evaluation_scores_what_nucleus_eval_scores(tiny_cfg, tmp_path, synth_root):
    """model_best.pth is picked by the number users get: NucleusTrainer.test and nucleus-eval run the same
    predictor (here with the diameter estimated and flip TTA on) and give the same DSB score."""
    cfg = tiny_cfg.clone()
    cfg.merge_from_list(["NUCLEUS.PREDICT.DIAMETER", "-1.0", "NUCLEUS.PREDICT.TTA", "True",
                         "NUCLEUS.PREDICT.SCORE_THRESH", "0.3", "NUCLEUS.PREDICT.DIAMETER_SCORE_THRESH", "0.3",
                         "DATASETS.TEST", "('nucleus_dsb_sample@x0.4',)"])
    torch.manual_seed(0)
    model = NucleusTrainer.build_model(cfg)
    model.train()  # as the EvalHook finds it
    results = NucleusTrainer.test(cfg, model)
    assert model.training  # given back in the mode it was in
    weights = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, weights)
    yaml = tmp_path / "eval.yaml"
    yaml.write_text(cfg.dump())
    assert eval_main(["--config-file", str(yaml), "--output", str(tmp_path / "eval"),
                      "MODEL.WEIGHTS", str(weights)]) == 0
    report = json.loads((tmp_path / "eval" / "nucleus_dsb_sample@x0.4" / "metrics.json").read_text())
    assert report["n_pred"] > 0 and report["n_gt"] > 0
    assert results["nucleus"]["dsb_score"] == report["dsb_score"]
    assert results["nucleus"]["n_pred"] == report["n_pred"]


@pytest.mark.slow
def test_an_earlier_run_is_refused_continued_or_overwritten_and_checkpoints_are_not_duplicated(
        tiny_cfg, tmp_path, synth_root, capsys):
    """A second run into the same OUTPUT_DIR overwrote model_final.pth and appended to metrics.json (curves
    mixed two runs); detectron2 wrote model_0000003.pth beside an identical model_final.pth."""
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "('nucleus_synth_train',)", "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 6,
        "SOLVER.CHECKPOINT_PERIOD": 2, "NUCLEUS.TRAIN.CHECKPOINT_KEEP": 1})
    out = tmp_path / "out"
    assert main(["--config-file", yaml]) == 0
    # periodic saves at iterations 1 and 3 (the last one kept), none at 5: model_final holds those weights
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000003.pth", "model_final.pth"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 5 and "trainer" in final  # optimizer, scheduler: --resume continues
    first = (out / "model_final.pth").stat().st_mtime_ns

    assert main(["--config-file", yaml]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err and (out / "model_final.pth").stat().st_mtime_ns == first

    assert main(["--config-file", yaml, "--resume"]) == 0  # finished: nothing to do, nothing rewritten
    assert (out / "model_final.pth").stat().st_mtime_ns == first

    assert main(["--config-file", yaml, "--overwrite", "NUCLEUS.TRAIN.FINAL_ONLY", "True"]) == 0
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_final.pth"]
    slim = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert set(slim) == {"model", "iteration"}
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iterations == sorted(set(iterations))  # one run's records only


def test_config_mistakes_are_one_line_with_status_2(tiny_cfg, tmp_path, capsys):
    yaml = config_file(tiny_cfg, tmp_path)
    for opts, named in ((["SOLVER.NO_SUCH_KEY", "1"], "SOLVER.NO_SUCH_KEY"),
                        (["SOLVER.MAX_ITER", "many"], "SOLVER.MAX_ITER"),
                        (["DATASETS.TRAIN", "('no_such_dataset',)"], "no_such_dataset"),
                        (["SOLVER.MAX_ITER"], "KEY VALUE")):
        assert main(["--config-file", yaml] + opts) == 2, opts
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "file").write_text("in the way")
    assert main(["--config-file", yaml, "OUTPUT_DIR", str(tmp_path / "file" / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_a_finite_loss_explosion_stops_training_like_nan(tiny_cfg, tmp_path, synth_root, capfd):
    """SOLVER.BASE_LR 1e3: the loss reached 2.6e14 by iteration 9, yet training saved a 'completed' model."""
    yaml = config_file(tiny_cfg, tmp_path, **{
        "DATASETS.TRAIN": "('nucleus_synth_train',)", "DATASETS.TEST": "()", "SOLVER.MAX_ITER": 60,
        "SOLVER.BASE_LR": 1e3, "SOLVER.WARMUP_ITERS": 0, "SOLVER.CLIP_GRADIENTS.ENABLED": False,
        "NUCLEUS.TRAIN.DIVERGENCE.CEILING": 1e3})
    assert main(["--config-file", yaml]) == EXIT_DIVERGED
    text = "".join(capfd.readouterr())
    assert "Training diverged" in text and "lower it" in text and "Traceback" not in text
    final = read_json(tmp_path / "out" / "final_metrics.json")
    assert not final["completed"] and final["error"].startswith("FloatingPointError")
    assert final["iteration"] < 60 and not (tmp_path / "out" / "model_final.pth").exists()


def test_a_rank_dying_after_training_finished_is_not_a_failed_run(tiny_cfg, tmp_path, monkeypatch):
    """The recipe once ended with exit 2 although model_final.pth and final_metrics.json were complete: a
    rank died in interpreter teardown (oneMKL). A finished training exits 0; an unfinished one still fails."""
    from torch.multiprocessing import ProcessExitedException

    from nucleus_seg.engine import job

    yaml = config_file(tiny_cfg, tmp_path)
    out = tmp_path / "out"

    def launch_then_die(*args, completed=True, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "model_final.pth").write_bytes(b"weights")
        (out / "final_metrics.json").write_text(json.dumps({"completed": completed}))
        raise ProcessExitedException("process 1 terminated with exit code 1", 1, 1, 1234)

    monkeypatch.setattr(job, "launch", launch_then_die)
    assert main(["--config-file", yaml, "--num-gpus", "1", "--procs-per-gpu", "2", "--overwrite"]) == 0
    monkeypatch.setattr(job, "launch", lambda *a, **k: launch_then_die(completed=False))
    with pytest.raises(ProcessExitedException):
        main(["--config-file", yaml, "--procs-per-gpu", "2", "--overwrite"])


def test_batched_proposals_change_how_training_computes_proposals_not_what(tiny_cfg, real_training_batch):
    """NUCLEUS.TRAIN.BATCHED_PROPOSALS (all images' RPN proposals at once, default) against detectron2's loop:
    one training step of the real model on real nuclei gives the same losses, to the bit."""
    from detectron2.utils.events import EventStorage

    from nucleus_seg.modeling.fast_inference import _fast_predict_proposals

    losses = {}
    for batched in (False, True):
        cfg = tiny_cfg.clone()
        cfg.NUCLEUS.TRAIN.BATCHED_PROPOSALS = batched
        torch.manual_seed(0)
        model = NucleusTrainer.build_model(cfg)
        model.train()
        fast = getattr(model.proposal_generator.predict_proposals, "__func__", None) is _fast_predict_proposals
        assert fast == batched
        torch.manual_seed(1)
        with EventStorage():
            losses[batched] = {k: v.item() for k, v in model(real_training_batch).items()}
    assert losses[True] == losses[False]
    assert losses[True]["loss_rpn_cls"] > 0 and losses[True]["loss_mask"] > 0

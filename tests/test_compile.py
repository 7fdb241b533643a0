"""NUCLEUS.TRAIN.COMPILE / NUCLEUS.PREDICT.COMPILE(_HEADS): the backbone and the ROI heads under torch.compile.

Inductor's code generation takes minutes for a ResNet on 2 CPU cores, so the capture is checked with the
``aot_eager`` backend: the same dynamo graph and AOT autograd split that inductor compiles, run by eager
kernels. ``fullgraph=True`` proves detectron2's ResNet-FPN is captured whole (no graph break that would
silently leave parts eager). The speed is measured on the GPU (benchmarks/infer_throughput.py,
train_throughput.py).
"""

from __future__ import annotations

import torch
from detectron2.modeling import build_model

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.modeling.compile import compile_backbone, compile_heads, heads_compiled, is_compiled
from nucleus_seg.modeling.precision import use_half_group_norm

R18 = "configs/nucleus_R18_FPN_cpu_demo.yaml"


def _features_loss(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(f.float().pow(2).mean() for f in features.values())


def test_the_backbone_is_captured_whole_and_computes_what_eager_does():
    cfg = get_nucleus_cfg(R18, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    use_half_group_norm(model)
    x = torch.randn(2, 3, 128, 128)
    model.train()
    eager = model.backbone(x)
    _features_loss(eager).backward()
    eager_grads = [p.grad.clone() for p in model.backbone.parameters()]
    model.zero_grad()

    compile_backbone(model, backend="aot_eager", fullgraph=True)
    assert is_compiled(model)
    compiled = model.backbone(x)
    _features_loss(compiled).backward()
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])
    for p, g in zip(model.backbone.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)

    model.eval()  # the inference graph (another dynamo guard) under the predictor's autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(x)
    assert features["p2"].dtype == torch.bfloat16 and features["p2"].shape == eager["p2"].shape


def test_the_switches_reach_the_trainer_and_the_predictor_and_checkpoints_stay_the_same(tmp_path):
    from nucleus_seg.engine.trainer import NucleusTrainer
    from nucleus_seg.inference.predictor import NucleusPredictor

    base = ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)]
    plain = NucleusTrainer.build_model(get_nucleus_cfg(R18, base))
    compiled = NucleusTrainer.build_model(get_nucleus_cfg(R18, [*base, "NUCLEUS.TRAIN.COMPILE", "True"]))
    assert not is_compiled(plain) and is_compiled(compiled)
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way

    weights = tmp_path / "w.pth"
    torch.save({"model": plain.state_dict()}, weights)
    opts = [*base, "MODEL.WEIGHTS", str(weights)]
    assert not is_compiled(NucleusPredictor(get_nucleus_cfg(R18, opts)).model)
    assert is_compiled(NucleusPredictor(get_nucleus_cfg(R18, [*opts, "NUCLEUS.PREDICT.COMPILE", "True"])).model)
    heads = NucleusPredictor(get_nucleus_cfg(R18, [*opts, "NUCLEUS.PREDICT.COMPILE_HEADS", "True"])).model
    assert heads_compiled(heads) and not is_compiled(heads)


def test_the_roi_heads_compile_for_any_number_of_boxes_and_detect_what_eager_does():
    """Box head(s) and mask head under torch.compile with symbolic ROI counts: the same detections as eager,
    on a batch of two images and then of one (other ROI counts through the same graphs)."""
    from nucleus_seg.modeling.fast_inference import speed_up_inference

    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_synth_h100.yaml",  # Cascade: three box heads
                          ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
                           "TEST.DETECTIONS_PER_IMAGE", "30"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    speed_up_inference(model)
    images = [{"image": torch.rand(3, 96, 96) * 255}, {"image": torch.rand(3, 64, 80) * 255}]

    def detect(batch):
        with torch.no_grad():
            return [(o.pred_boxes.tensor, o.scores, o.pred_masks)
                    for o in model.inference(batch, do_postprocess=False)]

    eager = [detect(images), detect(images[1:])]
    compile_heads(model, backend="aot_eager", fullgraph=True)
    assert heads_compiled(model)
    compiled = [detect(images), detect(images[1:])]
    assert sum(len(d[1]) for d in eager[0]) > sum(len(d[1]) for d in eager[1]) > 0
    for got, want in zip(compiled, eager):
        for (boxes, scores, masks), (boxes0, scores0, masks0) in zip(got, want):
            torch.testing.assert_close(boxes, boxes0)
            torch.testing.assert_close(scores, scores0)
            torch.testing.assert_close(masks, masks0)

"""NUCLEUS.TRAIN.COMPILE / NUCLEUS.PREDICT.COMPILE: the backbone under torch.compile.

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
from nucleus_seg.modeling.compile import compile_backbone, is_compiled
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

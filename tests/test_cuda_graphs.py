"""The backbone as CUDA graphs. NUCLEUS.TRAIN.CUDA_GRAPHS: in training, the eager backbone's losses and gradients;
everything but a CUDA training step runs the eager backbone. NUCLEUS.PREDICT.CUDA_GRAPHS: at inference, the same
features, a graph only for a shape seen twice, and the eager backbone wherever a graph cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.engine.trainer import NucleusTrainer, capture_backbone_graphs
from nucleus_seg.modeling.cuda_graphs import (
    GRAPHS_KEPT,
    graph_backbone_at_inference,
    graph_backbone_in_training,
    is_graphed_at_inference,
    is_graphed_in_training,
)


def test_cpu_training_keeps_the_eager_backbone(tiny_cfg):
    """On a CPU the option is a no-op with a log line, not an error: a config written for a GPU still trains."""
    cfg = tiny_cfg.clone()
    cfg.NUCLEUS.TRAIN.CUDA_GRAPHS = True
    model = NucleusTrainer.build_model(cfg)
    eager = model.backbone.forward
    capture_backbone_graphs(cfg, model, world=1)
    assert not is_graphed_in_training(model) and model.backbone.forward == eager


def test_the_capture_is_for_this_process_share_of_the_batch_and_the_padded_crop(tiny_cfg, monkeypatch):
    """3 processes sharing SOLVER.IMS_PER_BATCH 12 of 500 px crops: each captures batches of 4 images of 512 px
    (ImageList pads to the backbone's size divisibility), in the training autocast precision."""
    from nucleus_seg.engine import trainer

    captured = []
    monkeypatch.setattr(trainer, "graph_backbone_in_training",
                        lambda model, shape, dtype: captured.append((shape, dtype)))
    cfg = tiny_cfg.clone()
    model = NucleusTrainer.build_model(cfg)
    cfg.MODEL.DEVICE = "cuda"  # as prepare_cfg leaves it on a GPU machine
    cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.NUCLEUS.CROP_SIZE = 12, 500
    cfg.SOLVER.AMP.ENABLED, cfg.NUCLEUS.TRAIN.AMP_DTYPE = True, "bfloat16"
    capture_backbone_graphs(cfg, model, world=3)
    cfg.SOLVER.AMP.ENABLED = False
    capture_backbone_graphs(cfg, model, world=1)
    assert captured == [((4, 3, 512, 512), torch.bfloat16), ((12, 3, 512, 512), None)]


def test_a_compiled_backbone_is_not_captured(tiny_cfg, caplog):
    """NUCLEUS.TRAIN.COMPILE asked for explicitly wins over the graphs' default, and says so."""
    cfg = tiny_cfg.clone()
    cfg.NUCLEUS.TRAIN.COMPILE = True
    model = NucleusTrainer.build_model(cfg)
    with caplog.at_level(logging.INFO, logger="nucleus_seg"):
        capture_backbone_graphs(cfg, model, world=1)
    assert not is_graphed_in_training(model)
    assert any("is compiled" in r.message for r in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_backbone_trains_as_the_eager_one(tiny_cfg, real_training_batch, monkeypatch, caplog):
    """Three SGD steps of the real model on real nuclei, bfloat16 autocast without its weight cache (as
    QueuedAMPTrainer runs), the eager model given the graphed one's weights before each step: the same losses
    and backbone gradients, so the graphs read the weights the optimizer changed. A batch of another shape and
    no-grad calls run eagerly."""
    from detectron2.utils.events import EventStorage

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # same gradients run to run
    batch = real_training_batch
    cfg = tiny_cfg.clone()
    cfg.MODEL.DEVICE = "cuda"
    models = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        models[graphed] = NucleusTrainer.build_model(cfg).train()
    graph_backbone_in_training(models[True], (len(batch), 3, 128, 128), torch.bfloat16)
    optimizer = torch.optim.SGD(models[True].parameters(), lr=0.01)
    with EventStorage():
        for step in range(3):
            models[False].load_state_dict(models[True].state_dict())
            losses, grads = {}, {}
            for graphed, model in models.items():
                model.zero_grad(set_to_none=True)
                torch.manual_seed(step)
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    loss_dict = model(batch)
                sum(loss_dict.values()).backward()
                losses[graphed] = {k: v.item() for k, v in loss_dict.items()}
                grads[graphed] = torch.cat([p.grad.flatten().float() for p in model.backbone.parameters()
                                            if p.grad is not None])
            for k in losses[False]:
                assert losses[True][k] == pytest.approx(losses[False][k], rel=1e-2, abs=1e-3), (step, k)
            assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.999, step
            optimizer.step()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            one = models[True](batch[:1])  # another shape: the eager backbone, with a warning
        with torch.no_grad():
            features = models[True].backbone(torch.zeros(len(batch), 3, 128, 128, device="cuda"))
    assert all(torch.isfinite(v) for v in one.values()) and not features["p2"].requires_grad
    assert is_graphed_in_training(models[True]) and not is_graphed_in_training(models[False])
    assert [r.message for r in caplog.records if "not the one captured" in r.message]


def _inference_model(device: str):
    from detectron2.modeling import build_model

    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", ["MODEL.DEVICE", device,
                                                                     "MODEL.RESNETS.DEPTH", "50"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_inference_graphs_stay_out_of_the_cpu_and_of_gradients():
    model = _inference_model("cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone(x)
    graph_backbone_at_inference(model)
    graph_backbone_at_inference(model)  # idempotent: one wrapper
    wrapper = model.backbone.forward
    assert is_graphed_at_inference(model) and not is_graphed_at_inference(_inference_model("cpu"))
    assert not isinstance(wrapper.eager, type(wrapper))
    for _ in range(3):
        with torch.no_grad():
            got = model.backbone(x)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not wrapper.graphs
    assert model.backbone(x.requires_grad_())["p2"].requires_grad


def test_the_predictor_graphs_only_a_gpu_model_it_builds(tiny_cfg):
    from nucleus_seg.inference.predictor import NucleusPredictor

    cfg = tiny_cfg.clone()
    cfg.NUCLEUS.PREDICT.CUDA_GRAPHS = True
    predictor = NucleusPredictor(cfg)
    assert is_graphed_at_inference(predictor.model) == (predictor.device.type == "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_inference_replays_give_the_eager_features_and_old_graphs_are_dropped():
    model = _inference_model("cuda")
    graph_backbone_at_inference(model)
    wrapper = model.backbone.forward
    shapes = [(2, 3, 64 + 32 * i, 64) for i in range(GRAPHS_KEPT + 1)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
        for shape in shapes:
            for _ in range(3):  # eager, capture + replay, replay
                x = torch.randn(shape, device="cuda")
                got = {k: v.clone() for k, v in model.backbone(x).items()}
                expected = wrapper.eager(x)
                assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-2) for k in got), shape
            assert len(wrapper.graphs) == min(shapes.index(shape) + 1, GRAPHS_KEPT)
    assert (shapes[0], ) not in [k[:1] for k in wrapper.graphs]  # the least recently used went first

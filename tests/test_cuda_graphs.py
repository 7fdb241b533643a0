"""NUCLEUS.TRAIN.CUDA_GRAPHS: the backbone replayed as CUDA graphs in training gives the eager backbone's
losses and gradients; everything but a CUDA training step runs the eager backbone."""

from __future__ import annotations

import logging

import pytest
import torch

from nucleus_seg.engine.trainer import NucleusTrainer, capture_backbone_graphs
from nucleus_seg.modeling.cuda_graphs import graph_backbone_in_training, is_graphed


def test_cpu_training_keeps_the_eager_backbone(tiny_cfg):
    """On a CPU the option is a no-op with a log line, not an error: a config written for a GPU still trains."""
    cfg = tiny_cfg.clone()
    cfg.NUCLEUS.TRAIN.CUDA_GRAPHS = True
    model = NucleusTrainer.build_model(cfg)
    eager = model.backbone.forward
    capture_backbone_graphs(cfg, model, world=1)
    assert not is_graphed(model) and model.backbone.forward == eager


def test_a_compiled_backbone_is_not_captured(tiny_cfg, caplog):
    """NUCLEUS.TRAIN.COMPILE asked for explicitly wins over the graphs' default, and says so."""
    cfg = tiny_cfg.clone()
    cfg.NUCLEUS.TRAIN.COMPILE = True
    model = NucleusTrainer.build_model(cfg)
    with caplog.at_level(logging.INFO, logger="nucleus_seg"):
        capture_backbone_graphs(cfg, model, world=1)
    assert not is_graphed(model)
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
    assert is_graphed(models[True]) and not is_graphed(models[False])
    assert [r.message for r in caplog.records if "not the one captured" in r.message]

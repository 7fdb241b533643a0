"""The backbone as CUDA graphs (nucleus_seg.modeling.cuda_graph): the same features as the eager backbone, a graph
only for a shape seen twice, and the eager backbone wherever a graph cannot run (CPU, gradients)."""

from __future__ import annotations

import pytest
import torch

from nucleus_seg.config import get_nucleus_cfg
from nucleus_seg.modeling.cuda_graph import GRAPHS_KEPT, graph_backbone, is_graphed


def _backbone_model(device: str):
    from detectron2.modeling import build_model

    cfg = get_nucleus_cfg("configs/nucleus_R101_FPN_scratch.yaml", ["MODEL.DEVICE", device,
                                                                     "MODEL.RESNETS.DEPTH", "50"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_off_the_gpu_and_with_gradients_the_eager_backbone_runs():
    model = _backbone_model("cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone(x)
    graph_backbone(model)
    graph_backbone(model)  # idempotent: one wrapper
    assert is_graphed(model) and not isinstance(model.backbone.forward.eager, type(model.backbone.forward))
    for _ in range(3):
        with torch.no_grad():
            got = model.backbone(x)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not model.backbone.forward.graphs
    out = model.backbone(x.requires_grad_())
    assert out["p2"].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replays_give_the_eager_features_for_each_new_input_and_old_graphs_are_dropped():
    model = _backbone_model("cuda")
    graph_backbone(model)
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

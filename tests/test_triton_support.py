"""Where the Triton inference kernels run: not on GPUs Triton cannot compile for (PyTorch's ops stand in there)."""

from __future__ import annotations

import types

import torch

from nucleus_seg.modeling import triton_support


def test_the_kernels_stay_off_gpus_older_than_volta(monkeypatch):
    """A Pascal card (capability 6.1: a GTX 1080, where Triton's compiler fails) gets PyTorch's ops; Volta and
    later, and any device under Triton's interpreter, get the kernels; a CPU tensor never does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    found = {}
    for capability in [(6, 1), (7, 0), (9, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        triton_support._triton_compiles_for.cache_clear()
        found[capability] = triton_support.triton_runs_on(on_gpu)
    triton_support._triton_compiles_for.cache_clear()
    assert found == {(6, 1): False, (7, 0): True, (9, 0): True}
    assert not triton_support.triton_runs_on(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_support.triton_runs_on(torch.zeros(1))

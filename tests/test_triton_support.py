"""Where the Triton inference kernels run: not on GPUs Triton cannot compile for, nor where it cannot build or run
a kernel (PyTorch's ops stand in there, with the same results)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from nucleus_seg.modeling import triton_support

ON_GPU = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_support._triton_compiles_for.cache_clear()
    yield
    triton_support._triton_compiles_for.cache_clear()


def test_the_kernels_stay_off_gpus_older_than_volta(monkeypatch, no_interpreter):
    """A Pascal card (capability 6.1: a GTX 1080, which Triton does not compile for) gets PyTorch's ops, without
    trying Triton; Volta and later get the kernels once a test kernel ran; a CPU tensor never does, and any
    tensor does under Triton's interpreter."""
    probed = []
    monkeypatch.setattr(triton_support, "_run_probe", lambda device: probed.append(device) or True)
    found = {}
    for capability in [(6, 1), (7, 0), (9, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        triton_support._triton_compiles_for.cache_clear()
        found[capability] = triton_support.triton_runs_on(ON_GPU)
        triton_support.triton_runs_on(ON_GPU)  # asked once per device
    assert found == {(6, 1): False, (7, 0): True, (9, 0): True}
    assert probed == [torch.device("cuda", 0)] * 2
    assert not triton_support.triton_runs_on(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_support.triton_runs_on(torch.zeros(1))


def test_a_triton_that_cannot_build_a_kernel_gives_way_to_pytorch_with_one_warning(monkeypatch, caplog,
                                                                                  no_interpreter):
    """Triton builds its launcher with a C compiler at run time: a slim container without one used to end the
    prediction with its error; now one warning names the GPU and the reason."""
    def no_compiler(device):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\n"
                           "Traceback (most recent call last)")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton_support, "_run_probe", no_compiler)
    with caplog.at_level(logging.WARNING, logger="nucleus_seg"):
        assert not triton_support.triton_runs_on(ON_GPU)
        assert not triton_support.triton_runs_on(ON_GPU)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "cuda:0" in warned[0] and "Failed to find C compiler" in warned[0]
    assert "Traceback" not in warned[0] and "PyTorch's own ops" in warned[0]  # its first line only


def test_the_probe_kernel_adds_one():
    pytest.importorskip("triton")
    from test_nhwc_group_norm import run_interpreted

    run_interpreted("""
        import torch
        from nucleus_seg.modeling.triton_support import _run_probe
        assert _run_probe(torch.device("cpu"))
    """)

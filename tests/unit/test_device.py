"""Where the merges compute: CUDA or the CPU; other devices (Apple's MPS, XPU, DirectML) are refused by
merge_core with a clear error, and the nodes' `default` device falls back to the CPU for them."""
from __future__ import annotations

import pytest
import torch

from merge_core.device import host_compute_device, resolve_device
from merge_core.errors import MergeCoreError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.parametrize("name", ["mps", "xpu", torch.device("mps")])
def test_devices_without_fp64_linear_algebra_are_refused(name):
    with pytest.raises(MergeCoreError, match="is not supported: .*use cpu"):
        resolve_device(name)


def test_unknown_device_name_is_one_line():
    with pytest.raises(MergeCoreError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(MergeCoreError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_the_nodes_default_device_keeps_cuda_and_falls_back_to_the_cpu_elsewhere():
    """(what nodes.runtime.torch_device applies to ComfyUI's device)"""
    assert host_compute_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert host_compute_device(torch.device("cpu")) == torch.device("cpu")
    for other in ("mps", "xpu", "privateuseone"):  # DirectML shows as privateuseone
        assert host_compute_device(torch.device(other)) == torch.device("cpu")


def test_a_device_index_that_does_not_exist_is_one_line(monkeypatch):
    with pytest.raises(MergeCoreError, match="^device 'cpu:1': there is one CPU device; use cpu$"):
        resolve_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 2-GPU machine, as torch reports it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MergeCoreError, match=r"^device 'cuda:2' requested but this machine has 2 CUDA GPU\(s\): "
                                             "cuda:0 to cuda:1$"):
        resolve_device("cuda:2")

"""merge_core.files.stream_writer: tensors appended one at a time, header filled in last; the file is what
safetensors itself reads back (every dtype, scalars, metadata), and an undersized reserve is an error."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_core.errors import MergeCoreError
from merge_core.files.stream_writer import SafetensorsStream, header_bound


def test_round_trip_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen).bfloat16(),
               "c.alpha": torch.tensor(4.0), "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "e": torch.randn(2, 2, 3, 3, generator=gen).half(), "f": torch.tensor([True, False]),
               "g": torch.randn(4, 4, generator=gen)[:, ::2]}  # not contiguous
    meta = {"modelspec.title": "t", "x": "1"}
    bound = header_bound([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], meta)
    with open(tmp_path / "s.safetensors", "wb") as fh:
        stream = SafetensorsStream(fh, bound)
        for k, v in tensors.items():
            stream.add(k, v)
        stream.finish(meta)
    back = load_file(str(tmp_path / "s.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as fh:
        assert fh.metadata() == meta


def test_a_subset_fits_the_bound_and_overflow_is_an_error(tmp_path):
    entries = [(f"layer_{i}.lora_up.weight", torch.float16, (640, 32)) for i in range(50)]
    with open(tmp_path / "s.safetensors", "wb") as fh:
        stream = SafetensorsStream(fh, header_bound(entries, slack=0))
        for name, _, shape in entries[::3]:
            stream.add(name, torch.zeros(shape, dtype=torch.float16))
        stream.finish()
    assert len(load_file(str(tmp_path / "s.safetensors"))) == 17
    with open(tmp_path / "t.safetensors", "wb") as fh:
        stream = SafetensorsStream(fh, 16)
        stream.add("x", torch.zeros(3))
        with pytest.raises(MergeCoreError, match="reserved"):
            stream.finish({"long": "metadata" * 10})
        with pytest.raises(ValueError, match="twice"):
            stream.add("x", torch.zeros(3))


def test_writeback_hints_cover_the_data_once_and_change_nothing(tmp_path, monkeypatch):
    """Every WRITEBACK bytes the stream hands the new data range to the disk: the hinted ranges are contiguous,
    start at the data section, never repeat, and the file reads back exactly."""
    import os

    import merge_core.files.stream_writer as sw

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    hints = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        hints.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(sw, "WRITEBACK", 1000)
    monkeypatch.setattr(sw.os, "posix_fadvise", spy)
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(100 + 37 * i, generator=gen) for i in range(12)}
    bound = header_bound([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    with open(tmp_path / "w.safetensors", "wb") as fh:
        stream = SafetensorsStream(fh, bound)
        for k, v in tensors.items():
            stream.add(k, v)
        stream.finish()
    start = 8 + int.from_bytes((tmp_path / "w.safetensors").read_bytes()[:8], "little")  # the data section
    assert hints and all(advice == os.POSIX_FADV_DONTNEED for *_, advice in hints)
    assert [off for off, _, _ in hints] == [start] + [off + n for off, n, _ in hints[:-1]]
    assert all(n >= 1000 for _, n, _ in hints)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())

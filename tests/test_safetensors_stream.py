"""The streamed safetensors writer and reader against the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_cli.models.safetensors_stream import StreamReader, StreamWriter


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.half": torch.randn(3, 33, generator=g).half(),
        "c.bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "d.qweight": torch.randint(-2**31, 2**31 - 1, (6, 8), generator=g, dtype=torch.int32),
        "e.mask": torch.rand(9, generator=g) > 0.5,
        "f.scalar": torch.tensor(3.5, dtype=torch.float64),
        "g.empty": torch.zeros(0, 4),
        "h.bytes": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
    }


def test_what_we_write_safetensors_reads(tmp_path):
    tensors = sample()
    with StreamWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                      {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_what_safetensors_writes_we_read(tmp_path):
    tensors = sample()
    save_file(tensors, tmp_path / "y.safetensors", metadata={"format": "pt"})
    r = StreamReader(tmp_path / "y.safetensors")
    assert r.meta == {"format": "pt"} and r.keys() == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(r.get(k), v), k
    r.close()


def test_the_writer_refuses_what_was_not_planned(tmp_path):
    w = StreamWriter(tmp_path / "z.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="planned b"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="not written"):
        w.close()

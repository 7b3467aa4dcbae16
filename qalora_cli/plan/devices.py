"""Which device a stage will use, read from its setting without touching the hardware: a plan
for a GPU run can be made on a machine without one."""

from __future__ import annotations

import torch

from ..errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def planned_device(name: str) -> str:
    """'cpu' or the GPU's type ('cuda', 'mps'); 'auto' is what the stage would pick here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError:
        raise UserError(f"'{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None

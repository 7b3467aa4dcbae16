"""Quiet the optional libraries' import-time notices, for the CLI and the scripts alike."""

from __future__ import annotations


def quiet_library_logs() -> None:
    """Optional libraries announce at import what they could not load (torchao's CUDA
    extensions, torch.compile notices): noise to a user of this toolkit. Set before they import."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)

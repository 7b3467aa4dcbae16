"""The options of every command that loads a model to run it (eval, generate, chat)."""

from __future__ import annotations

import typer

from ..eval.model_loading import ADAPTER_HELP, DTYPE_HELP, KERNEL_HELP, MODEL_HELP

model_option = typer.Option(None, help=MODEL_HELP)
adapter_option = typer.Option(None, help=ADAPTER_HELP)
device_option = typer.Option("auto", help="auto, cpu, cuda, cuda:N, mps")
dtype_option = typer.Option("auto", help=DTYPE_HELP)
kernel_option = typer.Option("auto", help=KERNEL_HELP)

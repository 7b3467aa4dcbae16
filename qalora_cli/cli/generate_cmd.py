"""`qalora generate` and `qalora chat`: streaming generation with attention sinks
(StreamingLLM) on every model kind `qalora eval` loads. Tokens go to stdout as they are made;
the summary goes to stderr, so `qalora generate ... > out.txt` keeps only the text."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..library_logs import quiet_library_logs
from .model_options import adapter_option, device_option, dtype_option, kernel_option, model_option

CHAT_HELP = """Type a message and press Enter; the reply streams back. /reset starts over, /exit (or Ctrl-D)
leaves, Ctrl-C stops a reply. With the sink cache (the default) the conversation can go on
past the window: older turns are evicted, the first tokens (the attention sinks) stay."""


def _model_options():
    return dict(
        model=model_option,
        adapter=adapter_option,
        max_new_tokens=typer.Option(256, help="tokens to generate at most (per reply in chat)"),
        sinks=typer.Option(4, help="attention sinks: the first tokens, kept for good"),
        window=typer.Option(1020, help="recent tokens kept beside the sinks"),
        cache=typer.Option("sinks", help="sinks (constant memory, endless) or full (the plain cache)"),
        temperature=typer.Option(0.0, help="0: greedy; above 0: sampling"),
        top_p=typer.Option(1.0, help="nucleus sampling: the smallest set of tokens with this probability"),
        seed=typer.Option(None, help="seed of the sampling, for repeatable samples"),
        raw=typer.Option(False, "--raw", help="feed the text as it is, without the model's chat template"),
        ignore_eos=typer.Option(False, "--ignore-eos", help="go on past end-of-text and end-of-turn tokens"),
        device=device_option,
        dtype=dtype_option,
        kernel=kernel_option,
    )


_O = _model_options()


def generate(
    model: Optional[str] = _O["model"], adapter: Optional[Path] = _O["adapter"],
    prompt: Optional[str] = typer.Option(None, help="the prompt"),
    prompt_file: Optional[Path] = typer.Option(None, help="read the prompt from this file ('-': stdin)"),
    max_new_tokens: int = _O["max_new_tokens"], sinks: int = _O["sinks"], window: int = _O["window"],
    cache: str = _O["cache"], temperature: float = _O["temperature"], top_p: float = _O["top_p"],
    seed: Optional[int] = _O["seed"], raw: bool = _O["raw"], ignore_eos: bool = _O["ignore_eos"],
    device: str = _O["device"], dtype: str = _O["dtype"], kernel: str = _O["kernel"],
) -> None:
    """Generate from a prompt, streaming tokens to stdout (greedy by default). With the sink
    cache, memory stays flat however long the prompt or the generation."""
    from ..recipes.generate import GenerationSettings, generation_summary, start_conversation

    settings = GenerationSettings(model, adapter, max_new_tokens, sinks, window, cache, temperature, top_p, seed,
                                  raw, ignore_eos, device, dtype, kernel)
    text = _read_prompt(prompt, prompt_file)
    quiet_library_logs()
    conversation, _ = start_conversation(settings)
    for piece in conversation.reply(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(generation_summary(conversation, settings), file=sys.stderr)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt and --prompt-file")
    if prompt_file is None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompt-file '{prompt_file}': {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") \
            from None


def chat(
    model: Optional[str] = _O["model"], adapter: Optional[Path] = _O["adapter"],
    system: Optional[str] = typer.Option(None, help="a system message to start the conversation with"),
    max_new_tokens: int = _O["max_new_tokens"], sinks: int = _O["sinks"], window: int = _O["window"],
    cache: str = _O["cache"], temperature: float = _O["temperature"], top_p: float = _O["top_p"],
    seed: Optional[int] = _O["seed"], raw: bool = _O["raw"], ignore_eos: bool = _O["ignore_eos"],
    device: str = _O["device"], dtype: str = _O["dtype"], kernel: str = _O["kernel"],
) -> None:
    from ..recipes.generate import GenerationSettings, start_conversation

    settings = GenerationSettings(model, adapter, max_new_tokens, sinks, window, cache, temperature, top_p, seed,
                                  raw, ignore_eos, device, dtype, kernel)
    quiet_library_logs()
    conversation, name = start_conversation(settings, system)
    print(f"{name}; {settings.describe_cache()}. /reset starts over, /exit leaves.", file=sys.stderr)
    _chat_loop(conversation)


chat.__doc__ = "Talk with a model, replies streaming back.\n\n" + CHAT_HELP


def _chat_loop(conv) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            conv.reset()
            print("(conversation reset)")
            continue
        if not command:
            continue
        try:
            for piece in conv.reply(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()

"""Corrupt and hostile files for every reader (issue 17, item 3), shared by the seeded default
set (test_fuzz_readers.py) and the long run (test_fuzz_readers_slow.py).

A case writes one bad file into a copy of a good folder and runs what reads it: the CLI
command (typer's CliRunner) or, where a CLI run is too slow for hundreds of cases, the reader
function the command calls. It passes when the reader succeeds (a flipped bit inside tensor
data is not detectable) or refuses with the project's UserError: one line, exit code 2. Any
other exception, a traceback in the output or a run longer than HANG_S fails the case.

Mutations (hypothesis): truncation, bit flips (biased to the header, where the structure is),
overwritten and inserted bytes, an empty file; for safetensors, files that are well formed but
do not match (a tensor dropped, renamed, reshaped, retyped, swapped or added); for JSON and
YAML, the document with a key dropped or a value replaced by any JSON value."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qalora_cli.cli.app import app
from qalora_cli.errors import UserError

HANG_S = int(os.environ.get("QALORA_FUZZ_HANG_S", "120"))
runner = CliRunner()


def fuzz_settings(n: int):
    """n cases, the same ones every run (derandomized), no example database, no deadline."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int = HANG_S):
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Tally:
    """Cases tried and how each ended, per reader; written to $QALORA_FUZZ_COUNTS (JSON lines)."""

    def __init__(self, reader: str):
        self.reader, self.counts = reader, {"ok": 0, "refused": 0}

    def add(self, outcome: str) -> None:
        self.counts[outcome] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self) -> None:
        line = json.dumps({"reader": self.reader, "cases": self.total, **self.counts})
        print(line)
        if os.environ.get("QALORA_FUZZ_COUNTS"):
            with open(os.environ["QALORA_FUZZ_COUNTS"], "a") as f:
                f.write(line + "\n")


def call_reader(fn, *args, **kw) -> str:
    """'ok' or 'refused' (a one-line UserError); anything else raises AssertionError."""
    try:
        with time_limit():
            fn(*args, **kw)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"UserError message is not one line: {msg!r}"
        return "refused"
    except Hang as e:
        raise AssertionError(f"reader hung: {e}") from None
    except Exception:
        raise AssertionError("reader crashed instead of refusing:\n" + traceback.format_exc()) from None
    return "ok"


def call_cli(args: list[str], output: bool = False):
    """'ok' (exit 0) or 'refused' (exit 2, one `error:` line, the last, no traceback); with
    `output`, (that, the output)."""
    with time_limit():
        r = runner.invoke(app, [str(a) for a in args])
    if isinstance(r.exception, Hang):
        raise AssertionError(f"`qalora {' '.join(map(str, args))}` hung")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(*r.exc_info))
        raise AssertionError(f"`qalora {' '.join(map(str, args))}` crashed:\n{tb}")
    out = r.output
    assert "Traceback" not in out, out
    if r.exit_code == 0:
        return ("ok", out) if output else "ok"
    assert r.exit_code == 2, f"exit code {r.exit_code}: {out}"
    lines = out.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], out
    return ("refused", out) if output else "refused"


# ---- byte-level mutations ------------------------------------------------------------------

def safetensors_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)


@st.composite
def corrupted_bytes(draw, data: bytes, hot: int | None = None):
    """`data` truncated, bit-flipped, overwritten, extended or emptied. `hot`: the length of
    the structured head (a header), where half the positions fall."""
    n = len(data)
    hot = min(hot or n, n)

    def pos(limit=None):
        top = limit if limit is not None else (hot if draw(st.booleans()) else n)
        return draw(st.integers(0, max(top - 1, 0)))

    kind = draw(st.sampled_from(["truncate", "flip", "flip", "overwrite", "insert", "empty", "garbage"]))
    if kind == "truncate" or n == 0:
        return data[:pos()]
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(min_size=0, max_size=64))
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            out[pos()] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    at = pos()
    chunk = draw(st.binary(min_size=1, max_size=32))
    if kind == "overwrite":
        out[at:at + len(chunk)] = chunk
        return bytes(out[:max(n, at)])
    return bytes(out[:at]) + chunk + bytes(out[at:])


# ---- structured mutations --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def _paths(doc, prefix=()):
    """Every key path of a nested dict / list document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_document(draw, doc):
    """A copy of a JSON-like document with one key dropped, one value replaced, or replaced whole."""
    doc = json.loads(json.dumps(doc))
    paths = list(_paths(doc))
    kind = draw(st.sampled_from(["drop", "replace", "replace", "whole"])) if paths else "whole"
    if kind == "whole":
        return draw(json_values)
    path = draw(st.sampled_from(paths))
    node = doc
    for p in path[:-1]:
        node = node[p]
    if kind == "drop":
        del node[path[-1]]
    else:
        node[path[-1]] = draw(json_values)
    return doc


def dump_json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def json_file(draw, data: bytes):
    """A JSON file: bytes mutated, or the parsed document mutated and written back."""
    if draw(st.booleans()):
        return draw(corrupted_bytes(data))
    return dump_json(draw(mutated_document(json.loads(data))))


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8,
           torch.uint8, torch.bool]


@st.composite
def mismatched_safetensors(draw, tensors: dict[str, torch.Tensor], metadata: dict | None):
    """A well-formed safetensors file that does not match what the reader expects."""
    from safetensors.torch import save

    t = dict(tensors)
    names = sorted(t)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "rename", "reshape", "retype", "swap", "add", "scalar", "empty"]))
        name = draw(st.sampled_from(names)) if names else None
        if name is None or name not in t:
            continue
        if kind == "drop":
            del t[name]
        elif kind == "rename":
            t[name + draw(st.sampled_from(["_x", ".extra", ""])) + "z"] = t.pop(name)
        elif kind == "reshape":
            shape = list(t[name].shape) or [1]
            d = draw(st.integers(0, len(shape) - 1))
            shape[d] = draw(st.integers(0, 70))
            t[name] = torch.zeros(shape, dtype=t[name].dtype)
        elif kind == "retype":
            t[name] = t[name].to(draw(st.sampled_from(_DTYPES)))
        elif kind == "swap":
            other = draw(st.sampled_from(names))
            if other in t:
                t[name], t[other] = t[other], t[name]
        elif kind == "add":
            t[draw(st.text("abcdefghij._", min_size=1, max_size=12))] = torch.zeros(draw(st.integers(0, 5)))
        elif kind == "scalar":
            t[name] = torch.tensor(draw(st.floats(allow_nan=True)))
        elif kind == "empty":
            t = {}
    if draw(st.booleans()) and metadata is not None:
        metadata = dict(metadata)
        metadata[draw(st.sampled_from(sorted(metadata) + ["x"]))] = draw(st.text(max_size=8))
    return save({k: v.contiguous() for k, v in t.items()}, metadata=metadata)


@st.composite
def safetensors_file(draw, data: bytes):
    """Safetensors: bytes mutated (half the positions in the header) or well formed but mismatched."""
    if draw(st.integers(0, 2)) < 2:
        return draw(corrupted_bytes(data, hot=safetensors_header_end(data)))
    tensors, meta = _decode_safetensors(data)
    return draw(mismatched_safetensors(tensors, meta))


def _decode_safetensors(data: bytes):
    from safetensors.torch import load

    meta = json.loads(data[8:safetensors_header_end(data)]).get("__metadata__")
    return load(data), meta


# ---- folders -----------------------------------------------------------------------------------

def copy_with(src: Path, dst: Path, name: str, data: bytes) -> Path:
    """A fresh copy of folder `src` at `dst` with file `name` replaced by `data`."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / name).write_bytes(data)
    return dst


BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["quantize:", "  bits: *i"])

HOSTILE_YAML = [
    BILLION_LAUGHS,
    "!!python/object/apply:os.system ['echo pwned']",
    "model: !!python/name:os.system\n",
    "quantize: {bits: &x [*x]}\n",  # a self-referencing alias
    "\x00\xff\xfe",
    "quantize:\n  bits: " + "[" * 5000 + "]" * 5000,
    "- just\n- a\n- list\n",
    "quantize: {bits: 1e999}\n",
]

# what a template that escaped the sandbox would create
PWNED = Path(tempfile.gettempdir()) / "qalora-fuzz-template-escaped"

HOSTILE_CHAT_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('touch " + str(PWNED) + "').read() }}",
    "{{ lipsum.__globals__['os'].system('touch " + str(PWNED) + "') }}",
    "{% for i in range(10**12) %}x{% endfor %}",
    "{{ raise_exception('template refuses') }}",
    "{% if %}",
]

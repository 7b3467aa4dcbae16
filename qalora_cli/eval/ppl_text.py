"""The text perplexity is measured on: the built-in held-out text (never used for calibration),
a local file (.txt as is; .json/.jsonl/.csv/.parquet by a text field), or a hub dataset."""

from __future__ import annotations

from pathlib import Path

from ..data.builtin_text import heldout_text
from ..data.calibration import load_local, take_field
from ..data.file_types import DATA_SUFFIXES
from ..errors import UserError, first_line


def load_text(spec: str, config: str | None = None, split: str = "test", field: str = "text") -> tuple[str, str]:
    """-> (the text, a description for the report)."""
    if spec == "builtin":
        return heldout_text(), "builtin held-out text (Python documentation topics not used for calibration)"
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix in DATA_SUFFIXES:
            ds = load_local(DATA_SUFFIXES[p.suffix], str(p), str(p))
            text = "\n\n".join(take_field(ds, field, None, str(p), "pass --text-field"))
        else:
            text = p.read_text(encoding="utf-8", errors="replace")
        desc = str(p)
    elif p.suffix or spec.startswith((".", "/", "~")):
        raise UserError(f"text file '{spec}' does not exist")
    else:
        import datasets

        try:
            ds = datasets.load_dataset(spec, config, split=split)
        except Exception as e:
            raise UserError(f"could not load the dataset '{spec}': {first_line(e)}") from e
        # wikitext keeps paragraphs as rows, blank rows between them: joined as lm-eval does
        text = "\n\n".join(take_field(ds, field, None, spec, "pass --text-field"))
        desc = f"hub: {spec}" + (f"/{config}" if config else "") + f" [{split}]"
    if not text.strip():
        raise UserError(f"the text '{spec}' is empty")
    return text, desc

"""What the benchmark scripts share. Kept free of heavy imports (torch, transformers): some
scripts measure the memory and time their own imports take."""

from __future__ import annotations


def error_line(e: BaseException, limit: int | None = None) -> str:
    """'TypeName: the first line of the message' (at most `limit` characters of it), for a
    result file or a table cell that records why a variant failed."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:limit]}"

"""Real English text available offline with no download: the help topics of Python's own
documentation (`pydoc_data.topics`, shipped with every CPython; PSF License). About 465,000
characters in 79 topics.

The topics are split in two fixed halves so that evaluation never sees calibration text:
even-numbered topics (alphabetical) calibrate, odd-numbered ones are held out.
"""

from __future__ import annotations


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def calibration_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 0)


def heldout_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 1)

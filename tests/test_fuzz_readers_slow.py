"""The long run of test_fuzz_readers.py: at least 250 generated cases per reader in CI (the same
derandomized cases every run; QALORA_FUZZ_CASES=500 is the run docs/RELIABILITY.md reports).
`QALORA_FUZZ_COUNTS=FILE` appends each reader's count and how its cases ended (read / refused) to
FILE as JSON lines; docs/RELIABILITY.md has the figures."""

from __future__ import annotations

import os

import pytest

from test_fuzz_readers import READERS, fuzz_reader, fuzz_yaml, reader_param

SLOW_CASES = int(os.environ.get("QALORA_FUZZ_CASES", "250"))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [reader_param(n) for n in READERS])
def test_bad_files_are_refused_in_one_line_long(world, name):
    assert fuzz_reader(world, name, SLOW_CASES).total >= SLOW_CASES


def test_bad_yaml_configs_are_refused_in_one_line_long(tmp_path):
    assert fuzz_yaml(tmp_path, SLOW_CASES).total >= SLOW_CASES

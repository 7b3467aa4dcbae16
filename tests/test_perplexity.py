"""Perplexity against a direct float64 computation of the same windows."""

import math

import pytest
import torch

from helpers import make_tiny_llama, reference_nll
from qalora_cli.errors import UserError
from qalora_cli.eval.perplexity import perplexity


@pytest.mark.parametrize("seq_len, stride", [(32, 32), (32, 8), (40, 40)])
def test_matches_reference(seq_len, stride):
    model = make_tiny_llama(100)
    ids = torch.randint(0, 100, (150,), generator=torch.Generator().manual_seed(0))
    out = perplexity(model, ids, seq_len, stride)
    nll, count = reference_nll(model, ids, seq_len, stride)
    assert out["tokens"] == count
    if stride < seq_len:
        assert count == 149  # overlapping windows score every token but the first
    assert math.isclose(out["nll"], nll, rel_tol=1e-5)
    assert math.isclose(out["ppl"], math.exp(nll), rel_tol=1e-5)


def test_too_short_text_is_a_user_error():
    with pytest.raises(UserError, match="shorter than one window"):
        perplexity(make_tiny_llama(100), torch.arange(10), 32)

"""The batched sampler of the transformers engine (`observe_r1_serve.sampling`) and the delta merging of
`observe_r1_serve.engine.coalesce`."""

import math

import pytest
import torch

from observe_r1_serve.engine import ChoiceDelta, coalesce
from observe_r1_serve.sampling import sample_rows


def quantile_draws(logits: list[float], temperature: float, top_p: float, n: int = 4000) -> torch.Tensor:
    """Tokens drawn at the n evenly spaced quantiles (i + 0.5) / n: their frequencies are the sampled
    distribution to within 1/n, with no randomness in the test."""
    uniform = (torch.arange(n) + 0.5) / n
    return sample_rows(
        torch.tensor([logits]).expand(n, -1),
        torch.full((n,), temperature),
        torch.full((n,), top_p),
        uniform,
    )


def frequencies(tokens: torch.Tensor, vocab: int) -> list[float]:
    return (torch.bincount(tokens, minlength=vocab).float() / len(tokens)).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_tempered_softmax(temperature):
    logits = [2.0, 1.0, 0.0, -1.0, 0.5]
    expected = torch.softmax(torch.tensor(logits) / temperature, -1).tolist()
    assert frequencies(quantile_draws(logits, temperature, 1.0), 5) == pytest.approx(expected, abs=1e-3)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    # 0.5 < 0.7, so the second token is kept; the mass before the third (0.8) exceeds 0.7
    assert frequencies(quantile_draws(logits, 1.0, 0.7), 4) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-3)
    assert frequencies(quantile_draws(logits, 1.0, 0.4), 4) == pytest.approx([1, 0, 0, 0])


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    chosen = sample_rows(
        logits, torch.tensor([0.0, 1.0, 0.0]), torch.ones(3), torch.tensor([0.0, 0.999, 0.0])
    )
    assert chosen[0] == 1 and chosen[2] == 2
    assert chosen[1] == 2  # the last quantile of a sampled row lands on its least likely token


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_draw_at_the_top_never_lands_on_a_token_without_mass(top_p):
    logits = torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]])
    for u in (1 - 1e-12, 0.99999999, 1 - 2**-24):
        chosen = sample_rows(logits, torch.tensor([1.0]), torch.tensor([top_p]), torch.tensor([u]))
        assert chosen.item() in (0, 1)


def test_a_row_does_not_depend_on_its_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 0.5])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.8, 1.0, 1.0])
    uniform = torch.rand(6)
    together = sample_rows(logits, temperature, top_p, uniform)
    alone = [
        sample_rows(logits[i : i + 1], temperature[i : i + 1], top_p[i : i + 1], uniform[i : i + 1])
        for i in range(6)
    ]
    assert together.tolist() == [a.item() for a in alone]


def test_coalesce_merges_consecutive_deltas_of_one_choice_and_keeps_the_rest_apart():
    error = RuntimeError("boom")
    items = [
        ChoiceDelta(0, "a", 1),
        ChoiceDelta(0, "b", 2),
        ChoiceDelta(1, "x", 1),
        ChoiceDelta(1, "y", 2, "stop"),
        ChoiceDelta(1, "late", 3),
        error,
        ChoiceDelta(0, "c", 3, "length"),
    ]
    assert coalesce(items) == [
        ChoiceDelta(0, "ab", 2),
        ChoiceDelta(1, "xy", 2, "stop"),
        ChoiceDelta(1, "late", 3),
        error,
        ChoiceDelta(0, "c", 3, "length"),
    ]

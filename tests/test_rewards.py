"""Rewards: answer equivalence, the strict multiple-choice check, format, the group bonus, composition."""

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from observe_r1.answer import accuracy
from observe_r1.data import Sample
from observe_r1.format import format_response
from observe_r1_train.rewards import (
    BONUS_COEF,
    BONUS_MIN_LEN,
    FORMAT_REWARD,
    bonus_reward,
    compute_rewards,
    format_reward,
    load_reward,
)

CHOICES = ["red", "blue", "green", "yellow", "white"]


def sample(answer: str, choices: list[str] | None = None) -> Sample:
    return Sample(id="s", images=[], question="q", answer=answer, choices=choices)


def wrap(answer: str) -> str:
    return format_response("Two shapes.", "Add them up.", answer)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "1/2"),
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("$\\frac{1}{2}$", "0.5"),
        ("\\boxed{7}", "7"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("1+x", "x+1"),
        ("50%", "0.5"),  # percent: math-verify accepts both readings
        ("50%", "50"),
        ("5 cm", "5"),
        ("5\\text{ cm}", "5"),
        ("5.", "5"),
        ("12^\\circ", "12"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        ("The answer is 12.", "12"),
        ("Yes", "yes"),
        ("  blue sky. ", "Blue sky"),
    ],
)
def test_equivalent_answers_score_one(pred, gold):
    assert accuracy(wrap(pred), sample(gold)) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("15", "5"),
        ("-3", "3"),
        ("1/3", "0.333"),
        ("2, 3", "3"),  # a list is not one of its members
        ("5 or 6", "6"),
        ("1+x", "1"),  # the whole expression, not its first number
        ("five", "5"),
        ("yse", "yes"),  # a word is not a product of commuting symbols
        ("", "0"),
    ],
)
def test_different_answers_score_zero(pred, gold):
    assert accuracy(wrap(pred), sample(gold)) == 0.0


@pytest.mark.parametrize(
    "pred",
    [
        "B",
        "b",
        "(B)",
        "B.",
        "B)",
        "B:",
        "Answer: b",
        "option B",
        "The answer is (B)",
        "**B**",
        "Answer: **B**",
        "$\\boxed{B}$",
        "blue",
        "Blue.",
        "B. blue",
    ],
)
def test_multiple_choice_accepted_forms(pred):
    assert accuracy(wrap(pred), sample("B", CHOICES)) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("the", "E"),  # the authors' substring check would accept "e" in "the"
        ("BAD", "B"),
        ("A or B", "B"),
        ("B or B and A", "B"),
        ("B. red", "B"),  # letter and option text disagree
        ("I think it is B", "B"),
        ("C", "B"),
        ("bluish", "B"),
        ("", "B"),
    ],
)
def test_multiple_choice_traps_score_zero(pred, gold):
    assert accuracy(wrap(pred), sample(gold, CHOICES)) == 0.0


def test_multiple_choice_corner_cases():
    assert accuracy(wrap("(C)"), sample("C", CHOICES)) == 1.0
    assert accuracy(wrap("Answer: c"), sample("C", CHOICES)) == 1.0
    assert accuracy(wrap("E"), sample("E", CHOICES)) == 1.0
    # a letter gold without a choices list is still checked strictly
    assert accuracy(wrap("b"), sample("B")) == 1.0
    assert accuracy(wrap("the"), sample("E")) == 0.0
    # choices carrying their own labels, and numeric option text
    assert accuracy(wrap("green"), sample("C", ["A. red", "B. blue", "C. green"])) == 1.0
    assert accuracy(wrap("3.5"), sample("A", ["3.5", "35"])) == 1.0
    assert accuracy(wrap("3.5"), sample("B", ["3.5", "35"])) == 0.0


def test_empty_answer_block_scores_zero():
    empty = "<observe>x</observe><think>y</think><answer></answer>"
    assert accuracy(empty, sample("B", CHOICES)) == 0.0
    assert accuracy(empty, sample("0")) == 0.0


def test_answers_without_an_answer_block():
    # math: math-verify extracts the final expression from free text
    assert accuracy("3 apples and 2 more, so 5 in total.", sample("5")) == 1.0
    assert accuracy("<think>3 + 2</think> So it is 5", sample("5")) == 1.0
    # unclosed answer block: the text after <answer> is the answer
    assert accuracy("<think>3 + 2</think><answer>5", sample("5")) == 1.0
    # Text beside an <answer> block is never read: no second guess, no answer after an empty block.
    assert accuracy("<answer>3</answer> 4", sample("4")) == 0.0
    assert accuracy("<answer></answer>4", sample("4")) == 0.0
    assert accuracy("<answer>B</answer> or A", sample("A", CHOICES)) == 0.0
    assert accuracy("4 <answer>3</answer>", sample("3")) == 1.0
    # multiple choice: no letter is fished out of prose, a bare letter still counts
    assert accuracy("<think>so</think> I pick B because it is blue", sample("B", CHOICES)) == 0.0
    assert accuracy("B", sample("B", CHOICES)) == 1.0


def test_math_verify_works_in_worker_threads():
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: accuracy(wrap(p), sample("0.5")), ["1/2", "\\frac{2}{4}", "3"]))
    assert got == [1.0, 1.0, 0.0]


def test_format_reward_strict_and_nested():
    nested = "<think>a <observe>b</observe> c</think><answer>1</answer>"
    assert format_reward(wrap("1"), sample("1")) == FORMAT_REWARD == 0.5
    assert format_reward(nested, sample("1")) == 0.0
    assert format_reward(nested, sample("1"), nested_observe=True) == FORMAT_REWARD
    assert format_reward("<think>a</think><answer>1</answer>", sample("1")) == 0.0
    assert format_reward("1", sample("1")) == 0.0


def bonus(accuracies, lengths, completions=None):
    completions = completions or [wrap("x")] * len(lengths)
    return bonus_reward(completions, [sample("x")] * len(lengths), accuracies, lengths)


def test_bonus_goes_to_the_shortest_correct_response_above_the_floor():
    assert (BONUS_COEF, BONUS_MIN_LEN) == (0.2, 100)
    assert bonus([1, 0, 1, 1], [300, 120, 150, 200]) == [0, 0, 0.2, 0]


def test_no_bonus_when_the_shortest_correct_is_at_or_below_the_floor():
    assert bonus([1, 1], [100, 300]) == [0, 0]
    assert bonus([1, 1], [101, 300]) == [0.2, 0]


def test_no_bonus_without_a_correct_response():
    assert bonus([0, 0, 0], [150, 200, 300]) == [0, 0, 0]


def test_bonus_tie_goes_to_the_first_in_group_order():
    assert bonus([0, 1, 1, 1], [120, 150, 150, 200]) == [0, 0.2, 0, 0]


def test_bonus_ignores_malformed_correct_responses():
    completions = ["42", wrap("42")]
    assert bonus([1, 1], [130, 200], completions) == [0, 0.2]


def test_total_reward_takes_exactly_the_paper_values():
    good, bad_format = wrap("42"), "<think>hmm</think> 42"
    completions = [good, good, wrap("41"), bad_format, "41", good, wrap("41"), wrap("40")]
    lengths = [150, 300, 120, 110, 90, 50, 200, 200]
    result = compute_rewards(completions, [sample("42")] * 8, lengths, group_size=4)
    # group 1: 1.7 (shortest correct, 150 > 100), 1.5, 0.5 (wrong), 1.0 (correct, bad format)
    # group 2: 0 (wrong, bad format), 1.5 (shortest correct but 50 <= 100), 0.5, 0.5
    assert result.total == pytest.approx([1.7, 1.5, 0.5, 1.0, 0.0, 1.5, 0.5, 0.5])
    assert set(round(t, 6) for t in result.total) == {0.0, 0.5, 1.0, 1.5, 1.7}
    assert result.components["bonus"] == [0.2, 0, 0, 0, 0, 0, 0, 0]
    assert result.metrics["format_rate"] == 6 / 8
    assert result.metrics["bonus_rate"] == 1 / 2
    assert result.metrics["reward/accuracy"] == 4 / 8


def test_weights_and_clamp():
    completions, samples = [wrap("1")] * 2, [sample("1")] * 2
    result = compute_rewards(completions, samples, [10, 10], 2, {"accuracy": 30.0, "format": -1.0})
    assert result.total == [10.0, 10.0]
    assert result.components == {"accuracy": [1.0, 1.0], "format": [0.5, 0.5]}
    unclamped = compute_rewards(completions, samples, [10, 10], 2, {"accuracy": 30.0}, clamp=None)
    assert unclamped.total == [30.0, 30.0]
    with pytest.raises(ValueError, match="multiple of group_size"):
        compute_rewards(completions, samples, [10, 10], 3)


def test_shuffled_components_move_to_other_responses_and_the_logs_keep_what_was_earned():
    """`reward.shuffle` (the control run): the named components enter the total permuted by one seeded
    permutation, the answer check the weights read moves with "accuracy", the format reward stays with
    its response, and the logged components and metrics are the true ones."""
    completions = [wrap("42"), wrap("1"), "42", "<think>x</think>", wrap("42"), "41", wrap("7"), "42"] * 2
    lengths = list(range(101, 117))
    samples = [sample("42")] * 16
    true = compute_rewards(completions, samples, lengths, 4)

    def control(names, seed=3):
        return compute_rewards(completions, samples, lengths, 4, shuffle=names, shuffle_seed=seed)

    answers = control(["accuracy", "bonus"])
    assert answers == control(["accuracy", "bonus"]) and answers != control(["accuracy", "bonus"], seed=4)
    assert answers.components == true.components and answers.metrics == true.metrics
    assert sorted(answers.accuracy) == sorted(true.accuracy) and answers.accuracy != true.accuracy
    fmt = true.components["format"]
    earned = [a + b for a, b in zip(true.accuracy, true.components["bonus"], strict=True)]
    moved = [t - f for t, f in zip(answers.total, fmt, strict=True)]  # accuracy + bonus, permuted
    assert sorted(moved) == pytest.approx(sorted(earned)) and moved != pytest.approx(earned)
    everything = control(["accuracy", "format", "bonus"])
    assert sorted(everything.total) == pytest.approx(sorted(true.total)) and everything.total != true.total
    assert everything.accuracy == answers.accuracy  # one permutation per seed, whatever is shuffled


CUSTOM = """
from observe_r1_train.rewards import group_reward

def length_penalty(completions, samples):
    return [-len(c) / 100 for c in completions]

@group_reward
def rank(completions, samples, lengths, **ctx):
    return [float(sorted(lengths).index(n)) for n in lengths]

def wrong_count(completions, samples):
    return [1.0]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_custom_rewards_by_module_function(custom_module):
    completions = ["a" * 100, "a" * 50, "a" * 200, "a" * 10]
    spec_pen, spec_rank = f"{custom_module}:length_penalty", f"{custom_module}:rank"
    result = compute_rewards(completions, [sample("x")] * 4, [3, 1, 9, 5], 2, {spec_pen: 1.0, spec_rank: 2.0})
    assert result.components[spec_pen] == [-1.0, -0.5, -2.0, -0.1]
    assert result.components[spec_rank] == [1.0, 0.0, 1.0, 0.0]  # ranked within each group
    assert result.total == pytest.approx([1.0, -0.5, 0.0, -0.1])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("acuracy", "expected one of"),
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_A_FUNCTION", "not a function"),
    ],
)
def test_bad_reward_spec_is_named_in_the_error(custom_module, spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_reward(spec)
    assert spec in str(info.value)


def test_reward_returning_the_wrong_count_is_reported(custom_module):
    with pytest.raises(ValueError, match="my_rewards:wrong_count' returned 1 values for 2"):
        compute_rewards(["a", "b"], [sample("x")] * 2, [1, 1], 2, {"my_rewards:wrong_count": 1.0})


def test_the_authors_bonus_rule_pays_a_malformed_correct_response_when_asked():
    from observe_r1_train.rewards import bonus_reward

    sample = Sample(id="s", images=[], question="q", answer="3")
    malformed = "3"
    well_formed = "<observe>o</observe><think>t</think><answer>3</answer>"
    args = ([malformed, well_formed], [sample, sample], [1.0, 1.0], [150, 200])
    assert bonus_reward(*args) == [0.0, BONUS_COEF]
    assert bonus_reward(*args, bonus_requires_format=False) == [BONUS_COEF, 0.0]


def think(answer: str) -> str:
    return format_response("unused", "Add them up.", answer, "think")


def test_rewards_check_the_format_of_the_variant_asked_for():
    assert format_reward(think("1"), sample("1"), format_variant="think") == FORMAT_REWARD
    assert format_reward(wrap("1"), sample("1"), format_variant="think") == 0.0  # an observe block
    assert format_reward(think("1"), sample("1")) == 0.0  # observe (default) misses its block
    completions = [think("42"), wrap("42"), think("41"), "42"]
    for variant, formats, total, rate in [
        ("think", [0.5, 0, 0.5, 0], [1.7, 1.0, 0.5, 1.0], 2 / 4),
        ("observe", [0, 0.5, 0, 0], [1.0, 1.7, 0.0, 1.0], 1 / 4),
    ]:
        result = compute_rewards(
            completions, [sample("42")] * 4, [150, 200, 120, 110], 4, format_variant=variant
        )
        assert result.components["format"] == formats
        assert result.total == pytest.approx(total)  # the bonus needs the variant's format too
        assert result.metrics["format_rate"] == rate


def test_a_plugin_reward_is_told_the_variant():
    seen = []

    def plugin(completions, samples, format_variant):
        seen.append(format_variant)
        return [0.0] * len(completions)

    import types

    sys.modules["variant_plugin"] = types.SimpleNamespace(plugin=plugin)
    try:
        compute_rewards(
            [think("1")] * 2,
            [sample("1")] * 2,
            [1, 1],
            2,
            {"variant_plugin:plugin": 1.0},
            format_variant="think",
        )
    finally:
        del sys.modules["variant_plugin"]
    assert seen == ["think"]

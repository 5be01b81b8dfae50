"""The output-format contract: strict and nested checks, malformed inputs, and streaming splits."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from observe_r1.errors import InvalidValue
from observe_r1.format import (
    ALL_TAGS,
    FIELDS,
    SYSTEM_PROMPT,
    VARIANTS,
    StreamParser,
    format_response,
    parse,
    system_prompt,
    to_variant,
)

GOOD = "<observe>Three red circles.</observe>\n<think>Count them: 1, 2, 3.</think>\n<answer>3</answer>"


def test_well_formed_response_is_split_into_fields():
    r = parse(GOOD)
    assert (r.observation, r.reasoning, r.answer) == ("Three red circles.", "Count them: 1, 2, 3.", "3")
    assert r.format_ok and r.errors == ()


def test_whitespace_around_and_inside_blocks_is_allowed_and_stripped():
    r = parse("\n <observe>\n a \n</observe>  <think> b </think>\n\n<answer>  c\n</answer>\n")
    assert (r.observation, r.reasoning, r.answer, r.format_ok) == ("a", "b", "c", True)


def test_system_prompt_asks_for_every_tag():
    for tag in ALL_TAGS:
        assert tag in SYSTEM_PROMPT


def test_format_response_round_trips():
    r = parse(format_response("o", "t", "a"))
    assert (r.observation, r.reasoning, r.answer, r.format_ok) == ("o", "t", "a", True)


@pytest.mark.parametrize(
    "text, error",
    [
        ("<think>t</think><answer>a</answer>", "expected one <observe>, found 0"),
        ("<observe>o</observe><think>t</think>", "expected one <answer>, found 0"),
        (
            "<observe>o</observe><think>t</think><think>u</think><answer>a</answer>",
            "expected one <think>, found 2",
        ),
        ("<observe></observe><think>t</think><answer>a</answer>", "empty <observe> block"),
        ("<observe>o</observe><think> \n </think><answer>a</answer>", "empty <think> block"),
        ("<observe>o</observe><think>t</think><answer></answer>", "empty <answer> block"),
        ("So: <observe>o</observe><think>t</think><answer>a</answer>", "text outside"),
        ("<observe>o</observe><think>t</think><answer>a</answer> done", "text outside"),
        ("<observe>o</observe>x<think>t</think><answer>a</answer>", "text outside"),
        ("<observe>o</observe><think>t</think><answer>a", "unclosed <answer>"),
        ("<observe>o</observe></think><think>t<answer>a</answer>", "</think> without a matching <think>"),
        ("<think>t</think><observe>o</observe><answer>a</answer>", "blocks out of order"),
        ("<answer>a</answer><observe>o</observe><think>t</think>", "blocks out of order"),
        ("just an answer", "no <observe>, <think> or <answer> tags"),
        ("", "no <observe>, <think> or <answer> tags"),
    ],
)
def test_malformed_responses_are_rejected_with_a_reason(text, error):
    r = parse(text)
    assert not r.format_ok
    assert any(error in e for e in r.errors), r.errors


def test_tags_are_case_sensitive_and_exact():
    r = parse("<Observe>o</Observe><think>t</think><answer>a</answer>")
    assert not r.format_ok
    assert r.answer == "<Observe>o</Observe>\na"


NESTED = (
    "<think>First I look. <observe>Two bars, A taller.</observe> So A is tallest.</think><answer>A</answer>"
)


def test_nested_observe_is_accepted_only_in_lenient_mode():
    strict, lenient = parse(NESTED), parse(NESTED, nested_observe=True)
    assert not strict.format_ok and any("out of order" in e for e in strict.errors)
    assert lenient.format_ok
    assert lenient.observation == "Two bars, A taller."
    assert lenient.reasoning == "First I look.\nSo A is tallest."
    assert lenient.answer == "A"
    assert parse(GOOD, nested_observe=True).format_ok


def test_nested_observe_needs_reasoning_of_its_own():
    r = parse("<think><observe>o</observe></think><answer>a</answer>", nested_observe=True)
    assert not r.format_ok and "empty <think> block" in r.errors


def test_broken_format_still_delivers_everything_the_model_said():
    r = parse("The answer is 42.")
    assert (r.observation, r.reasoning, r.answer, r.format_ok) == ("", "", "The answer is 42.", False)
    r = parse("<think>reasoning only</think> 42")
    assert (r.reasoning, r.answer) == ("reasoning only", "42")
    r = parse("<observe>o</observe><think>t</think><answer>unclosed 7")
    assert r.answer == "unclosed 7"
    r = parse("<think>a</think><think>b</think><answer>c</answer>")
    assert r.reasoning == "a\nb"


def test_literal_angle_brackets_are_text():
    r = parse("<observe>x < y and y <= z</observe><think>a<b, <thing></think><answer><5</answer>")
    assert r.format_ok
    assert (r.observation, r.reasoning, r.answer) == ("x < y and y <= z", "a<b, <thing>", "<5")


def test_stream_holds_back_a_partial_tag():
    p = StreamParser()
    assert [(d.field, d.text) for d in p.feed("<observe>red</obs")] == [("observation", "red")]
    assert p.feed("erve><th") == []
    assert [(d.field, d.text) for d in p.feed("ink>so 3</think><answer>3")] == [
        ("reasoning", "so 3"),
        ("answer", "3"),
    ]
    p.feed("</answer>")
    p.finish()
    assert p.result.format_ok


def test_stream_holds_back_trailing_whitespace_until_more_text_arrives():
    p = StreamParser()
    assert [d.text for d in p.feed("<think>one ")] == ["one"]
    assert [d.text for d in p.feed("two  ")] == [" two"]
    assert p.feed("</think>") == []


def test_a_dangling_tag_prefix_at_the_end_is_literal_text():
    p = StreamParser()
    p.feed("<answer>5</answer> <thi")
    assert [(d.field, d.text) for d in p.finish()] == [("answer", "\n<thi")]
    assert p.result.answer == "5\n<thi"


def test_feed_after_finish_is_an_error():
    p = StreamParser()
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


# Independent oracle: the authors' format regexes, with "exactly one of each tag" and "non-empty".
_STRICT_RE = re.compile(
    r"\s*<observe>(.*?)</observe>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S
)
_NESTED_RE = re.compile(
    r"\s*<think>(.*?)<observe>(.*?)</observe>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S
)


def _oracle(text: str, nested: bool) -> bool:
    if any(text.count(tag) != 1 for tag in ALL_TAGS):
        return False
    m = _STRICT_RE.fullmatch(text)
    if m and all(g.strip() for g in m.groups()):
        return True
    m = _NESTED_RE.fullmatch(text) if nested else None
    return bool(m) and bool((m[1] + m[3]).strip()) and bool(m[2].strip()) and bool(m[4].strip())


_pieces = st.sampled_from(
    [
        *ALL_TAGS,
        "<",
        ">",
        "/",
        "<th",
        "</ans",
        "<obs",
        "</",
        "<thing>",
        " ",
        "\n",
        "  ",
        "a",
        "42",
        "é",
        "x y",
        "<<",
    ]
)
_soup = st.lists(_pieces, max_size=40).map("".join)
_words = st.text(alphabet=st.sampled_from("ab 1\n<>é"), max_size=12)
_well_formed = st.builds(
    lambda ws, o, t, a: (
        ws[0] + f"<observe>{o}</observe>{ws[1]}<think>{t}</think>{ws[2]}<answer>{a}</answer>" + ws[3]
    ),
    st.lists(st.sampled_from(["", " ", "\n", "\n\n"]), min_size=4, max_size=4),
    _words,
    _words,
    _words,
)
_nested = st.builds(
    lambda a, b, c, d: f"<think>{a}<observe>{b}</observe>{c}</think><answer>{d}</answer>",
    _words,
    _words,
    _words,
    _words,
)
_texts = st.one_of(_soup, _well_formed, _nested)


def _stream(text: str, cuts: list[int], nested: bool):
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    p = StreamParser(nested_observe=nested)
    deltas = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        deltas += p.feed(text[lo:hi])
    deltas += p.finish()
    return deltas, p.result


@settings(max_examples=600, deadline=None)
@given(
    text=_texts, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), nested=st.booleans()
)
def test_any_stream_split_ends_in_the_result_of_parse(text, cuts, nested):
    deltas, result = _stream(text, cuts, nested)
    expected = parse(text, nested_observe=nested)
    assert result == expected
    for name in FIELDS:
        joined = "".join(d.text for d in deltas if d.field == name)
        assert joined == getattr(expected, name)
        assert not any(tag in joined for tag in ALL_TAGS)
    assert all(d.text for d in deltas)


@settings(max_examples=600, deadline=None)
@given(text=_texts, nested=st.booleans())
def test_verdict_matches_the_authors_regex(text, nested):
    assert parse(text, nested_observe=nested).format_ok == _oracle(text, nested)


@settings(max_examples=200, deadline=None)
@given(o=_words, t=_words, a=_words)
def test_well_formed_parts_come_back_stripped(o, t, a):
    r = parse(format_response(o, t, a))
    if o.strip() and t.strip() and a.strip() and not any(tag in o + t + a for tag in ALL_TAGS):
        assert r.format_ok
        assert (r.observation, r.reasoning, r.answer) == (o.strip(), t.strip(), a.strip())


@pytest.mark.parametrize(
    "text, graded",
    [
        ("<observe>o</observe><think>t</think><answer> 42 </answer>", "42"),
        ("<answer>3</answer> 4", "3"),  # text beside the block is kept in `answer`, never graded
        ("<answer></answer>4", ""),
        ("<answer>1</answer><answer>2</answer>", "1"),  # the first block
        ("<think>so</think><answer>5", "5"),  # unclosed: runs to the end
        ("the answer is 7", "the answer is 7"),  # no block: the text outside every block
        ("<think>so</think> 8", "8"),
    ],
)
def test_graded_answer_is_the_first_answer_block_or_the_text_outside(text, graded):
    assert parse(text).graded_answer == graded
    assert graded in parse(text).answer  # nothing is lost from `answer`


# --- the think variant (plain R1): <think>…</think><answer>…</answer> -----------------------------------

THINK_GOOD = "<think>Three red circles: 1, 2, 3.</think>\n<answer>3</answer>"


def test_think_variant_accepts_its_form_with_an_empty_observation():
    r = parse(THINK_GOOD, variant="think")
    assert r.format_ok and r.errors == ()
    assert (r.observation, r.reasoning, r.answer) == ("", "Three red circles: 1, 2, 3.", "3")
    assert parse(f"  {THINK_GOOD}\n", variant="think").format_ok
    assert not parse(THINK_GOOD).format_ok  # the observe variant misses its observe block ...
    assert "expected one <observe>, found 0" in parse(THINK_GOOD).errors  # ... and says so


@pytest.mark.parametrize(
    "text, error",
    [
        (GOOD, "unexpected <observe>: format variant 'think' has no observe block"),
        ("<think>t <observe>o</observe></think><answer>a</answer>", "unexpected </observe>"),
        ("<think>t</think>", "expected one <answer>, found 0"),
        ("<think>t</think><think>u</think><answer>a</answer>", "expected one <think>, found 2"),
        ("<think> </think><answer>a</answer>", "empty <think> block"),
        ("<answer>a</answer><think>t</think>", "blocks out of order: expected think, answer"),
        ("So <think>t</think><answer>a</answer>", "text outside the <think> and <answer> blocks"),
        ("just an answer", "no <think> or <answer> tags"),
    ],
)
def test_think_variant_refuses_an_observe_block_and_the_usual_faults(text, error):
    r = parse(text, variant="think")
    assert not r.format_ok
    assert any(error in e for e in r.errors), r.errors


def test_an_observe_block_in_think_mode_still_reaches_the_observation():
    r = parse(GOOD, variant="think")
    assert (r.observation, r.reasoning, r.answer) == ("Three red circles.", "Count them: 1, 2, 3.", "3")


def test_think_variant_has_its_own_prompt_and_response_and_no_nested_mode():
    prompt = VARIANTS["think"].system_prompt
    assert system_prompt("think") == prompt and "<think>" in prompt and "<answer>" in prompt
    assert "observe>" not in prompt
    assert system_prompt() == SYSTEM_PROMPT and system_prompt("think", "") is None
    assert system_prompt("think", "Be brief.") == "Be brief."
    assert format_response("o", "t", "a", "think") == "<think>t</think>\n<answer>a</answer>"
    assert format_response("o", "t", "a") == "<observe>o</observe>\n<think>t</think>\n<answer>a</answer>"
    with pytest.raises(InvalidValue, match="nested_observe needs variant='observe'.*not 'think'"):
        parse(THINK_GOOD, nested_observe=True, variant="think")
    with pytest.raises(InvalidValue, match="variant='plain': expected one of observe, think"):
        StreamParser(variant="plain")


def test_to_variant_drops_the_observe_block_for_think_and_keeps_the_rest():
    assert to_variant(GOOD, "think") == "<think>Count them: 1, 2, 3.</think>\n<answer>3</answer>"
    nested = "<think>a <observe>b</observe> c</think><answer>1</answer>"
    assert to_variant(nested, "think") == "<think>a\nc</think>\n<answer>1</answer>"
    assert to_variant(THINK_GOOD, "think") == THINK_GOOD  # already right: unchanged
    assert to_variant(GOOD) == GOOD and to_variant("free text") == "free text"  # observe: as it was
    assert parse(to_variant(GOOD, "think"), variant="think").format_ok


@settings(max_examples=400, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_think_streams_never_carry_a_partial_tag_and_end_in_parse(text, cuts):
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    p = StreamParser(variant="think")
    deltas = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        deltas += p.feed(text[lo:hi])
    deltas += p.finish()
    assert p.result == parse(text, variant="think")
    for name in FIELDS:
        joined = "".join(d.text for d in deltas if d.field == name)
        assert joined == getattr(p.result, name)
        assert not any(tag in joined for tag in ALL_TAGS)


def _think_oracle(text: str) -> bool:
    if any(text.count(tag) != (0 if "observe" in tag else 1) for tag in ALL_TAGS):
        return False
    m = re.fullmatch(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", text, re.S)
    return bool(m) and all(g.strip() for g in m.groups())


_think_well_formed = st.builds(
    lambda ws, t, a: f"{ws[0]}<think>{t}</think>{ws[1]}<answer>{a}</answer>{ws[2]}",
    st.lists(st.sampled_from(["", " ", "\n"]), min_size=3, max_size=3),
    _words,
    _words,
)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(_texts, _think_well_formed))
def test_think_verdict_matches_the_plain_r1_regex(text):
    assert parse(text, variant="think").format_ok == _think_oracle(text)

"""Sample loading: JSONL and Parquet, images relative to the file, and bad rows named by file, line and field."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from observe_r1.data import DataError, load_samples

GOOD = {"id": "a", "images": ["img/a.png"], "question": "How many?", "answer": "3"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "img" / "notes.png").write_text("plain text")
    return tmp_path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_good_rows_load_with_images_resolved_relative_to_the_file(folder, monkeypatch):
    row = {
        **GOOD,
        "id": 7,
        "answer": 3,
        "choices": ["3", "4"],
        "difficulty": 0.25,
        "complexity": 120,
        "level": 2,
        "hint": "careful",
        "source": "mine",
        "topic": "counting",
    }
    path = _write_jsonl(
        folder / "data.jsonl", [GOOD, "", row, {**GOOD, "id": "url", "images": ["https://x/y.png"]}]
    )
    monkeypatch.chdir("/")
    samples = load_samples(path)
    assert [s.id for s in samples] == ["a", "7", "url"]
    assert samples[0].images == [str((folder / "img" / "a.png").resolve())]
    s = samples[1]
    assert (s.answer, s.choices, s.difficulty, s.complexity, s.level, s.hint, s.source) == (
        "3",
        ["3", "4"],
        0.25,
        120.0,
        2,
        "careful",
        "mine",
    )
    assert s.extra == {"topic": "counting"}
    assert s.to_row()["topic"] == "counting"
    assert samples[2].images == ["https://x/y.png"]


def test_a_row_without_images_is_text_only(folder):
    samples = load_samples(_write_jsonl(folder / "d.jsonl", [{**GOOD, "images": []}]))
    assert samples[0].images == []


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({k: v for k, v in GOOD.items() if k != "question"}, "question", "missing required field"),
        ({k: v for k, v in GOOD.items() if k != "answer"}, "answer", "missing required field"),
        ({**GOOD, "images": ["img/missing.png"]}, "images", "image file not found"),
        ({**GOOD, "images": ["img/broken.png"]}, "images", "unreadable image"),
        ({**GOOD, "images": ["img/notes.png"]}, "images", "unreadable image"),
        ({**GOOD, "images": "img/a.png"}, "images", "must be a list"),
        ({**GOOD, "question": 5}, "question", "non-empty string"),
        ({**GOOD, "question": "  "}, "question", "non-empty string"),
        ({**GOOD, "answer": ""}, "answer", "must not be empty"),
        ({**GOOD, "answer": ["3"]}, "answer", "string or number"),
        ({**GOOD, "id": True}, "id", "string or integer"),
        ({**GOOD, "choices": "A"}, "choices", "list of at least two"),
        ({**GOOD, "difficulty": "hard"}, "difficulty", "must be a number"),
        ({**GOOD, "difficulty": 1.5}, "difficulty", "[0, 1]"),
        ({**GOOD, "level": 1.5}, "level", "integer"),
        ({**GOOD, "hint": 3}, "hint", "must be a string"),
    ],
)
def test_a_bad_row_is_named_by_file_line_and_field(folder, row, field, message):
    path = _write_jsonl(folder / "data.jsonl", [GOOD, {**GOOD, "id": "b"}, row])
    with pytest.raises(DataError) as info:
        load_samples(path)
    err = info.value
    assert err.location == f"{path}:3"
    assert err.field == field
    assert message in str(err)
    assert f"{path}:3: field '{field}'" in str(err)


def test_invalid_json_and_non_object_rows_name_their_line(folder):
    path = _write_jsonl(folder / "data.jsonl", [GOOD, "", '{"id": "b", "images": [', "[1, 2]"])
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON"):
        load_samples(path)
    path = _write_jsonl(folder / "data.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=r"data\.jsonl:2: a row must be a JSON object"):
        load_samples(path)


def test_duplicate_ids_are_refused_with_both_places(folder):
    path = _write_jsonl(folder / "data.jsonl", [GOOD, GOOD])
    with pytest.raises(
        DataError, match=r"data\.jsonl:2: field 'id': duplicate id 'a' \(first at .*data\.jsonl:1\)"
    ):
        load_samples(path)


def test_parquet_rows_load_and_bad_rows_name_their_index(folder):
    rows = [{**GOOD, "choices": None}, {**GOOD, "id": "b", "choices": ["x", "y"]}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "data.parquet")
    samples = load_samples(folder / "data.parquet")
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].choices is None and samples[1].choices == ["x", "y"]
    pq.write_table(
        pa.Table.from_pylist([GOOD, {**GOOD, "id": "b", "images": ["img/gone.png"]}]), folder / "bad.parquet"
    )
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'images'"):
        load_samples(folder / "bad.parquet")


def test_missing_corrupt_or_unknown_files_are_refused(folder):
    with pytest.raises(DataError, match="data file not found"):
        load_samples(folder / "nope.jsonl")
    (folder / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable Parquet"):
        load_samples(folder / "x.parquet")
    (folder / "x.csv").write_text("id\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_samples(folder / "x.csv")

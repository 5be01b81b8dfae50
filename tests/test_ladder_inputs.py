"""The ladder's inputs: other tables mapped onto the sample schema (Parquet with image bytes, a Hugging Face
`datasets` folder), golds the answer check cannot verify, and the contamination check against an
evaluation set by question and by exact or perceptual image hash."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from observe_r1.answer import unverifiable_reason
from observe_r1.data import DataError, Sample
from observe_r1_train.ladder.contamination import EvalIndex, normalise_question
from observe_r1_train.ladder.inputs import Row, read_all, unverifiable


def picture(seed: int, size: int = 64) -> Image.Image:
    """A picture with a few shapes placed by `seed` (distinct seeds: clearly different pictures)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for i in range(4):
        x, y = (seed * 37 + i * 23) % (size - 16), (seed * 53 + i * 41) % (size - 16)
        draw.rectangle([x, y, x + 14, y + 14], fill=("red", "blue", "green", "black")[(seed + i) % 4])
    return img


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def test_parquet_with_a_column_map_and_image_bytes(tmp_path):
    table = pa.Table.from_pylist(
        [
            {
                "qid": "a",
                "problem": "How many?",
                "solution": "3",
                "image": {"bytes": png_bytes(picture(1)), "path": None},
            },
            {
                "qid": "b",
                "problem": "Which?",
                "solution": "B",
                "image": {"bytes": png_bytes(picture(2)), "path": None},
            },
        ]
    )
    pq.write_table(table, tmp_path / "src.parquet")
    columns = {"id": "qid", "question": "problem", "answer": "solution", "images": "image"}
    images = tmp_path / "out" / "images"
    rows = read_all([tmp_path / "src.parquet"], columns, "train", images)
    assert [(r.sample.id, r.sample.question, r.sample.answer) for r in rows] == [
        ("a", "How many?", "3"),
        ("b", "Which?", "B"),
    ]
    assert rows[0].location == f"{tmp_path / 'src.parquet'}:row 0"
    saved = Path(rows[0].sample.images[0])
    assert saved.parent == images and Image.open(saved).tobytes() == picture(1).tobytes()
    assert "problem" not in rows[0].sample.extra  # the mapped columns leave the row
    again = read_all([tmp_path / "src.parquet"], columns, "train", images)
    assert [r.sample.images for r in again] == [r.sample.images for r in rows]  # named by content
    with pytest.raises(
        DataError, match=r"src.parquet:row 0: field 'question': column 'prompt' \(input.map.question\)"
    ):
        read_all([tmp_path / "src.parquet"], {**columns, "question": "prompt"}, "train", images)


def test_datasets_folder_with_an_image_column_and_splits(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "q": datasets.Value("string"),
            "a": datasets.Value("string"),
            "img": datasets.Image(),
        }
    )
    split = datasets.Dataset.from_dict(
        {"id": ["x", "y"], "q": ["Count.", "Read."], "a": ["1", "2"], "img": [picture(3), picture(4)]},
        features=features,
    )
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "ds"))
    columns = {"question": "q", "answer": "a", "images": "img"}
    rows = read_all([tmp_path / "ds"], columns, "test", tmp_path / "images")
    assert [r.sample.id for r in rows] == ["x", "y"] and rows[1].location == f"{tmp_path / 'ds'}[test]:row 1"
    assert Image.open(rows[1].sample.images[0]).convert("RGB").tobytes() == picture(4).tobytes()
    with pytest.raises(DataError, match="no split 'train' \\(input.split\\); it has test"):
        read_all([tmp_path / "ds"], columns, "train", tmp_path / "images")


def test_bad_rows_and_duplicate_ids_are_refused_by_location_and_field(tmp_path):
    good = {"id": "1", "images": [], "question": "q", "answer": "1"}
    (tmp_path / "a.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({**good, "id": "2"}) + "\n" + json.dumps({**good, "answer": ""}) + "\n"
    )
    with pytest.raises(DataError, match=r"b.jsonl:2: field 'answer': must not be empty"):
        read_all([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], {}, "train", tmp_path / "images")
    (tmp_path / "b.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'id': duplicate id '1' \(first at .*a.jsonl:1\)"):
        read_all([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], {}, "train", tmp_path / "images")


@pytest.mark.parametrize(
    "answer, choices, reason",
    [
        ("3", None, None),
        ("\\frac{1}{2}", None, None),
        ("blue", None, None),
        ("B", ["red", "blue"], None),
        ("blue", ["red", "blue"], None),  # the option text names option B
        ("E", ["red", "blue"], "gold names option E, but the row has 2 choices"),
        ("purple", ["red", "blue"], "multiple-choice gold names no single option"),
        ("the two triangles are congruent by side angle side", None, "free-form gold of more than 6 words"),
        ("\\frac{", None, "math-verify cannot read the gold"),
    ],
)
def test_unverifiable_golds_have_reasons(answer, choices, reason):
    got = unverifiable_reason(Sample("s", [], "q", answer, choices=choices), max_words=6)
    assert got == reason if reason is None else got.startswith(reason)


def test_unverifiable_rows_are_listed_by_index():
    rows = [Row(f"f:{i}", Sample(str(i), [], "q", a)) for i, a in enumerate(["1", "\\frac{", "2"])]
    assert unverifiable(rows, 6) == {1: "math-verify cannot read the gold"}


def test_contamination_by_question_exact_and_perceptual_image(tmp_path):
    def saved(img: Image.Image, name: str) -> str:
        path = tmp_path / name
        img.save(path)
        return str(path)

    eval_rows = [
        Row(
            "eval.jsonl:1",
            Sample("e1", [saved(picture(5), "e1.png")], "How many RED squares are there?", "2"),
        ),
        Row("eval.jsonl:2", Sample("e2", [saved(picture(6), "e2.png")], "What is shown?", "A")),
    ]
    rows = [
        Row(
            "in:1",
            Sample("same-question", [saved(picture(7), "a.png")], "how many red squares are there", "2"),
        ),
        Row("in:2", Sample("same-pixels", [saved(picture(5), "b.bmp")], "Another question?", "1")),
        Row("in:3", Sample("resized", [saved(picture(6).resize((96, 96)), "c.png")], "Third question?", "1")),
        Row("in:4", Sample("clean", [saved(picture(9), "d.png")], "A new question?", "1")),
    ]
    index = EvalIndex(eval_rows, question=True, image="perceptual", max_distance=4)
    found = {rows[i].sample.id: [(m.by, m.eval_id) for m in index.matches(i, r)] for i, r in enumerate(rows)}
    assert found["same-question"] == [("question", "e1")]
    assert found["same-pixels"] == [("image (same pixels)", "e1")]
    assert [eval_id for _, eval_id in found["resized"]] == ["e2"] and found["resized"][0][0].startswith(
        "image (perceptual"
    )
    assert found["clean"] == []
    exact_only = EvalIndex(eval_rows, question=False, image="exact", max_distance=4)
    assert [len(exact_only.matches(i, r)) for i, r in enumerate(rows)] == [0, 1, 0, 0]
    assert normalise_question("  How many  RED squares, are there? ") == "how many red squares are there"


def test_a_templated_question_matches_only_through_its_image(tmp_path):
    """Perception data asks a few template questions of many images: a training row with a template
    question and another image is no copy; the same image still is; a question held once by each set
    is a copied item."""

    def row(name: str, seed: int, question: str) -> Row:
        path = tmp_path / f"{name}.png"
        picture(seed).save(path)
        return Row(f"{name}.jsonl:1", Sample(name, [str(path)], question, "red"))

    template, rare, unique = (
        "What colour is the shape?",
        "Is the red square left?",
        "What is the seventh square?",
    )
    eval_rows = [row("e1", 1, template), row("e2", 2, template), row("e3", 3, unique), row("e4", 6, rare)]
    rows = [
        row("other-image", 4, template),
        row("same-image", 1, template),
        row("same-unique", 5, unique),
        row("rare-1", 7, rare),  # once in the held-out set, twice here: a template too
        row("rare-2", 8, rare),
    ]
    index = EvalIndex(eval_rows, question=True, image="exact", max_distance=4, inputs=rows)
    assert index.templates == 2
    found = {r.sample.id: [(m.by, m.eval_id) for m in index.matches(i, r)] for i, r in enumerate(rows)}
    assert found == {
        "other-image": [],
        "same-image": [("image (same pixels)", "e1")],
        "same-unique": [("question", "e3")],
        "rare-1": [],
        "rare-2": [],
    }
    loose = EvalIndex(
        eval_rows, question=True, image="none", max_distance=4, question_max_repeats=3, inputs=rows
    )
    assert [len(loose.matches(i, r)) for i, r in enumerate(rows)] == [0, 0, 1, 1, 1]  # the template: 4 > 3

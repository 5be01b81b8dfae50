"""The sample schema every stage reads, and a loader that validates it.

A row is `{"id", "images", "question", "answer"}` plus the optional `choices`, `difficulty`,
`complexity`, `level`, `hint` and `source` (docs/architecture.md, "Contracts"). Image paths are relative to
the data file; http(s) URLs are kept as they are. Any bad row stops the load with a `DataError` that
names the file, the line (JSONL) or row (Parquet) and the field; nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from observe_r1.errors import UserError

REQUIRED_FIELDS = ("id", "images", "question", "answer")
OPTIONAL_FIELDS = ("choices", "difficulty", "complexity", "level", "hint", "source")


class DataError(UserError, ValueError):
    """A bad row: `location` is `file:line` (JSONL) or `file:row N` (Parquet), `field` the culprit."""

    def __init__(self, location: str, field_name: str | None, message: str):
        self.location = location
        self.field = field_name
        where = f"{location}: field '{field_name}'" if field_name else location
        super().__init__(f"{where}: {message}")


@dataclass
class Sample:
    """One image+question+answer row; `images` holds absolute paths or URLs once loaded."""

    id: str
    images: list[str]
    question: str
    answer: str
    choices: list[str] | None = None
    difficulty: float | None = None
    complexity: float | None = None
    level: int | None = None
    hint: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The JSON row for this sample, without empty optional fields; `extra` keys are inlined."""
        row = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        row.update(self.extra)
        return row


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_image(ref: str, base: Path, location: str, check_images: bool) -> str:
    if is_url(ref):
        return ref
    path = (base / ref).resolve()
    if not path.is_file():
        raise DataError(location, "images", f"image file not found: {ref} (looked for {path})")
    if check_images:
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(location, "images", f"unreadable image {ref}: {e}") from e
    return str(path)


def validate_row(row: Any, base: Path, location: str, check_images: bool = True) -> Sample:
    """Turn one raw row into a `Sample`, or raise `DataError` naming the location and field."""
    if not isinstance(row, dict):
        raise DataError(location, None, f"a row must be a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row or row[name] is None:
            raise DataError(location, name, "missing required field")

    sample_id = row["id"]
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise DataError(location, "id", f"must be a string or integer, got {type(sample_id).__name__}")
    images = row["images"]
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise DataError(location, "images", "must be a list of image paths or URLs")
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(location, "question", "must be a non-empty string")
    answer = row["answer"]
    if not (isinstance(answer, str) or _is_number(answer)):
        raise DataError(location, "answer", f"must be a string or number, got {type(answer).__name__}")
    if isinstance(answer, str) and not answer.strip():
        raise DataError(location, "answer", "must not be empty")

    choices = row.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices)
    ):
        raise DataError(location, "choices", "must be a list of at least two strings")
    for name in ("difficulty", "complexity"):
        value = row.get(name)
        if value is not None and not _is_number(value):
            raise DataError(location, name, f"must be a number, got {type(value).__name__}")
    difficulty = row.get("difficulty")
    if difficulty is not None and not 0.0 <= difficulty <= 1.0:
        raise DataError(location, "difficulty", f"must lie in [0, 1], got {difficulty}")
    level = row.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        raise DataError(location, "level", f"must be an integer, got {type(level).__name__}")
    for name in ("hint", "source"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise DataError(location, name, f"must be a string, got {type(value).__name__}")

    resolved = [_check_image(ref, base, location, check_images) for ref in images]
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    return Sample(
        id=str(sample_id),
        images=resolved,
        question=question,
        answer=str(answer),
        choices=choices,
        difficulty=None if difficulty is None else float(difficulty),
        complexity=None if row.get("complexity") is None else float(row["complexity"]),
        level=level,
        hint=row.get("hint"),
        source=row.get("source"),
        extra={k: v for k, v in row.items() if k not in known},
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(location, None, f"invalid JSON: {e.msg} (column {e.colno})") from e


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(str(path), None, f"unreadable Parquet file: {e}") from e
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}:row {index}", {k: v for k, v in row.items() if v is not None}


def raw_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """`(location, row)` for each row of a `.jsonl`/`.json` (one object per line) or `.parquet` file,
    unvalidated (a reader that maps other columns onto the schema first, such as the ladder's)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(str(path), None, f"unsupported file type '{suffix}' (use .jsonl or .parquet)")


def iter_samples(path: str | Path, check_images: bool = True) -> Iterator[Sample]:
    """Yield validated samples from a `.jsonl`/`.json` (one object per line) or `.parquet` file."""
    rows = raw_rows(path)
    seen: dict[str, str] = {}
    base = Path(path).parent
    for location, row in rows:
        sample = validate_row(row, base, location, check_images)
        if sample.id in seen:
            raise DataError(location, "id", f"duplicate id '{sample.id}' (first at {seen[sample.id]})")
        seen[sample.id] = location
        yield sample


def load_samples(path: str | Path, check_images: bool = True) -> list[Sample]:
    """Load and validate every row of a data file; the first bad row raises `DataError`."""
    return list(iter_samples(path, check_images))

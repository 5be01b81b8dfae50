"""The ladder's input rows: sample-schema files, or other tables mapped onto the schema, all validated
before anything is sampled.

Sources: JSONL and Parquet files, and Hugging Face `datasets` folders (`save_to_disk`; a folder of
several splits gives `input.split`). `input.map` names the source column of a schema field
(`question=problem`), so that downloaded copies of the paper's sources (MathVision, We-Math,
MathV360K, ...) can be read as they are. Image cells may hold paths, URLs, encoded bytes (a `datasets`
Image column, `{"bytes", "path"}` in Parquet) or lists of these; bytes are written once, named by
their hash, under the output's `images/`. Every row is checked with the core's schema check
(observe_r1.data), so a bad one stops the run naming its file, line (or row) and field.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from observe_r1.answer import unverifiable_reason
from observe_r1.data import DataError, Sample, raw_rows, validate_row
from observe_r1.errors import MissingFile


@dataclass(frozen=True)
class Row:
    """A validated input row and where it came from (`file:line` or `file:row N`)."""

    location: str
    sample: Sample


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _datasets_rows(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """A `save_to_disk` folder's rows, image columns left encoded ({"bytes", "path"})."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), None, f"no split '{split}' (input.split); it has {', '.join(loaded)}")
        loaded, where = loaded[split], f"{path}[{split}]"
    else:
        where = str(path)
    for name, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            loaded = loaded.cast_column(name, datasets.List(datasets.Image(decode=False)))
    for index, row in enumerate(loaded):
        yield f"{where}:row {index}", {k: v for k, v in row.items() if v is not None}


def _save_image(data: bytes, images_dir: Path, location: str) -> str:
    """Encoded image bytes as a file named by their hash (written once, atomically); its path."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = (img.format or "png").lower()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(location, "images", f"image bytes that no image reader takes: {e}") from e
    target = images_dir / f"{hashlib.sha256(data).hexdigest()[:20]}.{suffix}"
    if not target.is_file():
        images_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=images_dir, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return str(target)


def _image_refs(value: Any, images_dir: Path, location: str) -> Any:
    """An images cell as a list of paths or URLs; what is neither is left for the schema check to name."""
    if isinstance(value, (str, bytes, dict, Image.Image)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value
    refs = []
    for item in value:
        if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
            item = item["bytes"] or item["path"]
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            item = buffer.getvalue()
        refs.append(_save_image(item, images_dir, location) if isinstance(item, bytes) else item)
    return refs


def mapped(row: Any, columns: dict[str, str], location: str) -> Any:
    """`row` with each schema field taken from its source column (which then leaves the row)."""
    if not isinstance(row, dict) or not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values() or k in columns}
    for name, column in columns.items():
        if column not in row:
            raise DataError(location, name, f"column '{column}' (input.map.{name}) is not in the row")
        out[name] = row[column]
    return out


def read_rows(path: Path, columns: dict[str, str], split: str, images_dir: Path) -> Iterator[Row]:
    """Validated rows of one file or `datasets` folder."""
    if not path.exists():
        raise MissingFile(f"{path}: no such rows file or folder")
    rows = _datasets_rows(path, split) if is_datasets_folder(path) else raw_rows(path)
    base = path if path.is_dir() else path.parent
    for location, raw in rows:
        row = mapped(raw, columns, location)
        if isinstance(row, dict) and "images" in row:
            row["images"] = _image_refs(row["images"], images_dir, location)
        yield Row(location, validate_row(row, base, location))


def read_all(paths: list[Path], columns: dict[str, str], split: str, images_dir: Path) -> list[Row]:
    """Every row of every source, in order; ids must be unique across them all."""
    seen: dict[str, str] = {}
    rows = []
    for path in paths:
        for row in read_rows(path, columns, split, images_dir):
            if row.sample.id in seen:
                raise DataError(
                    row.location, "id", f"duplicate id '{row.sample.id}' (first at {seen[row.sample.id]})"
                )
            seen[row.sample.id] = row.location
            rows.append(row)
    return rows


def unverifiable(rows: list[Row], max_words: int) -> dict[int, str]:
    """Index -> why the answer check cannot verify that row's gold (observe_r1.answer)."""
    reasons = {}
    for i, row in enumerate(rows):
        reason = unverifiable_reason(row.sample, max_words)
        if reason is not None:
            reasons[i] = reason
    return reasons

"""Every sample on disk as soon as it is generated, so a killed run (SIGKILL included) loses at most
the batch in flight and continues where it stopped.

A cache is `NAME.jsonl` (one line per sample: question key, sample index, text, tokens, finish reason),
appended and fsynced after each batch, beside `NAME.json`, the generation settings that made it. A run
with other settings is refused rather than mixing samples of two settings. A line cut short by a kill
is the only damage an append can suffer; it is cut off on opening and its question sampled again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from observe_r1.errors import UserError
from observe_r1.io import atomic_write_text
from observe_r1_train.ladder.samplers import Response


class CacheError(UserError):
    """The cache was made with other settings, or is damaged beyond a torn last line."""


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees, with both values."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(set(saved) | set(wanted))
        return [d for k in keys for d in _differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
    if saved == wanted:
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} in the cache, {wanted!r} now"]


class SampleCache:
    """The samples of one kind (reference or pre-filter) under `folder`, keyed by question key."""

    def __init__(self, folder: Path, name: str, settings: dict[str, Any]):
        self.path = folder / f"{name}.jsonl"
        meta = folder / f"{name}.json"
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved != settings:
                listed = "; ".join(_differences(saved, settings))
                raise CacheError(
                    f"{meta}: the cached samples were made with other settings ({listed}); pass --force to"
                    " discard them, or choose another --out"
                )
        else:
            atomic_write_text(meta, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self._samples: dict[str, dict[int, Response]] = {}
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a kill during an append: drop the torn line
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as f:
                f.truncate(len(data))
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
                response = Response(record["text"], record["tokens"], record["exact"], record["finish"])
                self._samples.setdefault(record["key"], {})[record["index"]] = response
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CacheError(
                    f"{self.path}:{lineno}: damaged cache line ({e}); pass --force to discard it"
                ) from e

    def has(self, key: str, n: int) -> bool:
        """Whether samples 0..n-1 of question `key` are cached."""
        have = self._samples.get(key, {})
        return all(i in have for i in range(n))

    def get(self, key: str, n: int) -> list[Response]:
        return [self._samples[key][i] for i in range(n)]

    def add(self, batch: Iterable[tuple[str, list[Response]]]) -> None:
        """Append each question's samples (indices 0..), then flush and fsync once."""
        lines = []
        for key, responses in batch:
            slot = self._samples.setdefault(key, {})
            for index, r in enumerate(responses):
                slot[index] = r
                record = {"key": key, "index": index, "text": r.text, "tokens": r.tokens}
                lines.append(json.dumps({**record, "exact": r.exact, "finish": r.finish}, ensure_ascii=False))
        if not lines:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

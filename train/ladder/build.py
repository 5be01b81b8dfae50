"""The ladder pipeline (docs/algorithms.md, "NeuraLadder", "Difficulty prior"), every step switchable:

read and validate every row -> drop unverifiable golds -> drop rows found in the evaluation sets ->
pre-filter (one direct answer; right -> too simple) -> K reasoning samples per question, scored by the
core answer check (observe_r1.answer.accuracy, the training reward's) -> difficulty, level, complexity
-> U-shape filter -> difficulty-1 drop -> low-complexity drop at difficulty 0 -> order -> smoothing ->
stages and hints -> rows, summary and PNG.

Nothing is sampled before every row has passed the schema check (and, for a local model, the prompt
length check). Samples go to the cache under the output folder as they are made (ladder/cache.py), so
the same command continues a killed run; the steps after sampling run on the cache alone, so changing
a filter or the smoothing rebuilds the ladder without sampling again.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from observe_r1.answer import accuracy
from observe_r1.config import config_to_dict
from observe_r1.errors import UserError
from observe_r1.format import system_prompt
from observe_r1.sampling import SamplingParams
from observe_r1_train.ladder import curriculum, outputs
from observe_r1_train.ladder.cache import SampleCache
from observe_r1_train.ladder.config import LadderConfig
from observe_r1_train.ladder.contamination import EvalIndex
from observe_r1_train.ladder.inputs import Row, read_all, unverifiable
from observe_r1_train.ladder.samplers import LocalSampler, Question, Sampler, ServerSampler
from observe_r1_train.ladder.scoring import Scored, format_rate, histogram, question_key, score

CACHE_DIR = "cache"
IMAGES_DIR = "images"


class EmptyLadder(UserError):
    """The filters left no row; the message says which step removed what."""


class StepLog:
    """Per step: whether it ran, rows in, rows dropped by reason; every dropped row with its reason."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []

    def record(self, step: str, enabled: bool, rows_in: int, drops: list[tuple[Row, str]], **extra) -> None:
        reasons = Counter(reason for _, reason in drops)
        self.steps.append(
            {
                "step": step,
                "enabled": enabled,
                "in": rows_in,
                "dropped": len(drops),
                "reasons": dict(sorted(reasons.items())),
                **extra,
            }
        )
        self.dropped += [
            {"id": r.sample.id, "location": r.location, "step": step, "reason": why} for r, why in drops
        ]

    def explain(self, rows_read: int) -> str:
        parts = [
            f"{s['step']} dropped {s['dropped']} ({', '.join(f'{why}: {n}' for why, n in s['reasons'].items())})"
            for s in self.steps
            if s["dropped"]
        ]
        return f"{rows_read} rows read; " + ("; ".join(parts) or "no step dropped any")


def _settings(sampler: Sampler, params: SamplingParams, system_prompt: str | None) -> dict[str, Any]:
    """What made a cache's samples; a run with other settings must not reuse them."""
    return json.loads(
        json.dumps(
            {"sampler": sampler.describe(), "sampling": asdict(params), "system_prompt": system_prompt}
        )
    )


def _sample(sampler, questions, params, system_prompt, cache, desc: str, progress: bool) -> dict[str, float]:
    """Sample what the cache lacks, with a progress bar (questions/s and ETA); how many and how long."""
    from tqdm import tqdm

    pending = sum(not cache.has(q.key, params.n) for q in questions)
    started = time.perf_counter()
    bar = tqdm(
        total=pending, desc=desc, unit="question", disable=not progress or not pending, dynamic_ncols=True
    )
    try:
        sampler.generate(questions, params, system_prompt, cache, bar.update)
    finally:
        bar.close()
    return {"questions": len(questions), "sampled": pending, "seconds": time.perf_counter() - started}


class _Lock:
    """One run per output folder: two would append to the same cache."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = (out / ".lock").open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UserError(f"{out}: another observe-r1 ladder run is using this folder") from None

    def release(self) -> None:
        self.file.close()


def discard(out: Path) -> None:
    """--force: forget the cached samples, the extracted images and the ladder files of `out`."""
    for name in (CACHE_DIR, IMAGES_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (*outputs.LADDER_FILES, outputs.DROPPED, outputs.SUMMARY):
        (out / name).unlink(missing_ok=True)


class Builder:
    """One run of the pipeline for a `LadderConfig`; `run()` returns the summary and the timings."""

    def __init__(self, cfg: LadderConfig, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        self.log = StepLog()
        self.timing: dict[str, dict[str, float]] = {}
        self.system_prompt = system_prompt(cfg.format.variant, cfg.sampling.system_prompt)
        self.params = cfg.sampling.params()

    def _summary(self, rows_read: int, reference: Sampler | None, prefilter: Sampler | None, **parts) -> dict:
        return {
            "reference": reference.describe() if reference else None,
            "prefilter_model": prefilter.describe() if prefilter else None,
            "samples_per_question": self.cfg.sampling.samples,
            "rows_read": rows_read,
            "steps": self.log.steps,
            **parts,
            "settings": config_to_dict(self.cfg),
        }

    def _stop_empty(self, rows_read: int, summary: dict) -> None:
        outputs.write_summary(self.out / outputs.SUMMARY, summary)
        outputs.write_jsonl(self.out / outputs.DROPPED, self.log.dropped)
        outputs.remove_stale(self.out, keep=set())
        raise EmptyLadder(
            f"the ladder is empty: {self.log.explain(rows_read)} (see {self.out / outputs.SUMMARY})"
        )

    def _read(self) -> tuple[list[Row], int]:
        cfg = self.cfg
        rows = read_all(cfg.input.paths, cfg.input.map, cfg.input.split, self.out / IMAGES_DIR)
        rows_read = len(rows)
        if cfg.input.max_rows is not None:
            rows = rows[: cfg.input.max_rows]
        on = cfg.input.drop_unverifiable
        reasons = unverifiable(rows, cfg.input.max_answer_words) if on else {}
        self.log.record("verify", on, len(rows), [(rows[i], why) for i, why in reasons.items()])
        rows = [r for i, r in enumerate(rows) if i not in reasons]
        return self._decontaminate(rows), rows_read

    def _decontaminate(self, rows: list[Row]) -> list[Row]:
        c = self.cfg.contamination
        if not c.eval_sets:
            self.log.record("contamination", False, len(rows), [])
            return rows
        index = EvalIndex(
            read_all(c.eval_sets, {}, "train", self.out / IMAGES_DIR),
            c.question,
            c.image,
            c.max_distance,
            c.question_max_repeats,
            rows,
        )
        matches = [m for i, r in enumerate(rows) for m in index.matches(i, r)]
        first = {m.index: m for m in reversed(matches)}
        drops = (
            [(rows[i], f"in the evaluation set by {m.by}") for i, m in sorted(first.items())]
            if c.drop
            else []
        )
        listed = [
            {
                "id": rows[m.index].sample.id,
                "by": m.by,
                "eval_id": m.eval_id,
                "eval_location": m.eval_location,
            }
            for m in matches
        ]
        self.log.record(
            "contamination",
            True,
            len(rows),
            drops,
            matched=len(first),
            template_questions=index.templates,
            matches=listed,
        )
        return [r for i, r in enumerate(rows) if not (c.drop and i in first)]

    def _samplers(self) -> tuple[Sampler, Sampler | None]:
        cfg, pre = self.cfg, self.cfg.prefilter
        rows_per_call = cfg.engine.batch_questions * cfg.sampling.samples
        if cfg.reference.model is not None:
            reference: Sampler = LocalSampler(cfg.reference.model, cfg.engine, rows_per_call)
        else:
            reference = ServerSampler(cfg.reference.server, cfg.reference.server_model, cfg.server)
            reference.check()
        if not pre.enabled:
            return reference, None
        if pre.model is not None:
            return reference, LocalSampler(pre.model, cfg.engine, rows_per_call)
        if pre.server_model is not None:
            small = ServerSampler(cfg.reference.server, pre.server_model, cfg.server)
            small.check()
            return reference, small
        return reference, reference

    def _prefilter(self, sampler: Sampler | None, questions: list[Question], rows: list[Row]) -> list[int]:
        """Indices into `questions` that survive the pre-filter [OR1]: the model's one direct answer is wrong."""
        pre = self.cfg.prefilter
        if sampler is None:
            self.log.record("prefilter", False, len(questions), [])
            return list(range(len(questions)))
        params = SamplingParams(
            temperature=pre.temperature, max_tokens=pre.max_new_tokens, n=1, seed=self.params.seed
        )
        cache = SampleCache(self.out / CACHE_DIR, "prefilter", _settings(sampler, params, pre.system_prompt))
        self.timing["prefilter"] = _sample(
            sampler, questions, params, pre.system_prompt, cache, "pre-filter", self.progress
        )
        right = [i for i, q in enumerate(questions) if accuracy(cache.get(q.key, 1)[0].text, q.sample) == 1.0]
        self.log.record(
            "prefilter", True, len(questions), [(rows[i], "answered right with no reasoning") for i in right]
        )
        return [i for i in range(len(questions)) if i not in set(right)]

    def _filters(self, scored: list[Scored]) -> list[Scored]:
        """U-shape filter [DP], difficulty-1 drop (ours, option), low-complexity drop at difficulty 0 [OR1]."""
        cfg, k = self.cfg, self.cfg.sampling.samples
        u = cfg.u_filter

        def why_u(s: Scored) -> str:
            if s.correct == 0:
                return "p = 0 (every sample wrong)"
            if s.correct == s.k:
                return "p = 1 (every sample right)"
            return f"p = {s.p:g} outside ({u.p_low:g}, {u.p_high:g})"

        def step(name: str, on: bool, dropped: dict[int, str]) -> None:
            nonlocal scored
            before = histogram(scored, k)
            drops = [(s.row, dropped[s.index]) for s in scored if s.index in dropped]
            scored = [s for s in scored if s.index not in dropped]
            self.log.record(
                name, on, sum(before), drops, levels_before=before, levels_after=histogram(scored, k)
            )

        on = bool(u.enabled)
        step(
            "u_filter",
            on,
            {
                s.index: why_u(s)
                for s in scored
                if on and not curriculum.u_filter_keeps(s.p, u.p_low, u.p_high)
            },
        )
        on = cfg.hardest.drop
        step(
            "hardest",
            on,
            {s.index: "difficulty 1 (no sample right)" for s in scored if on and s.correct == 0},
        )
        on = bool(cfg.easy_drop.enabled)
        picked = (
            curriculum.easy_drop(
                [s.difficulty for s in scored], [s.complexity for s in scored], cfg.easy_drop.share
            )
            if on
            else []
        )
        reason = f"difficulty 0 and among the least complex {cfg.easy_drop.share:g} of that level"
        step("easy_drop", on, {scored[i].index: reason for i in picked})
        return scored

    def _arrange(self, scored: list[Scored]) -> tuple[list[Scored], list[int], dict[int, dict[int, int]]]:
        """The ladder order [OR1] and the smoothing: the rows in file order, each one's stretch, the mix."""
        cfg = self.cfg
        if cfg.order.enabled:
            scored = [
                scored[i]
                for i in curriculum.ladder_order(
                    [s.difficulty for s in scored], [s.complexity for s in scored]
                )
            ]
        if not cfg.smoothing.enabled:
            mix = {lv: {lv: n} for lv, n in sorted(Counter(s.level for s in scored).items())}
            return scored, [s.level for s in scored], mix
        sm = cfg.smoothing
        result = curriculum.smooth([s.level for s in scored], sm.width, sm.self_share, sm.seed)
        return [scored[i] for i in result.order], result.segments, result.mix

    def _row(self, s: Scored, segment: int) -> dict[str, Any]:
        """The output row: the input row in the sample schema plus the ladder's fields and statistics."""
        cfg, sample = self.cfg, s.row.sample
        row = sample.to_row()
        row["images"] = outputs.relative_images(sample.images, self.out)
        if sample.level is not None:
            row["input_level"] = sample.level  # `level` is the ladder's from here on
        row.update(difficulty=s.difficulty, complexity=s.complexity, level=s.level)
        if cfg.stages.enabled:
            row["stage"] = curriculum.stage(s.difficulty, cfg.stages.threshold)
            if row["stage"] == 2 and not sample.hint:
                row["hint"] = cfg.stages.hint
        row["ladder"] = {
            "correct": s.correct,
            "samples": s.k,
            "token_lengths": s.lengths,
            "format_rate": s.format_rate,
            "truncated": s.truncated,
            "segment": segment,
        }
        return row

    def run(self) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        cfg, k = self.cfg, self.cfg.sampling.samples
        rows, rows_read = self._read()
        reference, small = self._samplers()
        questions = [Question(question_key(r), r.sample, r.location) for r in rows]
        if isinstance(reference, LocalSampler):
            reference.check_prompts(questions, self.system_prompt, cfg.sampling.max_prompt_tokens)
        if small is not None and isinstance(small, LocalSampler) and small is not reference:
            small.check_prompts(questions, cfg.prefilter.system_prompt, cfg.sampling.max_prompt_tokens)
        kept = self._prefilter(small, questions, rows)
        if not kept:
            self._stop_empty(rows_read, self._summary(rows_read, reference, small))
        questions, rows = [questions[i] for i in kept], [rows[i] for i in kept]
        cache = SampleCache(
            self.out / CACHE_DIR, "reference", _settings(reference, self.params, self.system_prompt)
        )
        self.timing["reference"] = _sample(
            reference, questions, self.params, self.system_prompt, cache, "reference samples", self.progress
        )
        scored = [
            score(i, r, cache.get(q.key, k), cfg.format.variant)
            for i, (q, r) in enumerate(zip(questions, rows, strict=True))
        ]
        sampled = histogram(scored, k)
        responses = [r for q in questions for r in cache.get(q.key, k)]
        stats = {
            "samples": len(responses),
            "format_rate": format_rate(responses, cfg.format.variant),
            "truncated_share": sum(r.finish == "length" for r in responses) / len(responses),
        }
        scored = self._filters(scored)
        ladder, segments, mix = self._arrange(scored)
        by_level: dict[int, list[float]] = {}
        for s in ladder:
            by_level.setdefault(s.level, []).append(s.complexity)
        summary = self._summary(
            rows_read,
            reference,
            small,
            sample_stats=stats,
            levels={"sampled": sampled, "ladder": histogram(ladder, k)},
            complexity_per_level={
                str(lv): {"n": len(c), "mean": round(sum(c) / len(c), 4), "min": min(c), "max": max(c)}
                for lv, c in sorted(by_level.items())
            },
            smoothing={
                "enabled": bool(cfg.smoothing.enabled),
                "mix": {str(a): {str(b): n for b, n in m.items()} for a, m in mix.items()},
            },
            stages=None,
            rows=len(ladder),
        )
        if not ladder:
            self._stop_empty(rows_read, summary)
        rows_out = [self._row(s, seg) for s, seg in zip(ladder, segments, strict=True)]
        written = {outputs.LADDER_JSONL, outputs.LADDER_PARQUET}
        outputs.write_jsonl(self.out / outputs.LADDER_JSONL, rows_out)
        outputs.write_parquet(self.out / outputs.LADDER_PARQUET, rows_out)
        if cfg.stages.enabled:
            counts = {}
            for number, name in outputs.STAGE_FILES.items():
                part = [r for r in rows_out if r["stage"] == number]
                outputs.write_jsonl(self.out / name, part)
                counts[str(number)] = len(part)
                written.add(name)
            summary["stages"] = {"threshold": cfg.stages.threshold, "rows": counts}
        outputs.write_jsonl(self.out / outputs.DROPPED, self.log.dropped)
        if cfg.plot:
            outputs.plot(self.out / outputs.PLOT, summary, by_level)
            written.add(outputs.PLOT)
        outputs.remove_stale(self.out, keep=written)
        summary["files"] = sorted(written | {outputs.DROPPED, outputs.SUMMARY})
        outputs.write_summary(self.out / outputs.SUMMARY, summary)
        return summary, self.timing


def build(
    cfg: LadderConfig, force: bool = False, progress: bool = True
) -> tuple[dict[str, Any], dict[str, float]]:
    """Build (or continue, or rebuild from the cache) the ladder that `cfg` describes."""
    out = Path(cfg.out)
    lock = _Lock(out)
    try:
        if force:
            discard(out)
        return Builder(cfg, progress).run()
    finally:
        lock.release()

"""The ladder's options: every constant of docs/algorithms.md ("NeuraLadder", "Difficulty prior") is a
named option with the papers' value, or ours where they are silent (marked so).

Two presets, because the papers' defaults conflict (`PRESETS`): `neuraladder` [OR1] pre-filters, orders,
drops low-complexity items at difficulty 0 and smooths the levels, with no U-shape filter;
`difficulty-prior` [DP] applies the U-shape filter and splits two stages with hints, in input order.
A step's `enabled` left null takes the preset's choice; set it to switch that step alone.

Load with `load_ladder_config(path, overrides)` (YAML plus dotted overrides, observe_r1.config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from observe_r1.config import ConfigError, load_config
from observe_r1.data import OPTIONAL_FIELDS, REQUIRED_FIELDS
from observe_r1.sampling import SamplingParams
from observe_r1_train.config import FormatConfig

# ours: the paper only says the hint tells the model the problem is hard and to verify its steps [DP].
DIFFICULTY_HINT = (
    "This problem is difficult. Observe the image carefully, reason step by step, "
    "and verify each step before giving the final answer."
)
# [OR1]: the small model is asked to "only give the final answer"; the wording is ours.
DIRECT_ANSWER_PROMPT = (
    "Answer the question directly. Reply with only the final answer: a number, a short expression, "
    "or the option letter for a multiple-choice question. Do not explain."
)
# The steps a preset switches, with each preset's choice.
STEPS = ("prefilter", "u_filter", "easy_drop", "order", "smoothing", "stages")
PRESETS: dict[str, dict[str, bool]] = {
    "neuraladder": {
        "prefilter": True,
        "u_filter": False,
        "easy_drop": True,
        "order": True,
        "smoothing": True,
        "stages": False,
    },
    "difficulty-prior": {
        "prefilter": False,
        "u_filter": True,
        "easy_drop": False,
        "order": False,
        "smoothing": False,
        "stages": True,
    },
}
Preset = Literal[tuple(PRESETS)]
SCHEMA_FIELDS = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)


@dataclass
class InputConfig:
    # JSONL or Parquet files, or Hugging Face `datasets` folders (save_to_disk), read in this order
    paths: list[Path] = field(default_factory=list)
    # schema field -> source column, e.g. {question: problem, answer: solution, images: image}
    map: dict[str, str] = field(default_factory=dict)
    split: str = "train"  # the split of a datasets folder that holds several
    max_rows: int | None = None  # None: every row; else the first N (all rows are validated)
    drop_unverifiable: bool = True  # [OR1]: items with unverifiable answers dropped
    max_answer_words: int = 6  # ours: a longer gold in plain words is free text the check cannot match


@dataclass
class ContaminationConfig:
    """Rows that also appear in an evaluation set: by normalised question and by image."""

    eval_sets: list[Path] = field(default_factory=list)  # sample-schema files; empty: no check
    question: bool = True  # the normalised question (case, punctuation, spacing ignored) matches
    image: Literal["perceptual", "exact", "none"] = "perceptual"  # perceptual also catches exact copies
    max_distance: int = 4  # ours: differing bits of the 64-bit difference hash that still match
    # ours: a question found more often than this in the evaluation and input rows together is a
    # template ("What colour is the shape?"), which says nothing about the item by itself: such a row
    # matches only by its image (a copied item holds its question once in each)
    question_max_repeats: int = 2
    drop: bool = True  # False: report the matches only


@dataclass
class ReferenceConfig:
    """The model that writes the K reasoning samples: a local folder, or a model behind a server."""

    model: str | None = None  # a local Hugging Face folder, sampled in-process
    server: str | None = None  # an OpenAI-compatible base URL, e.g. http://host:8000/v1
    server_model: str | None = None  # the served model's name


@dataclass
class SamplingConfig:
    """How the reference samples: exactly these, whatever the checkpoint's generation config says."""

    samples: int = 8  # K [OR1]
    temperature: float = 1.0  # the paper run's rollout
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    repetition_penalty: float = 1.0  # 1: none
    max_new_tokens: int = 8192  # the paper run's generation limit
    max_prompt_tokens: int = 9216  # local model only: longer prompts are refused before sampling
    system_prompt: str | None = None  # None: format.variant's built-in prompt; "": none
    seed: int = 0

    def params(self) -> SamplingParams:
        """The K reasoning samples of one question."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_new_tokens,
            n=self.samples,
            seed=self.seed,
        )


@dataclass
class PrefilterConfig:
    """[OR1]: a small model answers each question once with no reasoning; right -> dropped as too simple."""

    enabled: bool | None = None  # None: the preset's choice
    model: str | None = None  # a smaller local model folder; None: the reference model
    server_model: str | None = None  # a smaller model on the reference server; None: the reference
    system_prompt: str = DIRECT_ANSWER_PROMPT
    temperature: float = 0.0  # ours: one greedy answer
    max_new_tokens: int = 32  # ours: a final answer is short


@dataclass
class EngineConfig:
    """The in-process engine (observe_r1_train.rollout.TransformersRollout)."""

    batch_questions: int = 8  # ours: questions per generate call, K samples each
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class ServerConfig:
    """Requests to the reference server (the `openai` client)."""

    concurrency: int = 4  # requests in flight
    samples_per_request: int | None = None  # None: K (n=K); a server that refuses n > 1 gets n=1
    timeout_s: float = 600.0
    retries: int = 5  # per request, after the first try, for timeouts, connection errors, 429 and 5xx
    backoff_s: float = 2.0  # the first wait; it doubles with each retry
    backoff_max_s: float = 60.0
    logprobs: bool = True  # ask for token log-probs, which count each choice's tokens (vLLM, OpenAI)
    api_key_env: str = "OBSERVE_R1_API_KEY"  # the variable holding the key; unset: no key
    # Sent with every request: our server then returns the raw text (tags included); `{}` for a server
    # that refuses unknown fields.
    extra_body: dict[str, bool] = field(default_factory=lambda: {"return_raw_text": True})


@dataclass
class UFilterConfig:
    """[DP]: keep p_low < p < p_high, p the share of the K samples that are right."""

    enabled: bool | None = None
    p_low: float = 0.0
    p_high: float = 1.0


@dataclass
class EasyDropConfig:
    """[OR1]: drop low-complexity items at difficulty 0 (the cut-off is unpublished)."""

    enabled: bool | None = None
    share: float = 0.5  # ours: the least complex half of the difficulty-0 items


@dataclass
class HardestConfig:
    """[OR1]: the authors reviewed the difficulty-1 items by hand; ours keeps them unless asked."""

    drop: bool = False


@dataclass
class OrderConfig:
    enabled: bool | None = None  # [OR1]: difficulty ascending, then complexity ascending


@dataclass
class SmoothingConfig:
    """[OR1]: each level's slots hold items of that level and its adjacent levels."""

    enabled: bool | None = None
    width: int = 2  # levels on each side: the paper's four adjacent levels
    self_share: float = 0.6  # ours, floor of a level's own share; the paper's chart shows ~50-70%
    seed: int = 0


@dataclass
class StagesConfig:
    """[DP]: stage 1 on moderate items, stage 2 on harder items with a difficulty hint."""

    enabled: bool | None = None
    threshold: float = 0.75  # ours: difficulty >= 0.75 (at most 2 of 8 right) is stage 2
    hint: str = DIFFICULTY_HINT  # written to the `hint` of stage-2 rows that have none


@dataclass
class LadderConfig:
    out: Path
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    preset: Preset = "neuraladder"
    input: InputConfig = field(default_factory=InputConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    format: FormatConfig = field(
        default_factory=FormatConfig
    )  # the prompt asked for and the format_rate check
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    u_filter: UFilterConfig = field(default_factory=UFilterConfig)
    easy_drop: EasyDropConfig = field(default_factory=EasyDropConfig)
    hardest: HardestConfig = field(default_factory=HardestConfig)
    order: OrderConfig = field(default_factory=OrderConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    plot: bool = True  # ladder.png

    def __post_init__(self):
        """The preset fills every `enabled` left null; then the cross-field checks, naming the key."""
        for step, on in PRESETS[self.preset].items():
            section = getattr(self, step)
            if section.enabled is None:
                section.enabled = on
        ref, pre, s = self.reference, self.prefilter, self.sampling
        _check(
            (ref.model is None) != (ref.server is None),
            "reference",
            "give exactly one of reference.model (--model) and reference.server (--server)",
        )
        _check(
            ref.server is None or bool(ref.server_model),
            "reference.server_model",
            "a server needs the served model's name (--server-model)",
        )
        _check(
            ref.server is not None or ref.server_model is None,
            "reference.server_model",
            "names a model on reference.server, which is not set",
        )
        _check(
            pre.model is None or pre.server_model is None,
            "prefilter",
            "give at most one of prefilter.model and prefilter.server_model",
        )
        _check(
            pre.server_model is None or ref.server is not None,
            "prefilter.server_model",
            "names a model on reference.server, which is not set",
        )
        _check(bool(self.input.paths), "input.paths", "needs at least one rows file or folder (--data)")
        for name in self.input.map:
            _check(
                name in SCHEMA_FIELDS,
                f"input.map.{name}",
                f"not a sample field (one of {', '.join(SCHEMA_FIELDS)})",
            )
        for key, value, low in [
            ("sampling.samples", s.samples, 1),
            ("sampling.max_new_tokens", s.max_new_tokens, 1),
            ("sampling.max_prompt_tokens", s.max_prompt_tokens, 1),
            ("prefilter.max_new_tokens", pre.max_new_tokens, 1),
            ("input.max_rows", self.input.max_rows, 1),
            ("input.max_answer_words", self.input.max_answer_words, 1),
            ("engine.batch_questions", self.engine.batch_questions, 1),
            ("server.concurrency", self.server.concurrency, 1),
            ("server.samples_per_request", self.server.samples_per_request, 1),
            ("server.retries", self.server.retries, 0),
            ("contamination.max_distance", self.contamination.max_distance, 0),
            ("contamination.question_max_repeats", self.contamination.question_max_repeats, 2),
            ("smoothing.width", self.smoothing.width, 0),
        ]:
            _check(value is None or value >= low, key, f"must be >= {low} (got {value})")
        _check(s.temperature >= 0, "sampling.temperature", "must be >= 0 (0: greedy)")
        _check(pre.temperature >= 0, "prefilter.temperature", "must be >= 0 (0: greedy)")
        _check(0 < s.top_p <= 1, "sampling.top_p", "must lie in (0, 1]")
        _check(s.top_k >= 0, "sampling.top_k", "must be >= 0 (0: no cut)")
        _check(s.repetition_penalty > 0, "sampling.repetition_penalty", "must be > 0 (1: none)")
        u = self.u_filter
        _check(
            0 <= u.p_low < u.p_high <= 1,
            "u_filter",
            f"needs 0 <= p_low < p_high <= 1 (got {u.p_low}, {u.p_high})",
        )
        _check(0 <= self.easy_drop.share <= 1, "easy_drop.share", "must lie in [0, 1]")
        _check(0 <= self.smoothing.self_share <= 1, "smoothing.self_share", "must lie in [0, 1]")
        _check(0 <= self.stages.threshold <= 1, "stages.threshold", "must lie in [0, 1]")
        _check(bool(self.stages.hint.strip()), "stages.hint", "must not be empty")
        _check(
            not self.smoothing.enabled or self.order.enabled,
            "smoothing.enabled",
            "smoothing mixes the levels of the ordered ladder: it needs order.enabled",
        )
        for key, value in [
            ("server.timeout_s", self.server.timeout_s),
            ("server.backoff_s", self.server.backoff_s),
        ]:
            _check(value > 0, key, f"must be > 0 (got {value})")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def load_ladder_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> LadderConfig:
    return load_config(LadderConfig, path, overrides)

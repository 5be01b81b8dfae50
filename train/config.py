"""The training config: every constant of docs/algorithms.md is a named option, with the authors' value or ours.

Load with `load_training_config(path, overrides)` (GRPO) or `sft.load_sft_config` (the warm start);
both configs are a `RunConfig`, which holds the sections and checks they share. `observe-r1 train`
and `sft` (train/cli.py) call `validate_paths(cfg)`, before any model loads and before relaunching
under torchrun; the run calls `grad_accumulation(cfg, world_size)` once it knows the world size.
Numbers that the pure modules already define (train/algorithms.py, train/rewards.py) are imported,
never restated.

Units, as in the authors' OpenRLHF script:
- a *step* is one rollout: `rollout.prompts_per_step` prompts (all ranks together) x `group_size`
  responses, scored, then `algorithm.ppo_epochs` passes of optimizer updates over those responses;
  `max_steps`, `checkpoint.save_every` and `logging.log_every` count these steps;
- `optim.train_batch` counts *responses* per optimizer update, all ranks together (OpenRLHF's
  `--train_batch_size`, the global DeepSpeed batch); `optim.micro_batch` counts responses per rank
  per forward/backward (`--micro_train_batch_size`). The paper's 128 x 8 = 1,024 responses per step
  thus make 16 updates of 64 responses, each 4 accumulated micro-batches of 2 on each of 8 GPUs.
Relative paths (data, model, output) are relative to the working directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from observe_r1.config import ConfigError, load_config
from observe_r1.format import DEFAULT_VARIANT, FormatVariant, nested_observe_problem
from observe_r1.sampling import SamplingParams
from observe_r1_train import algorithms
from observe_r1_train.rewards import BONUS_COEF, BONUS_MIN_LEN, BUILTINS, DEFAULT_COMPONENTS, REWARD_CLAMP

KL_DEFAULTS = {
    "loss": ("k3", algorithms.KL_LOSS_COEF),
    "reward": ("k1", algorithms.KL_REWARD_COEF),
    "none": ("k3", 0.0),
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

# Choices are the keys of the registries that implement them, so a new mode is one edit away from the
# config, and an unknown name is refused at load time with the list of known ones.
PriorKind = Literal[tuple(algorithms.DIFFICULTY_WEIGHTS)]
CombineMode = Literal[tuple(algorithms.WEIGHT_COMBINATIONS)]
AggMode = Literal[tuple(algorithms.AGGREGATIONS)]
KLKind = Literal[tuple(algorithms.KL_ESTIMATORS)]


@dataclass
class ModelConfig:
    path: str  # a local Hugging Face folder or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct
    dtype: Literal["bf16", "fp32"] = "bf16"  # authors: bf16; DeepSpeed's bf16 mode follows it
    gradient_checkpointing: bool = True  # authors: on
    freeze_vision_tower: bool = False  # ours: train every parameter
    ref_path: str | None = None  # the KL reference model; None: the initial policy (`path`)


@dataclass
class DataConfig:
    paths: list[Path]  # JSONL/Parquet sample files (observe_r1.data), read in this order
    shuffle: bool = False  # authors: read the ladder in file order; True shuffles with `seed`
    max_samples: int | None = None  # None: every row; the paper used the first 20,000 rows
    system_prompt: str | None = None  # None: format.variant's built-in prompt; "": no system prompt


@dataclass
class FormatConfig:
    """The output format the run trains (observe_r1.format.VARIANTS): GRPO rewards and SFT targets follow it.

    A section of its own, shared by GRPO and SFT through `RunConfig`, because it is neither data nor
    reward: it picks the default system prompt (`data.system_prompt: null`), the SFT targets, and every
    format check of the rewards. The ladder has the same section (train/ladder/config.py).
    """

    variant: FormatVariant = DEFAULT_VARIANT  # observe: <observe><think><answer> [OR1]; think: plain R1


@dataclass
class HintsConfig:
    """Stage-2 difficulty hints (difficulty prior, arXiv 2505.13261).

    The data owns them: `observe-r1 ladder` (its `stages` step) writes the hint into the `hint` field
    of the rows that get one. When enabled, a row's `hint` is put before or after its question.
    """

    enabled: bool = False
    position: Literal["prepend", "append"] = "prepend"


@dataclass
class VLLMRolloutConfig:
    """The colocated vLLM engine (`rollout.engine: vllm`, train/vllm_rollout.py)."""

    gpu_memory_utilization: float = 0.6  # authors: --vllm_gpu_memory_utilization 0.6 (share left to vLLM)
    enable_prefix_caching: bool = True  # reset after every weight push
    enforce_eager: bool | None = None  # None: eager on CPU (no compilation), CUDA graphs on GPU
    sleep: bool = True  # authors: sleep mode; offload between rollouts where the platform has it (CUDA)
    max_num_seqs: int = 256
    block_size: int | None = None  # None: vLLM's default (the CPU backend needs a multiple of 32)
    cpu_kv_cache_gib: int = 4  # CPU build only: the KV cache's size (VLLM_CPU_KVCACHE_SPACE)
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other `vllm.LLM` argument


@dataclass
class OnlineFilterConfig:
    """DAPO's dynamic sampling (arXiv 2503.14476; train/dynamic_sampling.py), off by default as in
    the authors' run: drop groups without a learning signal and sample fresh prompts until every rank
    holds its share of `rollout.prompts_per_step` groups. A step then reads more prompts than
    planned, so the data can run out before `max_steps`; training then stops, saves and exports."""

    enabled: bool = False
    drop_zero_variance: bool = True  # DAPO: drop groups whose rewards are all equal (zero advantage)
    min_accuracy: float = 0.0  # keep groups with min_accuracy <= p <= max_accuracy
    max_accuracy: float = 1.0
    max_rounds: int = 4  # generation rounds per step, the first included; past it the run stops with an error


@dataclass
class RolloutConfig:
    # auto: vllm where CUDA and vLLM are both present, else transformers
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    vllm: VLLMRolloutConfig = field(default_factory=VLLMRolloutConfig)
    filter: OnlineFilterConfig = field(default_factory=OnlineFilterConfig)
    group_size: int = 8
    prompts_per_step: int = 128  # all ranks together
    # Rollouts sample with exactly these, whatever the checkpoint's generation config says; the export
    # states them as its generation config.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1: none
    max_new_tokens: int = 8192
    max_prompt_tokens: int = 9216

    def sampling(self, seed: int | None = None) -> SamplingParams:
        """How a rollout samples: a group of `group_size` responses to each prompt."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_new_tokens,
            n=self.group_size,
            seed=seed,
        )


@dataclass
class RewardConfig:
    # weight per component: a built-in name (accuracy, format, bonus) or a `module:function` plug-in
    components: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COMPONENTS))
    bonus_coef: float = BONUS_COEF
    bonus_min_len: int = BONUS_MIN_LEN
    bonus_requires_format: bool = True  # ours: only a well-formatted shortest answer wins the bonus
    clamp: float | None = REWARD_CLAMP  # authors clamp the total to [-clamp, clamp]; None: no clamp
    nested_observe: bool = False  # also accept <observe> nested in <think> (the authors' regex); observe only
    # A control experiment, not a recipe: these components' values (and, with "accuracy", the answer
    # check the weights read) are permuted over each generation round's responses before the total, so
    # they no longer say which response was better; the logged reward metrics stay the true ones.
    # [accuracy, bonus] keeps the format reward and removes what the answers earned; every component
    # permutes the whole reward. Gains that survive it do not come from the shuffled components.
    shuffle: list[str] = field(default_factory=list)


@dataclass
class DifficultyPriorConfig:
    """Online advantage reweighting by the group accuracy p (algorithms.DIFFICULTY_WEIGHTS)."""

    kind: PriorKind = "none"
    combine: CombineMode = "multiply"  # how it meets the Observe-R1 weight
    alpha: float = algorithms.LINEAR_ALPHA  # linear: w = 1 + alpha (1 - p)
    a: float = algorithms.LOGISTIC_A  # logistic: w = a + (b - a) / (1 + exp(k (p - p0)))
    b: float = algorithms.LOGISTIC_B
    k: float = algorithms.LOGISTIC_K
    p0: float = algorithms.LOGISTIC_P0

    def weight_kwargs(self) -> dict[str, float]:
        """Keyword arguments for `algorithms.DIFFICULTY_WEIGHTS[kind]`."""
        return {
            "none": {},
            "linear": {"alpha": self.alpha},
            "logistic": {"A": self.a, "B": self.b, "k": self.k, "p0": self.p0},
        }[self.kind]


@dataclass
class AlgorithmConfig:
    normalize_std: bool = True  # False: Dr.GRPO advantages r - mean
    unbiased_std: bool = True  # authors: sample std (divide by G - 1)
    adv_eps: float = algorithms.ADV_EPS
    observe_weight: bool = True  # w = 4 sigma d (1 - d); False: w = 1 (plain GRPO)
    weight_sigma: float = algorithms.WEIGHT_SIGMA
    difficulty_prior: DifficultyPriorConfig = field(default_factory=DifficultyPriorConfig)
    clip_low: float = algorithms.CLIP_EPS
    clip_high: float = algorithms.CLIP_EPS  # > clip_low: DAPO clip-higher
    agg: AggMode = "token-mean"  # seq-mean-token-sum-norm divides by rollout.max_new_tokens
    # ours: KL as a loss term with coefficient 0 (no reference model is loaded); the authors put
    # k1 x 0.01 in the reward. kl_kind/kl_coef left null take the mode's default (KL_DEFAULTS).
    kl_mode: Literal["none", "loss", "reward"] = "loss"
    kl_kind: KLKind | None = None
    kl_coef: float | None = None
    ppo_epochs: int = 1

    def __post_init__(self):
        kind, coef = KL_DEFAULTS[self.kl_mode]
        self.kl_kind = kind if self.kl_kind is None else self.kl_kind
        self.kl_coef = coef if self.kl_coef is None else self.kl_coef

    @property
    def needs_ref_model(self) -> bool:
        return self.kl_mode != "none" and self.kl_coef > 0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr_ratio: float = 0.1  # cosine decay to min_lr_ratio x lr
    warmup_ratio: float = 0.03
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_batch: int = 64  # responses per optimizer update, all ranks together
    micro_batch: int = 2  # responses per forward/backward on one rank
    # GRPO's update: each prompt of a micro-batch runs once (vision tower and language model) and its
    # responses attend to it (train/shared_prefix.py), exactly the per-sample forward and gradients.
    # null: on when exact for the model; true: refuse a model where it is not; false: per sample.
    shared_prefix: bool | None = None
    epochs: int = 1  # passes over the data


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[2, 3] = 2
    offload: bool = False  # optimizer state (and ZeRO-3 parameters) in CPU memory
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the DeepSpeed JSON as is


@dataclass
class CheckpointConfig:
    output_dir: Path = Path("runs/train")
    save_every: int = 50  # steps; 0: only at the end
    keep_last: int = 2  # training-state checkpoints kept
    resume: str = "auto"  # auto: the latest in output_dir if any; none; or a checkpoint folder
    export_hf: bool = True  # also write a Hugging Face folder that vLLM/transformers load as is


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    jsonl: bool = True
    log_every: int = 1
    plot_png: bool = True


@dataclass
class RunConfig:
    """What GRPO and the SFT warm start share: the run loop's sections (train/runner.py) and their checks."""

    model: ModelConfig
    data: DataConfig
    format: FormatConfig = field(default_factory=FormatConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 42  # OpenRLHF's default
    max_steps: int | None = None  # None: `optim.epochs` passes over the data
    # ours: a budget of training seconds (the step loop, summed over resumes; loading not counted). Once
    # spent, the run stops after the step under way, saves a checkpoint and exports as at its end.
    max_time_s: float | None = None

    def __post_init__(self):
        """Cross-field checks, so a bad combination fails at load time and not after the model loads."""
        opt, ck = self.optim, self.checkpoint
        for key, value, low in [
            ("optim.train_batch", opt.train_batch, 1),
            ("optim.micro_batch", opt.micro_batch, 1),
            ("optim.epochs", opt.epochs, 1),
            ("checkpoint.save_every", ck.save_every, 0),  # 0: only at the end
            ("checkpoint.keep_last", ck.keep_last, 1),
            ("logging.log_every", self.logging.log_every, 1),
            ("data.max_samples", self.data.max_samples, 1),  # null: every row
            ("max_steps", self.max_steps, 1),  # null: optim.epochs over the data
        ]:
            _check_at_least(key, value, low)
        _check(
            self.max_time_s is None or self.max_time_s > 0,
            "max_time_s",
            f"must be > 0, got {self.max_time_s}",
        )
        _check(opt.train_batch % opt.micro_batch == 0, "optim.micro_batch", "must divide optim.train_batch")
        _check(opt.lr > 0, "optim.lr", f"must be > 0, got {opt.lr}")
        _check(0 <= opt.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        _check(0 <= opt.warmup_ratio < 1, "optim.warmup_ratio", "must lie in [0, 1)")
        _check(all(0 <= b < 1 for b in opt.betas), "optim.betas", "each must lie in [0, 1)")
        _check(bool(self.data.paths), "data.paths", "needs at least one data file")


@dataclass
class TrainConfig(RunConfig):
    """GRPO: the shared run plus rollout, rewards and the algorithm."""

    hints: HintsConfig = field(default_factory=HintsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)

    def __post_init__(self):
        super().__post_init__()
        ro, alg, opt = self.rollout, self.algorithm, self.optim
        _check(ro.group_size >= 2, "rollout.group_size", "must be >= 2 (advantages compare responses)")
        for key, value, low in [
            ("rollout.prompts_per_step", ro.prompts_per_step, 1),
            ("rollout.max_new_tokens", ro.max_new_tokens, 1),
            ("rollout.max_prompt_tokens", ro.max_prompt_tokens, 1),
            ("algorithm.ppo_epochs", alg.ppo_epochs, 1),
            ("rollout.filter.max_rounds", ro.filter.max_rounds, 1),
            ("reward.bonus_min_len", self.reward.bonus_min_len, 0),
        ]:
            _check_at_least(key, value, low)
        unknown = [c for c in self.reward.shuffle if c != "accuracy" and c not in self.reward.components]
        _check(
            not unknown,
            "reward.shuffle",
            f"{unknown} are not reward.components ({list(self.reward.components)})",
        )
        responses = ro.prompts_per_step * ro.group_size
        per_step = f"the {responses} responses of a step (rollout.prompts_per_step x rollout.group_size)"
        _check(responses % opt.train_batch == 0, "optim.train_batch", f"must divide {per_step}")
        for key, value in [("algorithm.clip_low", alg.clip_low), ("algorithm.clip_high", alg.clip_high)]:
            _check(0 < value < 1, key, f"must lie in (0, 1), got {value}")
        _check(ro.temperature > 0, "rollout.temperature", "must be > 0")
        _check(0 < ro.top_p <= 1, "rollout.top_p", "must lie in (0, 1]")
        _check(ro.top_k >= 0, "rollout.top_k", "must be >= 0 (0: no cut)")
        _check(ro.repetition_penalty > 0, "rollout.repetition_penalty", "must be > 0 (1: none)")
        gpu_share = ro.vllm.gpu_memory_utilization
        _check(
            0 < gpu_share <= 1, "rollout.vllm.gpu_memory_utilization", f"must lie in (0, 1], got {gpu_share}"
        )
        low, high = ro.filter.min_accuracy, ro.filter.max_accuracy
        _check(
            0 <= low <= high <= 1,
            "rollout.filter.min_accuracy",
            f"and rollout.filter.max_accuracy must satisfy 0 <= min <= max <= 1, got {low} and {high}",
        )
        _check(alg.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        nested = nested_observe_problem(
            self.format.variant, self.reward.nested_observe, ("reward.nested_observe", "format.variant")
        )
        _check(nested is None, "reward.nested_observe", str(nested))
        _check(bool(self.reward.components), "reward.components", "needs at least one reward")
        for spec in self.reward.components:
            _check(
                spec in BUILTINS or re.fullmatch(r"[\w.]+:\w+", spec) is not None,
                f"reward.components.{spec}",
                f"expected one of {', '.join(BUILTINS)} or 'module:function'",
            )


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_at_least(key: str, value: int | None, low: int) -> None:
    """`value` >= `low`, where None (the field's "unset") always passes."""
    _check(value is None or value >= low, key, f"must be >= {low} (got {value})")


def load_training_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def grad_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches accumulated per optimizer update: train_batch / (micro_batch x world_size)."""
    per_pass = cfg.optim.micro_batch * world_size
    if cfg.optim.train_batch % per_pass:
        raise ConfigError(
            f"optim.train_batch = {cfg.optim.train_batch} must be a multiple of optim.micro_batch"
            f" x world size = {cfg.optim.micro_batch} x {world_size}"
        )
    return cfg.optim.train_batch // per_pass


def _model_problem(key: str, path: str) -> str | None:
    """None if `path` is a model folder or a hub id that is not a local path; else what is wrong."""
    from observe_r1.modeling import ModelLoadError, check_model_folder

    if not Path(path).exists() and _HUB_ID.fullmatch(path) and not path.startswith("."):
        return None
    try:
        check_model_folder(Path(path))
    except ModelLoadError as e:
        return f"{key}: {e}"
    return None


def validate_paths(cfg: RunConfig) -> None:
    """Check that every input the config names exists, before the trainer loads anything.

    Kept out of loading so a config can be parsed, saved and tested where the files are not.
    Reports every missing input at once.
    """
    problems = [
        f"data.paths[{i}]: no such file: {p}" for i, p in enumerate(cfg.data.paths) if not p.is_file()
    ]
    problems.append(_model_problem("model.path", cfg.model.path))
    if cfg.model.ref_path is not None:
        problems.append(_model_problem("model.ref_path", cfg.model.ref_path))
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).is_dir():
        problems.append(f"checkpoint.resume: no such checkpoint folder: {cfg.checkpoint.resume}")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))

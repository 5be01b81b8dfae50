"""Configs: the generic loader (observe_r1/config.py), the training schema and the shipped YAML files."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import pytest

from observe_r1.config import ConfigError, config_to_dict, load_config, save_config
from observe_r1_train import algorithms, cli, rewards
from observe_r1_train.config import (
    KL_DEFAULTS,
    AggMode,
    CombineMode,
    DataConfig,
    HintsConfig,
    KLKind,
    ModelConfig,
    PriorKind,
    TrainConfig,
    grad_accumulation,
    load_training_config,
    validate_paths,
)
from observe_r1_train.sft import load_sft_config

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))
MINIMAL = "model: {path: m}\ndata: {paths: [d.jsonl]}\n"


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str = MINIMAL, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_training_config(write(tmp_path, text), overrides)
    return str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    load = load_sft_config if path.name.startswith("sft_") else load_training_config
    cfg = load(path)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load(tmp_path / "resolved.yaml") == cfg
    assert config_to_dict(load(tmp_path / "resolved.yaml")) == config_to_dict(cfg)


def test_paper_config_matches_the_released_script():
    cfg = load_training_config(CONFIGS / "observe_r1_3b.yaml")
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step) == (8, 128)
    assert (cfg.optim.train_batch, cfg.optim.micro_batch, grad_accumulation(cfg, 8)) == (64, 2, 4)
    assert (cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens, cfg.data.max_samples) == (
        9216,
        8192,
        20000,
    )
    assert (cfg.algorithm.kl_mode, cfg.algorithm.kl_kind, cfg.algorithm.kl_coef) == ("reward", "k1", 0.01)
    assert cfg.algorithm.needs_ref_model and cfg.deepspeed.zero_stage == 2 and cfg.model.dtype == "bf16"


def test_two_stage_configs_inherit():
    one = load_training_config(CONFIGS / "difficulty_prior_stage1.yaml")
    two = load_training_config(CONFIGS / "difficulty_prior_stage2.yaml")
    assert one.algorithm.difficulty_prior.kind == two.algorithm.difficulty_prior.kind == "logistic"
    assert not one.hints.enabled and two.hints.enabled
    assert two.optim == one.optim and two.data.paths != one.data.paths
    assert two.checkpoint.output_dir != one.checkpoint.output_dir


def test_defaults_are_the_reference_constants():
    cfg = TrainConfig(model=ModelConfig("m"), data=DataConfig([Path("d.jsonl")]))
    alg, prior, rw = cfg.algorithm, cfg.algorithm.difficulty_prior, cfg.reward
    assert (alg.adv_eps, alg.weight_sigma) == (algorithms.ADV_EPS, algorithms.WEIGHT_SIGMA)
    assert alg.clip_low == alg.clip_high == algorithms.CLIP_EPS
    assert (alg.kl_mode, alg.kl_kind, alg.kl_coef) == ("loss", "k3", algorithms.KL_LOSS_COEF)
    assert not alg.needs_ref_model
    assert KL_DEFAULTS["reward"] == ("k1", algorithms.KL_REWARD_COEF)
    assert prior.alpha == algorithms.LINEAR_ALPHA
    assert (prior.a, prior.b, prior.k, prior.p0) == (
        algorithms.LOGISTIC_A,
        algorithms.LOGISTIC_B,
        algorithms.LOGISTIC_K,
        algorithms.LOGISTIC_P0,
    )
    assert rw.components == rewards.DEFAULT_COMPONENTS and rw.components is not rewards.DEFAULT_COMPONENTS
    assert (rw.bonus_coef, rw.bonus_min_len, rw.clamp) == (
        rewards.BONUS_COEF,
        rewards.BONUS_MIN_LEN,
        rewards.REWARD_CLAMP,
    )
    assert (cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p) == (8, 1.0, 1.0)
    opt = cfg.optim
    assert (opt.lr, opt.min_lr_ratio, opt.warmup_ratio, opt.betas, opt.grad_clip) == (
        1e-6,
        0.1,
        0.03,
        (0.9, 0.95),
        1.0,
    )
    assert not cfg.data.shuffle and cfg.data.system_prompt is None


def test_kl_mode_picks_its_defaults_unless_given(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_training_config(path, ["algorithm.kl_mode=reward"])
    assert (cfg.algorithm.kl_kind, cfg.algorithm.kl_coef) == KL_DEFAULTS["reward"]
    cfg = load_training_config(path, ["algorithm.kl_mode=loss", "algorithm.kl_coef=0.01"])
    assert (cfg.algorithm.kl_kind, cfg.algorithm.kl_coef, cfg.algorithm.needs_ref_model) == ("k3", 0.01, True)


def test_overrides(tmp_path):
    cfg = load_training_config(
        write(tmp_path, MINIMAL),
        [
            "optim.lr=3e-6",
            "optim.betas=[0.9, 0.99]",
            "rollout.group_size=4",
            "rollout.top_p=1",
            "data.paths=[a.jsonl, b.parquet]",
            "reward.components={accuracy: 1.0, my.mod:fn: 2}",
            "data.shuffle=true",
            "data.system_prompt=",
            "algorithm.difficulty_prior.kind=linear",
            "deepspeed.extra={zero_optimization: {reduce_bucket_size: 5e8}}",
            "max_steps=3",
            "hints=",  # an empty section keeps its defaults
        ],
    )
    assert cfg.optim.lr == 3e-6 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.rollout.group_size == 4 and cfg.rollout.top_p == 1.0 and isinstance(cfg.rollout.top_p, float)
    assert cfg.data.paths == [Path("a.jsonl"), Path("b.parquet")]
    assert cfg.reward.components == {"accuracy": 1.0, "my.mod:fn": 2.0}  # replaced whole, not merged
    assert cfg.data.shuffle and cfg.data.system_prompt is None and cfg.max_steps == 3
    assert cfg.algorithm.difficulty_prior.weight_kwargs() == {"alpha": algorithms.LINEAR_ALPHA}
    assert cfg.deepspeed.extra == {"zero_optimization": {"reduce_bucket_size": 5e8}}
    assert cfg.hints == HintsConfig()
    assert cfg.model.path == "m"  # untouched sections keep the file's values


def test_unknown_key_suggests(tmp_path):
    msg = error(tmp_path, MINIMAL + "optim: {lrr: 1.0e-6}\n")
    assert msg == f"{tmp_path / 'train.yaml'}: optim.lrr: unknown key (did you mean 'lr'?)"
    assert error(tmp_path, overrides=("rollout.gruop_size=8",)) == (
        "override 'rollout.gruop_size=8': rollout.gruop_size: unknown key (did you mean 'group_size'?)"
    )


def test_wrong_types(tmp_path):
    assert error(tmp_path, overrides=("rollout.group_size=eight",)).endswith(
        "rollout.group_size: expected int, got str 'eight'"
    )
    assert "rollout.group_size: expected int, got bool True" in error(
        tmp_path, overrides=("rollout.group_size=true",)
    )
    assert "rollout.group_size: expected int, got float 8.5" in error(
        tmp_path, overrides=("rollout.group_size=8.5",)
    )
    assert "data.shuffle: expected bool, got int 1" in error(tmp_path, overrides=("data.shuffle=1",))
    assert "data.paths[1]: expected a non-empty path, got int 3" in error(
        tmp_path, overrides=("data.paths=[a, 3]",)
    )
    assert "optim.betas: expected tuple[float, float] (2 items)" in error(
        tmp_path, overrides=("optim.betas=[0.9]",)
    )
    assert "reward.components.format: expected float" in error(
        tmp_path, overrides=("reward.components={format: x}",)
    )
    assert "optim: expected a mapping, got float 0.1" in error(tmp_path, overrides=("optim=0.1",))
    assert "reward.shuffle: ['answer'] are not reward.components" in error(
        tmp_path, overrides=("reward.shuffle=[accuracy, answer]",)
    )


def test_bad_choice(tmp_path):
    msg = error(tmp_path, overrides=("algorithm.agg=mean",))
    assert "algorithm.agg: must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm" in msg
    assert "deepspeed.zero_stage: must be one of 2, 3" in error(
        tmp_path, overrides=("deepspeed.zero_stage=1",)
    )


def test_rollout_engine_and_its_vllm_options(tmp_path):
    assert "rollout.engine: must be one of auto, transformers, vllm (got str 'sglang')" in error(
        tmp_path, overrides=("rollout.engine=sglang",)
    )
    assert "rollout.vllm_sleep: unknown key" in error(tmp_path, overrides=("rollout.vllm_sleep=true",))
    assert "rollout.vllm.gpu_memory_utilization: must lie in (0, 1]" in error(
        tmp_path, overrides=("rollout.vllm.gpu_memory_utilization=1.5",)
    )


def test_missing_required(tmp_path):
    assert error(tmp_path, "data: {paths: [d.jsonl]}\n").endswith("model.path: missing required value")
    assert error(tmp_path, "model: {path: m}\n").endswith("data.paths: missing required value")


def test_yaml_syntax_error_has_line(tmp_path):
    msg = error(tmp_path, MINIMAL + "optim:\n  lr: [1\n  micro_batch: 2\n")
    assert msg.startswith(f"{tmp_path / 'train.yaml'}:5:") and "YAML error" in msg
    assert error(tmp_path, MINIMAL + "seed: 1\nseed: 2\n").startswith(f"{tmp_path / 'train.yaml'}:4:")
    assert "top level must be a mapping" in error(tmp_path, "- a\n- b\n")


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_training_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="base.yaml: config file not found"):
        load_training_config(write(tmp_path, "base: base.yaml\n"))
    assert "expected KEY=VALUE" in error(tmp_path, overrides=("optim.lr",))


def test_base_chain_merges_sections(tmp_path):
    write(
        tmp_path,
        MINIMAL + "optim: {lr: 2.0e-6, micro_batch: 4}\nreward: {components: {accuracy: 1}}\n",
        "a.yaml",
    )
    cfg = load_training_config(write(tmp_path, "base: a.yaml\noptim: {lr: 5.0e-6}\n", "b.yaml"))
    assert (cfg.optim.lr, cfg.optim.micro_batch, cfg.reward.components) == (5e-6, 4, {"accuracy": 1.0})
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    with pytest.raises(ConfigError, match="circular"):
        load_training_config(tmp_path / "b.yaml")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
        ("optim.train_batch=48", "optim.train_batch: must divide the 1024 responses"),
        ("optim.micro_batch=3", "optim.micro_batch: must divide optim.train_batch"),
        ("algorithm.clip_high=1.0", "algorithm.clip_high: must lie in (0, 1)"),
        ("optim.lr=0", "optim.lr: must be > 0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens: must be >= 1"),
        ("reward.components={nope: 1}", "reward.components.nope: expected one of accuracy"),
        ("data.paths=[]", "data.paths: needs at least one data file"),
        ("rollout.filter.max_rounds=0", "rollout.filter.max_rounds: must be >= 1"),
        ("rollout.filter.max_accuracy=1.5", "rollout.filter.min_accuracy: and rollout.filter.max_accuracy"),
    ],
)
def test_cross_field_checks(tmp_path, override, expected):
    msg = error(tmp_path, overrides=(override,))
    assert msg.startswith(str(tmp_path / "train.yaml")) and expected in msg


def test_grad_accumulation_checks_world_size(tmp_path):
    cfg = load_training_config(write(tmp_path, MINIMAL))
    assert grad_accumulation(cfg, 1) == 32
    with pytest.raises(ConfigError, match="multiple of optim.micro_batch x world size = 2 x 3"):
        grad_accumulation(cfg, 3)


def test_validate_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = load_training_config(
        write(tmp_path, MINIMAL), [f"data.paths=[{tmp_path / 'd.jsonl'}]", f"model.path={tmp_path / 'model'}"]
    )
    validate_paths(cfg)
    paper = load_training_config(CONFIGS / "observe_r1_3b.yaml", [f"data.paths=[{tmp_path / 'd.jsonl'}]"])
    validate_paths(paper)  # model.path is a hub id, resolved by transformers later
    cfg.data.paths.append(tmp_path / "missing.jsonl")
    cfg.model.ref_path = str(tmp_path)
    cfg.checkpoint.resume = str(tmp_path / "ckpt")
    with pytest.raises(ConfigError) as e:
        validate_paths(cfg)
    msg = str(e.value)
    assert f"data.paths[1]: no such file: {tmp_path / 'missing.jsonl'}" in msg
    assert "model.ref_path: " in msg and "config.json" in msg
    assert f"checkpoint.resume: no such checkpoint folder: {tmp_path / 'ckpt'}" in msg


@dataclass
class _Inner:
    mode: Literal["a", "b"] = "a"
    sizes: list[int] = field(default_factory=list)


@dataclass
class _Outer:
    name: str
    inner: _Inner = field(default_factory=_Inner)
    items: list[_Inner] = field(default_factory=list)
    weight: float | None = None


def test_generic_loader_without_a_file(tmp_path):
    cfg = load_config(_Outer, None, ["name=x", "items=[{mode: b, sizes: [1, 2]}]", "weight=2"])
    assert cfg == _Outer("x", _Inner(), [_Inner("b", [1, 2])], 2.0)
    save_config(cfg, tmp_path / "o.yaml")
    assert load_config(_Outer, tmp_path / "o.yaml") == cfg
    with pytest.raises(ConfigError, match=r"items\[0\].mode: must be one of a, b"):
        load_config(_Outer, None, ["name=x", "items=[{mode: c}]"])


def test_named_choices_are_the_registry_keys():
    for choice, registry in [
        (PriorKind, algorithms.DIFFICULTY_WEIGHTS),
        (CombineMode, algorithms.WEIGHT_COMBINATIONS),
        (AggMode, algorithms.AGGREGATIONS),
        (KLKind, algorithms.KL_ESTIMATORS),
    ]:
        assert get_args(choice) == tuple(registry)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.micro_batch=3", "optim.micro_batch: must divide optim.train_batch"),
        ("optim.lr=0", "optim.lr: must be > 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last: must be >= 1"),
        ("max_steps=0", "max_steps: must be >= 1"),
        ("max_time_s=0", "max_time_s: must be > 0"),
        ("data.paths=[]", "data.paths: needs at least one data file"),
    ],
)
def test_sft_config_makes_the_shared_checks(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        load_sft_config(write(tmp_path, MINIMAL), (override,))
    assert str(e.value).startswith(str(tmp_path / "train.yaml")) and expected in str(e.value)


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_both_commands_check_paths_before_loading(stage, tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(write(tmp_path, MINIMAL))])
    with pytest.raises(ConfigError, match=r"data.paths\[0\]: no such file: d.jsonl"):
        cli.run(args, stage)


def test_stage_two_of_the_difficulty_prior_starts_from_stage_ones_export():
    stage1 = load_training_config(CONFIGS / "difficulty_prior_stage1.yaml")
    stage2 = load_training_config(CONFIGS / "difficulty_prior_stage2.yaml")
    assert Path(stage2.model.path) == Path(stage1.checkpoint.output_dir) / "model"


def test_format_variant_is_a_checked_choice_shared_by_grpo_sft_and_the_ladder(tmp_path):
    from observe_r1.format import VARIANTS
    from observe_r1_train.config import FormatVariant
    from observe_r1_train.ladder.config import load_ladder_config

    assert get_args(FormatVariant) == tuple(VARIANTS) == ("observe", "think")
    assert load_training_config(write(tmp_path, MINIMAL)).format.variant == "observe"
    assert load_training_config(write(tmp_path, MINIMAL), ("format.variant=think",)).format.variant == "think"
    assert load_sft_config(write(tmp_path, MINIMAL), ("format.variant=think",)).format.variant == "think"
    ladder = write(tmp_path, "out: o\nreference: {model: m}\ninput: {paths: [d.jsonl]}\n", "ladder.yaml")
    assert load_ladder_config(ladder, ("format.variant=think",)).format.variant == "think"
    for load in (load_training_config, load_sft_config, load_ladder_config):
        path = ladder if load is load_ladder_config else write(tmp_path, MINIMAL)
        with pytest.raises(ConfigError, match="format.variant: must be one of observe, think"):
            load(path, ("format.variant=plain",))


def test_nested_observe_needs_the_observe_variant_and_says_so_naming_both(tmp_path):
    msg = error(tmp_path, overrides=("format.variant=think", "reward.nested_observe=true"))
    assert "reward.nested_observe needs format.variant='observe' (the block it nests), not 'think'" in msg
    cfg = load_training_config(write(tmp_path, MINIMAL), ("reward.nested_observe=true",))
    assert cfg.reward.nested_observe and cfg.format.variant == "observe"

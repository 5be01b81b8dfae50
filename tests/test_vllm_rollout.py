"""The vLLM rollout engine (train/vllm_rollout.py) for real: vLLM's CPU build (`.venv-vllm`) on the tiny
text-only Qwen2 and, for image prompts, on a tiny Qwen2.5-VL (through the test-only shim in
`vllm_helpers.image_only`: this machine has no torchvision), against the transformers engine and the
trainer's own log-probs. Skipped without vLLM."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from PIL import Image  # noqa: E402
from test_train_run import LEARNING, run, train_args  # noqa: E402
from vllm_helpers import image_only  # noqa: E402
from vllm_helpers.tiny_qwen2 import build_tiny_qwen2  # noqa: E402
from vllm_helpers.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl  # noqa: E402

from observe_r1.data import Sample  # noqa: E402
from observe_r1.modeling import load_model, load_processor  # noqa: E402
from observe_r1.sampling import SamplingParams  # noqa: E402
from observe_r1_train import algorithms, vllm_rollout  # noqa: E402
from observe_r1_train.config import VLLMRolloutConfig  # noqa: E402
from observe_r1_train.rollout import TransformersRollout  # noqa: E402
from observe_r1_train.vllm_rollout import VLLMRollout  # noqa: E402

# fp32 on both sides; vLLM's CPU attention and matmuls sum in another order than torch's SDPA.
LOGPROB_ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)  # vLLM: greedy takes n = 1
CONFIG = VLLMRolloutConfig(block_size=32, cpu_kv_cache_gib=1, max_num_seqs=8)
# More than two cache blocks of 32 tokens, so a stale prefix cache would be reused after a push.
LONG = "Count the circles, the squares and the triangles, then add them up. " * 6


def make_engine(path) -> VLLMRollout:
    return VLLMRollout(
        str(path), load_processor(path, allow_text_only=True), CONFIG, dtype="fp32", max_model_len=512, seed=0
    )


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of `model`'s weights with Gaussian noise of std `scale` added to each."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny Qwen2 and a second folder holding its weights plus noise (the "trained" policy)."""
    root = tmp_path_factory.mktemp("qwen2")
    base = build_tiny_qwen2(root / "base", seed=0)
    moved = root / "moved"
    perturbed(load_model(base, allow_text_only=True)).save_pretrained(moved)
    load_processor(base, allow_text_only=True).save_pretrained(moved)
    return base, moved


@pytest.fixture(scope="module")
def engines(folders):
    """The engine under test (built from the base) and a fresh one built from the moved weights."""
    under_test, fresh = make_engine(folders[0]), make_engine(folders[1])
    yield under_test, fresh
    under_test.close()
    fresh.close()


def samples():
    return [Sample(id="a", images=[], question="How many circles?", answer="3")]


def sample_long():
    return [Sample(id="long", images=[], question=LONG, answer="12")]


def rollout(engine, batch=None, sampling=GREEDY):
    batch = batch or samples()
    return engine.generate(batch, [s.question for s in batch], sampling, logprobs=True)


def same(a, b) -> bool:
    """Same tokens and log-probs (within LOGPROB_ATOL) for every response."""
    return torch.equal(a.completion_ids, b.completion_ids) and torch.allclose(
        a.logprobs, b.logprobs, atol=LOGPROB_ATOL, rtol=0
    )


def trainer_logprobs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = batch.completion_logits(model)
    return algorithms.token_logprobs(logits, batch.completion_ids, 1.0) * batch.completion_mask


def test_push_changes_outputs_and_pushing_back_restores_them(engines, folders):
    engine, _ = engines
    original = rollout(engine)
    engine.update_weights(load_model(folders[1], allow_text_only=True), version=1)
    moved = rollout(engine)
    assert not torch.equal(moved.completion_ids, original.completion_ids)
    engine.update_weights(load_model(folders[0], allow_text_only=True), version=2)
    assert same(rollout(engine), original)
    # A version already pushed is skipped: these weights never reach vLLM.
    engine.update_weights(load_model(folders[1], allow_text_only=True), version=2)
    assert same(rollout(engine), original)


def test_greedy_after_a_push_equals_a_fresh_engine_and_the_transformers_engine(engines, folders):
    engine, fresh = engines
    model = load_model(folders[1], allow_text_only=True)
    engine.update_weights(model, version=engine.version + 1)
    pushed = rollout(engine)
    assert same(pushed, rollout(fresh))
    reference = TransformersRollout(model, load_processor(folders[1], allow_text_only=True))
    expected = reference.generate(samples(), ["How many circles?"], GREEDY)
    assert torch.equal(pushed.completion_ids, expected.completion_ids)
    assert torch.equal(pushed.completion_mask, expected.completion_mask)
    assert pushed.texts == expected.texts and pushed.finish_reasons == expected.finish_reasons
    # vLLM's raw log-probs of its own tokens against the trainer's recomputation (train/algorithms.py).
    ours = trainer_logprobs(model, pushed)
    assert (ours - pushed.logprobs).abs().max() < LOGPROB_ATOL


def test_sampled_groups_are_keyed_to_the_sample(engines):
    """A sample's responses do not depend on what else is in the batch (nor, so, on the rank)."""
    engine, _ = engines
    sampling = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7)
    alone = rollout(engine, samples(), sampling)
    both = rollout(engine, sample_long() + samples(), sampling)
    assert torch.equal(both.completion_ids[3:, : alone.completion_ids.shape[1]], alone.completion_ids)
    assert len(set(map(tuple, alone.completion_ids.tolist()))) > 1  # the G responses differ


def long_prompt_matches_fresh_after_a_push(engine, fresh, folders, skip_reset: bool = False) -> bool:
    """Fill the prefix cache with the long prompt under the base weights, push the moved ones (with
    `skip_reset`, leaving the prefix cache as it was): is the long prompt then answered as by an
    engine that never saw the base weights?"""
    engine.update_weights(load_model(folders[0], allow_text_only=True), version=engine.version + 1)
    rollout(engine, sample_long())
    with pytest.MonkeyPatch.context() as patch:
        if skip_reset:
            patch.setattr(engine.llm, "reset_prefix_cache", lambda: True)
        engine.update_weights(load_model(folders[1], allow_text_only=True), version=engine.version + 1)
    return same(rollout(engine, sample_long()), rollout(fresh, sample_long()))


def test_prefix_cache_is_reset_after_a_push(engines, folders):
    engine, fresh = engines
    assert long_prompt_matches_fresh_after_a_push(engine, fresh, folders)
    # The check catches a stale cache: without the reset, the long prompt's cached blocks keep the base
    # weights' keys and values. (The next push resets the cache again.)
    assert not long_prompt_matches_fresh_after_a_push(engine, fresh, folders, skip_reset=True)


def test_grpo_run_with_the_vllm_engine(folders, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": f"t{i}", "images": [], "question": f"What is {i} + {i}?", "answer": str(2 * i)}
        for i in range(8)
    ]
    (data / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    extra = [
        "rollout.engine=vllm",
        "rollout.vllm.block_size=32",
        "rollout.vllm.cpu_kv_cache_gib=1",
        "rollout.max_prompt_tokens=512",
        "model.dtype=fp32",
        "model.gradient_checkpointing=false",
        "max_steps=2",
        "checkpoint.save_every=1",
        "logging.tensorboard=false",  # the vLLM environment has neither TensorBoard nor matplotlib
        "logging.plot_png=false",
        *LEARNING,
    ]
    proc = run(train_args(folders[0], data, out, *extra))
    summary = json.loads(proc.stdout[proc.stdout.rfind("\n{") + 1 :])  # after vLLM's own output
    assert summary["step"] == 2 and (out / "model" / "config.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000002"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)


# Image prompts: the tiny Qwen2.5-VL (head_dim 32), fp32. Its vision tower runs in vLLM with torch's
# SDPA, the text model with vLLM's CPU attention; both sum in another order than transformers.
IMAGE_LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def vl_folders(tmp_path_factory):
    """The tiny Qwen2.5-VL, a copy with noisy weights (vision tower included), and three noise images."""
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    base = build_tiny_qwen2_5_vl(root / "base", seed=0)
    moved = root / "moved"
    perturbed(load_model(base)).save_pretrained(moved)
    load_processor(base).save_pretrained(moved)
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(64, 48), (100, 60), (56, 90)]):
        path = root / f"noise{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return base, moved, images


@pytest.fixture(scope="module")
def vl_engine(vl_folders):
    image_only.install()
    engine = VLLMRollout(
        str(vl_folders[0]), load_processor(vl_folders[0]), CONFIG, dtype="fp32", max_model_len=512, seed=0
    )
    yield engine
    engine.close()


def image_samples(images):
    """One image, another, and two images in one prompt (placeholders of different lengths)."""
    return [
        Sample(id="i1", images=images[:1], question="How many circles?", answer="3"),
        Sample(id="i2", images=images[1:2], question="Which bar is the tallest?", answer="B"),
        Sample(id="i3", images=images[1:], question="Count the squares.", answer="2"),
    ]


def test_image_request_has_one_placeholder_per_image(vl_folders):
    """vLLM expands each `<|image_pad|>` itself, so the request carries one per image."""
    processor = load_processor(vl_folders[0])
    pad = processor.image_token_id
    for sample in image_samples(vl_folders[2]):
        prompt = vllm_rollout.process_prompt(processor, sample, sample.question, None)
        request = vllm_rollout.vllm_request(prompt, sample, pad)
        ids = prompt["input_ids"][0].tolist()
        assert request["prompt_token_ids"].count(pad) == len(sample.images) < ids.count(pad)
        assert [t for t in ids if t != pad] == [t for t in request["prompt_token_ids"] if t != pad]
        images = request["multi_modal_data"]["image"]
        assert [im.size for im in images] == [Image.open(p).size for p in sample.images]
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)


def image_rollout(engine, images):
    batch = image_samples(images)
    return engine.generate(batch, [s.question for s in batch], GREEDY, logprobs=True)


def test_image_prompts_match_the_transformers_engine(vl_engine, vl_folders):
    """vLLM's own Qwen2.5-VL processor expands the placeholders as ours does (`check_expanded` runs in
    every `generate`), and its greedy tokens and raw log-probs on image prompts are the transformers
    engine's and the trainer's, before and after a weight push that moves the vision tower too."""
    for version, folder in enumerate(vl_folders[:2]):
        model = load_model(folder)
        vl_engine.update_weights(model, version=version)
        got = image_rollout(vl_engine, vl_folders[2])
        expected = TransformersRollout(model, load_processor(folder)).generate(
            image_samples(vl_folders[2]), [s.question for s in image_samples(vl_folders[2])], GREEDY
        )
        assert torch.equal(got.completion_ids, expected.completion_ids)
        assert torch.equal(got.completion_mask, expected.completion_mask)
        assert got.texts == expected.texts and got.finish_reasons == expected.finish_reasons
        ours = trainer_logprobs(model, got)
        assert (ours - got.logprobs).abs().max() < IMAGE_LOGPROB_ATOL


def test_expanded_placeholders_sent_to_vllm_are_caught(vl_engine, vl_folders, monkeypatch):
    """The request as the engine built it before (the processor's expanded ids): vLLM expands the first
    placeholder of each run again, so the prompt it runs is longer than the processor's."""
    monkeypatch.setattr(
        vllm_rollout,
        "vllm_request",
        lambda p, s, _: {
            "prompt_token_ids": p["input_ids"][0].tolist(),
            "multi_modal_data": {"image": vllm_rollout.open_images(s.images)},
        },
    )
    with pytest.raises(RuntimeError, match="image placeholders differ"):
        image_rollout(vl_engine, vl_folders[2])

"""The transformers rollout engine on the tiny model: batch layout, seeding, greedy and shared-prefill
equivalence, and log-prob agreement between generation and the update-side forward."""

import copy

import pytest
import torch
from PIL import Image

from observe_r1.chat import build_messages, generate, open_images
from observe_r1.data import Sample
from observe_r1.format import SYSTEM_PROMPT
from observe_r1.modeling import load_model, load_processor
from observe_r1.sampling import SamplingParams
from observe_r1_train import dynamic_sampling
from observe_r1_train.rollout import RolloutEngine, TransformersRollout

G = 4
PROMPTS = [
    "Count.",
    "How many red circles are there in the picture? Answer with a single number.",
    "Which of the two shapes is bigger?",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Prompts of different lengths with 0, 1 and 2 images of different sizes."""
    folder = tmp_path_factory.mktemp("rollout_images")
    paths = []
    for name, size, colour in (("a", (56, 56), "red"), ("b", (84, 112), "blue")):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return [
        Sample("0", [], PROMPTS[0], "1"),
        Sample("1", paths[:1], PROMPTS[1], "1"),
        Sample("2", paths, PROMPTS[2], "A"),
    ]


@pytest.fixture(scope="module")
def biased(model, processor):
    """The tiny model with its output layer nudged towards `<|im_end|>` and `<|image_pad|>`, so a
    short rollout holds both finish reasons and sampled image placeholders (which a real policy
    rarely writes, but a fresh one does)."""
    biased = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    for token in ("<|im_end|>", "<|image_pad|>"):
        head.bias.data[processor.tokenizer.convert_tokens_to_ids(token)] = 3.5
    biased.lm_head = head
    return biased


def sampling(**kwargs) -> SamplingParams:
    """Groups of G responses of at most 16 tokens, seeded."""
    return SamplingParams(**{"max_tokens": 16, "seed": 0, "n": G, **kwargs})


def test_batch_layout(biased, processor, samples):
    engine = TransformersRollout(biased, processor)
    assert isinstance(engine, RolloutEngine)
    batch = engine.generate(samples, PROMPTS, sampling())
    n = len(samples) * G
    ids, mask, lengths = batch.completion_ids, batch.completion_mask, batch.completion_lengths
    assert ids.shape == mask.shape == (n, 16)
    assert batch.group_index.tolist() == [i // G for i in range(n)]
    assert len(batch.texts) == len(batch.finish_reasons) == n
    assert set(batch.finish_reasons) == {"stop", "length"}
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in engine.eos_ids
    for row in range(n):
        length = int(lengths[row])
        assert mask[row].tolist() == [1] * length + [0] * (16 - length)
        assert (ids[row, length:] == batch.pad_id).all()
        body = ids[row, :length].tolist()
        if batch.finish_reasons[row] == "stop":
            assert body[-1] in engine.eos_ids and not set(body[:-1]) & set(engine.eos_ids)
        else:
            assert length == 16 and not set(body) & set(engine.eos_ids)
        assert batch.texts[row] == processor.tokenizer.decode(body, skip_special_tokens=True)
    assert "stop" in batch.finish_reasons and any(ids[r, int(lengths[r]) - 1] == end for r in range(n))
    assert [len(p) for p in batch.prompt_ids] == [p["input_ids"].shape[1] for p in batch.prompt_inputs]
    assert len(set(map(len, batch.prompt_ids))) == 3
    assert "pixel_values" not in batch.prompt_inputs[0]
    assert [len(p["image_grid_thw"]) for p in batch.prompt_inputs[1:]] == [1, 2]
    assert set(batch.timing) == {"prepare", "generate"} and all(t >= 0 for t in batch.timing.values())


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model, processor, samples):
    engine = TransformersRollout(model, processor)
    state = torch.get_rng_state()
    first = engine.generate(samples, PROMPTS, sampling(seed=7))
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.generate(samples, PROMPTS, sampling(seed=7))
    other = engine.generate(samples, PROMPTS, sampling(seed=8))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # Sampling, not copying: responses within a group differ.
    assert len({tuple(r) for r in first.completion_ids[:G].tolist()}) > 1


def test_a_response_does_not_depend_on_the_batch_it_is_sampled_in(biased, processor, samples):
    """What lets two ranks sample what one rank samples: each row's stream is keyed to its sample and
    its index in the group, so a prompt alone, or beside other prompts, gets the same tokens."""
    engine = TransformersRollout(biased, processor)
    s = sampling(seed=3, temperature=0.9, top_p=0.95, top_k=50)
    together = engine.generate(samples, PROMPTS, s)
    first = engine.generate(samples[:1], PROMPTS[:1], s)
    rest = engine.generate(samples[1:], PROMPTS[1:], s)
    assert together.texts == first.texts + rest.texts
    assert len(set(together.texts[:G])) > 1


def test_top_k_of_one_samples_the_greedy_tokens(model, processor, samples):
    """The warpers act before the keyed draw: with only the best token left, sampling is greedy."""
    engine = TransformersRollout(model, processor)
    sampled = engine.generate(samples, PROMPTS, sampling(temperature=1.0, top_k=1))
    greedy = engine.generate(samples, PROMPTS, sampling(temperature=0.0))
    assert torch.equal(sampled.completion_ids, greedy.completion_ids)


def test_greedy_groups_match_single_prompt_generate(model, processor, samples):
    batch = TransformersRollout(model, processor).generate(samples, PROMPTS, sampling(temperature=0.0))
    for p, sample in enumerate(samples):
        group = batch.completion_ids[p * G : (p + 1) * G]
        assert (group == group[0]).all()
        images = open_images(sample.images)
        messages = build_messages(PROMPTS[p], len(images), SYSTEM_PROMPT)
        alone = generate(model, processor, messages, images, SamplingParams(max_tokens=16, temperature=0))
        assert batch.texts[p * G : (p + 1) * G] == [alone.text] * G


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_repeated_prompts(biased, processor, samples, temperature):
    shared = TransformersRollout(biased, processor)
    repeated = TransformersRollout(biased, processor, share_prefill=False)
    s = sampling(temperature=temperature, top_p=0.9)
    a = shared.generate(samples, PROMPTS, s, logprobs=True)
    b = repeated.generate(samples, PROMPTS, s, logprobs=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.texts == b.texts and a.finish_reasons == b.finish_reasons
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_update_forward_reproduces_generation_logprobs(biased, processor, samples):
    batch = TransformersRollout(biased, processor).generate(samples, PROMPTS, sampling(), logprobs=True)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((batch.completion_ids == image_pad) & batch.completion_mask.bool()).any()
    everything, mixed = list(range(len(batch.texts))), [G + 1, 2 * G, 2 * G + 3, 0]
    for rows, picked in ((None, everything), (mixed, mixed), (slice(G, 2 * G), everything[G : 2 * G])):
        inputs, start = batch.model_inputs(biased, rows)
        ids, mask = batch.completion_ids[picked], batch.completion_mask[picked]
        assert inputs["inputs_embeds"].shape[:2] == (len(picked), start + ids.shape[1])
        with torch.no_grad():
            logits = biased(**inputs).logits[:, start - 1 : -1].float()
            only_completion = batch.completion_logits(biased, rows).float()  # what the trainers use
        torch.testing.assert_close(only_completion, logits, atol=1e-5, rtol=0)
        logprobs = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask
        torch.testing.assert_close(logprobs, batch.logprobs[picked], atol=1e-4, rtol=0)


def test_groups_picked_from_rounds_of_different_widths_score_as_they_were_sampled(biased, processor, samples):
    """Online filtering's batch surgery (train/dynamic_sampling.py): groups picked out of two rounds,
    whose completions were padded to different widths, joined into one batch, give the update the
    log-probs that generation gave them, with and without the shared-prefix path."""
    engine = TransformersRollout(biased, processor)
    short = engine.generate(samples[:2], PROMPTS[:2], sampling(max_tokens=6), logprobs=True)
    long = engine.generate(samples, PROMPTS, sampling(seed=1), logprobs=True)
    joined = dynamic_sampling.concat_batches(
        [dynamic_sampling.select_groups(short, [1]), dynamic_sampling.select_groups(long, [2, 0])]
    )
    assert [s.id for s in joined.samples] == ["1", "2", "0"]
    assert joined.completion_ids.shape == (3 * G, long.completion_ids.shape[1])
    assert joined.texts == short.texts[G : 2 * G] + long.texts[2 * G :] + long.texts[:G]
    mask = joined.completion_mask.bool()
    assert torch.equal(joined.completion_lengths[:G], short.completion_lengths[G:])
    with torch.no_grad():
        logits = joined.completion_logits(biased).float()
    logprobs = logits.log_softmax(-1).gather(-1, joined.completion_ids[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(logprobs, joined.logprobs, atol=1e-4, rtol=0)
    assert joined.timing["generate"] == pytest.approx(short.timing["generate"] + long.timing["generate"])


def test_update_forward_backpropagates_into_the_shared_vision_tower(biased, processor, samples):
    batch = TransformersRollout(biased, processor).generate(samples, PROMPTS, sampling())
    inputs, start = batch.model_inputs(biased)
    logits = biased(**inputs).logits[:, start - 1 : -1]
    logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None]).sum().backward()
    grads = [p.grad for p in biased.model.visual.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    biased.zero_grad(set_to_none=True)


def test_refuses_bad_calls(model, processor, samples):
    engine = TransformersRollout(model, processor)
    with pytest.raises(ValueError, match="one prompt per sample"):
        engine.generate(samples, PROMPTS[:2], sampling())
    with pytest.raises(ValueError, match="n=0: must be >= 1"):
        engine.generate(samples, PROMPTS, sampling(n=0))
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"):
            engine.generate(samples, PROMPTS, sampling())
    finally:
        model.eval()


def test_prompts_over_the_limit_are_refused_by_name(model, processor, samples):
    engine = TransformersRollout(model, processor)
    with pytest.raises(
        ValueError, match=r"max_prompt_tokens = 300 tokens: sample '1' has \d+, sample '2' has"
    ):
        engine.generate(samples, PROMPTS, sampling(), max_prompt_tokens=300)

"""The transformers engine's shared-prefix KV cache changes nothing but speed: the same batches, run
with and without it, give the same tokens (fp32, tiny model), greedy and seeded sampling alike."""

import asyncio

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from observe_r1.format import SYSTEM_PROMPT
from observe_r1.sampling import SamplingParams
from observe_r1_serve.config import ServerConfig
from observe_r1_serve.engine import EngineRequest
from observe_r1_serve.transformers_engine import TransformersEngine


def conversation(text: str, images: list[tuple[int, int]], system: str | None = SYSTEM_PROMPT) -> tuple:
    """Messages as the app builds them (system prompt first unless the request brings none) and images."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages, [Image.new("RGB", size, (40 * i, 200, 90)) for i, size in enumerate(images)]


# Suffixes of different lengths (text only, one image of two sizes, two images), a request with its
# own system prompt and one with none (the chat template then adds its default system turn): neither
# of the last two shares the cached prefix.
CONVERSATIONS = [
    conversation("How many shapes?", [(64, 48)]),
    conversation("Which bar is the tallest? Answer with its colour.", [(112, 84)]),
    conversation("What is 2 + 3?", []),
    conversation("Compare the two pictures.", [(56, 56), (84, 56)]),
    conversation("How many shapes?", [(64, 48)], system="You answer in one word."),
    conversation("Say hello.", [], system=None),
]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """The same model with and without the cache; a long batching window puts each call's requests
    in one batch (no request is queued before all have been prepared)."""
    made = {
        on: TransformersEngine(
            ServerConfig(
                model=tiny_model_dir,
                dtype="fp32",
                prefix_cache=on,
                batch_wait_ms=300,
                max_batch_wait_ms=60_000,
            )
        )
        for on in (True, False)
    }
    yield made
    for engine in made.values():
        asyncio.run(engine.shutdown())


def run_batch(engine: TransformersEngine, sampling: SamplingParams) -> list[list[tuple[int, str, int]]]:
    """Every conversation as one request; per request, its (choice, text, tokens) when each choice ends."""

    async def one(index: int, messages: list[dict], images: list) -> list[tuple[int, str, int]]:
        request = EngineRequest(f"r{index}", engine.render_prompt(messages), images, sampling)
        await engine.prepare(request, max_prompt_tokens=4096)
        texts: dict[int, str] = {}
        ends = []
        async for delta in engine.generate(request):
            texts[delta.index] = texts.get(delta.index, "") + delta.text
            if delta.finish_reason is not None:
                ends.append((delta.index, texts[delta.index], delta.completion_tokens))
        return sorted(ends)

    async def all_of_them():
        return await asyncio.gather(*(one(i, m, imgs) for i, (m, imgs) in enumerate(CONVERSATIONS)))

    outputs = asyncio.run(all_of_them())
    assert engine._last_batch_rows == len(CONVERSATIONS) * sampling.n, "the requests did not share one batch"
    return outputs


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=7),
    ],
    ids=["greedy", "seeded-sampling"],
)
def test_outputs_with_the_prefix_cache_equal_outputs_without(engines, sampling):
    cached, plain = run_batch(engines[True], sampling), run_batch(engines[False], sampling)
    assert cached == plain
    assert max(tokens for request in plain for _, _, tokens in request) >= 6  # real continuations compared


def test_the_shared_system_turn_is_prefilled_once_and_reused(engines):
    engine = engines[True]
    cache = engine.prefix_cache
    misses = cache.misses
    run_batch(engine, SamplingParams(temperature=0, max_tokens=2))
    assert cache.misses == misses <= 1 and cache.hits >= 1


def test_each_system_prompt_is_its_own_prefix_and_a_prompt_without_one_is_plainly_padded(engines):
    engine = engines[True]

    def processed(prompt: str, images: list) -> dict:
        return engine._process(EngineRequest("x", prompt, images, SamplingParams()))

    turns = {
        engine.prefix_cache.system_turn(processed(engine.render_prompt(messages), images))
        for messages, images in (CONVERSATIONS[2], CONVERSATIONS[4], CONVERSATIONS[5])
    }
    assert len(turns) == 3 and all(turns)  # ours, the request's own, the template's default
    bare = processed("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n", [])
    assert engine.prefix_cache.system_turn(bare) == ()
    assert engine.prefix_cache.inputs([bare]) is None


def test_the_cache_can_be_turned_off(engines):
    assert engines[False].prefix_cache is None


def test_logits_from_the_cache_match_each_prompt_run_alone(engines):
    """Stricter than equal tokens (a random tiny model's attention is nearly uniform, so a wrong
    position or mask can leave the argmax alone): the first steps' logits agree to float rounding."""
    engine = engines[True]
    items = [
        engine._process(EngineRequest("x", engine.render_prompt(messages), images, SamplingParams()))
        for messages, images in CONVERSATIONS
    ]

    def logits(inputs: dict) -> torch.Tensor:
        config = GenerationConfig(
            max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        with torch.inference_mode():
            return torch.stack(engine.model.generate(**inputs, generation_config=config).logits, 1)

    batched = logits(engine.prefix_cache.inputs(items))
    alone = torch.cat([logits(item) for item in items])
    assert (batched - alone).abs().max() < 1e-5  # a position off by the padding: ~1e-3


def test_repetition_penalty_in_a_batch_matches_transformers_on_each_prompt_alone(engines):
    """The engine's penalty (each row's own prompt and response tokens, inside a batch that starts from
    the cached system turn) picks the tokens transformers' repetition-penalty processor picks for that
    prompt alone, greedy."""
    engine = engines[True]
    ours = run_batch(engine, SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=12))
    for (messages, images), request in zip(CONVERSATIONS, ours, strict=True):
        inputs = engine._process(EngineRequest("x", engine.render_prompt(messages), images, SamplingParams()))
        config = GenerationConfig(
            max_new_tokens=12, do_sample=False, repetition_penalty=1.8, eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.pad_id,
        )  # fmt: skip
        with torch.inference_mode():
            out = engine.model.generate(**inputs, generation_config=config)
        alone = engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert request[0][1] == alone
    assert ours != run_batch(engine, SamplingParams(temperature=0, max_tokens=12))  # the penalty mattered

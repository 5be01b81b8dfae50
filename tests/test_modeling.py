"""The tiny model folder and model/processor loading, with the torchvision fallback."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLProcessor
from vllm_helpers.tiny_qwen2 import build_tiny_qwen2

from observe_r1.chat import build_messages, generate
from observe_r1.modeling import (
    ModelLoadError,
    is_text_only,
    load_model,
    load_processor,
    position_ids,
    tokenizer_of,
    torchvision_available,
)
from observe_r1.sampling import SamplingParams
from observe_r1.tiny_model import QWEN_SPECIAL_TOKENS, SIZES, build, parameter_count

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
}


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _image(seed: int = 0, size=(130, 100)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiny_model_is_a_complete_hugging_face_folder(tiny_model_dir):
    assert EXPECTED_FILES <= {f.name for f in tiny_model_dir.iterdir()}
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    model = load_model(tiny_model_dir)
    assert 150_000 < parameter_count(model) < 300_000


def test_tokenizer_holds_qwen_special_tokens_matching_the_config(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    tok = processor.tokenizer
    config = json.loads((tiny_model_dir / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(QWEN_SPECIAL_TOKENS)
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ["<observe>3 red circles</observe>", "naïve 東京 ∑ 🙂", "  \n\t"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    # Special tokens are single tokens, never split by the BPE.
    assert tok("<|im_start|>user")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_is_qwen2_vl_style(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    prompt = processor.apply_chat_template(
        build_messages("How many?", 2), add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\nYou are a careful visual reasoning assistant.")
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert prompt.endswith("How many?<|im_end|>\n<|im_start|>assistant\n")
    no_system = processor.apply_chat_template(build_messages("Q", 0, system_prompt=None), tokenize=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tiny_model_dir, tmp_path):
    again = build(tmp_path / "again", seed=0)
    other = build(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_model_dir)
    assert _digest(other)["model.safetensors"] != _digest(tiny_model_dir)["model.safetensors"]
    assert _digest(other)["tokenizer.json"] == _digest(tiny_model_dir)["tokenizer.json"]


def test_small_size_is_in_the_benchmark_range():
    # Parameter count from the config alone: instantiating on the meta device allocates nothing.
    from transformers import Qwen2_5_VLForConditionalGeneration

    from observe_r1.tiny_model import build_config, build_tokenizer

    spec = SIZES["small"]
    config = build_config(spec, build_tokenizer(spec.vocab_size))
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert 20e6 <= parameter_count(model) <= 50e6


def test_build_refuses_to_overwrite_and_leaves_the_folder_intact(tiny_model_dir):
    before = _digest(tiny_model_dir)
    with pytest.raises(FileExistsError):
        build(tiny_model_dir, seed=5)
    assert _digest(tiny_model_dir) == before


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        build(tmp_path / "m", size="huge")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torchvision_available(), reason="the fallback is used only without torchvision")
def test_without_torchvision_the_stock_processor_class_runs_without_video(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert not hasattr(processor, "video_processor")
    with pytest.raises(ValueError, match="torchvision"):
        processor(
            text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 56, 56, 3), np.uint8)]
        )


def test_processor_expands_each_image_into_its_patch_tokens(tiny_model_dir):
    processor = load_processor(tiny_model_dir)
    images = [_image(0, (130, 100)), _image(1, (300, 300))]
    prompt = processor.apply_chat_template(build_messages("Q", 2), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    # 130x100 is resized to a multiple of 28 (patch 14 x merge 2); 300x300 is capped at max_pixels.
    assert grid[0].tolist() == [1, 8, 10]
    assert int(grid[1].prod()) * 14 * 14 <= 224 * 224
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == int(grid.prod(dim=1).sum()) // 4
    assert inputs["pixel_values"].shape == (int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14)


def test_image_size_limits_can_be_overridden_at_load(tiny_model_dir):
    processor = load_processor(tiny_model_dir, max_pixels=56 * 56)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[_image(0, (300, 300))])
    assert np.prod(inputs["image_grid_thw"][0]) * 14 * 14 <= 56 * 56


def test_generation_is_seeded_and_stops_within_the_budget(tiny_model_dir):
    model, processor = load_model(tiny_model_dir), load_processor(tiny_model_dir)
    messages = build_messages("How many circles?", 1)
    first = generate(model, processor, messages, [_image()], SamplingParams(max_tokens=12, seed=3))
    again = generate(model, processor, messages, [_image()], SamplingParams(max_tokens=12, seed=3))
    assert first == again
    assert 1 <= first.completion_tokens <= 12
    greedy = generate(model, processor, messages, [_image()], SamplingParams(max_tokens=12, temperature=0))
    assert greedy == generate(
        model, processor, messages, [_image()], SamplingParams(max_tokens=12, temperature=0, seed=99)
    )


def _to_legacy_layout(src: Path, dst: Path) -> None:
    """Rewrite a folder the way Qwen2.5-VL checkpoints on the hub are laid out (transformers 4.x):
    flat text config with `rope_scaling: mrope`, `model.*`/`visual.*` weight names, min/max_pixels,
    chat_template.json."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type")
    rope = text.pop("rope_parameters")
    config.update(text)
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["vision_config"]["in_chans"] = config["vision_config"].pop("in_channels")
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(dst / "model.safetensors")
    renamed = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
        for k, v in weights.items()
    }
    assert any(k.startswith("visual.") for k in renamed) and any(
        k.startswith("model.layers.") for k in renamed
    )
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    size = pre.pop("size")
    pre.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    (dst / "preprocessor_config.json").write_text(json.dumps(pre))
    template = (dst / "chat_template.jinja").read_text()
    (dst / "chat_template.jinja").unlink()
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))


def test_a_hub_layout_qwen2_5_vl_folder_loads_through_the_same_functions(tiny_model_dir, tmp_path):
    legacy = tmp_path / "legacy"
    _to_legacy_layout(tiny_model_dir, legacy)
    prompt_messages = build_messages("Q", 1)
    outputs = []
    for folder in (tiny_model_dir, legacy):
        model, processor = load_model(folder), load_processor(folder)
        prompt = processor.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[_image()], return_tensors="pt")
        with torch.no_grad():
            outputs.append((inputs["input_ids"], model(**inputs).logits))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])


def test_loading_a_missing_or_foreign_folder_names_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_processor(tmp_path / "empty")


@pytest.mark.skipif(not torchvision_available(), reason="needs torchvision (GPU machines have it)")
def test_with_torchvision_the_stock_processor_is_used_and_matches_the_fallback(tiny_model_dir):
    from observe_r1.modeling import _image_only_class

    stock = load_processor(tiny_model_dir)
    assert type(stock) is Qwen2_5_VLProcessor and hasattr(stock, "video_processor")
    fallback = _image_only_class(Qwen2_5_VLProcessor).from_pretrained(tiny_model_dir)
    prompt = stock.apply_chat_template(build_messages("Q", 1), add_generation_prompt=True, tokenize=False)
    a = stock(text=[prompt], images=[_image()], return_tensors="pt")
    b = fallback(text=[prompt], images=[_image()], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=0.05, rtol=0)


def test_a_text_only_policy_loads_only_when_allowed(tiny_model_dir, tmp_path):
    """The trainer takes a text-only causal LM (the vLLM rollout tests' tiny Qwen2); everyone else gets
    the image-text-to-text model or an error."""
    qwen2 = build_tiny_qwen2(tmp_path / "qwen2")
    assert is_text_only(qwen2) and not is_text_only(tiny_model_dir)
    with pytest.raises(ModelLoadError, match="cannot load a model"):
        load_model(qwen2)
    model = load_model(qwen2, allow_text_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tokenizer = load_processor(qwen2, allow_text_only=True)
    assert tokenizer_of(tokenizer) is tokenizer and not hasattr(tokenizer, "image_processor")
    batch = {"attention_mask": torch.tensor([[0, 1, 1]])}
    assert position_ids(model, batch).tolist() == [[0, 0, 1]]
    assert type(load_model(tiny_model_dir, allow_text_only=True)).__name__ != "Qwen2ForCausalLM"

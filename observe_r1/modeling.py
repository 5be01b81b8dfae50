"""Load a Qwen2.5-VL-class model and its processor, with or without torchvision.

Qwen2.5-VL's stock processor bundles a video processor that needs torchvision. Where torchvision is
missing (this project's CPU machines: the registry's wheels link CUDA), `load_processor` builds the
same processor class without its video processor, on the PIL image processor. For images and text
it is the stock class and behaves identically; only video input is refused. Where torchvision
exists, the stock `AutoProcessor` is used unchanged. A real Qwen2.5-VL folder and the tiny model
built by `observe_r1.tiny_model` load through the same two functions.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from observe_r1.errors import InvalidValue, UserError


class ModelLoadError(UserError, RuntimeError):
    """The model folder is missing, incomplete or not a supported architecture."""


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@functools.cache
def _image_only_class(processor_cls: type) -> type:
    """`processor_cls` without its video processor.

    `ProcessorMixin` reads a processor's sub-processors off its `__init__` signature, so a subclass
    whose signature has no `video_processor` is checked, saved and called without one; the parent's
    `__init__` still receives `video_processor=None` and drops it. Video input, which the parent would
    silently ignore, is refused.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_cls.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:
            raise InvalidValue("video input needs torchvision, which is not installed; send images instead")
        return processor_cls.__call__(self, *args, **kwargs)

    namespace = {"__init__": __init__, "__call__": __call__}
    return type(f"{processor_cls.__name__}ImageOnly", (processor_cls,), namespace)


def check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")


def is_text_only(path: str | os.PathLike) -> bool:
    """Whether the folder holds a causal LM without a vision tower (e.g. `Qwen2ForCausalLM`).

    The trainer takes such a model as its policy when asked (`allow_text_only`), so its vLLM rollout engine
    can be exercised where vLLM runs no vision model (its CPU build here); the server and chat do not."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = AutoConfig.from_pretrained(path).model_type
    return (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def tokenizer_of(processor):
    """The tokenizer of a multimodal processor, or the tokenizer itself (a text-only policy's "processor")."""
    return getattr(processor, "tokenizer", processor)


def _processor_class(path: Path) -> type:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(path).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ModelLoadError(f"{path}: model type '{model_type}' has no multimodal processor in transformers")
    return getattr(transformers, name)


def load_processor(path: str | os.PathLike, allow_text_only: bool = False, **image_kwargs: Any):
    """The model's processor: stock `AutoProcessor` with torchvision, the image-only variant without;
    with `allow_text_only`, a text-only model's tokenizer (see `is_text_only`).

    `image_kwargs` (e.g. `min_pixels`, `max_pixels`) override the saved image-processor settings.
    """
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(path)
    check_model_folder(path)
    if allow_text_only and is_text_only(path):
        return AutoTokenizer.from_pretrained(path)
    if torchvision_available():
        return AutoProcessor.from_pretrained(path, **image_kwargs)
    return _image_only_class(_processor_class(path)).from_pretrained(path, **image_kwargs)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `"fp32"`, `"float32"`, `"fp16"`, `"float16"` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    value = names.get(dtype) or getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise InvalidValue(f"unknown dtype '{dtype}' (use bf16, fp16 or fp32)")
    return value


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "fp32",
    device: str = "cpu",
    allow_text_only: bool = False,
):
    """The image-text-to-text model in `path` (or, with `allow_text_only`, a text-only causal LM; see
    `is_text_only`), in eval mode, on `device`.

    Its generation config keeps only the special token ids: `generate` fills every setting a call leaves
    unset from it, so a checkpoint's sampling defaults (Qwen2.5-VL ships top_k=1, top_p=0.001 and a
    repetition penalty) would reach paths that must sample exactly as configured. Who wants those
    defaults reads them with `observe_r1.sampling.checkpoint_defaults` (docs/architecture.md, "Sampling").
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    path = Path(path)
    check_model_folder(path)
    auto = AutoModelForCausalLM if allow_text_only and is_text_only(path) else AutoModelForImageTextToText
    try:
        model = auto.from_pretrained(path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a model from {path}: {e}") from e
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    return model.to(device).eval()


def position_ids(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen2.5-VL's (4, B, L) positions: 1-D text positions (for the mask), then the 3-D mrope ones.

    This is what `generate` computes for a fresh prompt. Passing it explicitly whenever a forward or
    `generate` starts from a prefilled cache keeps it off the `rope_deltas` the model caches on itself
    between calls, and gives every token the position it has alone, wherever padding sits in its row
    (positions count only tokens whose attention mask is 1). A text-only model gets its (B, L) positions.
    """
    mask = batch["attention_mask"]
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if not hasattr(model.model, "get_rope_index"):
        return text
    if batch.get("image_grid_thw") is None:
        mrope = text[None].expand(3, -1, -1)
    else:
        mrope, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=mask,
        )
    return torch.cat([text[None], mrope])

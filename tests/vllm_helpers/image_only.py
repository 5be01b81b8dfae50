"""Let vLLM's CPU build run Qwen2.5-VL here, where torchvision is missing (test-only shim).

Two things in vLLM 0.32's Qwen2.5-VL path need torchvision, and nothing else in it does:

1. `vllm/model_executor/models/qwen2_vl.py` (imported by its `qwen2_5_vl.py`) imports `smart_resize`
   from `transformers.models.qwen2_vl.image_processing_qwen2_vl`, the torchvision image processor's
   module, which imports torchvision at its top. `smart_resize` is also in the PIL image processor's
   module (`image_processing_pil_qwen2_vl`, "Copied from" the other), and transformers already
   resolves `Qwen2VLImageProcessor` to that PIL processor without torchvision. So the torchvision
   module's name is made to point at the PIL module.
2. vLLM builds the HF processor as `Qwen2_5_VLProcessor.from_pretrained`, which loads the video
   processor (torchvision). Its processing info is replaced, through vLLM's own model registry (the
   out-of-tree model API), by one asking for `observe_r1.modeling._image_only_class(Qwen2_5_VLProcessor)`:
   the stock processor without its video processor, as this project loads it itself.

Nothing else changes: vLLM's multimodal processor, its placeholder expansion and caches, its
vision tower and its M-RoPE positions are its own. Where torchvision exists this does nothing.

In this process, call `install()` before building the engine (enough for `VLLMRollout`, whose engine
runs here: `VLLM_ENABLE_V1_MULTIPROCESSING=0` and the uni executor). vLLM's async engine, the server's,
runs its engine core in a spawned process (the CPU platform forces spawn): there `install` comes in as
a vLLM general plugin, which vLLM loads in every process it starts, from the entry point that
`plugin_path` writes (put that folder and tests/ on the child's PYTHONPATH).
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


@functools.cache
def install() -> None:
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    sys.modules.setdefault(TORCHVISION_MODULE, importlib.import_module(PIL_MODULE))

    from transformers import Qwen2_5_VLProcessor
    from vllm import ModelRegistry
    from vllm.model_executor.models import qwen2_5_vl
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from observe_r1.modeling import _image_only_class

    image_only = _image_only_class(Qwen2_5_VLProcessor)

    class ImageOnlyInfo(qwen2_5_vl.Qwen2_5_VLProcessingInfo):
        def get_hf_processor(self, **kwargs: object):
            return self.ctx.get_hf_processor(image_only, **kwargs)

        def get_supported_mm_limits(self):
            return {"image": None}  # no video: its processor needs torchvision

    @MULTIMODAL_REGISTRY.register_processor(
        qwen2_5_vl.Qwen2_5_VLMultiModalProcessor,
        info=ImageOnlyInfo,
        dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder,
    )
    class ImageOnlyQwen2_5_VL(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
        pass

    ModelRegistry.register_model(ARCHITECTURE, ImageOnlyQwen2_5_VL)


def plugin_path(root: Path) -> Path:
    """A folder holding an entry point `vllm.general_plugins: image_only = vllm_helpers.image_only:install`
    (a bare dist-info, which `importlib.metadata` finds on `sys.path`)."""
    info = root / "observe_r1_vllm_image_only-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: observe-r1-vllm-image-only\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nimage_only = vllm_helpers.image_only:install\n"
    )
    return root

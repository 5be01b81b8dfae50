"""The image-size rules the server checks up front agree with the model's own image processor. This
file also runs under .venv-vllm, whose transformers is the one vLLM pins, so both engines' processors
are checked."""

import pytest
from PIL import Image
from transformers import AutoImageProcessor

from observe_r1_serve.image_rules import ImageRules

# Around the patch (14) and patch x merge (28) sides, and the aspect-ratio bound (200) at several scales.
SIDES = (1, 2, 3, 13, 14, 27, 28, 29, 55, 56, 57, 84, 200, 201, 401)
EDGES = [(s, 200 * s + d) for s in (1, 2, 3, 28) for d in (0, 1)]
SIZES = sorted({(w, h) for w in SIDES for h in SIDES} | set(EDGES) | {(h, w) for w, h in EDGES})


def processor_takes(image_processor, width: int, height: int) -> bool:
    try:
        image_processor(images=[Image.new("RGB", (width, height))], return_tensors="np")
    except (ValueError, RuntimeError):  # torch's reshape (torchvision processors) raises RuntimeError
        return False
    return True


@pytest.mark.parametrize("do_resize", [True, False])
def test_the_rules_refuse_exactly_the_sizes_the_processor_refuses(tiny_model_dir, do_resize):
    # The vLLM engine loads the image processor this way; the transformers engine's processor holds the same.
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir, do_resize=do_resize)
    rules = ImageRules.of(image_processor)
    disagreements = [
        (w, h, problem)
        for w, h in SIZES
        if ((problem := rules.size_problem(w, h)) is None) != processor_takes(image_processor, w, h)
    ]
    assert not disagreements
    refused = sum(rules.size_problem(w, h) is not None for w, h in SIZES)
    assert 0 < refused < len(SIZES)  # the sweep has sizes on both sides of the rules

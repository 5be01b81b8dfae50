"""The image sizes the served model's image processor takes, checked before a request reaches either
engine, so an image it would refuse is a 400 naming the image, never an error inside the engine.

Qwen2-VL-family image processors (transformers' `Qwen2VLImageProcessor` and its PIL twin, which vLLM
calls too) cut an image into patch_size x patch_size patches merged merge_size x merge_size. With
`do_resize` (the default) they first scale it with `smart_resize` to whole multiples of
patch_size x merge_size between min_pixels and max_pixels, upscaling as needed (a 1x1 image becomes
56x56), so their only refusal is an aspect ratio above 200: a bound written into `smart_resize`, not
a setting. Without resizing, both sides must already be whole multiples of patch_size x merge_size.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageRules:
    resize: bool  # the processor resizes every image (`do_resize`)
    factor: int  # patch_size x merge_size: the side every image is cut into multiples of

    @classmethod
    def of(cls, image_processor) -> ImageRules:
        """The rules of a loaded Qwen2-VL-family image processor, from its own settings."""
        return cls(
            resize=bool(image_processor.do_resize),
            factor=image_processor.patch_size * image_processor.merge_size,
        )

    def size_problem(self, width: int, height: int) -> str | None:
        """Why the processor would refuse a `width` x `height` image, or None when it takes it."""
        if self.resize:
            ratio = max(width, height) / min(width, height)
            if ratio > MAX_ASPECT_RATIO:
                return (
                    f"the image is {width}x{height} pixels, an aspect ratio of {ratio:.1f}:1; "
                    f"this model's image processor takes at most {MAX_ASPECT_RATIO}:1"
                )
            return None
        if width % self.factor or height % self.factor:
            return (
                f"the image is {width}x{height} pixels; this model's image processor does not resize "
                f"images, so both sides must be multiples of {self.factor} pixels"
            )
        return None

"""Qwen-Image: text-to-image, and Edit / Edit-Plus (reference images appended to the sequence)."""

from ditcache.families.family import Family
from ditcache.families.registry import register_family

FAMILY = register_family(
    Family(
        name="qwen_image",
        transformer="QwenImageTransformer2DModel",
        diffusers_pipelines=("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
        adapter="ditcache.families.qwen_image.adapter:QwenImageAdapter",
        pipelines=("ditcache.families.qwen_image.pipeline:QwenImagePipeline",),
        loader="ditcache.families.qwen_image.pipeline:QwenImagePipeline.from_pretrained",
        stack=("transformer_blocks",),
        model_types=("Qwen-Image", "Qwen-Image-Edit-Plus"),
        image_model=True,
    )
)

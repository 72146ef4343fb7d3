"""HunyuanVideo: text-to-video and both image-to-video variants (``latent_concat``, ``token_replace``)."""

from ditcache.families.family import Family
from ditcache.families.registry import register_family

FAMILY = register_family(
    Family(
        name="hunyuan_video",
        transformer="HunyuanVideoTransformer3DModel",
        diffusers_pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
        adapter="ditcache.families.hunyuan_video.adapter:HunyuanVideoAdapter",
        pipelines=("ditcache.families.hunyuan_video.pipeline:HunyuanVideoPipeline",),
        loader="ditcache.families.hunyuan_video.pipeline:HunyuanVideoPipeline.from_pretrained",
        stack=("transformer_blocks", "single_transformer_blocks"),
        model_types=("HunyuanVideo-T2V", "HunyuanVideo-I2V"),
    )
)

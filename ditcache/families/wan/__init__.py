"""Wan: Wan2.1 T2V/I2V/FL2V (one transformer) and Wan2.2 A14B (two experts), and the bundled
reference models, which are tiny Wan transformers."""

from ditcache.families.family import Family
from ditcache.families.registry import register_family

FAMILY = register_family(
    Family(
        name="wan",
        transformer="WanTransformer3DModel",
        diffusers_pipelines=("WanPipeline", "WanImageToVideoPipeline"),
        adapter="ditcache.families.wan.adapter:WanAdapter",
        pipelines=("ditcache.families.wan.pipeline:WanPipeline", "ditcache.families.wan.pipeline:Wan22Pipeline"),
        loader="ditcache.families.wan.pipeline:load",
        stack=("blocks",),
        modulation_argument="temb",
        model_types=(
            "Wan2.1-T2V-1.3B",
            "Wan2.1-T2V-14B",
            "Wan2.1-I2V-14B-480P",
            "Wan2.1-I2V-14B-720P",
            "Wan2.1-FL2V-14B-720P",
            "Wan2.2-T2V-A14B",
            "Wan2.2-I2V-A14B",
            "Wan2.2-FL2V-A14B",
            "Reference-Digits",
            "Reference-Digits-MoE",
        ),
    )
)

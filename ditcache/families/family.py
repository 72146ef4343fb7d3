"""The :class:`Family` record: everything the rest of ditcache needs to know about a model family.

A family (Wan, HunyuanVideo, Qwen-Image, ...) is one folder under ``ditcache/families/`` whose
``__init__.py`` registers its record. The record names its adapter, pipelines and loader by import
path (``"module:attribute"``) rather than holding the classes, because those modules import the
diffusers transformer classes, which take seconds each: finding the family of a directory, or
listing the families, must not import every model diffusers has.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ditcache.parallel import ParallelGroups, UlyssesProcessor
    from ditcache.runtime.adapter import FamilyAdapter
    from ditcache.runtime.denoise import DenoisingPipeline


def resolve(path: str) -> Any:
    """The object an import path ``"package.module:Attribute[.attribute...]"`` names."""
    module_name, _, attributes = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for name in filter(None, attributes.split(".")):
        target = getattr(target, name)
    return target


@dataclass(frozen=True)
class Family:
    """A model family as the registry knows it.

    Attributes:
        name: the family's name (``--model`` of the launchers, ``family(name)``).
        transformer: the diffusers class name of its transformer, e.g. ``"WanTransformer3DModel"``.
        diffusers_pipelines: ``_class_name`` values of ``model_index.json`` that mean this family.
        adapter: import path of its :class:`~ditcache.runtime.adapter.FamilyAdapter` subclass, which
            also names its Ulysses attention processors.
        pipelines: import paths of its pipeline classes, the first being the default.
        loader: import path of ``load(model_dir, *, device, dtype, parallel) -> pipeline``, which
            picks the pipeline class a directory calls for.
        stack: names of the transformer's ``ModuleList`` attributes that make up the cached block
            stack, in the order its forward runs them (what ``enable_cache`` hooks on diffusers'
            own pipelines).
        modulation_argument: the first block's argument holding the step's timestep modulation
            (:attr:`~ditcache.cache.StepContext.modulation` under ``enable_cache``), or None.
        model_types: params ``model_type`` names of its shipped params files.
        image_model: whether it makes images (one frame) rather than videos.
    """

    name: str
    transformer: str
    diffusers_pipelines: tuple[str, ...]
    adapter: str
    pipelines: tuple[str, ...]
    loader: str
    stack: tuple[str, ...]
    modulation_argument: str | None = None
    model_types: tuple[str, ...] = ()
    image_model: bool = False

    def detect(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a directory's ``model_index.json`` describes this family: its diffusers pipeline
        class, or else its transformer class."""
        if model_index.get("_class_name") in self.diffusers_pipelines:
            return True
        spec = model_index.get("transformer")
        return isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] == self.transformer

    @property
    def adapter_class(self) -> type[FamilyAdapter]:
        return resolve(self.adapter)

    @property
    def transformer_class(self) -> type[torch.nn.Module]:
        return self.adapter_class.transformer_class

    @property
    def pipeline_classes(self) -> tuple[type[DenoisingPipeline], ...]:
        return tuple(resolve(path) for path in self.pipelines)

    @property
    def ulysses_processors(self) -> Mapping[type, type[UlyssesProcessor]]:
        """Stock diffusers attention processor class -> its Ulysses replacement, for this family."""
        return self.adapter_class.ulysses_processors

    def from_pretrained(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: ParallelGroups | None = None,
    ) -> DenoisingPipeline:
        """Load ``model_dir`` as this family's pipeline (``parallel``: this rank's groups, None = one process)."""
        return resolve(self.loader)(model_dir, device=device, dtype=dtype, parallel=parallel)

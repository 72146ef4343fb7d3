"""ditcache: feature-cached, distributed inference for diffusion transformers."""

__version__ = "0.1.0"

"""Shipped calibration params (one JSON file per model) and their loader."""

from ditcache.params.loader import (
    PARAMS_DIR_ENV,
    SHIPPED_PARAMS_DIR,
    CacheParams,
    list_models,
    load_params,
    params_from_dict,
    resolve_params_path,
    sanitize_model_name,
)

__all__ = [
    "PARAMS_DIR_ENV",
    "SHIPPED_PARAMS_DIR",
    "CacheParams",
    "list_models",
    "load_params",
    "params_from_dict",
    "resolve_params_path",
    "sanitize_model_name",
]

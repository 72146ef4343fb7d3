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
from ditcache.params.userdir import default_user_params_dir, is_shipped_params_path

__all__ = [
    "PARAMS_DIR_ENV",
    "SHIPPED_PARAMS_DIR",
    "CacheParams",
    "default_user_params_dir",
    "is_shipped_params_path",
    "list_models",
    "load_params",
    "params_from_dict",
    "resolve_params_path",
    "sanitize_model_name",
]

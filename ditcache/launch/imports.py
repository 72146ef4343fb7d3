"""Import user code named on a command line: a dotted module name, or a path to a ``.py`` file.

A file is loaded by path rather than by putting its folder on ``sys.path``, so naming one file
cannot shadow any other module of the process. Importing the same file twice returns the module
already loaded: a module that registers a cache must run once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ditcache.errors import ParamsError


def import_user_module(spec: str, option: str = "--import") -> ModuleType:
    """The module ``spec`` names (``package.module`` or ``path/to/file.py``, relative to the working
    directory); ``option`` names the command-line option in errors."""
    if spec.endswith(".py"):
        return _import_file(Path(spec).resolve(), option)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is None or not spec.startswith(exc.name):
            raise  # the module exists but imports something missing: its own traceback says what
        raise ParamsError(
            f"{option} {spec}: no module named {exc.name!r}; give a module importable from PYTHONPATH "
            "or a path to a .py file"
        ) from None


def _import_file(path: Path, option: str) -> ModuleType:
    if not path.is_file():
        raise ParamsError(f"{option} {path}: no such file; give an existing .py file or a module name")
    name = f"ditcache_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

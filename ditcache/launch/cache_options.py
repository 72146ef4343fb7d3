"""The launchers' feature-cache options: any registered cache, by name, with its options.

``--cache NAME --cache-option KEY=VALUE ...`` is ``cache_config(NAME, KEY=VALUE, ...)``, checked
before anything is loaded. ``--import MODULE`` runs first, so a cache that a user module registers
(``@register_cache``) is usable by name like the built-in ones. ``--order`` and
``--taylor-threshold`` are shorthands for ada_taylor's ``n_derivatives`` and ``taylor_threshold``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditcache.cache import CacheConfig, available_caches, cache_config
from ditcache.errors import CacheConfigError
from ditcache.launch.imports import import_user_module

# ada_taylor field -> the shorthand option that sets it
SHORTHANDS = {"n_derivatives": "--order", "taylor_threshold": "--taylor-threshold"}


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("feature cache")
    group.add_argument(
        "--cache", default="ada_taylor",
        help=f"a registered cache ({', '.join(available_caches())}, or one an --import module registers)",
    )
    group.add_argument(
        "--cache-option", action="append", default=[], metavar="KEY=VALUE",
        help="a field of the cache's config (repeatable); VALUE is read as JSON if it parses, else as a string",
    )
    group.add_argument("--order", type=int, help="ada_taylor's n_derivatives (0 = residual reuse only; default 1)")
    group.add_argument(
        "--taylor-threshold", type=int, help="ada_taylor's taylor_threshold: beyond this many steps reuse the residual"
    )
    group.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import a module (dotted name or .py file) first, e.g. one that registers a cache (repeatable)",
    )


def parse_option(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> (key, JSON value, else the string; a JSON list becomes a tuple, as configs are frozen)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CacheConfigError(f"--cache-option {text!r} must be KEY=VALUE, e.g. --cache-option thresh=0.2")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), tuple(value) if isinstance(value, list) else value


def cache_from_args(args: argparse.Namespace) -> CacheConfig:
    """The config ``--cache``/``--cache-option``/``--order``/``--taylor-threshold`` describe (after ``--import``)."""
    for module in args.imports:
        import_user_module(module)
    if args.cache not in available_caches():
        raise CacheConfigError(
            f"unknown --cache {args.cache!r}; known caches: {', '.join(available_caches())} "
            "(a cache of your own: --import the module that registers it)"
        )
    options = dict(parse_option(text) for text in args.cache_option)
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in SHORTHANDS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    if given and args.cache != "ada_taylor":
        flags = ", ".join(SHORTHANDS[field] for field in given)
        raise CacheConfigError(f"{flags} set ada_taylor's options; for --cache {args.cache} use --cache-option KEY=VALUE")
    twice = sorted(set(given) & set(options))
    if twice:
        raise CacheConfigError(f"{twice} given both as {SHORTHANDS[twice[0]]} and as --cache-option: give it once")
    return cache_config(args.cache, **given, **options)

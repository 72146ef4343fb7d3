"""Launchers: the ``ditcache`` subcommands that turn command lines into runs.

``generate`` and ``calibrate`` run one rank's job (one process, or one rank of ``torchrun``);
``ray_generate`` places the same per-rank job on Ray actors (``ray_cluster``). This is the top layer:
it imports the runtime, nothing imports it. Nothing here imports Ray until the Ray launcher runs, so
``import ditcache`` works without the ``ray`` extra.
"""

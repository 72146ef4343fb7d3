"""Quality/speed benchmark: ditcache's AdaTaylorCache against its peers, on the same model and sampler.

Every method runs on the bundled reference model (and its two-expert Wan2.2-style variant) through
the same public pipeline call, ``pipe(prompts, ..., seed=..., cache=...)``: same weights, prompts,
noise (the pipeline draws it from the batch's seed), flow-matching Euler schedule, CFG and decoding.
The uncached output of the same process is the reference. Each method is swept over its own knob,
so it draws a curve, not a point:

    ditcache-ada_taylor-o{0,1,2}      AdaTaylorCache, curve calibrated here; thresh x K x retention
                                      (x taylor_threshold 1..3 for orders 1 and 2)
    ditcache-ada_taylor-o1-wancurve   the same rule with the published Wan curve (resampled)
    taylorseer-interval-o{1,2}        TaylorSeer's fixed-interval rule ("taylorseer_interval" cache)
    teacache                          TeaCache's rule ("teacache" cache), its polynomial fitted on
                                      the calibration run
    first-block                       diffusers' FirstBlockCache rule ("first_block" cache)
    diffusers-fbc                     diffusers FirstBlockCache hook (threshold)
    diffusers-magcache[-wancurve]     diffusers MagCache hook (same curve; threshold x K x retention)
    diffusers-taylorseer-o{1,2}       diffusers TaylorSeer hook, block-level identifiers (interval)

ditcache's caches and the re-implemented rules are cache configs handed to the pipeline; diffusers'
hooks are enabled on deep copies of the transformers, and the same pipeline runs on those copies
(``bench/peers.py``). Modules: :mod:`.workload` (model, batches, the one pipeline call),
:mod:`.calibration` (curve and TeaCache polynomial), :mod:`.runners` (methods and grids),
:mod:`.metrics` (block counting, PSNR/SSIM/accuracy), :mod:`.evaluate` (screening, evaluation,
timing), :mod:`.report` (matched tables, Pareto plot, doc block) and ``__main__`` (the CLI).

    python -m bench.quality --update-doc        # full run (100 samples per model), writes bench/results/
                                                # and the table block of docs/benchmarks.md
    python -m bench.quality --efficiency-check  # then: order 1 at its matched settings vs uncached, 100 samples
    python -m bench.quality --quick             # reduced grid, 20 samples, reference model only
    python -m bench.quality --smoke --out-json /tmp/q.json --no-plot   # tiny end-to-end check
"""

"""Quality/speed benchmark: ditcache's tuned AdaTaylorCache plans against diffusers' cache hooks and TeaCache.

Every method runs on the bundled reference model and its two-expert Wan2.2-style variant through the
same public pipeline call, one request per sample (batch 1, as a user runs a request): same weights,
prompts, noise (sample i: seed ``EVAL_SEED + i``), the pipeline's own scheduler (sigmas and steps are
what the pipeline reports), CFG and decoding. The uncached output of the same process is the
reference. Workloads: each model at 20, 30 and 50 steps.

    ditcache-tuned         ours: AdaTaylorCache on the plans ``ditcache.cache.tune`` picks from the
                           calibration samples' residuals (placement, rule or uniform-interval plan;
                           order and taylor_threshold), one plan per budget
    teacache               TeaCache's rule ("teacache" cache), polynomial fitted on the calibration run;
                           threshold x warm-up
    diffusers-fbc          diffusers FirstBlockCacheConfig (threshold), per request
    diffusers-magcache     diffusers MagCacheConfig on the curve calibrated here (threshold x K x retention)
    diffusers-taylorseer   diffusers TaylorSeerCacheConfig, block-level (interval x warm-up x order)
    diffusers-seacache     diffusers SeaCacheConfig (threshold x max consecutive reuses)
    diffusers-pab          diffusers PyramidAttentionBroadcastConfig (self- x cross-attention skip range)

FasterCache does not apply with one transformer call per CFG branch (``bench/peers.py``).

Selection never sees the evaluation samples: calibration (curve, TeaCache polynomial, residuals the
tuner replays) and screening use other seeds. Per peer, the screening-front settings around each band
are evaluated; ours' tuned plans are evaluated as chosen. Each method's Pareto front (pooled PSNR vs
compute fraction) is interpolated at 1.5x, 2x, 3x, 4x, 5x (:mod:`.frontier`), and every margin (ours
minus each peer) carries a paired-bootstrap 95% interval over the evaluation samples. Compute is the
block work that really ran (self-attention, cross-attention and FFN by FLOP share, so an
attention-only method like PAB is counted fairly). Speedup efficiency of ours is timed at batch 1 and
at the benchmark batch. Modules: :mod:`.workload`, :mod:`.calibration`, :mod:`.runners`,
:mod:`.metrics`, :mod:`.evaluate`, :mod:`.frontier`, :mod:`.report`, ``__main__`` (the CLI).

    python -m bench.quality --update-doc        # full run (2 models x 3 step counts), writes bench/results/
                                                # and the table block of docs/benchmarks.md
    python -m bench.quality --quick             # reduced grid, 6 samples, reference model, 20 steps
    python -m bench.quality --smoke --out-json /tmp/q.json --no-plot   # tiny end-to-end check
    python -m bench.quality --from-json bench/results/quality.json --update-doc   # re-render only
"""

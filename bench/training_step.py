"""Scratch CNN training throughput on in-memory batches, and the share of this CPU's peak.

The model is `pipeline.cnn.build_cnn` with params.yaml's `train_cnn` section; the batches
are real images decoded once into memory, so only the training step is timed. The float32
peak is measured in the same run with large matmuls; the share is the model's analytic
FLOPs (convolutions and dense layers from their shapes; a training step is about 3x the
forward pass) times images/s, over that peak. Variants of the configured step (larger
batches, XLA) are measured beside
it, as candidates for params.yaml or pipeline/. So is the dense head's training step, on
random features of the configured backbone's size: a few milliseconds, where its update
and the round trip from Python to each compiled step are what cost, so the configured head
(`compute.steps_per_execution` steps per call) is timed against one step per call.

    python -m bench.training_step [--images DIR_OR_ZIP] [--out bench/results] [--quick]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Report,
    base_parser,
    decode_all,
    matmul_peak_gflops,
    model_flops,
    pct,
    prepare_images,
    ratio,
    repo_config,
    timed,
)
from pipeline.config import Config, FeaturesConfig, TrainCnnConfig

TRAINING_FLOPS_FACTOR = 3  # forward, gradient w.r.t. activations, gradient w.r.t. weights


def backbone_feature_size(cfg: FeaturesConfig) -> int:
    """The length of the feature vectors `extract_features` writes under `cfg`."""
    from pipeline.backbones import build_backbone

    return int(build_backbone(cfg.model_copy(update={"weights": "none"})).output_shape[-1])


CONFIGURED_HEAD = "configured"
ONE_STEP_PER_CALL = "steps_per_execution 1"


def head_step_ms(cfg: Config, features: int, batches: int, repeats: int) -> dict[str, Any]:
    """ms per training step of the configured head, beside one compiled call per step.

    The configured head takes `compute.steps_per_execution` steps per call. The features are
    random, non-negative and ~40% zeros, like post-ReLU ones: only their shape matters to the
    step's time. Each
    timed run is one `fit` of `batches` steps, its setup included, as for the CNN; the
    variants take turns, rotating which goes first, and the fastest run of each counts.
    """
    import keras

    from pipeline.transfer import build_head

    head_cfg = cfg.head.model_copy(update={"optimizer": "adam"})
    per_call = cfg.compute.steps_per_execution
    rng = np.random.default_rng(cfg.common.seed)
    count = batches * head_cfg.batch_size
    x = np.maximum(rng.normal(0.25, 1.0, (count, features)), 0).astype(np.float32)
    y = (rng.random(count) < 0.5).astype(np.float32)
    data = in_memory_batches(x, y, head_cfg.batch_size)
    keras.utils.set_random_seed(cfg.common.seed)
    heads = {CONFIGURED_HEAD: build_head(features, head_cfg, per_call)}
    if per_call != 1:
        heads[ONE_STEP_PER_CALL] = build_head(features, head_cfg)
    for head in heads.values():  # warm-up: tracing, oneDNN primitive creation
        head.fit(
            data, steps_per_epoch=min(batches, 2 * per_call), epochs=1, shuffle=False, verbose=0
        )
    times: dict[str, list[float]] = {name: [] for name in heads}
    names = list(heads)
    for turn in range(repeats):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            seconds, _ = timed(
                lambda h=heads[name]: h.fit(
                    data, steps_per_epoch=batches, epochs=1, shuffle=False, verbose=0
                )
            )
            times[name].append(1000 * seconds / batches)
    return {name: {"ms_per_step": min(ms), "runs_ms_per_step": ms} for name, ms in times.items()}


def in_memory_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-run", type=int, help="images per timed run (default 640)")
    parser.add_argument(
        "--repeats", type=int, help="interleaved timed runs per variant (default 2)"
    )
    parser.add_argument("--matmul-n", type=int, help="matmul size for the peak (default 4096)")
    parser.add_argument(
        "--batch-sizes",
        default="128",
        help="comma-separated extra batch sizes measured beside the configured one",
    )
    parser.add_argument("--no-xla", action="store_true", help="skip the jit_compile=True variant")
    parser.add_argument("--head-batches", type=int, help="steps per timed head run (default 100)")
    args = parser.parse_args(argv)

    import keras

    from pipeline.cnn import build_cnn
    from pipeline.optimizers import compile_binary

    base = repo_config()
    cfg = base.train_cnn
    per_run = args.images_per_run or (32 if args.quick else 640)
    repeats = args.repeats or (1 if args.quick else 2)
    matmul_n = args.matmul_n or (512 if args.quick else 4096)
    head_batches = args.head_batches or (4 if args.quick else 100)
    if args.quick:
        cfg = cfg.model_copy(update={"image_size": (64, 64), "batch_size": 8})
        base = base.model_copy(
            update={"features": base.features.model_copy(update={"image_size": (32, 32)})}
        )
    extra = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.quick:
        extra = [16]

    report = Report("training_step", "Scratch CNN: training images/s and share of peak", args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        images = prepare_images(args.images, Path(workdir), limit=max(per_run, 64) // 2 * 2)
        x, y = decode_all(images, cfg.image_size)

    # name -> (config, XLA)
    variants: dict[str, tuple[TrainCnnConfig, bool]] = {
        f"configured (batch {cfg.batch_size})": (cfg, False)
    }
    for size in extra:
        variants[f"batch {size}"] = (cfg.model_copy(update={"batch_size": size}), False)
    if not args.no_xla:
        variants[f"batch {cfg.batch_size}, XLA jit_compile"] = (cfg, True)

    keras.utils.set_random_seed(base.common.seed)
    models, steps, failures = {}, {}, {}
    for name, (variant, jit) in variants.items():
        steps[name] = max(1, per_run // variant.batch_size)
        per_call = base.compute.steps_per_execution
        model = build_cnn(variant, steps_per_execution=per_call)
        if jit:
            compile_binary(model, variant, None, jit, per_call)
        data = in_memory_batches(x, y, variant.batch_size)
        try:  # warm-up: tracing, XLA compilation, oneDNN primitive creation
            model.fit(data, steps_per_epoch=min(3, steps[name]), epochs=1, shuffle=False, verbose=0)
        except Exception as error:  # XLA may not compile every op; report, don't abort
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        models[name] = (model, data)

    peak_runs, times = [], {name: [] for name in models}
    for _ in range(repeats):  # interleaved with the peak, so load hits each alike
        peak_runs.append(
            matmul_peak_gflops(matmul_n, repeats=3, warmup_s=0.1 if args.quick else 2.0)
        )
        for name, (model, data) in models.items():
            seconds, _ = timed(
                lambda m=model, d=data, s=steps[name]: m.fit(
                    d, steps_per_epoch=s, epochs=1, shuffle=False, verbose=0
                )
            )
            times[name].append(seconds)
    peak = max(run["gflops"] for run in peak_runs)
    head_features = backbone_feature_size(base.features)
    head_steps = head_step_ms(base, head_features, head_batches, 2 * repeats)

    configured = next(iter(variants))
    forward_model = models[configured][0]
    forward_model.predict(x[: cfg.batch_size], batch_size=cfg.batch_size, verbose=0)
    forward_s, _ = timed(
        lambda: forward_model.predict(x[:per_run], batch_size=cfg.batch_size, verbose=0)
    )
    forward_rate = min(per_run, len(x)) / forward_s

    flops = model_flops(forward_model)
    train_flops = {k: TRAINING_FLOPS_FACTOR * v for k, v in flops.items()}
    rows, results = [], {}
    for name in variants:
        if name in failures:
            rows.append([name, None, None, None, None, f"failed: {failures[name]}"])
            results[name] = {"failed": failures[name]}
            continue
        rate = steps[name] * variants[name][0].batch_size / min(times[name])
        conv_gflops = rate * train_flops["conv"] / 1e9
        total_gflops = rate * train_flops["total"] / 1e9
        results[name] = {
            "images_per_s": rate,
            "seconds": times[name],
            "steps": steps[name],
            "conv_gflops": conv_gflops,
            "model_gflops": total_gflops,
            "conv_share_of_peak": conv_gflops / peak,
            "model_share_of_peak": total_gflops / peak,
            "ratio_to_configured": None,
        }
        rows.append(
            [name, rate, conv_gflops, pct(conv_gflops / peak), pct(total_gflops / peak), ""]
        )
    base_rate = results[configured].get("images_per_s")
    for result in results.values():
        if "images_per_s" in result:
            result["ratio_to_configured"] = ratio(result["images_per_s"], base_rate)
    for row, name in zip(rows, variants, strict=True):
        if "images_per_s" in results[name]:
            row[-1] = f"{results[name]['ratio_to_configured']:.2f}x configured"

    report.settings = {
        "train_cnn": cfg.model_dump(mode="json"),
        "images_in_memory": len(x),
        "images_per_run": per_run,
        "repeats": repeats,
        "matmul_n": matmul_n,
        "head": base.head.model_copy(update={"optimizer": "adam"}).model_dump(mode="json"),
        "head_batches": head_batches,
        "training_flops_factor": TRAINING_FLOPS_FACTOR,
    }
    report.results = {
        "peak_gflops": peak,
        "peak_runs": peak_runs,
        "forward_flops_per_image": flops,
        "training_flops_per_image": train_flops,
        "variants": results,
        "forward_images_per_s": forward_rate,
        "forward_conv_share_of_peak": forward_rate * flops["conv"] / 1e9 / peak,
        "configured_images_per_s": base_rate,
        "configured_conv_share_of_peak": results[configured].get("conv_share_of_peak"),
        "head_feature_size": head_features,
        "head_steps": head_steps,
        "head_steps_per_execution": base.compute.steps_per_execution,
        "head_one_step_per_call_over_configured": ratio(
            head_steps.get(ONE_STEP_PER_CALL, {}).get("ms_per_step"),
            head_steps[CONFIGURED_HEAD]["ms_per_step"],
        ),
    }
    report.table(
        f"Measured float32 peak: {peak:.0f} GFLOP/s ({matmul_n}x{matmul_n} matmul, best of "
        f"{3 * repeats}); training FLOPs per image {train_flops['total'] / 1e6:.0f} M "
        f"(convolutions {train_flops['conv'] / 1e6:.0f} M) at "
        f"{cfg.image_size[0]}x{cfg.image_size[1]}; best of {repeats} runs of {per_run} images",
        [
            "training step",
            "images/s",
            "conv GFLOP/s",
            "conv share of peak",
            "model share of peak",
            "vs configured",
        ],
        rows,
    )
    report.table(
        "Forward pass only (model.predict, configured batch), for scale",
        ["pass", "images/s", "conv share of peak"],
        [["predict", forward_rate, pct(report.results["forward_conv_share_of_peak"])]],
    )
    configured_ms = head_steps[CONFIGURED_HEAD]["ms_per_step"]
    report.table(
        f"Dense head training step on {head_features} features per image (the configured "
        f"backbone's), batch {base.head.batch_size}, steps_per_execution "
        f"{base.compute.steps_per_execution} unless named; fastest of "
        f"{len(head_steps[CONFIGURED_HEAD]['runs_ms_per_step'])} runs of {head_batches} "
        "steps each",
        ["head", "ms per step", "vs configured"],
        [
            [name, step["ms_per_step"], f"{ratio(step['ms_per_step'], configured_ms):.2f}x"]
            for name, step in head_steps.items()
        ],
    )
    share = report.results["configured_conv_share_of_peak"]
    report.target(
        "conv share of float32 peak (configured)",
        None if share is None else 100 * share,
        "reported (no target set)",
        None,
        unit="%",
    )
    report.notes.append(
        "Shares count only conv/dense multiply-adds; batch norm, ReLU, pooling, dropout, the "
        "optimizer update and the metrics take the rest of each step."
    )
    return report.write(args.out)


if __name__ == "__main__":
    main()

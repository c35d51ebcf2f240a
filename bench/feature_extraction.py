"""VGG16 feature extraction: the stage's real path vs. a plain forward pass over the same images.

Real path: the files through `pipeline.datasets.image_dataset` into `backbone.predict`,
exactly `pipeline.features.extract`. Plain: the same images decoded into memory
beforehand, then `backbone.predict` on the array. Their ratio is what the input pipeline
costs extraction. The backbone is `pipeline.backbones.build_backbone` with params.yaml's
`features` section and `weights: none` (random weights cost the same FLOPs as ImageNet's).
Both run in float32 and, where the CPU has native bfloat16 (AVX-512 BF16 or AMX), under
Keras' `mixed_bfloat16` policy; then the stage's head (params.yaml's `head`, float32) is
trained on each policy's features of the same images, three quarters for training, and
its validation accuracy on the rest compared.

    python -m bench.feature_extraction [--images DIR_OR_ZIP] [--out bench/results] [--quick]
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

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
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.devices import cpu_has_bf16
from pipeline.images import LabeledImage

TARGET_RATIO = 1.3
POLICIES = ("float32", "mixed_bfloat16")


def head_accuracy(features: np.ndarray, labels: np.ndarray, cfg: HeadConfig, seed: int) -> float:
    """Validation accuracy of the stage's head trained on `features`, a quarter held out.

    Trained as `train_head` trains it (early stopping, best epoch kept), in float32, so only
    the features' precision differs between policies.
    """
    import keras

    from pipeline.history import summarize_history
    from pipeline.train_head import feature_dataset
    from pipeline.training import fit
    from pipeline.transfer import build_head

    order = np.random.default_rng(seed).permutation(len(labels))
    train, validation = np.split(order, [len(order) * 3 // 4])
    keras.utils.set_random_seed(seed)
    head = build_head(features.shape[1], cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        history = fit(
            head,
            feature_dataset(features[train], labels[train], cfg.batch_size, seed),
            feature_dataset(features[validation], labels[validation], cfg.batch_size),
            cfg,
            log_to_mlflow=False,
        )
    return float(summarize_history(history)["val/accuracy"])


def measure_policy(
    policy: str,
    cfg: FeaturesConfig,
    images: Sequence[LabeledImage],
    repeats: int,
    seed: int,
) -> tuple[dict[str, object], np.ndarray]:
    """Real-path and plain images/s of a backbone built under one Keras dtype policy.

    Also returns the features of the real path, for `head_accuracy`.
    """
    import keras

    from pipeline.backbones import build_backbone
    from pipeline.features import extract

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        backbone = build_backbone(cfg)
        pixels, _labels = decode_all(images, cfg.image_size)

        extracted: list[np.ndarray] = []

        def real() -> None:
            # The stage's progress bar goes to stdout; keep it out of the report.
            with contextlib.redirect_stdout(io.StringIO()):
                extracted[:] = [extract(backbone, list(images), cfg)]

        def plain() -> None:
            backbone.predict(pixels, batch_size=cfg.batch_size, verbose=0)

        warm = list(images[: cfg.batch_size])
        with contextlib.redirect_stdout(io.StringIO()):
            extract(backbone, warm, cfg)  # warm-up: tracing, oneDNN primitive creation
        backbone.predict(pixels[: cfg.batch_size], batch_size=cfg.batch_size, verbose=0)
        times: dict[str, list[float]] = {"real": [], "plain": []}
        for _ in range(repeats):  # interleaved, so load from other processes hits each alike
            times["real"].append(timed(real)[0])
            times["plain"].append(timed(plain)[0])
        flops = model_flops(backbone)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rates = {path: len(images) / min(seconds) for path, seconds in times.items()}
    result = {
        "images_per_s": rates,
        "seconds": times,
        "plain_over_real": ratio(rates["plain"], rates["real"]),
        "forward_flops_per_image": flops,
    }
    return result, extracted[0]


def main(argv: Sequence[str] | None = None) -> Path:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, help="images to extract (default 256)")
    parser.add_argument("--repeats", type=int, help="interleaved timed passes per path (default 2)")
    parser.add_argument("--matmul-n", type=int, help="matmul size for the peak (default 4096)")
    parser.add_argument(
        "--bf16",
        choices=("auto", "force", "skip"),
        default="auto",
        help="mixed_bfloat16: where the CPU supports it (auto), always (force), never (skip)",
    )
    args = parser.parse_args(argv)

    base = repo_config()
    # VGG16 whatever params.yaml picks: the figure is the tutorial's backbone.
    cfg = base.features.model_copy(update={"weights": "none", "backbone": "vgg16"})
    limit = args.limit or (16 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 2)
    matmul_n = args.matmul_n or (512 if args.quick else 4096)
    head_cfg = base.head
    if args.quick:
        cfg = cfg.model_copy(update={"image_size": (32, 32), "batch_size": 8})
        head_cfg = head_cfg.model_copy(update={"units": 8, "epochs": 2})
    native_bf16 = cpu_has_bf16()
    run_bf16 = args.bf16 == "force" or (args.bf16 == "auto" and native_bf16)

    report = Report("feature_extraction", "VGG16 features: real path vs. plain forward", args.quick)
    warmup_s = 0.1 if args.quick else 2.0
    peak = matmul_peak_gflops(matmul_n, repeats=3, warmup_s=warmup_s)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as workdir:
        images = prepare_images(args.images, Path(workdir), limit)
        results: dict[str, object] = {}
        labels = np.array([image.label for image in images], dtype=np.int8)
        for policy in POLICIES:
            if policy == "mixed_bfloat16" and not run_bf16:
                reason = "not supported on this CPU" if not native_bf16 else "skipped (--bf16 skip)"
                results[policy] = {"skipped": reason}
                continue
            results[policy], features = measure_policy(
                policy, cfg, images, repeats, base.common.seed
            )
            results[policy]["head_val_accuracy"] = head_accuracy(
                features, labels, head_cfg, base.common.seed
            )
    # Measured before and after the passes, so a load spike at either end does not set it.
    peak = max(peak, matmul_peak_gflops(matmul_n, 3, warmup_s), key=lambda run: run["gflops"])

    rows = []
    for policy, result in results.items():
        if "skipped" in result:
            rows.append([policy, result["skipped"], "", "", "", "", ""])
            continue
        flops = result["forward_flops_per_image"]["total"]
        for path, label in (("real", "files -> image_dataset -> predict"), ("plain", "in memory")):
            rate = result["images_per_s"][path]
            result.setdefault("share_of_float32_peak", {})[path] = (
                rate * flops / 1e9 / peak["gflops"]
            )
            rows.append(
                [
                    policy,
                    label,
                    rate,
                    rate * flops / 1e9,
                    pct(rate * flops / 1e9 / peak["gflops"]),
                    f"{result['plain_over_real']:.2f}x" if path == "real" else "1.00x",
                    f"{result['head_val_accuracy']:.3f}" if path == "real" else "",
                ]
            )
    float32 = results["float32"]
    headline = float32["plain_over_real"]
    report.settings = {
        "features": cfg.model_dump(mode="json"),
        "images": len(images),
        "repeats": repeats,
        "matmul_n": matmul_n,
        "bf16_mode": args.bf16,
    }
    report.results = {
        "peak": peak,
        "policies": results,
        "float32_real_images_per_s": float32["images_per_s"]["real"],
        "float32_plain_images_per_s": float32["images_per_s"]["plain"],
        "float32_plain_over_real": headline,
        "bf16_native": native_bf16,
    }
    flops = float32["forward_flops_per_image"]["total"]
    report.table(
        f"{len(images)} images at {cfg.image_size[0]}x{cfg.image_size[1]}, batch "
        f"{cfg.batch_size}, pooling {cfg.pooling}; {flops / 1e9:.2f} GFLOP per image; "
        f"float32 peak {peak['gflops']:.0f} GFLOP/s; best of {repeats} interleaved passes",
        [
            "policy",
            "path",
            "images/s",
            "GFLOP/s",
            "share of fp32 peak",
            "plain / this",
            "head val. accuracy on these features",
        ],
        rows,
    )
    report.target(
        "plain / real path, float32",
        headline,
        f"<= {TARGET_RATIO:g}x",
        None if headline is None else headline <= TARGET_RATIO,
    )
    bf16 = results["mixed_bfloat16"]
    if "skipped" in bf16:
        report.target("mixed_bfloat16 speed-up", None, bf16["skipped"], None)
    else:
        speedup = ratio(bf16["images_per_s"]["plain"], float32["images_per_s"]["plain"])
        report.results["bf16_plain_speedup"] = speedup
        report.target("mixed_bfloat16 / float32, plain", speedup, "reported", None)
        difference = bf16["head_val_accuracy"] - float32["head_val_accuracy"]
        report.results["bf16_minus_float32_head_accuracy"] = difference
        report.target(
            "head validation accuracy, bfloat16 features - float32 features",
            difference,
            "reported",
            None,
            unit=" (accuracy, 0-1)",
        )
    return report.write(args.out)


if __name__ == "__main__":
    main()

"""Stage: a look inside the scratch CNN, as the tutorial explains convolutions.

For a few test images: the learned first-layer filters beside the hand-made Sobel and
box-blur kernels the tutorial starts from, the feature maps of each conv block, and Grad-CAM
heat maps of the regions that drove the decision. Figures go to `reports/explain` and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from pipeline import process, stage
from pipeline.datasets import load_image
from pipeline.errors import MissingInputError
from pipeline.files import atomic_dir
from pipeline.images import CLASS_NAMES, LabeledImage, list_split

EXAMPLES = 4
MAPS_PER_BLOCK = 8

# The tutorial's hand-made kernels: edges in two directions, and a blur.
CLASSIC_KERNELS = {
    "Sobel x": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32),
    "Sobel y": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=np.float32),
    "box blur": np.full((3, 3), 1 / 9, dtype=np.float32),
}


def conv_layers(model: keras.Model) -> list[keras.layers.Conv2D]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def first_layer_filters(model: keras.Model) -> np.ndarray:
    """The first conv layer's kernels as `(filters, 3, 3, channels)`, each scaled to 0-1."""
    kernels = conv_layers(model)[0].get_weights()[0]  # (3, 3, in, out)
    kernels = np.transpose(kernels, (3, 0, 1, 2))
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    high = kernels.max(axis=(1, 2, 3), keepdims=True)
    return (kernels - low) / np.maximum(high - low, 1e-8)


def block_output(model: keras.Model, conv: keras.layers.Conv2D):
    """A conv block's output: its first Activation after the conv (BatchNorm may sit between)."""
    index = model.layers.index(conv)
    after = (
        layer for layer in model.layers[index + 1 :] if isinstance(layer, keras.layers.Activation)
    )
    return next(after, conv).output


def feature_maps(model: keras.Model, images: np.ndarray) -> list[np.ndarray]:
    """The output of each conv block (after its activation) for `images`."""
    outputs = [block_output(model, conv) for conv in conv_layers(model)]
    probe = keras.Model(model.input, outputs)
    return [np.asarray(x) for x in probe(images, training=False)]


def grad_cam(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) on the last conv block: where the decision came from.

    Returns `(n, height, width)` heat maps in 0-1 at the input's size. Positive evidence
    for the predicted class: the gradient of P(dog) for dogs, of P(cat) for cats.
    """
    last_block = block_output(model, conv_layers(model)[-1])
    probe = keras.Model(model.input, [last_block, model.output])
    inputs = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        maps, probs = probe(inputs, training=False)
        score = tf.where(probs >= 0.5, probs, 1 - probs)
    gradients = tape.gradient(score, maps)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3])[..., 0].numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return cam / np.maximum(peak, 1e-8)


def filters_figure(filters: np.ndarray) -> Figure:
    shown = filters[:16]
    columns = 8
    rows = 1 + -(-len(shown) // columns)
    figure = Figure(figsize=(1.4 * columns, 1.5 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for column, (name, kernel) in enumerate(CLASSIC_KERNELS.items()):
        axes[0, column].imshow(kernel, cmap="gray", vmin=-2, vmax=2)  # blur is mid-grey
        axes[0, column].set_title(name, fontsize=8)
    for index, kernel in enumerate(shown):
        axis = axes[1 + index // columns, index % columns]
        axis.imshow(kernel if kernel.shape[-1] == 3 else kernel[..., 0], interpolation="nearest")
        axis.set_title(f"learned {index + 1}", fontsize=7)
    figure.suptitle("Hand-made kernels (top) and the CNN's first-layer 3x3 filters (RGB)")
    figure.tight_layout()
    return figure


def feature_maps_figure(image: np.ndarray, maps: list[np.ndarray], caption: str) -> Figure:
    columns = MAPS_PER_BLOCK + 1
    figure = Figure(figsize=(1.3 * columns, 1.4 * len(maps)))
    axes = figure.subplots(len(maps), columns, squeeze=False)
    for row, block in enumerate(maps):
        axes[row, 0].imshow(image.astype(np.uint8))
        axes[row, 0].set_title(f"block {row + 1}", fontsize=8)
        strongest = np.argsort(-block.mean(axis=(0, 1)))[:MAPS_PER_BLOCK]
        for column, channel in enumerate(strongest, start=1):
            axes[row, column].imshow(block[..., channel], cmap="viridis")
        for axis in axes[row]:
            axis.axis("off")
    figure.suptitle(f"{caption}: the {MAPS_PER_BLOCK} most active feature maps of each conv block")
    figure.tight_layout()
    return figure


def grad_cam_figure(images: np.ndarray, heat: np.ndarray, captions: list[str]) -> Figure:
    figure = Figure(figsize=(2.6 * len(images), 5.4))
    axes = figure.subplots(2, len(images), squeeze=False)
    for column, (image, cam, caption) in enumerate(zip(images, heat, captions, strict=True)):
        axes[0, column].imshow(image.astype(np.uint8))
        axes[0, column].set_title(caption, fontsize=8)
        axes[1, column].imshow(image.astype(np.uint8))
        axes[1, column].imshow(cam, cmap="jet", alpha=0.45)
        axes[0, column].axis("off")
        axes[1, column].axis("off")
    figure.suptitle("Grad-CAM: the regions that drove each decision")
    figure.tight_layout()
    return figure


def pick_examples(test: list[LabeledImage], count: int) -> list[LabeledImage]:
    """Half cats, half dogs, spread over the split, so the figures are the same every run."""
    chosen = []
    for label in range(len(CLASS_NAMES)):
        of_class = [image for image in test if image.label == label]
        step = max(1, len(of_class) // max(1, count // 2))
        chosen += of_class[::step][: count // 2]
    return chosen


def write_figures(model: keras.Model, examples: list[LabeledImage], target: Path) -> None:
    size = model.input_shape[1:3]
    images = np.stack([load_image(str(image.path), size).numpy() for image in examples])
    probs = model.predict(images, verbose=0).ravel()
    captions = [
        f"{CLASS_NAMES[image.label][:-1]}, P(dog)={prob:.2f}"
        for image, prob in zip(examples, probs, strict=True)
    ]
    filters_figure(first_layer_filters(model)).savefig(target / "filters.png")
    maps = feature_maps(model, images)
    for index, caption in enumerate(captions):
        per_image = [block[index] for block in maps]
        figure = feature_maps_figure(images[index], per_image, caption)
        figure.savefig(target / f"feature_maps_{index + 1}.png")
    grad_cam_figure(images, grad_cam(model, images), captions).savefig(target / "grad_cam.png")


def main() -> None:
    with stage.context("explain") as ctx:
        paths = ctx.cfg.paths
        test = list_split(paths.split / "test")
        if not test or not paths.models.cnn.is_file():
            raise MissingInputError(
                "needs the test split and models/cnn.keras; run the pipeline first"
            )
        examples = pick_examples(test, EXAMPLES)
        model = keras.models.load_model(paths.models.cnn)
        with atomic_dir(paths.reports.explain) as staging:
            write_figures(model, examples, staging)
    print(
        f"explain: filters, feature maps and Grad-CAM of {len(examples)} test images "
        f"in {paths.reports.explain}"
    )


if __name__ == "__main__":
    process.run(main)

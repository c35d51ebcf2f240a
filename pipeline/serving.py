"""A logged model that takes photos: MLflow's pyfunc around a trained Keras model.

    mlflow models serve -m models:/dogs-vs-cats@champion --env-manager local --port 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"image": "<the photo, base64>"}]}'

The training stages log every model this way (`log_photo_model`): the `.keras` file as an
artifact, the `pipeline` package as code, and `served_model.py` as the model's code
(MLflow's models from code; MLflow refuses to load pickled models by default). Its input is
a column `image` of encoded JPEG, PNG, BMP or GIF bytes, which MLflow's server base64-decodes
because the signature declares it binary; its output, `prob_dog` and `label` per photo, as
`pipeline.predict` writes them: each photo checked and re-encoded as the split stage does,
then decoded and resized by `datasets.decode_image`, as in training.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import keras
import mlflow
import mlflow.pyfunc
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from mlflow.models import infer_signature
from PIL import Image

from pipeline.datasets import decode_image, predict_dog_probability
from pipeline.images import inspect_image, label_of_probability, reencode_as_jpeg

IMAGE_COLUMN = "image"
KERAS_ARTIFACT = "keras_model"
DEFAULT_THRESHOLD = 0.5
BATCH_SIZE = 32
MODEL_CODE = Path(__file__).with_name("served_model.py")


def decodable_photos(photos: Sequence[bytes]) -> list[bytes]:
    """Each photo as TensorFlow's decoder reads it the way training did (re-encoded where the
    split stage re-encodes); an unusable one is refused with its position and the reason."""
    readable = []
    for position, data in enumerate(photos):
        problem, needs_reencoding = inspect_image(bytes(data))
        if problem:
            raise MlflowException(f"image {position}: {problem}", INVALID_PARAMETER_VALUE)
        readable.append(reencode_as_jpeg(data) if needs_reencoding else bytes(data))
    return readable


def classify_photos(
    model: keras.Model, photos: Sequence[bytes], threshold: float = DEFAULT_THRESHOLD
) -> pd.DataFrame:
    """`prob_dog` and `label` for each photo's bytes."""
    size = tuple(model.input_shape[1:3])
    batches = (
        tf.data.Dataset.from_tensor_slices(decodable_photos(photos))
        .map(lambda data: decode_image(data, size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(BATCH_SIZE)
    )
    probs = predict_dog_probability(model, batches).astype(float)
    labels = [label_of_probability(prob, threshold) for prob in probs]
    return pd.DataFrame({"prob_dog": probs, "label": labels})


class PhotoClassifier(mlflow.pyfunc.PythonModel):
    """P(dog) and a label for photos, for `mlflow models serve` and `mlflow.pyfunc`."""

    def __init__(self, model: keras.Model | None = None) -> None:
        self.model = model

    def load_context(self, context) -> None:
        # Uncompiled: serving needs no optimizer.
        self.model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)

    # A DataFrame hint gives MLflow no schema: the logged signature (a binary column, a
    # threshold param) stays what its server decodes and checks requests by.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, float] | None = None
    ) -> pd.DataFrame:
        threshold = (params or {}).get("threshold", DEFAULT_THRESHOLD)
        return classify_photos(self.model, list(model_input[IMAGE_COLUMN]), threshold)


def model_requirements() -> list[str]:
    """What loading a logged model needs besides MLflow: Keras, the backend it was saved with,
    and Pillow, which checks the photos."""
    return [f"{name}=={version(name)}" for name in ("keras", "tensorflow", "pillow")]


def example_photo(size: Sequence[int]) -> bytes:
    """A plain grey JPEG the model's size: an input example that reads no data, so a stage
    needs no image it does not declare (train_head reads features only)."""
    out = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), (128, 128, 128)).save(out, format="JPEG")
    return out.getvalue()


def log_photo_model(
    model: keras.Model, keras_file: Path, name: str, step: int = 0
) -> mlflow.models.model.ModelInfo:
    """Logs `keras_file` (the saved `model`) as a photo model, with a photo as its input
    example and the signature of `model`'s answer for it.

    The requirements are given rather than inferred: inferring them reloads the model in a
    subprocess to watch its imports, seconds per model (`bench.incremental` measures it).
    """
    example = pd.DataFrame({IMAGE_COLUMN: [example_photo(model.input_shape[1:3])]})
    answer = PhotoClassifier(model).predict(None, example)
    signature = infer_signature(example, answer, params={"threshold": DEFAULT_THRESHOLD})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=MODEL_CODE,
        artifacts={KERAS_ARTIFACT: str(keras_file)},
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=model_requirements(),
        step=step,
    )


def load_keras_model(uri: str) -> keras.Model:
    """The Keras model inside a logged photo model (`models:/name@alias`, `runs:/...`), or a
    logged Keras model as earlier versions of the pipeline logged them."""
    loaded = mlflow.pyfunc.load_model(uri)
    try:
        return loaded.unwrap_python_model().model
    except MlflowException:  # no Python model inside: MLflow's Keras flavor
        return loaded.get_raw_model()

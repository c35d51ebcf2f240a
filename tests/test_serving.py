"""The logged photo model: in-process through MLflow's pyfunc, and behind `mlflow models serve`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from devtools.fakes import jpeg_bytes, photo
from pipeline.cnn import build_cnn
from pipeline.precision import for_inference
from pipeline.serving import load_keras_model, log_photo_model
from pipeline.team_stack import free_port
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> tuple[str, Path]:
    """A tiny CNN, built and saved as train_cnn saves it, logged as a photo model in a fresh
    store; its model URI and the store's folder."""
    import keras

    folder = tmp_path_factory.mktemp("store")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    cfg = tiny_config().train_cnn.model_copy(update={"block_filters": [4], "dense_units": []})
    keras.utils.set_random_seed(0)  # untrained weights whose P(dog) differs between images
    model = for_inference(build_cnn(cfg))
    model.save(folder / "cnn.keras")
    artifacts = (folder / "artifacts").as_uri()  # not ./mlruns in the repository
    with mlflow.start_run(experiment_id=mlflow.create_experiment("t", artifacts)):
        info = log_photo_model(model, folder / "cnn.keras", "cnn")
    return f"models:/{info.model_id}", folder


def test_the_logged_model_takes_photos_and_answers_as_predict_does(logged, tmp_path) -> None:
    from pipeline.predict import predict_files

    uri, _ = logged
    files = {
        "cat.jpg": jpeg_bytes(photo(0, seed=5)),
        "dog.png": jpeg_bytes(photo(1, 6), format="PNG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": list(files.values())}))
    assert list(served.columns) == ["prob_dog", "label"]
    # The same decode, re-encoding and resize as pipeline.predict, so the same answer.
    keras_model = load_keras_model(uri)
    expected = predict_files(
        keras_model, [tmp_path / name for name in files], reencode={tmp_path / "dog.png"}
    )
    assert served["prob_dog"].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert served["label"].tolist() == ["dog" if p >= 0.5 else "cat" for p in expected]
    model = mlflow.pyfunc.load_model(uri)
    everything_a_dog = model.predict(pd.DataFrame({"image": [files["cat.jpg"]]}), {"threshold": 0})
    assert everything_a_dog["label"].tolist() == ["dog"]


def test_the_logged_model_names_its_input_and_output_and_carries_an_example(logged) -> None:
    uri, _ = logged
    info = mlflow.models.get_model_info(uri)
    signature = info.signature.to_dict()
    assert json.loads(signature["inputs"]) == [
        {"type": "binary", "name": "image", "required": True}
    ]
    assert [column["name"] for column in json.loads(signature["outputs"])] == ["prob_dog", "label"]
    assert info.saved_input_example_info is not None


def test_a_file_that_is_no_image_is_refused_with_its_position(logged) -> None:
    uri, _ = logged
    model = mlflow.pyfunc.load_model(uri)
    photos = pd.DataFrame({"image": [jpeg_bytes(photo(0, seed=1)), b"not an image"]})
    with pytest.raises(MlflowException, match="image 1: not a readable image"):
        model.predict(photos)


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` on 127.0.0.1 until it answers; yields its URL, then stops it."""
    port = free_port()
    # MLflow starts `uvicorn` from PATH: the environment's own, as once it is activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    serve = ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", *serve, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers stop with it
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"no model server:\n{log.read_text()}") from None
                    time.sleep(0.5)
            yield url
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def invoke(url: str, photos: list[bytes]) -> tuple[int, dict]:
    """Posts the photos as the README's curl does: base64 in an `image` column."""
    records = [{"image": base64.b64encode(data).decode()} for data in photos]
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"dataframe_records": records}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_champion_served_by_mlflow_answers_a_posted_jpeg(logged) -> None:
    uri, folder = logged
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(uri, "dogs-vs-cats")
    mlflow.MlflowClient().set_registered_model_alias("dogs-vs-cats", "champion", version.version)
    champion = "models:/dogs-vs-cats@champion"
    with model_server(champion, tracking_uri, folder / "serve.log") as url:
        status, answer = invoke(url, [jpeg_bytes(photo(1, seed=3))])
        assert status == 200
        (prediction,) = answer["predictions"]
        assert 0 <= prediction["prob_dog"] <= 1 and prediction["label"] in ("cat", "dog")
        status, refusal = invoke(url, [b"not an image"])
        assert status == 400 and "image 0: not a readable image" in refusal["message"]

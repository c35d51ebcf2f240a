"""A bounded fuzz pass over what a user controls: params.yaml, archives, image bytes and
predict's arguments. Each generated input either works or is refused with a one-line
message; never a traceback, a hang or a write outside the folder it was given.

Derandomized with a small number of examples, so CI runs the same inputs in seconds each
time; raise `FUZZ_EXAMPLES` to explore further by hand.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.fakes import jpeg_bytes, photo
from pipeline import archives
from pipeline.config import ConfigError, flatten, load_config
from pipeline.errors import PipelineError
from pipeline.images import inspect_image, reencode_as_jpeg
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
bounded = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared CPU makes single examples slow; the example count bounds time
    derandomize=True,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder per example (hypothesis reruns a test body within one `tmp_path`)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


def files_below(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def assert_one_line(message: object) -> None:
    assert isinstance(message, str) and message, message
    assert "Traceback" not in message and "\n" not in message.strip(), message


# --- params.yaml ---------------------------------------------------------------------------

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
PARAM_NAMES = sorted(flatten(PARAMS)) + sorted(PARAMS) + ["trian_cnn", "head.lerning_rate"]
any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 2000), max_size=7),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)


def with_value(params: dict, dotted: str, value: object) -> dict:
    node = params
    *parents, key = dotted.split(".")
    for parent in parents:
        if not isinstance(node.get(parent), dict):
            return params
        node = node[parent]
    node[key] = value
    return params


@bounded
@given(changes=st.lists(st.tuples(st.sampled_from(PARAM_NAMES), any_value), min_size=1, max_size=3))
def test_any_params_value_loads_or_is_named_on_its_own_line(changes) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for name, value in changes:
        params = with_value(params, name, value)
    with sandbox() as folder:
        path = folder / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        try:
            load_config(path)
        except ConfigError as error:
            header, *fields = str(error).splitlines()
            assert header.startswith("params.yaml has ") and fields, str(error)
            assert all(line.startswith("  - ") for line in fields), str(error)


@bounded
@given(text=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_params_file_bytes_load_or_give_one_line(text: bytes) -> None:
    with sandbox() as folder:
        path = folder / "params.yaml"
        path.write_bytes(text)
        try:
            load_config(path)
        except ConfigError as error:
            if not str(error).startswith("params.yaml has "):  # a list of fields, as above
                assert_one_line(str(error))


# --- archives ------------------------------------------------------------------------------

name_part = st.sampled_from(["..", ".", "", "train", "cat.1.jpg", "C:", "\\..\\x", " ", "é"])
member_name = st.lists(name_part | st.text(min_size=1, max_size=6), min_size=1, max_size=4).map(
    "/".join
)
member = st.tuples(
    member_name,
    st.integers(0, 3000),  # bytes of content
    st.sampled_from(["file", "dir", "symlink", "fifo"]),
    st.sampled_from([b"\0", b"ab", bytes(range(256))]),
)


def write_zip(path: Path, members) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, size, kind, unit in members:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" else ""))
            mode = {"file": 0o100644, "dir": 0o040755, "symlink": 0o120777, "fifo": 0o010644}
            info.external_attr = mode[kind] << 16
            zf.writestr(info, b"" if kind == "dir" else (unit * size)[:size])


def write_tar(path: Path, members) -> None:
    kinds = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, size, kind, unit in members:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            info.linkname = "../../etc/passwd" if kind == "symlink" else ""
            data = (unit * size)[:size] if kind == "file" else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def assert_extracts_inside_or_refuses(archive: Path) -> None:
    """Extraction puts files under `target` only, or raises ArchiveError naming the archive."""
    root = archive.parent
    target = root / "deep" / "target"
    before = files_below(root)
    try:
        archives.extract(archive, target)
        archives.extract_nested(target)
    except archives.ArchiveError as error:
        assert_one_line(str(error).splitlines()[0])
    written = {p for p in files_below(root) if p not in before}
    assert all(target in p.parents for p in written), written
    assert files_below(root).get(archive) == before[archive]  # the archive itself untouched


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # repeated names: generated
@bounded
@given(members=st.lists(member, min_size=1, max_size=5), kind=st.sampled_from(["zip", "tar"]))
def test_any_archive_members_extract_inside_or_are_refused(members, kind) -> None:
    with sandbox() as folder:
        archive = folder / f"data.{'zip' if kind == 'zip' else 'tar.gz'}"
        try:
            (write_zip if kind == "zip" else write_tar)(archive, members)
        except (ValueError, OSError, UnicodeError):  # names the writer itself cannot store
            return
        assert_extracts_inside_or_refuses(archive)


@bounded
@given(
    kind=st.sampled_from(["zip", "tar"]),
    cut=st.integers(0, 4000),
    flips=st.lists(st.integers(0, 10**6), max_size=4),
)
def test_a_cut_or_bit_flipped_archive_extracts_inside_or_is_refused(kind, cut, flips) -> None:
    with sandbox() as folder:
        archive = folder / f"data.{'zip' if kind == 'zip' else 'tar.gz'}"
        members = [("train/cat.1.jpg", 900, "file", b"ab"), ("train/dog.1.jpg", 700, "file", b"x")]
        (write_zip if kind == "zip" else write_tar)(archive, members)
        data = bytearray(archive.read_bytes())
        data = data[: len(data) - cut % len(data)] or bytearray(b"P")
        for flip in flips:
            data[flip % len(data)] ^= 1 << (flip % 8)
        archive.write_bytes(bytes(data))
        assert_extracts_inside_or_refuses(archive)


# --- image bytes ---------------------------------------------------------------------------

FORMATS = {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGB", "L", "RGBA", "P"), "GIF": ("P",)}


@functools.cache
def tf_decode():
    import tensorflow as tf

    return lambda data: tf.io.decode_image(data, channels=3, expand_animations=False)


@bounded
@given(
    image_format=st.sampled_from(sorted(FORMATS)),
    mode_index=st.integers(0, 3),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    cut=st.integers(0, 3000),
    flips=st.lists(st.integers(0, 10**6), max_size=3),
)
def test_cut_or_bit_flipped_images_are_named_or_decode_as_training_decodes_them(
    image_format, mode_index, size, cut, flips
) -> None:
    modes = FORMATS[image_format]
    image = photo(0, seed=size[0] * 41 + size[1], size=size).convert(modes[mode_index % len(modes)])
    data = bytearray(jpeg_bytes(image, format=image_format))
    data = data[: len(data) - cut % len(data)]
    for flip in flips:
        if data:
            data[flip % len(data)] ^= 1 << (flip % 8)
    problem, reencode = inspect_image(bytes(data))
    if problem is not None:
        assert_one_line(problem)
        return
    usable = reencode_as_jpeg(bytes(data)) if reencode else bytes(data)
    assert tf_decode()(usable).shape[2] == 3  # what split and predict hand to TensorFlow


# --- predict's arguments -------------------------------------------------------------------

OPTIONS = ["--model", "--out", "--threshold", "--batch-size", "--tta", "--kaggle-submission"]
VALUES = ["photos", "photos/cat.1.jpg", "broken.jpg", "notes.txt", "1.jpg", "out.csv", "x.keras"]
VALUES += ["model.keras", "params.yaml", "missing", "0", "1", "0.5", "-1", "nan", "2", "-"]
token = st.sampled_from(OPTIONS + VALUES) | st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8
)


@pytest.fixture(scope="module")
def predict_folder(tmp_path_factory) -> Path:
    from pipeline.cnn import build_cnn
    from pipeline.precision import for_inference
    from tests.conftest import tiny_config

    folder = tmp_path_factory.mktemp("predict")
    cfg = tiny_config().train_cnn.model_copy(update={"block_filters": [4], "dense_units": []})
    for_inference(build_cnn(cfg)).save(folder / "model.keras")
    (folder / "photos").mkdir()
    (folder / "photos/cat.1.jpg").write_bytes(jpeg_bytes(photo(0, seed=1)))
    (folder / "1.jpg").write_bytes(jpeg_bytes(photo(1, seed=2)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "notes.txt").write_text("notes")
    (folder / "params.yaml").write_text("common: {seed: 1}\n")
    (folder / "x.keras").write_bytes(b"garbage")
    return folder


@bounded
@given(args=st.lists(token, max_size=8), model_first=st.booleans())
def test_any_predict_arguments_work_or_exit_with_one_line(
    args, model_first, predict_folder, monkeypatch, capsys
) -> None:
    from pipeline import predict

    monkeypatch.chdir(predict_folder)
    monkeypatch.setattr(predict, "load_model", cached_load_model(predict.load_model))
    argv = (["--model", "model.keras"] if model_first else []) + args
    before = files_below(predict_folder)
    try:
        predict.main(argv)
        code = None
    except PipelineError as error:  # what process.run prints as one line, with status 1
        code = str(error)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(code, str):
        assert_one_line(code)
    else:
        assert code in (None, 0, 1, 2), code  # 2: argparse's usage error
    changed = {p for p, data in files_below(predict_folder).items() if before.get(p) != data}
    out = argv[argv.index("--out") + 1] if "--out" in argv[:-1] else None
    assert changed <= {(predict_folder / out).resolve()} if out else not changed, changed


@functools.cache
def cached_load_model(load):
    """Loads each model file once for the whole pass: Keras takes a second a load."""
    return functools.cache(load)

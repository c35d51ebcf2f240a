"""The pipeline's one typed config, loaded and validated once from `params.yaml`.

Every stage calls `load_config()` in its `main()` and passes the sections it needs down
explicitly. A bad file fails before any work starts, with one error naming every bad field.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
ImageSize = tuple[Annotated[int, Field(ge=32, le=1024)], Annotated[int, Field(ge=32, le=1024)]]
Optimizer = Literal["adam", "sgd", "rmsprop"]


class ConfigError(PipelineError, ValueError):
    """`params.yaml` is missing, unreadable or holds invalid values."""


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; frozen so no stage edits shared config.
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommonConfig(Section):
    seed: Annotated[int, Field(ge=0, lt=2**31)]


class ComputeConfig(Section):
    """Where the training stages run; `pipeline.devices` resolves `auto` on each machine."""

    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    cache_images: bool = True
    steps_per_execution: PositiveInt = 1


class ModelPaths(Section):
    cnn: Path
    backbone: Path
    head: Path
    transfer: Path
    finetuned: Path


class ReportPaths(Section):
    download: Path
    split: Path
    augment: Path
    train_cnn: Path
    extract_features: Path
    train_head: Path
    finetune: Path
    evaluate: Path
    explain: Path


class PathsConfig(Section):
    raw: Path
    split: Path
    augmented: Path
    features: Path
    augmented_features: Path
    models: ModelPaths
    reports: ReportPaths

    @model_validator(mode="after")
    def _outputs_do_not_overlap(self) -> PathsConfig:
        # A stage replaces its output folder whole: one inside another would be wiped with it.
        named = {name: Path(value) for name, value in flatten(self).items()}
        for name, path in named.items():
            for other, other_path in named.items():
                if name != other and (path == other_path or other_path in path.parents):
                    raise ValueError(f"paths.{name} ({path}) overlaps paths.{other} ({other_path})")
        return self


class FileCheck(Section):
    """What a downloaded file must be, where known: its size in bytes and its SHA-256."""

    size: PositiveInt | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class MirrorConfig(FileCheck):
    url: HttpUrl


class DownloadConfig(Section):
    source: Literal["petimages", "kaggle", "local"]
    local_path: Path | None = None
    kaggle_competition: str
    kaggle_train: FileCheck = FileCheck()  # the competition's train.zip
    petimages: MirrorConfig

    @field_validator("local_path", mode="before")
    @classmethod
    def _path_not_empty(cls, value: Any) -> Any:
        # Path("") is ".", the repository itself, which would then be copied into data/raw.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a .zip, .tar(.gz) or folder, or null")
        return value

    @model_validator(mode="after")
    def _local_source_needs_a_path(self) -> DownloadConfig:
        if self.source == "local" and self.local_path is None:
            raise ValueError(
                "source 'local' needs download.local_path (a .zip, .tar(.gz) or folder)"
            )
        return self


class SplitConfig(Section):
    n: Annotated[int, Field(ge=4)] | None = None
    validation_fraction: Fraction
    test_fraction: Fraction

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> SplitConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be below 1 to leave images for training"
            )
        return self


class RandomAugmentConfig(Section):
    """Transforms drawn afresh for every image in every epoch, by Keras layers in the model."""

    horizontal_flip: bool
    rotation: Annotated[float, Field(ge=0, le=0.5)]  # fraction of a full turn
    zoom: Annotated[float, Field(ge=0, lt=1)]
    shift: Annotated[float, Field(ge=0, lt=1)]


class AugmentConfig(RandomAugmentConfig):
    """The same transforms, drawn once per variant and stored (stage augment), plus shear."""

    variants: Annotated[int, Field(ge=0, le=20)]
    image_size: ImageSize
    shear: Annotated[float, Field(ge=0, le=1)]
    jpeg_quality: Annotated[int, Field(ge=50, le=100)]


class OptimizerMixin(Section):
    optimizer: Optimizer
    learning_rate: Annotated[float, Field(gt=0, le=1)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    batch_size: PositiveInt
    epochs: PositiveInt
    patience: Annotated[int, Field(ge=0)]


class TrainCnnConfig(OptimizerMixin):
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop"]
    image_size: ImageSize
    stem_filters: Annotated[int, Field(ge=0)]
    block_filters: Annotated[list[PositiveInt], Field(min_length=1, max_length=6)]
    convs_per_block: Annotated[int, Field(ge=1, le=4)]
    residual: bool
    separable: bool
    batch_norm: bool
    top_filters: Annotated[int, Field(ge=0)]
    pooling: Literal["flatten", "average"]
    dense_units: list[PositiveInt]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0, lt=1)]
    schedule: Literal["constant", "cosine"]
    warmup_epochs: Annotated[int, Field(ge=0)]
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)]
    random_augment: RandomAugmentConfig | None
    use_augmented: bool
    batch_norm_recompute_images: Annotated[int, Field(ge=0)]

    @property
    def downsamplings(self) -> int:
        """How many times the network halves height and width: the stem, then each block."""
        return int(self.stem_filters > 0) + len(self.block_filters)

    @model_validator(mode="after")
    def _blocks_fit_the_image(self) -> TrainCnnConfig:
        # Each halving needs a pixel left to pool at the end.
        halvings = self.downsamplings
        if min(self.image_size) < 2**halvings:
            raise ValueError(
                f"a stem and {len(self.block_filters)} blocks halve the image {halvings} "
                f"times: image_size must be at least {2**halvings}x{2**halvings}, "
                f"got {self.image_size[0]}x{self.image_size[1]}"
            )
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainCnnConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})"
            )
        return self


# The smallest input each `keras.applications` backbone accepts (height and width).
BACKBONE_MIN_SIZE = {
    "vgg16": 32,
    "resnet50": 32,
    "mobilenet_v2": 32,
    "efficientnet_b0": 32,
    "xception": 71,
}
Backbone = Literal["vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "xception"]


class FeaturesConfig(Section):
    backbone: Backbone
    weights: str
    image_size: ImageSize
    pooling: Literal["flatten", "avg"]
    batch_size: PositiveInt
    include_augmented: bool
    dtype: Literal["float16", "float32"]
    compress: bool

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        if not value.endswith(".h5"):
            raise ValueError("must be 'imagenet', 'none' or a path to a .h5 / .weights.h5 file")
        return value

    @model_validator(mode="after")
    def _size_fits_the_backbone(self) -> FeaturesConfig:
        smallest = BACKBONE_MIN_SIZE[self.backbone]
        if min(self.image_size) < smallest:
            raise ValueError(
                f"{self.backbone} needs image_size of at least {smallest}x{smallest}, "
                f"got {self.image_size[0]}x{self.image_size[1]}"
            )
        return self


class HeadConfig(OptimizerMixin):
    units: PositiveInt
    dropout: Annotated[float, Field(ge=0, lt=1)]


class FinetuneConfig(OptimizerMixin):
    enabled: bool
    unfreeze_layers: Annotated[int, Field(ge=0, le=50)]
    use_augmented: bool


class EvaluateConfig(Section):
    threshold: Fraction
    batch_size: PositiveInt
    tta: bool


class Config(Section):
    common: CommonConfig
    compute: ComputeConfig
    paths: PathsConfig
    download: DownloadConfig
    split: SplitConfig
    augment: AugmentConfig
    train_cnn: TrainCnnConfig
    features: FeaturesConfig
    head: HeadConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys `Config` accepts in the mapping at `loc` (empty where `loc` is not a section)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        # `RandomAugmentConfig | None` and the like: the section is the union's model.
        models = [field.annotation, *typing.get_args(field.annotation)]
        model = next((t for t in models if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _unknown_key_message(loc: tuple[int | str, ...]) -> str:
    closest = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1)
    return f"unknown key (a typo of {closest[0]}?)" if closest else "unknown key (a typo?)"


def format_validation_error(error: ValidationError) -> str:
    lines = [f"params.yaml has {error.error_count()} invalid value(s):"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = _unknown_key_message(item["loc"])
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any) -> Config:
    """Validates a mapping shaped like `params.yaml`."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: Path = PARAMS_FILE) -> Config:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
    return parse_config(raw)


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what and where, without its quote of the text."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return " ".join(f"{getattr(error, 'problem', None) or error}{where}".split())


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"head": {"units": 256}}` -> `{"head.units": 256}`, the names MLflow and DVC show."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat

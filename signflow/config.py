"""One typed config for the whole pipeline, parsed from `params.yaml`.

Every hyperparameter lives in `params.yaml`, and only there: no field here has a default, so a key
missing from a user's params file is an error naming it, never a silent change of recipe (a test
checks that every field is required). This module only says what is allowed. Unknown keys and
wrong types fail at load time with the key's full path (`train.lr: ...`).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from signflow._images import PILLOW_PIXEL_LIMIT
from signflow.errors import SignflowError

__all__ = [
    "AugmentConfig",
    "CiConfig",
    "ConfigError",
    "EvaluateConfig",
    "ExportConfig",
    "ExtractConfig",
    "NOT_OVERRIDABLE",
    "OVERRIDABLE_SECTIONS",
    "Params",
    "PruningConfig",
    "RENAMED_SECTIONS",
    "RegisterConfig",
    "ScheduleConfig",
    "SearchRange",
    "SplitConfig",
    "SweepConfig",
    "TrainConfig",
    "apply_overrides",
    "check_run_overrides",
    "load_params",
    "params_file_in",
    "parse_params",
    "read_params_file",
    "resolve_relative_paths",
]


class ConfigError(SignflowError, ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _float_from_yaml(value: Any) -> Any:
    # PyYAML follows YAML 1.1 and reads `1e-4` (no dot) as a string; accept it as the float it means.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class ExtractConfig(_Section):
    """How the fetched source (`data/source`) becomes the class-folder dataset. Where the source comes
    from is not a param: `data.dvc` records it (`signflow source set`)."""

    sha256: str | None
    """When set, an archive source must have exactly this sha256; None accepts what data.dvc fetched."""
    class_root: str | None
    """Folder inside the source that holds the class folders; None finds it."""
    timeout_s: int = Field(ge=1)
    """Deadline of a flow run's extract task (fetch and extract), retries not included."""
    max_source_bytes: int = Field(ge=1)
    """An archive source larger than this is refused before it is opened."""
    max_extracted_bytes: int = Field(ge=1)
    """An archive whose entries declare more bytes in all is refused before anything is extracted
    (and an entry that writes more than it declares is stopped as it is written)."""
    max_members: int = Field(ge=1)
    """An archive with more entries (files and folders) is refused."""
    max_compression_ratio: float = Field(ge=1)
    """An archive, or an entry over 1 MiB, that expands more than this many times is refused: images
    barely compress, zip bombs expand a thousandfold."""

    _coerce = field_validator("max_compression_ratio", mode="before")(_float_from_yaml)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a 64-character hex sha256 digest, or null")
        return value


class SplitConfig(_Section):
    train: float = Field(gt=0, lt=1)
    valid: float = Field(ge=0, lt=1)
    test: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0, le=2**32 - 1)
    """0 to 2**32 - 1: scikit-learn's random_state (numpy's RandomState) takes no other."""
    strategy: Literal["auto", "folders", "random", "group"]
    """folders: the dataset's own train/valid/test folders (a missing valid or test is carved out of train);
    random: stratified random; group: one split per key of `group_pattern`; auto: folders when the
    dataset ships split folders, else random."""
    group_pattern: str | None
    """For strategy group: a regex searched in each image's path under data/raw; its one capture group is the key."""
    near_duplicates: Literal["group", "report", "off"]
    """group: each cluster of near-identical images lands in one split; report: only count test images with
    a near-duplicate in train (and report accuracy without them); off: do not search."""
    near_duplicate_distance: int = Field(ge=0, le=128)
    """Largest Hamming distance (of 256 bits) between perceptual hashes of two near-duplicates."""
    max_cluster_fraction: float = Field(gt=0, le=1)
    """With near_duplicates: group, a cluster holding more of its class than this stops the split with advice."""
    max_pixels: int = Field(ge=1, le=PILLOW_PIXEL_LIMIT)
    """Images with more pixels are left out (read from the header, before decoding): decoding one
    costs 3 bytes a pixel, several times over. At most Pillow's own decompression-bomb limit."""
    max_aspect_ratio: float = Field(ge=1)
    """Images whose longer side is more than this many times the shorter are left out: the model
    sees only their centre square."""

    _coerce = field_validator("train", "valid", "test", "max_aspect_ratio", "max_cluster_fraction", mode="before")(
        _float_from_yaml
    )

    @field_validator("group_pattern")
    @classmethod
    def _one_capture_group(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            groups = re.compile(value).groups
        except re.error as error:
            raise ValueError(f"{value!r} is not a valid regular expression: {error}") from None
        if groups != 1:
            raise ValueError(
                f"{value!r} has {groups} capture groups; it needs exactly one, the group key "
                r"(e.g. '(signer\d+)'; write other parentheses as (?:...))"
            )
        return value

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.valid + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + valid + test must be 1.0, got {total:g}")
        if self.strategy == "group" and not self.group_pattern:
            raise ValueError("strategy group needs split.group_pattern (a regex with one capture group)")
        return self


class AugmentConfig(_Section):
    enabled: bool
    scale_min: float = Field(gt=0, le=1)
    """Smallest area fraction kept by the random resized crop."""
    hflip: float = Field(ge=0, le=1)
    """Probability of a horizontal flip. Off by default: a mirrored hand can be another sign."""
    color_jitter: float = Field(ge=0, le=1)

    _coerce = field_validator("scale_min", "hflip", "color_jitter", mode="before")(_float_from_yaml)


class TrainConfig(_Section):
    model: str = Field(min_length=1)
    pretrained: bool
    weights_file: str | None
    """Local weights in timm's layout (safetensors or .pth); used instead of the hub when set."""
    trainable_blocks: int | Literal["all"]
    """Trailing parameter groups (timm's group_matcher) that train besides the new head; 0 = head only."""
    image_size: int = Field(ge=32, le=1024)
    batch_size: int = Field(ge=1, le=4096)
    epochs: int = Field(ge=1, le=1000)
    optimizer: Literal["adamw", "adam", "sgd"]
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(ge=0, lt=1)
    """SGD's (Nesterov) momentum; Adam and AdamW ignore it."""
    lr_schedule: Literal["cosine", "constant"]
    """cosine: the learning rate follows a cosine from `lr` down to 0 over `epochs`; constant: it stays at `lr`."""
    weight_decay: float = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    early_stopping_patience: int = Field(ge=0)
    """Stop after this many epochs without a better validation accuracy; 0 = never stop early."""
    seed: int = Field(ge=0, le=2**32 - 1)
    """0 to 2**32 - 1: np.random.seed takes no other."""
    augment: AugmentConfig
    cache_frozen_features: bool
    """Run the frozen layers once per image view and train only the trainable tail (docs/pipeline.md)."""
    inference_batch_size: int = Field(ge=1, le=4096)
    """Images per forward pass where no gradients are needed: frozen-feature caching and validation."""
    cached_views: int = Field(ge=1, le=64)
    """Augmented views of each training image cached when cache_frozen_features is on; epochs cycle
    them (no more views than epochs are computed)."""
    cache_dtype: Literal["float16", "float32"]
    """Number format of the cached frozen features on disk: float16 halves their size (and the I/O)."""
    loader_workers: int = Field(ge=0, le=64)
    """Processes reading training batches from the cache files; 0 reads in the training process."""
    cache_runtime: Literal["auto", "onnxruntime", "torch"]
    """What runs the frozen layers for the cache: auto = ONNX Runtime on the CPU, PyTorch on CUDA."""
    device: Literal["auto", "cpu", "cuda"]
    num_threads: int = Field(ge=0, le=1024)
    """torch intra-op threads; 0 keeps torch's default (one per core). At most 1024, more than any
    current machine's cores: thousands make OpenMP abort the process when it cannot create them. A
    fixed bound, not the core count, so the same params are valid on every machine that loads them."""
    channels_last: bool
    amp: bool
    """bfloat16/float16 autocast on CUDA; ignored on the CPU."""
    resume: bool
    """Continue an interrupted run from its last epoch checkpoint (`<model>.resume`) when params and data match."""

    _coerce = field_validator("lr", "momentum", "weight_decay", "label_smoothing", mode="before")(_float_from_yaml)

    @field_validator("trainable_blocks", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError("must be 0 (head only), a positive number of blocks, or 'all'")
        return value


class EvaluateConfig(_Section):
    batch_size: int = Field(ge=1, le=4096)
    gallery_size: int = Field(ge=0, le=200)
    """How many of the most confident mistakes `mistakes.png` shows."""
    calibration_bins: int = Field(ge=2, le=100)
    """Equal-width confidence bins for the reliability diagram and the ECE."""


class ExportConfig(_Section):
    opset: int = Field(ge=9, le=23)
    """ONNX opset of the exported model."""
    tolerance: float = Field(gt=0, le=1)
    """Largest |ONNX Runtime - PyTorch| logit difference accepted; export fails above it."""
    int8: bool
    """Also write an int8 model beside the ONNX file (static quantization calibrated on valid images)."""
    int8_max_accuracy_drop: float = Field(ge=0, le=1)
    """The int8 model is kept only if its test accuracy is at most this below the float model's."""
    int8_calibration_images: int = Field(ge=1, le=100_000)
    """Validation images the activation ranges are calibrated on (fewer if the split has fewer)."""

    _coerce = field_validator("tolerance", "int8_max_accuracy_drop", mode="before")(_float_from_yaml)


class RegisterConfig(_Section):
    model_name: str = Field(min_length=1)
    """Registered-model name in the MLflow registry."""
    tracking_uri: str
    """Used unless MLFLOW_TRACKING_URI is set in the environment."""
    experiment: str
    min_accuracy: float = Field(ge=0, le=1)
    """The `champion` alias only moves to a model whose test accuracy reaches this gate."""

    _coerce = field_validator("min_accuracy", mode="before")(_float_from_yaml)


class ScheduleConfig(_Section):
    """How `python -m flows.serve` and `signflow deploy` schedule the pipeline on a Prefect server (not a
    hyperparameter: no DVC stage reads this section)."""

    deployment: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Deployment name; the UI shows it as `signflow-pipeline/<deployment>`."""
    cron: str | None
    """Cron expression (5 fields), or null to use `interval_s`."""
    interval_s: int | None = Field(ge=60)
    timezone: str
    concurrency_limit: int = Field(ge=1, le=16)
    """Runs of the deployment at once; 1 keeps two runs from sharing the workspace."""
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"]
    """What a run that would exceed the limit does: wait for the running one, or be cancelled."""
    work_pool: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """The Prefect work pool `signflow deploy` deploys to and `signflow worker` takes runs from."""
    heartbeat_s: int = Field(ge=30, le=3600)
    """A run on a work pool reports every this many seconds; one silent for 3 beats (its worker died)
    is marked Crashed."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        # The field count here; Prefect checks each field when the deployment is built (flows/serve.py).
        if value is not None and len(value.split()) not in (5, 6):
            raise ValueError(f"{value!r} is not a cron expression (5 fields, e.g. '0 3 * * *' = daily at 03:00)")
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> ScheduleConfig:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("set exactly one of schedule.cron and schedule.interval_s (the other to null)")
        return self


class SearchRange(_Section):
    """A numeric range for `sweep.space`: whole numbers when `low` and `high` both are, else floats."""

    low: float | int
    high: float | int
    log: bool
    """Sample on a log scale (learning rates): needs `low` above 0."""

    _coerce = field_validator("low", "high", mode="before")(_float_from_yaml)

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low above 0 (got {self.low})")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class PruningConfig(_Section):
    """Optuna's MedianPruner on each epoch's validation accuracy: a trial below the median of the
    earlier trials at the same epoch stops there."""

    startup_trials: int = Field(ge=0)
    """Trials that are never pruned, so the median has something to stand on."""
    warmup_epochs: int = Field(ge=0)
    """Epochs of every trial that are never pruned (the first epochs are noisy)."""


def _train_keys_only(values: dict[str, Any]) -> dict[str, Any]:
    if not values:
        raise ValueError("name at least one train.* key and its values")
    for key, choices in values.items():
        if not key.startswith("train.") or key == "train.":
            raise ValueError(f"{key!r}: a sweep varies train.* keys only (all trials share one split)")
        if isinstance(choices, list) and not choices:
            raise ValueError(f"{key!r}: give at least one value")
    return values


class SweepConfig(_Section):
    """`signflow sweep` / `python -m flows.sweep`: the train params to try, how, and the budget."""

    method: Literal["grid", "optuna"]
    """grid: every combination of `grid`, in order. optuna: `max_trials` trials drawn from `space` by
    Optuna's TPE sampler (seeded by `seed`), hopeless ones pruned after an epoch (`pruning`)."""
    grid: dict[str, list[Any]]
    """Dotted `train.*` keys and the values to try; every combination is a trial, in order."""
    space: dict[str, SearchRange | list[Any]]
    """Dotted `train.*` keys and their search range ({low, high, log}) or list of choices (optuna)."""
    seed: int
    """Seeds the TPE sampler: the same seed, space and split draw the same trials (one worker)."""
    random_trials: int = Field(ge=1)
    """optuna: trials drawn at random before TPE starts to model the results."""
    pruning: PruningConfig
    max_trials: int = Field(ge=1, le=1000)
    max_minutes: float = Field(gt=0)
    """No trial starts after this many minutes (the first always runs); running ones finish."""
    workers: int = Field(ge=1, le=64)
    """Trials at once in the Prefect flow: above 1, a local Dask cluster of this many single-threaded
    worker processes (torch threads per trial: cores / workers)."""
    dask_address: str | None
    """An existing Dask scheduler (`tcp://host:8786`) whose workers run the flow's trials; the
    SIGNFLOW_DASK_ADDRESS environment variable wins over it. No credentials here: params.yaml is committed."""

    _coerce = field_validator("max_minutes", mode="before")(_float_from_yaml)

    @field_validator("grid")
    @classmethod
    def _grid_train_keys_only(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _train_keys_only(grid)

    @field_validator("space")
    @classmethod
    def _space_train_keys_only(cls, space: dict[str, Any]) -> dict[str, Any]:
        return _train_keys_only(space)

    @field_validator("dask_address")
    @classmethod
    def _no_credentials(cls, address: str | None) -> str | None:
        from signflow._redact import url_credentials

        if address and url_credentials(address):
            raise ValueError("holds credentials; params.yaml is committed: set SIGNFLOW_DASK_ADDRESS instead")
        return address


class CiConfig(_Section):
    """The gates `signflow ci` holds a change to (not a hyperparameter: no DVC stage reads this section).
    The base revision's values apply, so a change cannot loosen its own gates."""

    max_accuracy_drop: float = Field(ge=0, le=1)
    """The change fails when its test accuracy is more than this below the base revision's, both
    scored on the same test images."""
    max_test_near_duplicate_fraction: float = Field(ge=0, le=1)
    """The change fails when a larger share of its test images have a near-duplicate in train (or when
    the split did not look for them)."""

    _coerce = field_validator("max_accuracy_drop", "max_test_near_duplicate_fraction", mode="before")(_float_from_yaml)


# BaseModel inherits ABC's `register` method; the params section of that name is meant to shadow it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)

    class Params(_Section):
        extract: ExtractConfig
        split: SplitConfig
        train: TrainConfig
        evaluate: EvaluateConfig
        export: ExportConfig
        # Without an explicit Field(), pydantic takes the inherited method as this field's default.
        register: RegisterConfig = Field()
        schedule: ScheduleConfig
        sweep: SweepConfig
        ci: CiConfig


RENAMED_SECTIONS = {"download": "extract"}
"""Old params sections and their new names: a params file that still uses one is told the new name."""


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden" and key in RENAMED_SECTIONS:
            message = f"this section is now called {RENAMED_SECTIONS[key]!r}: rename it in the params file"
        elif item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        elif item["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key by its full path."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


OVERRIDABLE_SECTIONS = ("train", "evaluate")
"""What one run may change (`overrides` of a Prefect run, `--set`): training and evaluation
hyperparameters. Where the data comes from and goes (extract.*, register.*, ...) is changed in
params.yaml only, which git and DVC track: a Prefect server has no authentication by default, and
anyone who can reach it can start a run."""
NOT_OVERRIDABLE = ("train.weights_file",)
"""A path on the machine that runs the flow, not a hyperparameter."""


def check_run_overrides(overrides: dict[str, Any]) -> None:
    """Refuse an override outside the allow-list (OVERRIDABLE_SECTIONS), naming the key."""
    for key in overrides:
        section, _, rest = str(key).partition(".")
        if section not in OVERRIDABLE_SECTIONS or not rest or key in NOT_OVERRIDABLE:
            allowed = ", ".join(f"{name}.*" for name in OVERRIDABLE_SECTIONS)
            raise ConfigError(
                f"override {key!r} is not allowed: a run may override only {allowed} keys (not "
                f"{', '.join(NOT_OVERRIDABLE)}); change other settings in params.yaml"
            )


def params_file_in(project_root: Path, params_path: str | Path) -> Path:
    """`params_path` under `project_root`; refused when absolute or outside the project (a run
    parameter must not point the flow at another file on the machine)."""
    relative = Path(params_path)
    inside = (project_root / relative).resolve()
    if relative.is_absolute() or not inside.is_relative_to(project_root.resolve()):
        raise ConfigError(f"params file {str(params_path)!r}: must be a path relative to the project, inside it")
    return inside


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys (`train.epochs`) replaced; the key must exist."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: no section {part!r} in params")
            node = node[part]
        node[parts[-1]] = value
    return result


def read_params_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (extract, split, train, ...)")
    return raw


def _is_relative_local(url: str) -> bool:
    return "://" not in url and not Path(url).expanduser().is_absolute()


def resolve_relative_paths(params: Params, base_dir: Path) -> Params:
    """Relative local paths in params (weights, sqlite registry) are relative to the params file's
    folder, so `dvc repro` and a flow started from another folder read the same files."""
    base_dir = base_dir.resolve()
    train, register = params.train, params.register
    if train.weights_file and _is_relative_local(train.weights_file):
        train = train.model_copy(update={"weights_file": str(base_dir / train.weights_file)})
    database = register.tracking_uri.removeprefix("sqlite:///")
    if register.tracking_uri.startswith("sqlite:///") and not Path(database).is_absolute():
        register = register.model_copy(update={"tracking_uri": f"sqlite:///{base_dir / database}"})
    return params.model_copy(update={"train": train, "register": register})


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml`, with optional dotted-key overrides (train.* and evaluate.*
    only, see OVERRIDABLE_SECTIONS) applied first."""
    raw = read_params_file(path)
    if overrides:
        check_run_overrides(overrides)
        raw = apply_overrides(raw, overrides)
    return resolve_relative_paths(parse_params(raw, source=str(path)), Path(path).parent)

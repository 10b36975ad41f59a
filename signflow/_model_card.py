"""The model card: one markdown page that says what a registered model is, how it was made, how
well it does and what it must not be used for. Written next to the model by the register step and
attached to the MLflow model version as its description."""

from __future__ import annotations

from typing import Any

import yaml

from signflow._markdown import calibration_rows, has_validation, near_duplicate_rows
from signflow._model_file import ModelBundle
from signflow.split_files import test_split_description


def _split_counts(split_report: dict[str, Any]) -> str:
    counts = split_report.get("counts", {})
    excluded = split_report.get("excluded", [])
    total = sum(counts.values())
    parts = ", ".join(f"{name} {count}" for name, count in counts.items())
    return f"{total} usable images ({parts}); {len(excluded)} file(s) left out (unreadable or duplicates)"


def render_model_card(
    bundle: ModelBundle,
    metrics: dict[str, Any],
    params: dict[str, Any],
    split_report: dict[str, Any],
    registration: dict[str, Any],
) -> str:
    """Markdown for the card; `registration` holds model_name, version, data_version, data_source, git_commit."""
    sections = [
        [f"# Model card: {registration['model_name']} version {registration['version']}", ""],
        _what_it_is(bundle, params["train"]),
        _how_to_use(registration),
        _data(split_report, registration, bundle.summary),
        _metrics(metrics, bundle.summary),
        [
            "## Training parameters",
            "```yaml",
            yaml.safe_dump({"train": params["train"]}, sort_keys=False).rstrip(),
            "```",
            "",
        ],
        _intended_use(),
        _known_limits(params["train"], split_report),
    ]
    return "\n".join(line for section in sections for line in section)


def _what_it_is(bundle: ModelBundle, train: dict[str, Any]) -> list[str]:
    prep = bundle.preprocessing
    return [
        "## What it is",
        f"An image classifier over {len(bundle.class_names)} classes: a timm `{bundle.model_name}` fine-tuned "
        f"from {'ImageNet weights' if train.get('pretrained') else 'random initialisation'} with a new "
        f"classification head (trainable blocks: {train.get('trainable_blocks')}).",
        "",
        f"Classes, in output order: {', '.join(f'`{name}`' for name in bundle.class_names)}.",
        "",
        f"Input: any image, EXIF-rotated, converted to RGB, shorter side resized to {prep.image_size} px "
        f"({prep.interpolation}) and centre-cropped, normalised with mean {list(prep.mean)} and std {list(prep.std)}. "
        "These settings are stored in the model file and applied by `signflow predict` and the MLflow model.",
        "",
    ]


def _how_to_use(registration: dict[str, Any]) -> list[str]:
    name, version = registration["model_name"], registration["version"]
    return [
        "## How to use it",
        f"- `signflow predict --model {version} photo.jpg` prints the top 3 classes of each image.",
        f'- `mlflow.pyfunc.load_model("models:/{name}/{version}")`, with `MLFLOW_TRACKING_URI` set to this registry, '
        "loads it in Python (ONNX Runtime, no PyTorch); its `predict` takes a DataFrame with a column `image` of "
        "image file bytes or base64 strings.",
        f"- `mlflow models serve -m models:/{name}/{version} --env-manager local` serves it over HTTP: POST the "
        "version's `serving_input_example.json` to `/invocations`.",
        f"- `signflow serve --model {version}` opens a web page that classifies what your camera sees.",
        "",
    ]


def _data(split_report: dict[str, Any], registration: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    kept = (
        "The checkpoint kept is the epoch with the best validation accuracy"
        if has_validation(summary)
        else "There was no validation split (split.valid: 0): the checkpoint kept is the last epoch"
    )
    return [
        "## Data",
        f"- Source (data.dvc): `{registration.get('data_source', 'unrecorded')}`",
        f"- Data version (DVC md5 of the fetched source, from data.dvc): `{registration['data_version']}`",
        f"- Code version (git commit): `{registration['git_commit']}`",
        f"- {_split_counts(split_report)}.",
        f"- Split: {_split_description(split_report)} Identical files are kept once (never in two splits).",
        f"- {kept}; the test split is used only once, for the figures below.",
        "",
    ]


def _split_description(split_report: dict[str, Any]) -> str:
    description = test_split_description(split_report)
    return description[0].upper() + description[1:] + ("" if description.endswith(".") else ".")


def _metrics(metrics: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    test_images = metrics["test_images"]
    return [
        "## Metrics (test split)",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        f"| test images | {test_images} |",
        *near_duplicate_rows(metrics),
        f"| mistakes | {metrics.get('mistakes', 'n/a')} |",
        *calibration_rows(metrics),
        _validation_row(summary),
        "",
        f"With {test_images} test images, one mistake moves accuracy by "
        f"{1 / max(test_images, 1):.4f}: treat differences of a few mistakes between models as noise.",
        "",
        *_calibration_note(metrics),
    ]


def _validation_row(summary: dict[str, Any]) -> str:
    epoch = summary.get("best_epoch", "?")
    if not has_validation(summary):
        return f"| validation accuracy | none: no validation split (last epoch, {epoch}, kept) |"
    return f"| validation accuracy (epoch {epoch}) | {summary.get('valid_accuracy', float('nan')):.4f} |"


def _calibration_note(metrics: dict[str, Any]) -> list[str]:
    if "temperature" not in metrics:
        return []
    if metrics["temperature"] == 1.0:
        return [
            "Probabilities are not calibrated: no temperature was fitted (there was no validation split to fit "
            "it on), so they are the model's plain softmax. Treat them as scores, not as probabilities.",
            "",
        ]
    return [
        f"Probabilities are calibrated: the logits are divided by a temperature of {metrics['temperature']:.4f}, "
        "fitted on the validation split after training (temperature scaling), in the model file, the ONNX graph "
        "and the MLflow model alike. This changes the probabilities, never the predicted class.",
        "",
    ]


def _intended_use() -> list[str]:
    return [
        "## Intended use",
        "Recognising the classes above in photos that look like the training data (for the reference dataset: "
        "one hand showing a digit of Turkish Sign Language, close up, on a plain light background). For "
        "teaching, prototyping and as a baseline to compare other models against.",
        "",
    ]


def _known_limits(train: dict[str, Any], split_report: dict[str, Any]) -> list[str]:
    smallest = min((min(v.values()) for v in split_report.get("per_class", {}).values() if v), default=0)
    lines = [
        "## Known limits",
        "- It always answers with one of the classes above, even for images of something else; it has no "
        "'none of these' output. Low top-1 probability is a hint, not a guarantee (see the calibration figure "
        "in the evaluation report).",
        f"- It was trained on {sum(split_report.get('counts', {}).values())} images"
        f" (the smallest class has {smallest} in one split): backgrounds, lighting, skin tones, hands and "
        "cameras absent from them can lower accuracy in ways the test split cannot show.",
    ]
    if not train.get("augment", {}).get("hflip"):
        lines.append("- Mirrored images (the other hand) may be read as another class; training did not flip images.")
    lines += ["- Not for decisions about people or safety without a separate evaluation on the target population.", ""]
    return lines

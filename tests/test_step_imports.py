"""Each small step imports what its work needs and no more: the steps run as separate `signflow <step>`
processes, and an unneeded import is seconds of every `dvc repro` (bench/floors.py measures them)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from signflow.evaluate import compute_metrics, confusion_counts
from tests.helpers import ROOT

NOT_NEEDED = {
    "signflow.cli": ["torch", "numpy", "pandas", "sklearn", "scipy", "mlflow", "onnx", "matplotlib"],
    "signflow.extract": ["torch", "numpy", "pandas", "sklearn", "scipy", "mlflow", "onnx", "matplotlib"],
    # scikit-learn only for a random split (imported there); numpy, pandas, Pillow and scipy do the work
    "signflow.split": ["torch", "sklearn", "mlflow", "onnx", "matplotlib"],
    # the metrics are computed with numpy; mlflow and onnx are the register and export steps'
    "signflow.evaluate": ["sklearn", "scipy", "mlflow", "onnx"],
    "signflow.export": ["sklearn", "scipy", "mlflow", "matplotlib", "pandas"],
    "signflow.register": ["sklearn", "scipy", "matplotlib", "timm"],
}


@pytest.mark.parametrize("module", sorted(NOT_NEEDED))
def test_a_step_module_does_not_import_what_its_step_does_not_need(module):
    code = (
        f"import json, sys; import {module}; print(json.dumps(sorted(set({NOT_NEEDED[module]!r}) & set(sys.modules))))"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(found.stdout) == [], f"{module} imports {found.stdout.strip()}"


@pytest.mark.parametrize("seed", range(20))
def test_the_metrics_are_scikit_learns_to_the_bit(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 12))
    images = int(rng.integers(1, 400))
    labels = rng.integers(0, classes, images)
    # mostly right, some classes never predicted or never present: the zero-division cases
    predicted = np.where(rng.random(images) < 0.8, labels, rng.integers(0, max(1, classes - 2), images))
    if seed % 3 == 0:
        labels = np.where(labels == classes - 1, 0, labels)
    names = [f"c{i}" for i in range(classes)]
    metrics, per_class = compute_metrics(labels, predicted, names)

    indices = list(range(classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=indices, zero_division=0)
    for column, expected in {"precision": precision, "recall": recall, "f1": f1, "support": support}.items():
        assert per_class[column].dtype == expected.dtype
        assert per_class[column].to_numpy().tobytes() == expected.tobytes(), column
    assert metrics["accuracy"] == float(accuracy_score(labels, predicted))
    assert metrics["macro_f1"] == float(f1_score(labels, predicted, labels=indices, average="macro", zero_division=0))
    expected_confusion = confusion_matrix(labels, predicted, labels=indices)
    assert confusion_counts(labels, predicted, classes).dtype == expected_confusion.dtype
    assert np.array_equal(confusion_counts(labels, predicted, classes), expected_confusion)

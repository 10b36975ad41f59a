"""Where each step reads and writes, relative to the project root. `dvc.yaml` names the same paths
(a test checks it), and every CLI command takes an option to change each one.
"""

from pathlib import Path

PARAMS = Path("params.yaml")
RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
MODEL_PATH = Path("models/model.pt")
RECEIPT_PATH = Path("models/registered.json")
ONNX_PATH = Path("models/model.onnx")
MODEL_CARD_PATH = Path("models/model_card.md")
REPORTS_DIR = Path("reports")
TRAIN_LOG = REPORTS_DIR / "train_log.csv"
METRICS_PATH = REPORTS_DIR / "metrics.json"
RUN_LOCK = Path(".signflow-run.lock")
SWEEP_DIR = Path("sweep")

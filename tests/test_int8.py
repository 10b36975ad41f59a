"""The int8 model the export step writes beside model.onnx, and its accuracy gate."""

import json

import numpy as np
import onnx

from signflow._int8 import int8_path_for
from signflow._onnx import INPUT_NAME, onnx_session
from signflow.export import export_onnx
from tests.helpers import section


def test_int8_model_is_written_beside_the_onnx_file_with_both_models_figures(trained, tmp_path):
    _params, raw, split, _ = trained
    onnx_path = tmp_path / "models" / "model.onnx"
    onnx_path.parent.mkdir()
    result = export_onnx(section("export", int8_max_accuracy_drop=1.0), tmp_path / "model.pt", onnx_path, raw, split)
    int8_path = onnx_path.with_name("model.int8.onnx")
    assert int8_path_for(onnx_path) == int8_path and int8_path.is_file()
    assert result.int8.kept and "int8 kept" in result.summary_line()
    graph = onnx.load(str(int8_path))
    assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node)  # QDQ, really quantized
    meta = {entry.key: entry.value for entry in graph.metadata_props}
    assert json.loads(meta["signflow.class_names"]) == ["alpha", "beta", "gamma ü"]
    figures = json.loads(onnx_path.with_name("export.json").read_text())
    assert figures["int8_kept"] is True
    assert (
        figures["int8"]["bytes"] == int8_path.stat().st_size and figures["float"]["bytes"] == onnx_path.stat().st_size
    )
    assert 0 <= figures["int8"]["test_accuracy"] <= 1 and figures["float"]["latency_ms"] > 0
    image = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert onnx_session(int8_path).run(None, {INPUT_NAME: image})[0].shape == (2, 3)


def test_int8_model_scoring_below_the_float_one_is_removed_and_the_report_says_why(trained, tmp_path, monkeypatch):
    """An honest gate failure: the tiny model's int8 twin made to lose test images (its calibration
    ranges squeezed to almost nothing), with no drop allowed."""
    import signflow._int8 as int8

    _params, raw, split, _ = trained
    onnx_path = tmp_path / "model.onnx"
    onnx_path.with_name("model.int8.onnx").write_bytes(b"stale int8 file of other weights")
    real_batches = int8.normalised_batches
    monkeypatch.setattr(int8, "_CalibrationReader", lambda paths, prep: _Squeezed(real_batches(paths, prep)))
    result = export_onnx(section("export", int8_max_accuracy_drop=0.0), tmp_path / "model.pt", onnx_path, raw, split)
    assert not onnx_path.with_name("model.int8.onnx").exists()
    assert result.int8.int8_model.test_accuracy < result.int8.float_model.test_accuracy
    assert "int8 removed" in result.int8.reason and "below the float model" in result.int8.reason
    assert json.loads(onnx_path.with_name("export.json").read_text())["int8_kept"] is False


class _Squeezed:
    """Calibration images scaled down 1000x: every activation range becomes tiny, so int8 saturates."""

    def __init__(self, batches):
        self.images = (image[None] * 1e-3 for batch in batches for image in batch)

    def get_next(self):
        image = next(self.images, None)
        return None if image is None else {INPUT_NAME: image}


def test_without_int8_no_int8_file_is_left_beside_the_onnx_file(trained, tmp_path):
    _params, raw, split, _ = trained
    onnx_path = tmp_path / "model.onnx"
    onnx_path.with_name("model.int8.onnx").write_bytes(b"stale")
    result = export_onnx(section("export", int8=False), tmp_path / "model.pt", onnx_path, raw, split)
    assert result.int8 is None and not onnx_path.with_name("model.int8.onnx").exists()

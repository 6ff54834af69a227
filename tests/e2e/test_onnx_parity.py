"""One torch model, watched by the torch adapter and audited through its ONNX exports (legacy
and dynamo exporters, fp16, ORT-optimised with fused ops): the same layers, thresholds, rows,
dead sets and wiring, so the two reports merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_fixtures import DEAD, MODELS, export, onnx_report, torch_report
from onnxruntime.transformers.float16 import convert_float_to_float16

from neuronwatch import Report

SETTINGS = {"min_rows": 50}
PLANTED = {"mlp": {"act": DEAD}, "conv": {"relu": [2]}, "encoder": {}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("exports")
    paths: dict[tuple[str, str], Path] = {}
    for key, (cls, batches) in MODELS.items():
        first = batches()[0]
        for exporter in ("legacy", "dynamo"):
            paths[key, exporter] = export(
                cls(), first, folder / f"{key}_{exporter}.onnx", exporter == "dynamo"
            )
        legacy = onnx.load(str(paths[key, "legacy"]))
        half = folder / f"{key}_fp16.onnx"
        onnx.save(convert_float_to_float16(legacy, keep_io_types=True), str(half))
        paths[key, "fp16"] = half
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(folder / f"{key}_ort.onnx")
        ort.InferenceSession(str(paths[key, "legacy"]), options, providers=["CPUExecutionProvider"])
        paths[key, "ort-optimised"] = folder / f"{key}_ort.onnx"
    return paths


@pytest.fixture(scope="module")
def torch_reports() -> dict[str, Report]:
    return {
        key: torch_report(cls(), batches(), **SETTINGS) for key, (cls, batches) in MODELS.items()
    }


VARIANTS = ["legacy", "dynamo", "fp16", "ort-optimised"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("key", list(MODELS))
def test_same_layers_rows_and_dead_sets(
    exports: dict[tuple[str, str], Path], torch_reports: dict[str, Report], key: str, variant: str
) -> None:
    expected = torch_reports[key]
    _, batches = MODELS[key]
    got = onnx_report(exports[key, variant], batches(), name=expected.model, **SETTINGS)
    assert list(got.layers) == list(expected.layers)
    for name, want in expected.layers.items():
        have = got.layers[name]
        assert have.config == want.config, name
        assert have.rows == want.rows, name
        assert have.dead_indices.tolist() == want.dead_indices.tolist(), name
        assert have.count("dead") == want.count("dead")
        # fp16 rounds some values across the 1e-3 GELU threshold; fp32 kernels agree exactly.
        tolerance = 2 if variant == "fp16" else 0
        assert np.abs(have.partials.fired - want.partials.fired).max() <= tolerance, name
        np.testing.assert_allclose(
            have.partials.abs_sum, want.partials.abs_sum, rtol=1e-2 if variant == "fp16" else 1e-4
        )
    for name, dead in PLANTED[key].items():
        assert got.layers[name].dead_indices.tolist() == dead


@pytest.mark.parametrize("variant", ["legacy", "dynamo", "ort-optimised"])
@pytest.mark.parametrize("key", list(MODELS))
def test_torch_and_onnx_reports_merge(
    exports: dict[tuple[str, str], Path], torch_reports: dict[str, Report], key: str, variant: str
) -> None:
    expected = torch_reports[key]
    _, batches = MODELS[key]
    got = onnx_report(exports[key, variant], batches(), name=expected.model, **SETTINGS)
    assert dict(got.wiring) == dict(expected.wiring)
    merged = expected.merged(got)
    for name, stats in merged.layers.items():
        assert stats.rows == 2 * expected.layers[name].rows
        np.testing.assert_array_equal(
            stats.partials.histogram, 2 * expected.layers[name].partials.histogram
        )


def test_the_dynamo_export_names_the_model_like_torch(
    exports: dict[tuple[str, str], Path], torch_reports: dict[str, Report]
) -> None:
    _, batches = MODELS["mlp"]
    got = onnx_report(exports["mlp", "dynamo"], batches(), **SETTINGS)
    assert got.model == torch_reports["mlp"].model == "MLP"

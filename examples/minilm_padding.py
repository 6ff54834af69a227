"""Padding is not data: the pretrained MiniLM encoder watched with and without its attention mask.

Same model, same 932 real English sentences (the license texts of Debian's ``base-files``, see
``onnx_minilm.py``), same padded batches of 32: once with pad positions counted as rows
(``mask=None``, what a plain hook sees), once with the forward's ``attention_mask`` leaving
them out (the default). Prints the per-layer figures side by side as a Markdown table::

    python examples/minilm_padding.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_minilm

BATCH, MAX_TOKENS = 32, 128


def main() -> None:
    texts = onnx_minilm.sentences()
    data = list(onnx_minilm.batches(texts, BATCH, MAX_TOKENS))
    tokens = sum(int(feed["attention_mask"].sum()) for feed in data)
    positions = sum(feed["attention_mask"].size for feed in data)
    settings = {"compile": False, "min_rows": 100}
    padded = onnx_minilm.torch_report(data, mask=None, **settings)
    real = onnx_minilm.torch_report(data, **settings)
    print(
        f"{len(texts)} sentences in {len(data)} padded batches of {BATCH}: {positions} positions, "
        f"{tokens} real tokens, {positions - tokens} pad positions"
    )
    print("| layer | rows (pads counted / left out) | leaking | dormant | asleep | mean \\|a\\| |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, after in real.layers.items():
        before = padded.layers[name]
        cells = [
            f"{before.count(state)} / {after.count(state)}"
            for state in ("leaking", "dormant", "asleep")
        ]
        mean = f"{before.mean_abs.mean():.4f} / {after.mean_abs.mean():.4f}"
        print(f"| {name} | {before.rows} / {after.rows} | {' | '.join(cells)} | {mean} |")


if __name__ == "__main__":
    main()

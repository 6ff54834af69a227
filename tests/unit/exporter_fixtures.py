"""Engines with planted neuron states, shared by the exporter and alert tests."""

from __future__ import annotations

import numpy as np

from neuronwatch import Engine, Monitor, ParamRef, Wiring

ROWS = 100  # rows per observation; min_rows is 50, so one observation judges every neuron
# fc1 (ReLU, 8 neurons): 0, 1, 2 never fire (dead); 3 fires on 2 rows of 100 (asleep).
# fc2 (LeakyReLU, 6 neurons): 0 never fires (leaking).
# out (Tanh, 4 neurons): 0 sits at -1 on every row (saturated, and dead: no gradient).
FC1_DEAD = [0, 1, 2]
FC1_ASLEEP = [3]
FC2_LEAKING = [0]
OUT_SATURATED = [0]


def planted_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    fc1 = rng.uniform(0.5, 1.5, size=(ROWS, 8))
    fc1[:, FC1_DEAD] = 0.0
    fc1[:, FC1_ASLEEP] = 0.0
    fc1[:2, FC1_ASLEEP] = 1.0
    fc2 = rng.uniform(0.5, 1.5, size=(ROWS, 6))
    fc2[:, FC2_LEAKING] = -0.01
    out = rng.uniform(-0.5, 0.5, size=(ROWS, 4))
    out[:, OUT_SATURATED] = -1.0
    return {"fc1.act": fc1, "fc2.act": fc2, "out.act": out}


def planted_engine(model: str = "mlp", wired: bool = True) -> Engine:
    engine = Engine(model, min_rows=50)
    engine.add_layer("fc1.act", "ReLU")
    engine.add_layer("fc2.act", "LeakyReLU")
    engine.add_layer("out.act", "Tanh")
    if wired:
        engine.set_wiring(
            "fc1.act",
            Wiring(
                producer="fc1",
                consumer="fc2",
                produces=(ParamRef("fc1.weight", (8, 4), 0), ParamRef("fc1.bias", (8,), 0)),
                consumes=(ParamRef("fc2.weight", (6, 8), 1),),
            ),
        )
    return engine


def feed(engine: Engine, rng: np.random.Generator) -> None:
    for layer, array in planted_batch(rng).items():
        engine.observe(layer, array)


def planted_monitor(steps: int = 3, windows: int = 1, model: str = "mlp") -> Monitor:
    """A monitor whose engine saw ``steps`` planted batches per window, ``windows`` windows
    closed, and one more batch in the current window."""
    engine = planted_engine(model)
    monitor = Monitor(engine, flush_every=1)
    rng = np.random.default_rng(0)
    for _ in range(windows):
        for _ in range(steps):
            feed(engine, rng)
            monitor.step()
        monitor.rollover()
    feed(engine, rng)
    monitor.step()
    return monitor

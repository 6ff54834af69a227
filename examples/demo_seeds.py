"""The demo's contrast for seeds 0-9: ReLU dead share per layer, LeakyReLU dead and leaking.

    python examples/demo_seeds.py

Prints the Markdown table the README quotes. Needs: pip install 'neuronwatch[demo]'.
"""

from __future__ import annotations

from neuronwatch import demo


def main() -> None:
    data = demo.load_data()
    layers = [f"act{i}" for i in range(1, demo.HIDDEN_LAYERS + 1)]
    print(
        "| seed | ReLU dead, per layer (%) | ReLU dead | ReLU acc. "
        "| LeakyReLU dead | LeakyReLU leaking | LeakyReLU acc. |"
    )
    print("|---|---|---|---|---|---|---|")
    for seed in range(10):
        relu = demo.train("relu", seed=seed, data=data)
        leaky = demo.train("leaky_relu", seed=seed, data=data)
        per_layer = " / ".join(f"{100 * relu.report.layers[n].ratio('dead'):.0f}" for n in layers)
        print(
            f"| {seed} | {per_layer} | {100 * relu.report.ratio('dead'):.1f} % "
            f"| {100 * relu.test_accuracy:.1f} % | {leaky.report.count('dead')} "
            f"| {100 * leaky.report.ratio('leaking'):.1f} % | {100 * leaky.test_accuracy:.1f} % |"
        )


if __name__ == "__main__":
    main()

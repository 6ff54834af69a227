"""Watch a small PyTorch model train and save a report (copy this into your training loop)."""

import torch

import neuronwatch

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
with neuronwatch.watch(model, name="example-mlp", window=50, min_rows=1000) as monitor:
    for _ in range(200):
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step()  # flushes every 10 steps, closes a window every 50
    report = monitor.report()  # the last complete window
print(report.save("neuronwatch-example"), report.count("dead"), "dead of", report.neurons)

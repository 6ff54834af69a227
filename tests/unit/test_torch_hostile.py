"""What a hostile user found, kept found: interrupted forwards, pools and norms between a conv and
its activation, servers warming up on many threads, models used through their own methods,
encoder-decoder masks, functional activations, name collisions, tracing."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch_models import never_fired  # noqa: E402

import neuronwatch  # noqa: E402


def function_modes() -> int:
    return len(torch.overrides._get_current_function_mode_stack())


# -- interrupted forwards -------------------------------------------------------------------------


class Interruptible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.out = nn.Linear(4, 1)
        self.interrupt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        if self.interrupt:
            raise KeyboardInterrupt  # Ctrl-C in a notebook: a BaseException, not an Exception
        return self.out(h)


@pytest.mark.parametrize("interrupted", [0, 2])
def test_a_forward_cut_by_ctrl_c_does_not_stop_the_monitor(interrupted: int) -> None:
    model = Interruptible()
    with neuronwatch.watch(model, min_rows=1) as monitor:  # compile=True: deferred reductions
        for i in range(5):
            model.interrupt = i == interrupted
            with contextlib.suppress(KeyboardInterrupt):
                model(torch.randn(4, 3))
        assert function_modes() == 0  # the traced forward's recorder did not stay pushed
        rows = monitor.report().layers["act"].rows
    # The four completed forwards count; the interrupted one is counted or dropped whole.
    assert rows in (16, 20)


# -- pools, pads and norms between a conv and its activation --------------------------------------


@pytest.mark.parametrize(
    "between",
    [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Upsample(scale_factor=2), nn.ZeroPad2d(1)],
    ids=lambda m: type(m).__name__,
)
def test_channel_preserving_modules_keep_the_channel_axis(between: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 10, 3), between=between, act=nn.ReLU(), head=nn.Conv2d(10, 2, 1)
        )
    )
    with torch.no_grad():
        model.conv.bias[[3, 8]] = -50.0
    captured: list[torch.Tensor] = []
    model.act.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        for _ in range(2):
            model(torch.randn(2, 3, 14, 14))
        act = monitor.report().layers["act"]
    assert act.neurons == 10
    assert act.dead_indices.tolist() == never_fired(torch.cat(captured), 1) == [3, 8]


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm+act: a non-leaf BatchNorm that normalises with F.batch_norm."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training
        )
        return self.act(self.drop(x))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: an nn.LayerNorm subclass over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("norm", ["bnact", "ln2d"])
def test_norms_written_as_functions_keep_the_channel_axis(norm: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    if norm == "bnact":
        model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3), bn=BatchNormAct2d(8)))
        act_name = "bn.act"
        with torch.no_grad():
            model.bn.bias[[1, 6]] = -50.0
    else:
        model = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(3, 8, 3), ln=LayerNorm2d(8), act=nn.ReLU())
        )
        act_name = "act"
        with torch.no_grad():
            model.ln.bias[[1, 6]] = -50.0
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        for _ in range(2):
            model(torch.randn(4, 3, 9, 7))
        report = monitor.report()
    act = report.layers[act_name]
    assert act.neurons == 8  # channels, not the width 5
    assert act.rows == 2 * 4 * 7 * 5
    assert act.dead_indices.tolist() == [1, 6]
    report.save(tmp_path)  # the wiring agrees with 8 neurons: saving works


def test_inputs_of_a_conv_use_its_channels() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3)
            self.conv2 = nn.Conv2d(6, 2, 1)
            with torch.no_grad():
                self.conv1.bias[[0, 4]] = -50.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))

    model = Net()
    with neuronwatch.watch(model, inputs=["conv2"], compile=False, min_rows=10) as monitor:
        model(torch.randn(4, 3, 16, 16))
        layer = monitor.report().layers["conv2:input"]
    assert layer.neurons == 6
    assert layer.rows == 4 * 7 * 7
    assert layer.dead_indices.tolist() == [0, 4]


# -- many threads, one model ----------------------------------------------------------------------


def test_a_server_warming_up_on_many_threads_gets_the_right_axis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8), act=nn.ReLU(), conv2=nn.Conv2d(8, 6, 3)
        )
    ).eval()
    with torch.no_grad():
        model.bn.bias[3] = -50.0
    start = threading.Barrier(4)
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:

        def serve() -> None:
            start.wait()
            with torch.inference_mode():
                for _ in range(3):
                    model(torch.randn(2, 3, 8, 7))

        threads = [threading.Thread(target=serve) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        act = monitor.report().layers["act"]
    assert act.neurons == 8
    assert act.dead_indices.tolist() == [3]
    assert act.rows % (2 * 6 * 5) == 0  # whole forwards only
    assert 2 * 6 * 5 <= act.rows <= 12 * 2 * 6 * 5


def test_pausing_in_two_threads_never_pauses_for_good() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(2, 3), act=nn.ReLU()))
    monitor = neuronwatch.watch(model, compile=False, min_rows=1)
    inside = threading.Barrier(2)

    def evaluate() -> None:
        with monitor.paused():
            inside.wait()
            model(torch.randn(1, 2))
            inside.wait()

    threads = [threading.Thread(target=evaluate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert monitor.watching
    model(torch.randn(5, 2))
    monitor.close()
    assert monitor.report().layers["act"].rows == 5  # paused forwards: none; after: all


# -- models used through their own methods --------------------------------------------------------


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 5), nn.ReLU())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x).sum(-1)


@pytest.mark.parametrize("call", ["embed", "forward", "__call__"])
def test_every_counts_calls_of_the_method_not_of_its_submodules(call: str) -> None:
    model = Embedder()
    with neuronwatch.watch(model, compile=False, every=2, min_rows=1) as monitor:
        for _ in range(8):
            getattr(model, call)(torch.randn(5, 4))
        rows = {name: stats.rows for name, stats in monitor.report().layers.items()}
    assert rows == {"body.1": 20, "head.1": 20}  # 4 of the 8 calls, both layers
    assert "embed" not in vars(model)  # the method wrapper is gone


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc2.bias[:] = -50.0  # every neuron dead at the second call only

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_call_sites_of_a_method_call_are_numbered_in_that_call() -> None:
    model = Shared()
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        for _ in range(3):
            model.encode(torch.randn(5, 3))
        layers = monitor.report().layers
    assert layers["act"].rows == layers["act#2"].rows == 15
    assert layers["act#2"].count("dead") == 8
    assert layers["act"].count("dead") < 8


# -- masks of encoder-decoder models and wrappers -------------------------------------------------


class Stack(nn.Module):
    """A token-wise stack taking its own mask (T5's encoder and decoder stacks do)."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.embed.weight.fill_(1.0)
            self.fc.weight.fill_(1.0)
            self.fc.bias.fill_(bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.act(self.fc(self.embed(input_ids)))


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Stack(0.0)
        self.decoder = Stack(0.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoded = self.encoder(input_ids, attention_mask=attention_mask)
        decoded = self.decoder(decoder_input_ids, attention_mask=decoder_attention_mask)
        return encoded.sum() + decoded.sum()


def test_the_encoder_mask_stays_in_the_encoder() -> None:
    model = Seq2Seq()
    ids = torch.ones(2, 6, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        model(ids, mask, ids)  # the decoder has as many positions as the encoder
        layers = monitor.report().layers
    assert layers["encoder.act"].rows == 10  # its 2 pad positions left out
    assert layers["decoder.act"].rows == 12  # no decoder mask: every position counts


class Wrapper(nn.Module):
    """The Lightning / custom-head shape: forward takes the tokenizer's batch dict."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Stack(0.0)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**batch).sum()


def test_a_wrapped_encoder_takes_its_own_mask() -> None:
    model = Wrapper()
    batch = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]),
    }
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        model(batch)
        assert monitor.report().layers["encoder.act"].rows == 6


# -- functional activations nobody watches --------------------------------------------------------


class SwiGLU(nn.Module):
    """Meta's reference LLaMA feed-forward: w2(silu(w1(x)) * w3(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8)
        self.norm = nn.ReLU()  # one activation module, so the model has something to watch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def test_a_gated_functional_activation_is_named(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="neuronwatch")
    model = SwiGLU()
    with neuronwatch.watch(model, compile=False):
        model(torch.randn(3, 4))
    messages = [r.getMessage() for r in caplog.records if "functional activation" in r.getMessage()]
    assert len(messages) == 1
    assert "SiLU" in messages[0]
    assert "'w1'" in messages[0]
    assert "inputs=[...]" in messages[0]


def test_inputs_watch_a_module_called_with_keywords() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(4, 2)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.dense(hidden_states)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.out = Head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(hidden_states=F.gelu(self.fc(x)))

    model = Net()
    with neuronwatch.watch(model, inputs=["out"], compile=False, min_rows=1) as monitor:
        model(torch.randn(5, 3))
        snapshot = monitor.snapshot()
    assert snapshot.errors == {}
    assert snapshot.layers("lifetime")["out:input"].rows == 5


# -- names, tracing -------------------------------------------------------------------------------


def test_a_module_named_like_a_call_site_is_not_merged_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.acts = nn.ModuleDict({"act": nn.ReLU(), "act#2": nn.ReLU()})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.acts["act"](x)
            return self.acts["act#2"](self.acts["act"](x - 100.0))

    caplog.set_level(logging.WARNING, logger="neuronwatch")
    with neuronwatch.watch(Net(), compile=False, min_rows=1) as monitor:
        monitor.sources[0].model(torch.rand(5, 4))
        layers = monitor.report().layers
    assert layers["acts.act#2"].rows == 5  # the module's own rows only
    assert "acts.act#2" in caplog.text
    assert "per_call_site=False" in caplog.text


def test_jit_tracing_a_watched_model_records_nothing() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 4), act=nn.ReLU()))
    with neuronwatch.watch(model, min_rows=1) as monitor:
        model(torch.randn(2, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            # check_trace=False: the check would run the model once more, eagerly, for real
            torch.jit.trace(model, torch.randn(3, 3), check_trace=False)
        report = monitor.report()
    assert report.layers["act"].rows == 2
    assert monitor.sources[0]._probes[0].sites[0].accumulator.compile  # not switched to eager

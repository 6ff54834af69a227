"""Budgets per state: exactly the planted offenders, at exactly their ratios."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from plots_planted import DEAD, NEURONS, UNKNOWN_LAYER, planted_report

from neuronwatch import ConfigError, Report, ReportError, State
from neuronwatch.gate import BUDGET_STATES, SUMMARY_SCHEMA, Budget, check_budget


def offences(report: Report, budget: Budget) -> list[tuple[str, str, float]]:
    return [(o.layer, o.state.value, o.ratio) for o in check_budget(report, budget).offending]


def test_dead_budget_names_exactly_the_layers_over_it_with_their_ratios() -> None:
    report = planted_report()
    # blocks.1 has 2 of 32 dead (0.0625), blocks.2 has 11 of 32 (0.34375).
    assert offences(report, Budget({"dead": 0.3})) == [("blocks.2.act", "dead", 11 / NEURONS)]
    assert offences(report, Budget({"dead": 0.05})) == [
        ("blocks.1.act", "dead", 2 / NEURONS),
        ("blocks.2.act", "dead", 11 / NEURONS),
    ]
    assert offences(report, Budget({"dead": 0.5})) == []


def test_a_ratio_equal_to_the_budget_is_within_it() -> None:
    report = planted_report()
    exact = len(DEAD["blocks.2.act"]) / NEURONS
    assert offences(report, Budget({"dead": exact})) == []
    assert offences(report, Budget({"dead": exact - 1e-9}))[0][0] == "blocks.2.act"


def test_each_state_has_its_own_budget() -> None:
    report = planted_report()
    assert offences(report, Budget({"leaking": 0.1})) == [("head.leaky", "leaking", 2 / 16)]
    assert offences(report, Budget({"saturated": 0.2})) == [("head.tanh", "saturated", 2 / 8)]
    # Dead ReLU units are dormant too (mean |a| = 0), and so are the near-zero leaking ones.
    assert offences(report, Budget({"dormant": 0.1})) == [
        ("blocks.2.act", "dormant", 11 / NEURONS),
        ("head.leaky", "dormant", 2 / 16),
    ]
    result = check_budget(report, Budget({"dead": 0.05, "saturated": 0.2}))
    assert {
        layer: [o.state for o in found] for layer, found in result.offending_layers.items()
    } == {
        "blocks.1.act": [State.DEAD],
        "blocks.2.act": [State.DEAD],
        "head.tanh": [State.SATURATED],
    }


def test_unknown_layers_fail_unless_allowed() -> None:
    report = planted_report(unknown=True)
    strict = check_budget(report, Budget({"dead": 0.5}))
    assert not strict.passed
    assert [(o.layer, o.state, o.count, o.budget) for o in strict.offending] == [
        (UNKNOWN_LAYER, State.UNKNOWN, 8, None)
    ]
    lenient = check_budget(report, Budget({"dead": 0.5}, allow_unknown=True))
    assert lenient.passed
    assert [o.layer for o in lenient.unknown] == [UNKNOWN_LAYER]
    # With nothing capped there is no gate, and an unknown layer fails nothing.
    assert check_budget(report, Budget()).passed


def test_pre_layers_are_left_out_unless_asked_for() -> None:
    report = planted_report(pre=True)
    default = check_budget(report, Budget({"dead": 0.3}))
    assert [o.layer for o in default.offending] == ["blocks.2.act"]
    assert all(s.kind != "pre" for s in default.checked)
    with_pre = check_budget(report, Budget({"dead": 0.3}, kinds=frozenset({"pre", "post"})))
    assert [o.layer for o in with_pre.offending] == ["blocks.2.act:pre", "blocks.2.act"]
    only_pre = check_budget(report, Budget({"dead": 0.3}, kinds=frozenset({"pre"})))
    assert [o.layer for o in only_pre.offending] == ["blocks.2.act:pre"]


def test_summary_json_carries_verdict_budgets_and_every_layer() -> None:
    report = planted_report(unknown=True)
    summary = check_budget(report, Budget({"dead": 0.3, "saturated": 0.5})).to_json()

    assert summary["schema"] == SUMMARY_SCHEMA
    assert summary["passed"] is False
    assert summary["budgets"] == {"dead": 0.3, "saturated": 0.5}
    assert summary["kinds"] == ["attn", "post"]
    assert summary["layers_offending"] == 2
    assert [(o["layer"], o["state"]) for o in summary["offending"]] == [
        ("blocks.2.act", "dead"),
        (UNKNOWN_LAYER, "unknown"),
    ]
    dead = summary["offending"][0]
    assert (dead["count"], dead["neurons"], dead["ratio"], dead["budget"]) == (11, 32, 11 / 32, 0.3)
    layers = {entry["layer"]: entry for entry in summary["layers"]}
    assert list(layers) == list(report.layers)
    assert layers["blocks.2.act:pre"]["checked"] is False
    assert layers["head.tanh"]["ratios"]["saturated"] == 2 / 8
    assert layers["blocks.1.act"]["passed"] is True
    assert summary["layers_checked"] == sum(1 for s in report.layers.values() if s.kind == "post")


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"dead": 1.5}, r"in \[0, 1\], got 1.5"),
        ({"dead": -0.1}, r"in \[0, 1\]"),
        ({"active": 0.5}, "no budget can be set on 'active'"),
        ({"unknown": 0.5}, "no budget can be set on 'unknown'"),
        ({"deadd": 0.5}, "unknown neuron state 'deadd'"),
    ],
)
def test_bad_budgets_are_refused_with_the_fix(
    limits: dict[State | str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Budget(limits)


def test_bad_kinds_are_refused() -> None:
    with pytest.raises(ConfigError, match="budget kinds must be some of"):
        Budget({"dead": 0.1}, kinds=frozenset({"mlp"}))


def test_budget_order_does_not_depend_on_argument_order() -> None:
    a = Budget({"saturated": 0.1, "dead": 0.2})
    b = Budget({"dead": 0.2, "saturated": 0.1})
    assert list(a.limits) == list(b.limits) == [State.DEAD, State.SATURATED]
    assert set(BUDGET_STATES) == {State.DEAD, State.LEAKING, State.DORMANT, State.SATURATED}


def test_a_report_with_nothing_to_check_does_not_pass() -> None:
    empty = Report(model="m", window="lifetime", step=0, layers=MappingProxyType({}))
    with pytest.raises(ReportError, match="no layers of kind attn, post"):
        check_budget(empty, Budget({"dead": 0.3}))
    only_pre = planted_report(pre=True)
    with pytest.raises(ReportError, match="no layers of kind attn"):
        check_budget(only_pre, Budget({"dead": 0.3}, kinds=frozenset({"attn"})))

"""The vocabulary of neuron states, defined once for stats, reports, rendering and exporters.

Every *known* neuron (its window reached ``min_rows`` finite rows) is in exactly one of the
**firing states** ``dead``, ``leaking``, ``asleep``, ``active``; a neuron that is not known is
``unknown``. ``dormant`` and ``saturated`` are **overlays**: they are judged on known neurons on
top of the firing state (a GELU neuron can be active and dormant; an ELU neuron stuck on its
negative plateau is leaking and saturated). See ``docs/vocabulary.md``.
"""

from __future__ import annotations

from enum import Enum

from .errors import ConfigError

__all__ = ["FIRING_STATES", "OVERLAY_STATES", "STATES", "State", "parse_state"]


class State(str, Enum):
    """A neuron state; the value is the word used in reports, metrics and the CLI."""

    DEAD = "dead"
    LEAKING = "leaking"
    ASLEEP = "asleep"
    ACTIVE = "active"
    UNKNOWN = "unknown"
    DORMANT = "dormant"
    SATURATED = "saturated"

    def __str__(self) -> str:
        return self.value

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[State, str] = {
    State.DEAD: "never fired in the window and passed no gradient on any row (ReLU, ReLU6, "
    "Hardtanh; or stuck on a flat region: sigmoid at 0, tanh at -1, ELU's plateau): it cannot "
    "recover by itself",
    State.LEAKING: "never fired in the window, but still passed gradient (LeakyReLU, PReLU; "
    "ELU, GELU, SiLU, tanh... off their flat regions): it can recover",
    State.ASLEEP: "fired on fewer than asleep_below (default 5 %) of the window's rows",
    State.ACTIVE: "fired on at least asleep_below of the window's rows",
    State.UNKNOWN: "the window has fewer than min_rows finite rows: not judged yet",
    State.DORMANT: "ReDo score mean|a_i| / layer mean of mean|a| is <= tau (default 0.1)",
    State.SATURATED: "in the family's flat region on every row (|tanh| > 0.99, sigmoid < 0.01 or "
    "> 0.99, ReLU6 at 6, ELU on its negative plateau)",
}

FIRING_STATES: tuple[State, ...] = (
    State.DEAD,
    State.LEAKING,
    State.ASLEEP,
    State.ACTIVE,
    State.UNKNOWN,
)
OVERLAY_STATES: tuple[State, ...] = (State.DORMANT, State.SATURATED)
STATES: tuple[State, ...] = FIRING_STATES + OVERLAY_STATES


def parse_state(name: str | State) -> State:
    """The state called ``name``; a ConfigError lists the valid names otherwise.

    >>> parse_state("dead")
    <State.DEAD: 'dead'>
    """
    try:
        return State(name)
    except ValueError:
        valid = ", ".join(s.value for s in STATES)
        raise ConfigError(f"unknown neuron state {name!r}; valid states: {valid}") from None

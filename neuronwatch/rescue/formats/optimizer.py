"""Which optimizer moments belong to which parameter of a PyTorch training checkpoint.

An optimizer's ``state_dict()`` knows its parameters by number only. torch records their names
(``param_names``) when the optimizer was built from ``model.named_parameters()``; otherwise the
numbers follow the order the parameters were given in, which is the state_dict's order only
when the optimizer was built from ``model.parameters()`` in one group (or in groups whose
parameters no shape could confuse). Every mapping is checked against the moments' shapes, and
one that cannot be trusted is refused: a revived neuron must never keep the moments that killed
it, and another parameter's moments must never be zeroed by mistake. Shapes prove an order only
for a parameter whose shape no other mapped parameter has: ``Adam(chain(head, body))`` lists
the parameters in another order than the state_dict, and with equal shapes nothing shows it. So
moments matched by order are edited only for such parameters; an edit touching another one is
refused (:meth:`OptimizerMap.check_editable`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..checkpoint import CheckpointError, TensorInfo

__all__ = ["OptimizerMap", "is_optimizer", "map_optimizer"]

# Buffers torch modules save next to their parameters (never in an optimizer).
_BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})
_NAMED = "build the optimizer from model.named_parameters() so it saves param_names"


def is_optimizer(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


@dataclass(frozen=True)
class OptimizerMap:
    """Optimizer parameter id -> state_dict name, how it was found, and a note for the
    manifest (a prefix that had to be stripped or added)."""

    names: dict[Any, str]
    mapped_by: str
    note: str | None = None
    # Matched by order, and another mapped parameter has the same shape: the pairing of these
    # names cannot be verified, so their moments must not be edited.
    unverified: frozenset[str] = frozenset()

    def check_editable(
        self, touched: Collection[str], has_state: Collection[Any], where: str
    ) -> None:
        """Refuse an edit of a parameter (in ``touched``) whose moments (the optimizer ids in
        ``has_state``) were matched by an order that shapes cannot verify."""
        blocked = sorted(
            name
            for pid, name in self.names.items()
            if name in self.unverified and name in touched and pid in has_state
        )
        if blocked:
            raise CheckpointError(
                f"{where} has no param_names and {blocked[0]!r} shares its shape with another "
                "parameter, so the order cannot show which moments are its (an optimizer given "
                "the parameters in another order would get the wrong ones reset): save "
                f"param_names ({_NAMED}), pass --trust-optimizer-order if it was built from "
                "model.parameters(), or rescue the bare state_dict and start a new optimizer"
            )


def _groups(optimizer: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    groups = optimizer.get("param_groups")
    state = optimizer.get("state")
    if (
        not isinstance(groups, list | tuple)
        or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
        or not isinstance(state, Mapping)
    ):
        raise CheckpointError(
            f"{where} is not in torch's optimizer layout (state, param_groups with params); "
            "its moments cannot be matched to the parameters"
        )
    return list(groups)


def _rename(names: list[str], known: Collection[str]) -> tuple[list[str], str | None] | None:
    """``names`` as state_dict names: as they are, or through one prefix stripped from all of
    them (DDP's ``module.``) or added to all (a LightningModule's ``model.``)."""
    if all(name in known for name in names):
        return names, None
    if not names:
        return names, None
    parts = names[0].split(".")
    for cut in range(1, len(parts)):
        prefix = ".".join(parts[:cut]) + "."
        if all(n.startswith(prefix) and n[len(prefix) :] in known for n in names):
            return [n[len(prefix) :] for n in names], f"stripped the prefix {prefix!r}"
    prefixes = {k[: -len(names[0])] for k in known if k.endswith("." + names[0])}
    fits = [p for p in prefixes if all(p + n in known for n in names)]
    if len(fits) == 1:
        return [fits[0] + n for n in names], f"added the prefix {fits[0]!r}"
    return None


def _by_names(
    groups: list[Mapping[str, Any]], ids: list[Any], infos: Mapping[str, TensorInfo], where: str
) -> OptimizerMap:
    names = [str(n) for g in groups for n in g["param_names"]]
    if len(names) != len(ids):
        raise CheckpointError(f"{where}: param_names and params differ in length")
    renamed = _rename(names, infos)
    if renamed is None:
        sample = next((n for n in names if n not in infos), names[0])
        raise CheckpointError(
            f"{where}: the optimizer's param_names (e.g. {sample!r}) do not match the "
            f"state_dict's names (e.g. {next(iter(infos), '')!r}), not even through one "
            "common prefix; cannot tell which moments belong to which parameter (use "
            "--state-dict-key for the state_dict the optimizer trained)"
        )
    mapped, note = renamed
    return OptimizerMap(dict(zip(ids, mapped, strict=True)), "param_names", note)


def _order_candidates(torch: Any, state: Mapping[str, Any]) -> list[str]:
    """The names model.parameters() would list: the state_dict's order without buffers and
    without the second copy of a tied parameter."""
    seen: set[tuple[int, int]] = set()
    found = []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        if name.rsplit(".", 1)[-1] in _BUFFER_LEAVES or not tensor.is_floating_point():
            continue
        found.append(name)
    return found


def _by_order(
    torch: Any,
    groups: list[Mapping[str, Any]],
    ids: list[Any],
    state: Mapping[str, Any],
    infos: Mapping[str, TensorInfo],
    where: str,
) -> OptimizerMap:
    candidates = _order_candidates(torch, state)
    if len(candidates) != len(ids):
        raise CheckpointError(
            f"{where} has {len(ids)} parameters but the state_dict {len(candidates)}; cannot "
            f"tell which moments belong to which parameter ({_NAMED})"
        )
    names = dict(zip(ids, candidates, strict=True))
    if len(groups) > 1:
        # Groups may list the parameters in any order (one learning rate per layer, top
        # first). The moments' shapes catch a wrong pairing unless two groups hold
        # parameters of one shape: then the order cannot be verified.
        owners: dict[tuple[int, ...], set[int]] = {}
        for index, group in enumerate(groups):
            for pid in group["params"]:
                owners.setdefault(infos[names[pid]].shape, set()).add(index)
        shared = next((shape for shape, found in owners.items() if len(found) > 1), None)
        if shared is not None:
            raise CheckpointError(
                f"{where} has {len(groups)} parameter groups holding parameters of the same "
                f"shape {shared} and no param_names: whether its order is the state_dict's "
                f"cannot be verified, and a wrong guess resets the wrong moments ({_NAMED})"
            )
    counts = Counter(infos[name].shape for name in names.values())
    unverified = frozenset(name for name in names.values() if counts[infos[name].shape] > 1)
    return OptimizerMap(names, "order", unverified=unverified)


def _check_shapes(
    torch: Any, optimizer: Mapping[str, Any], found: OptimizerMap, infos: Mapping[str, TensorInfo]
) -> None:
    state = optimizer["state"]
    for pid, name in found.names.items():
        for key, value in state.get(pid, {}).items():
            if (
                isinstance(value, torch.Tensor)
                and value.dim()
                and tuple(value.shape) != (infos[name].shape)
            ):
                how = f" (matched by {found.mapped_by}: {_NAMED})"
                raise CheckpointError(
                    f"optimizer parameter #{pid} holds {key!r} of shape {tuple(value.shape)} but "
                    f"parameter {name!r} has shape {infos[name].shape}; rescue carries edits "
                    f"over only to moments shaped like their parameter{how}"
                )


def map_optimizer(
    torch: Any,
    optimizer: Mapping[str, Any],
    state: Mapping[str, Any],
    infos: Mapping[str, TensorInfo],
    where: str,
) -> OptimizerMap:
    """Map ``optimizer`` (an ``Optimizer.state_dict()`` found at ``where``) onto the
    state_dict ``state`` (``infos``: its tensors); a :class:`CheckpointError` when it cannot
    be trusted."""
    groups = _groups(optimizer, where)
    ids = [pid for group in groups for pid in group["params"]]
    if groups and all("param_names" in group for group in groups):
        found = _by_names(groups, ids, infos, where)
    else:
        found = _by_order(torch, groups, ids, state, infos, where)
    try:
        _check_shapes(torch, optimizer, found, infos)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return found

"""The loss registry: every loss module of this package, found by looking, and what the rest of the project
asks of a loss.

A loss module is a module of `spo_align.losses` that defines `ENTRY`, a `LossEntry` (see `entry.py`): its
recipe section, its tensor function and its facts in one file. Adding one is adding such a module; nothing
here or anywhere else lists the losses by hand. Everything that asks "which loss is this?" asks this module
instead: the recipe's loss union (`recipe/schema.py`), `recipe/resolve` (optimum), `recipe/checks`, the
stages (build, reference), the metrics callbacks, `spo plot` (colours, terms, labels) and the experiment's
tables (reward scale). The derivations behind each optimum are in docs/losses.md.

No torch here, and loss modules import it only inside their functions: recipes are validated and resolved
with the base install alone.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from spo_align.losses.entry import BOTH_BELOW_REF, NLL_TERM, PAIR_METRICS, LossEntry, Metric, Optimum

if TYPE_CHECKING:
    from spo_align.losses.pair import PairLossFn


class LossRegistryError(RuntimeError):
    """Two loss modules claim the same type or the same listing place (a programming error, caught at import)."""


def _discover() -> dict[str, LossEntry]:
    """type -> entry for every module of this package that defines `ENTRY`, in the entries' `order`."""
    package = importlib.import_module(__name__.rpartition(".")[0])
    entries: list[LossEntry] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        entry = getattr(module, "ENTRY", None)
        if isinstance(entry, LossEntry):
            entries.append(entry)
    for attribute in ("type", "order"):
        values = [getattr(entry, attribute) for entry in entries]
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise LossRegistryError(f"loss modules share the same {attribute}: {', '.join(repeated)}")
    return {entry.type: entry for entry in sorted(entries, key=lambda entry: entry.order)}


CATALOGUE: dict[str, LossEntry] = _discover()
"""Every loss type, in the order docs and tables list them."""

TYPES: tuple[str, ...] = tuple(CATALOGUE)

SECTIONS: tuple[type[Any], ...] = tuple(entry.section for entry in CATALOGUE.values())
"""Every loss's recipe section, in `TYPES` order: the members of the recipe's `loss` union."""


def loss_entry(loss: Any) -> LossEntry:
    """The entry of a loss section (or of a `loss.type` string)."""
    name = loss if isinstance(loss, str) else getattr(loss, "type", None)
    if name not in CATALOGUE:
        raise ValueError(f"no catalogue entry for loss type {name!r}; known: {', '.join(TYPES)}")
    return CATALOGUE[name]


def build_pair_loss(loss: Any) -> PairLossFn:
    """The function over `PairInputs` for a pairwise loss section, with its NLL term when nll_weight > 0."""
    entry = loss_entry(loss)
    if entry.stage != "pair" or entry.build is None:
        pair_types = ", ".join(t for t, e in CATALOGUE.items() if e.stage == "pair")
        raise ValueError(f"loss {entry.type!r} is not a pairwise loss ({pair_types})")
    fn = entry.build(loss)
    weight = float(getattr(loss, "nll_weight", 0.0))
    if weight > 0:
        from spo_align.losses.pair import with_nll_term

        fn = with_nll_term(fn, weight)
    return fn


def loss_optimum(loss: Any) -> Optimum | None:
    """Where the loss's pair term is minimal (None for no loss, or a loss without one; docs/losses.md)."""
    return None if loss is None else loss_entry(loss).optimum(loss)


def optimum_note(loss: Any) -> str:
    """The `spo resolve` note on `loss_optimum`, saying when an NLL term moves it."""
    if loss is None:
        return ""
    note = loss_entry(loss).optimum_note
    weight = float(getattr(loss, "nll_weight", 0.0))
    if weight > 0:
        note += f"; of the pair term alone: the NLL term (nll_weight {weight:g}) moves it (docs/losses.md)"
    return note


def reward_scale(loss: Any) -> float | None:
    """What the runner's `rewards/*` are the log-ratio multiplied by; None when they are no log-ratio (SimPO)."""
    return loss_entry(loss).reward_scale(loss)


def loss_label(loss: Any) -> str:
    """A run's loss and key parameters, e.g. `spo β=0.2 α=1`, `dpo β=0.1 ε=0.1 +nll 1` (tables, `spo plot`)."""
    parameters = loss_entry(loss).parameters(loss)
    nll = float(getattr(loss, "nll_weight", 0.0))
    return f"{loss.type}{' ' + parameters if parameters else ''}" + (f" +nll {nll:g}" if nll > 0 else "")


def logged_terms(loss: Any) -> tuple[str, ...]:
    """The names of the terms a run of this loss section logs: its entry's, then `nll_term` when it has one."""
    terms = tuple(term.name for term in loss_entry(loss).terms)
    return terms + ((NLL_TERM.name,) if float(getattr(loss, "nll_weight", 0.0)) > 0 else ())


def logged_metrics() -> tuple[Metric, ...]:
    """Every loss-related metric the stages log, in display order: rewards and log-probs, each loss's
    terms (catalogue order), the NLL term, and the both-below-reference share."""
    terms = [term for entry in CATALOGUE.values() for term in entry.terms]
    return (*PAIR_METRICS, *terms, NLL_TERM, BOTH_BELOW_REF)

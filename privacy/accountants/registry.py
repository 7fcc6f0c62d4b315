"""Name → accountant class, as used by the ``dp-accountant`` config key and the CLI."""

from __future__ import annotations

from privacy.accountants.base import Accountant
from privacy.accountants.prv import PrvAccountant
from privacy.accountants.rdp import RdpAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    RdpAccountant.name: RdpAccountant,
    PrvAccountant.name: PrvAccountant,
}


def build_accountant(name: str) -> Accountant:
    """A fresh accountant by name (``"rdp"`` or ``"prv"``)."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(
            f"accountant must be one of {', '.join(map(repr, ACCOUNTANTS))}; got {name!r}"
        ) from None

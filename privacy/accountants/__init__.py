"""Privacy accountants (RDP, PRV/PLD) that price ledger events; build one by name."""

from privacy.accountants.base import Accountant
from privacy.accountants.prv import PrvAccountant
from privacy.accountants.rdp import RdpAccountant
from privacy.accountants.registry import ACCOUNTANTS, build_accountant

__all__ = ["ACCOUNTANTS", "Accountant", "PrvAccountant", "RdpAccountant", "build_accountant"]

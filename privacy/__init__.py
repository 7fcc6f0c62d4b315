"""Differential privacy for Pollen: central DP, accounting, ledger, budget, reports, DP-SGD.

Layout: ``mechanisms`` (clip/normalize/noise, :class:`DpSpec`, :class:`CentralDpAggregator`),
``sampling`` (cohort samplers), ``events`` (ledger events), ``accountants`` (RDP, PRV),
``ledger`` (crash-safe JSONL), ``budget`` (ε for a plan, z for a target, budget stop),
``report`` and ``cli`` (``pollen privacy …``), ``dpsgd`` (Opacus, imported on demand since it
pulls in torch).
"""

from privacy.accountants import ACCOUNTANTS, Accountant, build_accountant
from privacy.budget import BudgetGuard, PrivacyBudgetExceeded, epsilon_for, plan_noise_multiplier
from privacy.events import RoundRelease, SampledGaussian
from privacy.ledger import LedgerConflictError, PrivacyLedger
from privacy.mechanisms import (
    CentralDpAggregator,
    DpRelease,
    DpSpec,
    NormBoundExceeded,
    Params,
    add_gaussian_noise,
    clip_update,
    global_l2_norm,
    normalize_update,
    prepare_client_update,
)
from privacy.sampling import Cohort, CohortSampler, FixedSizeSampler, PoissonSampler, build_sampler

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetGuard",
    "CentralDpAggregator",
    "Cohort",
    "CohortSampler",
    "DpRelease",
    "DpSpec",
    "FixedSizeSampler",
    "LedgerConflictError",
    "NormBoundExceeded",
    "Params",
    "PoissonSampler",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "RoundRelease",
    "SampledGaussian",
    "add_gaussian_noise",
    "build_accountant",
    "build_sampler",
    "clip_update",
    "epsilon_for",
    "global_l2_norm",
    "normalize_update",
    "plan_noise_multiplier",
    "prepare_client_update",
]

"""Differential privacy for each site: accountants, noise calibration and the privacy ledger.

The privacy unit is the patient; every release is DP-SGD's Poisson-subsampled Gaussian mechanism.
Nothing here knows about rounds' runners or Flower: the runner asks the ledger before a round and
records each site's release after it.
"""

from privmed.privacy.accountants import (
    Release,
    accountant_names,
    check_accountant_name,
    epsilon_spent,
    independent_epsilon,
)
from privmed.privacy.calibration import check_delta, epsilon_curve, noise_for_epsilon
from privmed.privacy.ledger import LEDGER_FILE, BudgetExceeded, LedgerError, PrivacyLedger

__all__ = [
    "LEDGER_FILE",
    "BudgetExceeded",
    "LedgerError",
    "PrivacyLedger",
    "Release",
    "accountant_names",
    "check_accountant_name",
    "check_delta",
    "epsilon_curve",
    "epsilon_spent",
    "independent_epsilon",
    "noise_for_epsilon",
]

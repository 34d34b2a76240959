"""Differential privacy for each site: accountants, noise calibration, the privacy plan, the
coordinator's ledger and each site's own, secret keys, DP-SGD through Opacus, and figures that
never claim less than a ledger backs.

The unit is the patient (one record, where the data names no patients); every release is DP-SGD's
Poisson-subsampled Gaussian mechanism (or, under central DP, the server's Gaussian one). Nothing
here knows about rounds, runners or Flower.

The names below load their modules on first use, so that a light reader (the report, which needs
only `privmed.privacy.figures`) does not import Opacus and torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Release": "accountants",
    "accountant_names": "accountants",
    "check_accountant_name": "accountants",
    "epsilon_spent": "accountants",
    "independent_epsilon": "accountants",
    "check_delta": "calibration",
    "epsilon_curve": "calibration",
    "noise_for_epsilon": "calibration",
    "LEDGER_FILE": "ledger",
    "BudgetExceeded": "ledger",
    "LedgerError": "ledger",
    "PrivacyLedger": "ledger",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: load on first use
    if name not in _EXPORTS:
        raise AttributeError(f"module 'privmed.privacy' has no attribute '{name}'")
    return getattr(importlib.import_module(f"privmed.privacy.{_EXPORTS[name]}"), name)

"""Attribute inference on a tabular model: from the final model, a patient's other features and
their label, guess a sensitive binary feature (by default sex).

The attack (Fredrikson et al. 2014; Yeom et al. 2018): fill the unknown feature with each value it
takes at the patient's site, and guess the more likely one given the population's shares and the
model's probability of the patient's true label under each (a maximum a posteriori guess). It is run on the sites' training patients (members) and on their test patients
(non-members), against the baseline of guessing the population's commoner value: what the model
reveals beyond the population is the member accuracy above that baseline; what it reveals about
*its training patients* (the part differential privacy bounds) is the member accuracy above the
non-member accuracy. Accuracies come with 95% Wilson intervals.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

from privmed.audit import mia
from privmed.audit.membership import Target, logits_of
from privmed.errors import ConfigError

TITLE = "Attribute inference, maximum a posteriori (Fredrikson et al. 2014)"
SEES = "the final shared model, as a black box: its outputs on inputs of its choice"
ASSUMES = ("knows a patient's other features and diagnosis, the values the feature takes at the "
           "patient's site (its encoding), and the feature's share in the population")


def pick_attribute(target: Target, name: str | None) -> int:
    """The column of the attacked feature: `name`, or 'sex' when the data has it, else the first
    binary feature. ConfigError when the data is not tabular or the feature is not binary."""
    names = list(target.facts.feature_names)
    if not target.facts.tabular or not names:
        raise ConfigError(f"{target.run_dir}: attribute inference needs tabular data with named "
                          f"features; data.source '{target.config.data.source}' has none")
    # standardised per site, a binary feature takes two values at each site, more over all sites
    binary = [n for i, n in enumerate(names)
              if all(len(np.unique(sd.train.images[:, i])) <= 2 for sd in target.site_data)]
    if name is None:
        name = "sex" if "sex" in binary else (binary[0] if binary else None)
        if name is None:
            raise ConfigError(f"{target.run_dir}: no binary feature to infer (features: {', '.join(names)})")
    if name not in names:
        raise ConfigError(f"--attribute: '{name}' is not a feature of this data (features: {', '.join(names)})")
    if name not in binary:
        raise ConfigError(f"--attribute: '{name}' is not binary at every site; attribute inference "
                          f"guesses a binary feature (binary here: {', '.join(binary) or 'none'})")
    return names.index(name)


def _guess(target: Target, x: np.ndarray, y: np.ndarray, col: int, values: np.ndarray, prior: float) -> np.ndarray:
    """Per patient, which of its site's two `values` (2,) is the more likely given the model's
    output on its true label and the population's share `prior` of the second value (0 or 1):
    argmax_v log P(v) + log p_model(y | x with v)."""
    score = []
    for k, p in ((0, 1.0 - prior), (1, prior)):
        xk = x.copy()
        xk[:, col] = values[k]
        score.append(np.log(p) - mia.losses(logits_of(target.model, xk), y))
    return (score[1] > score[0]).astype(int)


def _accuracy(correct: np.ndarray) -> dict:
    n, k = len(correct), int(correct.sum())
    if n == 0:
        return {"accuracy": None, "ci": None, "n": 0}
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"accuracy": k / n, "ci": [float(ci.low), float(ci.high)], "n": n}


def attribute_audit(target: Target, attribute: str | None = None) -> dict:
    """Attribute inference against `target`'s final model on its sites' training (members) and
    test (non-members) patients; what audit.json records."""
    col = pick_attribute(target, attribute)
    name = target.facts.feature_names[col]
    sites = []
    for sd in target.site_data:
        parts = [p for p in (sd.train, sd.test) if p is not None and len(p)]
        values = np.unique(np.concatenate([p.images[:, col] for p in parts]))
        if len(values) == 2:  # a feature constant at a site leaves nothing to guess there
            sites.append((sd, values))
    if not sites:
        raise ConfigError(f"--attribute: '{name}' takes one value at every site; nothing to infer")
    # the population's share of the second value (as coded per site: standardising keeps the order)
    truth = {(sd.name, key): (part.images[:, col] == values[1]).astype(int)
             for sd, values in sites for key, part in (("members", sd.train), ("non_members", sd.test))
             if part is not None and len(part)}
    prior = float(np.concatenate(list(truth.values())).mean())
    majority = int(prior >= 0.5)
    groups: dict[str, list] = {"members": [], "non_members": []}
    for sd, values in sites:
        for key, part in (("members", sd.train), ("non_members", sd.test)):
            if (sd.name, key) not in truth:
                continue
            guess = _guess(target, part.images.astype(np.float32), part.labels, col, values, prior)
            groups[key].append((truth[sd.name, key], guess))
    out = {"title": TITLE, "sees": SEES, "assumes": ASSUMES, "attribute": name, "population_share": prior}
    for key, pairs in groups.items():
        truth = np.concatenate([t for t, _ in pairs]) if pairs else np.zeros(0, int)
        guess = np.concatenate([g for _, g in pairs]) if pairs else np.zeros(0, int)
        out[key] = {"attack": _accuracy(guess == truth), "baseline": _accuracy(truth == majority)}
    return out

"""What a membership audit attacks, and the shadow runs its strongest attacks need.

The target is a finished run's selected model (model.pt). The candidates are patients of the pooled
test set, which no site trained on (non-members), drawn at random, and as many training patients of
the run's sites (members) with the same labels. Shadow runs are privmed runs of the same config (same strategy,
rounds, training and privacy settings, and the same sites) in which each candidate patient is
included with probability 1/2, independently: a non-member that is included joins a site drawn at
random, a member that is left out leaves its site. The site's other training items stay in every
shadow, as they were in the target. The attacker so modelled knows the training recipe and holds
data of the same distribution (Carlini et al. 2022); it sees only the models' outputs.

The unit of membership is the patient, as privmed's guarantee: a patient's items are included or
left out together, and a patient's score is that of its first item.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from privmed import catalog
from privmed.config import RunConfig, validate_config
from privmed.data import load_source
from privmed.data.base import ImageSet, SourceData
from privmed.data.sites import SiteData, split_into_sites
from privmed.errors import ConfigError, RunDirError
from privmed.federation.experiment import experiment_from_sites
from privmed.federation.facts import DataFacts
from privmed.federation.runner import run_in_process
from privmed.federation.site import derive_seed
from privmed.models import build_model


@dataclass
class Candidates:
    """The patients an audit asks about: their first item's image and label, whether the target
    trained on them, and for members the index of the site that held them."""

    images: np.ndarray  # (N, ...) one item per patient
    labels: np.ndarray  # (N,)
    members: np.ndarray  # (N,) bool
    site: np.ndarray  # (N,) int: the member's site, -1 for a non-member
    item_groups: list[np.ndarray]  # per candidate: its items' indices in the site's train / the test set
    # the attacker's population sample (RMIA's z): the sites' validation items, which no model
    # trained on; never in a shadow run either
    population_images: np.ndarray
    population_labels: np.ndarray
    # where the non-members' item_groups point: the pooled test set, or the part of the sites'
    # validation data set aside for them
    outside: ImageSet | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def all_images(self) -> np.ndarray:
        """The candidates' images, then the population's (the order of every logits array)."""
        return np.concatenate([self.images, self.population_images])

    def all_labels(self) -> np.ndarray:
        return np.concatenate([self.labels, self.population_labels])


@dataclass
class Target:
    """A finished run as an auditor sees it: its config, its selected model, and the data its sites
    trained on (re-created from the config, as the run made it)."""

    run_dir: Path
    config: RunConfig
    model: nn.Module
    source: SourceData
    site_data: list[SiteData]
    facts: DataFacts
    summary: dict


def load_target(run_dir: Path) -> Target:
    """The run in `run_dir`: its resolved config, its selected global model and its sites' data.
    RunDirError for a missing or unfinished run; ConfigError for a run whose data privmed cannot
    re-create here (hospitals' own data: each hospital audits its own)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt", "summary.json"):
        if not (run_dir / name).is_file():
            raise RunDirError(f"{run_dir / name}: not found; `privmed audit` needs a finished run directory")
    import yaml

    reading = "config.yaml"
    try:
        raw = yaml.safe_load((run_dir / reading).read_text(encoding="utf-8"))
        reading = "summary.json"
        summary = json.loads((run_dir / reading).read_text(encoding="utf-8"))
        reading = "model.pt"
        saved = torch.load(run_dir / reading, weights_only=True)
        args, state = saved["model_args"], saved["state_dicts"]["global"]
    except (yaml.YAMLError, ValueError, UnicodeDecodeError, KeyError, TypeError, RuntimeError, EOFError,
            pickle.UnpicklingError) as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise RunDirError(f"{run_dir / reading}: a run file is corrupt or not privmed's "
                          f"({type(e).__name__}: {why})") from None
    cfg = validate_config(raw, source=str(run_dir / "config.yaml"))
    if cfg.data.source == "sites":
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: data.source 'sites': the hospitals hold the data, so the "
            "coordinator cannot audit membership (it has no patient to ask about)"
        )
    if catalog.strategy(cfg.federation.strategy).personalised:
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: federation.strategy '{cfg.federation.strategy}' leaves one "
            "model per site; the membership audit attacks one shared model"
        )
    model = build_model(**args)
    model.load_state_dict(state)
    model.eval()
    source = load_source(cfg.data, cfg.sites, seed=cfg.seed, task=cfg.task)
    site_data = split_into_sites(source, cfg.sites, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    return Target(run_dir, cfg, model, source, site_data, DataFacts.of(source, cfg.data.source), summary)


NON_MEMBERS = ("test", "validation")


def draw_candidates(
    target: Target, n_per_side: int, seed: int, n_population: int = 500, non_members: str = "test",
) -> Candidates:
    """Up to `n_per_side` non-member patients and as many member patients (from every site's
    training patients together) with the same number of each label, at random under `seed`; and
    up to `n_population` items of the sites' validation data as the attacker's population sample.
    Matching the labels keeps a difference in prevalence between the training and test splits
    (PneumoniaMNIST: 74% against 62.5% pneumonia) from passing for membership: a model calibrated
    to its training prevalence has a lower loss on the commoner label.

    `non_members`: 'test', patients of the pooled test set; or 'validation', patients of the sites'
    validation data (half of its patients, the other half the population sample): drawn from the
    training split's distribution, so that a test split collected apart from the training split
    cannot pass for membership. Validation patients chose the model's round without privacy
    (best-validation), a small influence; under DP the last round is kept and they had none."""
    if non_members not in NON_MEMBERS:
        raise ConfigError(f"--non-members: '{non_members}' (allowed: {', '.join(NON_MEMBERS)})")
    rng = np.random.default_rng([seed, 0xA0D17])
    members = []  # (site index, item indices of one patient)
    for i, sd in enumerate(target.site_data):
        members += [(i, g) for g in _patient_groups(sd.train)]
    val = ImageSet.concat([sd.val for sd in target.site_data])
    source, population = _outside_and_population(val, target.source.test, non_members, rng)
    outside = [(-1, g) for g in _patient_groups(source)]

    def label(site: int, g: np.ndarray) -> int:
        data = source if site < 0 else target.site_data[site].train
        return int(data.labels[g[0]])

    picked_in, picked_out = _label_matched(members, outside, label, n_per_side, rng)
    if len(picked_in) < 2:
        raise ConfigError(f"the run has {len(members)} training and {len(outside)} test patients with "
                          f"{len(picked_in)} label-matched pairs: too few to audit")
    picked = picked_in + picked_out
    images, labels = [], []
    for site, g in picked:
        data = source if site < 0 else target.site_data[site].train
        images.append(data.images[g[0]])
        labels.append(data.labels[g[0]])
    pop = rng.choice(len(population), min(n_population, len(population)), replace=False)
    return Candidates(
        images=np.stack(images), labels=np.asarray(labels, dtype=np.int64),
        members=np.asarray([s >= 0 for s, _ in picked]), site=np.asarray([s for s, _ in picked]),
        item_groups=[g for _, g in picked],
        population_images=population.images[pop], population_labels=population.labels[pop],
        outside=source,
    )


def _outside_and_population(
    val: ImageSet, test: ImageSet, non_members: str, rng: np.random.Generator
) -> tuple[ImageSet, ImageSet]:
    """(where the non-members come from, the attacker's population sample): the test set and the
    validation data, or ('validation') the validation data's patients cut in two at random."""
    if non_members == "test":
        return test, val
    groups = _patient_groups(val)
    half = rng.permutation(len(groups))
    cut = len(groups) // 2
    source = val.subset(np.sort(np.concatenate([groups[j] for j in half[:cut]] or [np.zeros(0, int)])))
    population = val.subset(np.sort(np.concatenate([groups[j] for j in half[cut:]] or [np.zeros(0, int)])))
    return source, population


def _label_matched(
    members: list, outside: list, label, n_per_side: int, rng: np.random.Generator
) -> tuple[list, list]:
    """(members, non-members) drawn in pairs of the same label: up to `n_per_side` non-members at
    random, and for each label as many members as there are of it (fewer where too few members
    have it). Each candidate is (site index or -1, its patient's item indices)."""
    member_label = np.asarray([label(*m) for m in members])
    outside_label = np.asarray([label(*o) for o in outside])
    n = min(n_per_side, len(outside))
    drawn = rng.choice(len(outside), n, replace=False) if n else np.zeros(0, dtype=np.int64)
    picked_out, picked_in = [], []
    for c in np.unique(outside_label[drawn]):
        of_c = drawn[outside_label[drawn] == c]
        pool = np.flatnonzero(member_label == c)
        k = min(len(of_c), len(pool))  # a label no site trained on cannot be matched
        picked_out += [outside[j] for j in of_c[:k]]
        picked_in += [members[j] for j in rng.choice(pool, k, replace=False)]
    return picked_in, picked_out


def _patient_groups(data: ImageSet) -> list[np.ndarray]:
    """The item indices of each patient in `data` (each item its own patient when none are named)."""
    ids = data.patient_ids()
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


@torch.no_grad()
def logits_of(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The model's raw outputs (N, K) on `images`, float64."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy().reshape(len(x), -1)


def shadow_sites(target: Target, cand: Candidates, include: np.ndarray, rng: np.random.Generator) -> list[SiteData]:
    """The sites of one shadow run: each site's training data less its candidate members that
    `include` leaves out, plus the included non-members, each joining a site drawn at random."""
    n_sites = len(target.site_data)
    drop = [np.zeros(len(sd.train), dtype=bool) for sd in target.site_data]
    joins: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for k in range(len(cand)):
        if cand.members[k]:
            if not include[k]:
                drop[cand.site[k]][cand.item_groups[k]] = True
        elif include[k]:
            joins[int(rng.integers(n_sites))].append(cand.item_groups[k])
    out = []
    for i, sd in enumerate(target.site_data):
        parts = [sd.train.subset(np.flatnonzero(~drop[i]))]
        if joins[i]:
            outside = cand.outside if cand.outside is not None else target.source.test
            parts.append(outside.subset(np.concatenate(joins[i])))
        train = ImageSet.concat(parts) if len(parts) > 1 else parts[0]
        if train.site is not None:  # the joined test items belong to this site now
            train = replace(train, site=np.full(len(train), sd.name, dtype=object))
        out.append(replace(sd, train=train))
    return out


@dataclass
class Shadows:
    """The shadow runs' outputs on the candidates and which candidates each one trained on."""

    logits: np.ndarray  # (S, N + P, K): on the candidates, then the population
    included: np.ndarray  # (S, N) bool: which candidates each trained on
    seconds: float
    asked: int  # shadows asked for (fewer ran when the time budget ran out)


def train_shadows(
    target: Target, cand: Candidates, count: int, seed: int, budget_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Shadows:
    """`count` shadow runs of the target's config (each from its own seed); stops early, after at
    least one, when `budget_s` seconds have gone. Their DP noise, if any, comes from fresh keys."""
    start = time.perf_counter()
    logits, included = [], []
    for s in range(count):
        if budget_s is not None and s > 0 and time.perf_counter() - start > budget_s:
            break
        rng = np.random.default_rng([seed, 0x5AD0, s])
        include = rng.random(len(cand)) < 0.5
        cfg = target.config.model_copy(update={"seed": derive_seed(seed, "shadow", s) % (2**31 - 1)})
        exp = experiment_from_sites(cfg, shadow_sites(target, cand, include, rng), target.facts, target.source)
        exp.public_test = None  # the coordinator scores no public test set for a shadow
        result = run_in_process(exp)
        logits.append(logits_of(result.model, cand.all_images()))
        included.append(include)
        if progress is not None:
            progress(s + 1, count)
    return Shadows(np.stack(logits), np.stack(included), time.perf_counter() - start, count)

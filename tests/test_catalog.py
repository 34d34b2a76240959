"""The catalog (privmed.catalog) is the one list of what privmed has: every registry, the config's
accepted values, the report and the statement must agree with it, and every strategy it lists
must build."""

import subprocess
import sys
from typing import get_args

import pytest

from privmed import catalog
from privmed.catalog import names
from privmed.config import (
    AttackConfig,
    DataConfig,
    FederationConfig,
    PrivacyConfig,
    RunConfig,
    SitePrivacyConfig,
    SitesConfig,
    validate_config,
)
from privmed.errors import ConfigError, DataError

STRATEGIES = names(catalog.STRATEGIES)


def _literal(model, key) -> tuple:
    return get_args(model.model_fields[key].annotation)


def test_catalog_imports_no_heavy_library():
    code = ("import sys, privmed.catalog; heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'numpy', 'pydantic', 'yaml', 'scipy', 'opacus'}); print(heavy); assert not heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("entries", [catalog.TASKS, catalog.SOURCES, catalog.MODELS, catalog.STRATEGIES,
                                     catalog.AGGREGATORS, catalog.ADVERSARIES, catalog.AUDIT_ATTACKS,
                                     catalog.ACCOUNTANTS])
def test_names_are_unique(entries):
    assert len(set(names(entries))) == len(entries)


def test_config_accepts_exactly_the_catalog():
    assert _literal(DataConfig, "source") == names(catalog.SOURCES)
    assert _literal(RunConfig, "task") == names(catalog.TASKS)
    assert _literal(FederationConfig, "strategy") == STRATEGIES
    assert _literal(FederationConfig, "aggregator") == names(catalog.AGGREGATORS)
    assert _literal(AttackConfig, "kind") == names(catalog.ADVERSARIES)
    assert _literal(PrivacyConfig, "accountant") == names(catalog.ACCOUNTANTS)
    assert _literal(SitePrivacyConfig, "accountant") == names(catalog.ACCOUNTANTS)


def test_config_refuses_a_name_outside_the_catalog():
    with pytest.raises(ConfigError, match="federation.strategy: Input should be 'fedavg', 'fedprox'"):
        validate_config({"federation": {"strategy": "fedavgg"}})


def test_catalog_entries_name_real_things():
    for s in catalog.SOURCES:
        assert set(s.tasks) <= set(names(catalog.TASKS)), s.name
        assert s.patient_ids in ("always", "never", "csv", "hospital"), s.name
    for t in catalog.TASKS:
        assert t.default_model is None or t.default_model in names(catalog.MODELS), t.name


# --------------------------------------------------------------------------- strategies


def test_strategy_registry_is_the_catalog():
    from privmed.federation.strategies import registry

    classes = registry()
    assert tuple(classes) == STRATEGIES
    for entry in catalog.STRATEGIES:
        cls = classes[entry.name]
        assert cls.name == entry.name
        assert cls.pools_data == entry.pools_data, entry.name
        if entry.secure:  # its server can work from a secure sum alone
            assert hasattr(cls, "aggregate_secure"), entry.name


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_catalog_strategy_builds(name):
    import numpy as np

    from privmed.federation.strategies import GLOBAL, build_strategy

    entry = catalog.strategy(name)
    s = build_strategy(FederationConfig(strategy=name), seed=0, local_lr=0.1, shared=[True, False])
    assert s.name == name
    state = s.init_state([np.zeros(2, np.float32), np.zeros(1, np.float32)], ["a", "b", "c"])
    # a personalised strategy keeps a model per site, the others one shared model
    assert (GLOBAL not in state) == entry.personalised, name
    if entry.robust:
        fed = FederationConfig(strategy=name, aggregator="median")
        assert build_strategy(fed, seed=0, local_lr=0.1).name == name


def test_unknown_strategy_lists_the_catalog():
    from privmed.federation.strategies import strategy_class

    with pytest.raises(ConfigError) as e:
        strategy_class("fedprx")
    assert str(e.value) == ("federation.strategy: unknown strategy 'fedprx'; did you mean 'fedprox'? "
                            f"(known: {', '.join(sorted(STRATEGIES))})")


@pytest.mark.parametrize("name", STRATEGIES)
def test_config_rules_follow_the_catalog(name):
    entry = catalog.strategy(name)
    secure = {"federation": {"strategy": name, "secure_aggregation": True}, "sites": {"count": 3}}
    if entry.secure:
        validate_config(secure)
    else:
        with pytest.raises(ConfigError, match=f"strategy '{name}' cannot use it: {entry.not_secure}"):
            validate_config(secure)
    robust = {"federation": {"strategy": name, "aggregator": "median"}, "sites": {"count": 3}}
    if entry.robust:
        validate_config(robust)
    else:
        with pytest.raises(ConfigError, match="robust rules serve"):
            validate_config(robust)
    central = {"federation": {"strategy": name}, "privacy": {"mode": "central", "epsilon": 8}}
    if entry.central_dp:
        validate_config(central)
    else:
        with pytest.raises(ConfigError, match="privacy.mode 'central'"):
            validate_config(central)
    finetune = {"federation": {"strategy": name, "finetune_steps": 2}}
    if entry.federated:
        validate_config(finetune)
    else:
        with pytest.raises(ConfigError, match="fine-tuning personalises a federated model"):
            validate_config(finetune)
    cfg = validate_config({"federation": {"strategy": name}})
    assert cfg.federation.effective_server_lr == (0.01 if entry.adaptive else 1.0)
    for section, values in entry.defaults.items():
        assert {k: getattr(getattr(cfg, section), k) for k in values} == values


def test_aggregators_follow_the_catalog():
    from privmed.config import aggregator_min_sites
    from privmed.federation.robust import RULES

    assert tuple(RULES) == names(catalog.AGGREGATORS)
    assert [aggregator_min_sites(a.name, 2) for a in catalog.AGGREGATORS] == [1, 5, 5, 7, 7, 11, 1]


# --------------------------------------------------------------------------- the other registries


def test_model_registry_is_the_catalog():
    from privmed import models

    assert models.model_names() == sorted(names(catalog.MODELS))
    for m in catalog.MODELS:
        assert models.spatial_dims(m.name) == m.dims, m.name
        assert (m.name in models.DENSE_MODELS) == m.dense, m.name
        assert models.is_tabular_model(m.name) == m.tabular, m.name
    with pytest.raises(ConfigError, match="model.name: unknown model 'resnet19'; did you mean 'resnet18'"):
        models.check_model_name("resnet19")


def test_accountant_registry_is_the_catalog():
    from privmed.privacy.accountants import accountant_names, check_accountant_name

    assert accountant_names() == sorted(names(catalog.ACCOUNTANTS))
    with pytest.raises(ConfigError, match="unknown accountant 'pvr'"):
        check_accountant_name("pvr")


def test_task_registry_is_the_catalog():
    from privmed.tasks.base import _TASKS, get_task

    assert tuple(_TASKS) == names(catalog.TASKS)
    for t in catalog.TASKS:
        task = get_task(t.name)
        assert (task.name, task.dense, task.per_sample, task.headline) == (t.name, t.dense, t.per_sample, t.headline)
    with pytest.raises(ConfigError, match="task: unknown task"):
        get_task("segmentaton")


def test_audit_attacks_are_the_catalog():
    from privmed.audit.attacks import ATTACKS, UPDATE_ATTACKS

    assert (*ATTACKS, *UPDATE_ATTACKS) == names(catalog.AUDIT_ATTACKS)
    for a in catalog.AUDIT_ATTACKS:
        if a.membership:
            got = ATTACKS[a.name]
            assert (got.title, got.sees, got.assumes, got.needs_shadows, got.needs_population) == (
                a.title, a.sees, a.assumes, a.needs_shadows, a.needs_population)
            assert callable(got.score)
        else:
            assert (UPDATE_ATTACKS[a.name].title, UPDATE_ATTACKS[a.name].sees) == (a.title, a.sees)


def test_adversaries_are_the_catalog():
    from privmed.config import MODEL_ATTACKS

    assert MODEL_ATTACKS == tuple(a.name for a in catalog.ADVERSARIES if a.crafts_update)


def test_data_dispatch_is_the_catalog():
    from privmed.data import load_source

    loadable = [s.name for s in catalog.SOURCES if s.loader is not None]
    for s in catalog.SOURCES:
        if s.loader is not None:
            assert callable(catalog.load(s.loader)), s.name
    assert [s.name for s in catalog.SOURCES if s.loader is None] == ["sites"]
    with pytest.raises(DataError) as e:
        load_source(DataConfig.model_construct(source="nope", channels=None), SitesConfig(), seed=0)
    assert str(e.value) == f"data.source: unknown source 'nope' (known: {', '.join(loadable)})"


def test_phantom_names_its_patients():
    from privmed.data import load_source

    assert catalog.source("phantom").patient_ids == "always"
    data = load_source(DataConfig(samples_per_site=20, size=16), SitesConfig(count=2), seed=0)
    assert data.train.patient is not None


def test_sources_tasks_follow_the_catalog():
    for s in catalog.SOURCES:
        if s.name == "sites":
            continue
        given = {"root": ".", "csv": "x.csv", "name": "pneumoniamnist"}  # what each source reads of these
        raw = {"data": {"source": s.name, **{k: v for k, v in given.items() if k in s.keys}}}
        assert validate_config(raw).task == s.task, s.name
        wrong = next(t for t in names(catalog.TASKS) if t not in s.tasks)
        with pytest.raises(ConfigError, match=f"task: '{wrong}' does not fit data.source '{s.name}'"):
            validate_config({**raw, "task": wrong})


# --------------------------------------------------------------------------- the report


def test_report_and_statement_read_the_catalog():
    from privmed.report import html, released, statement

    assert tuple(statement.STRATEGIES) == STRATEGIES
    assert all(title and how for title, how in statement.STRATEGIES.values())
    personalised = tuple(s.name for s in catalog.STRATEGIES if s.personalised)
    assert html.PERSONALISED == released.PERSONALISED == personalised == ("fedbn", "local")
    assert set(released.TO_WHOM) <= set(STRATEGIES)


def test_every_source_reads_only_data_keys_that_exist():
    from privmed.config import DataConfig

    fields = set(DataConfig.model_fields)
    for src in catalog.SOURCES:
        assert set(src.keys) <= fields, (src.name, set(src.keys) - fields)
        assert "source" not in src.keys and "val_fraction" not in src.keys  # every source's

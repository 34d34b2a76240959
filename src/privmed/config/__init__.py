"""The typed run config: loaded from YAML once, validated once, then passed around frozen.

- `values`: the accepted values (the catalog's tables in the shapes the validators read);
- `schema`: the pydantic models, one per section (`RunConfig`, and a hospital's `SiteConfig`);
- `defaults`: what the config's source, task, volumes, strategy or privacy mode implies where it
  is silent, and its filling-in;
- `rules`: the checks across fields, reading what each strategy, source, task, aggregator and
  attack can do from privmed.catalog;
- `loading`: YAML, `--set` overrides and the one-line errors.

Every name below is imported from here (`from privmed.config import RunConfig, load_config`).
"""

from privmed.config.defaults import (
    DEFAULT_HOSPITAL_EPSILON,
    DP_SGD_DEFAULTS,
    SOURCE_DEFAULTS,
    STRATEGY_DEFAULTS,
    TASK_DEFAULTS,
    VOLUME_DEFAULTS,
)
from privmed.config.loading import apply_overrides, load_config, load_site_config, read_yaml, validate_config
from privmed.config.schema import (
    AttackConfig,
    DataConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    PrivacyConfig,
    RunConfig,
    SiteConfig,
    SitePrivacyConfig,
    SitesConfig,
    TrainingConfig,
    shown,
)
from privmed.config.values import (
    ACCOUNTANTS,
    ADAPTIVE_STRATEGIES,
    AGGREGATORS,
    ATTACKS,
    CENTRAL_STRATEGIES,
    DENSE_TASKS,
    MEDMNIST_SIZES,
    MEDMNIST_VOLUME_SIZES,
    MEDMNIST_VOLUMES,
    MODEL_ATTACKS,
    PATCH_MODEL,
    PATCH_SIDES,
    ROBUST_STRATEGIES,
    ROOT_SOURCES,
    SECURE_REFUSED,
    SECURE_STRATEGIES,
    SOURCE_NAMES,
    SOURCE_SITES,
    SOURCE_TASK,
    SOURCE_TASKS,
    STRATEGIES,
    TABULAR_SOURCES,
    TASK_MODEL,
    TASK_NAMES,
    UNSHARED_STRATEGIES,
    VOLUME_MODEL,
    aggregator_min_sites,
    is_volume_source,
)
from privmed.errors import ConfigError

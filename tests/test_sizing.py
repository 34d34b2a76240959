"""The defaults that follow the data (privmed.federation.sizing): chosen from the sites' counts
where the config is silent, kept where it speaks, written to the run's config, and resumed alike."""

from pathlib import Path

import pytest
import yaml

import privmed
from privmed.config import validate_config
from privmed.federation.facts import DataFacts, SiteProfile
from privmed.federation.sizing import MIN_STEPS, batch_size_for, fit_to_data, left_to_data, local_epochs_for

IMAGES = DataFacts(1, 16, 2, False, "phantom", ("a", "b"), image_shape=(1, 16, 16))
TABLE = DataFacts(0, 0, 2, True, "heart-disease", ("a", "b"), ("x", "y"), image_shape=(2,))


def _sites(*n_train: int) -> list[SiteProfile]:
    return [SiteProfile(f"site-{i}", n, n, True, n // 5, n // 5, (n // 10, n // 10)) for i, n in enumerate(n_train)]


def _silent(**sections) -> dict:
    return {"data": {"source": "phantom"}, "sites": {"count": 3}, **sections}


@pytest.mark.parametrize("n", [10, 25, 50, 64, 100, 170, 255, 256, 1000, 1569, 5000])
@pytest.mark.parametrize("batch", [16, 32, 64])
def test_local_epochs_take_about_min_steps_a_round(n, batch):
    epochs = local_epochs_for(n, batch)
    per_epoch = -(-n // batch)
    # the whole number of epochs nearest to MIN_STEPS steps (one at least)
    assert abs(epochs * per_epoch - MIN_STEPS) <= per_epoch / 2 or (epochs == 1 and per_epoch > MIN_STEPS)


def test_batch_size_keeps_several_batches_an_epoch_and_64_for_large_sites():
    assert batch_size_for(256) == batch_size_for(5000) == 64  # what PneumoniaMNIST's defaults were measured at
    for n in (16, 20, 31, 32, 50, 64, 100, 255):
        assert n / batch_size_for(n) >= 2
    assert [batch_size_for(n) for n in (20, 32, 50, 63, 64, 255)] == [8, 16, 16, 16, 32, 32]


def test_small_sites_get_work_a_decaying_schedule_and_the_last_round():
    cfg = fit_to_data(validate_config(_silent()), IMAGES, _sites(200, 150, 100))
    assert cfg.training.batch_size == 32 and cfg.federation.local_epochs == 4  # 5 steps an epoch at 150
    assert (cfg.training.lr_schedule, cfg.federation.model_selection) == ("cosine", "last")
    assert fit_to_data(cfg, IMAGES, _sites(200, 150, 100)) is cfg  # chosen once: its values are now set
    assert left_to_data(cfg) == set()


def test_large_sites_keep_the_defaults_measured_on_them():
    cfg = fit_to_data(validate_config(_silent()), IMAGES, _sites(1569, 1200, 900))
    assert (cfg.training.batch_size, cfg.federation.local_epochs) == (64, 1)


@pytest.mark.parametrize("named, kept", [
    ({"training": {"batch_size": 4}}, {"training.batch_size": 4, "federation.local_epochs": 1}),  # 38 steps an epoch
    ({"federation": {"local_epochs": 1}}, {"federation.local_epochs": 1, "training.batch_size": 32}),
    ({"federation": {"local_steps": 5}}, {"federation.local_epochs": 1, "federation.local_steps": 5}),
    ({"training": {"lr_schedule": "constant"}}, {"training.lr_schedule": "constant", "federation.model_selection": "auto"}),
    ({"federation": {"model_selection": "best-validation"}},
     {"training.lr_schedule": "constant", "federation.model_selection": "best-validation"}),
])
def test_what_the_config_names_is_kept(named, kept):
    cfg = fit_to_data(validate_config(_silent(**named)), IMAGES, _sites(200, 150, 100))
    for key, value in kept.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key


@pytest.mark.parametrize("cfg, data", [
    (_silent(privacy={"mode": "dp-sgd", "epsilon": 8}), IMAGES),  # its batches and steps are the guarantee's
    ({"data": {"source": "heart-disease", "root": "data"}}, TABLE),  # tabular sources keep their measured defaults
    (_silent(task="segmentation"), IMAGES),
])
def test_runs_with_their_own_defaults_are_left_alone(cfg, data):
    cfg = validate_config(cfg)
    assert fit_to_data(cfg, data, _sites(40, 30, 20)) is cfg


SLICES = DataFacts(1, 64, 2, False, "nifti", ("background", "ventricles"), image_shape=(1, 64, 64))
PATCHES = DataFacts(1, 16, 2, False, "nifti", ("background", "ball"), image_shape=(1, 16, 16, 16))


def _nifti(**sections) -> dict:
    return {"task": "segmentation", "data": {"source": "nifti", "csv": "index.csv"},
            "sites": {"count": 3, "partition": "natural"}, **sections}


def test_a_hospital_s_own_slices_get_the_local_work_rule_and_nothing_else():
    """Segmentation of nifti slices (benchmarks/foreign_volumes.py: 20 rounds of one local epoch
    gave Dice 0.000 on IXI's ventricles, 3 epochs 0.796): local_epochs nearest MIN_STEPS steps at
    the median site; the task's batch, lr, schedule and selection stay."""
    silent = validate_config(_nifti())
    cfg = fit_to_data(silent, SLICES, _sites(138, 92, 92))  # 2-3 volumes of 46 slices a hospital
    assert cfg.federation.local_epochs == local_epochs_for(92, 16) == 3  # 6 batches of 16 an epoch
    changed = {k for k in ("training", "federation", "data", "model")
               if getattr(cfg, k).model_dump() != getattr(silent, k).model_dump()}
    assert changed == {"federation"} and cfg.federation.model_dump() == {
        **silent.federation.model_dump(), "local_epochs": 3}
    assert left_to_data(silent) == {"federation.local_epochs"} and left_to_data(cfg) == set()
    # a coordinator whose hospitals hold the data: the same, from their facts
    coordinator = validate_config({"task": "segmentation", "data": {"source": "sites"},
                                   "sites": {"names": ["a", "b", "c"]}})
    assert fit_to_data(coordinator, SLICES, _sites(138, 92, 92)).federation.local_epochs == 3
    # named local work, 3D patches, the phantom's volumes and DP-SGD keep their own
    named = validate_config(_nifti(federation={"local_epochs": 1}))
    assert fit_to_data(named, SLICES, _sites(138, 92, 92)) is named
    patches = validate_config(_nifti(data={"source": "nifti", "csv": "index.csv", "patch": [16, 16, 16]}))
    assert fit_to_data(patches, PATCHES, _sites(400, 300, 300)) is patches and left_to_data(patches) == set()
    phantom = validate_config(_silent(task="segmentation"))
    assert left_to_data(phantom) == set()
    private = validate_config(_nifti(privacy={"mode": "dp-sgd", "epsilon": 8}))
    assert fit_to_data(private, SLICES, _sites(138, 92, 92)) is private


def test_run_writes_the_chosen_values_and_resumes_on_them(tmp_path: Path, one_thread):
    raw = _silent(data={"source": "phantom", "size": 16, "samples_per_site": 60},
                  model={"name": "cnn", "width": 4}, federation={"rounds": 2})
    raw["sites"]["partition"] = "natural"
    out = tmp_path / "run"
    s = privmed.run(raw, out, report=False).summary
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["batch_size"] == 16 and saved["federation"]["local_epochs"] > 1
    assert (saved["training"]["lr_schedule"], saved["federation"]["model_selection"]) == ("cosine", "last")
    assert s["best_round"] == 2
    # the same silent config resumes (its defaults chosen again from the same data), rounds raised
    raw["federation"]["rounds"] = 3
    assert privmed.run(raw, out, resume=True, report=False).summary["rounds_completed"] == 3
    # a config that names another value does not
    raw["training"] = {"batch_size": 8}
    with pytest.raises(Exception, match="training.batch_size"):
        privmed.run(raw, out, resume=True, report=False)


def test_volumes_take_fewer_steps_a_round_over_more_rounds():
    volumes = DataFacts(1, 28, 2, False, "medmnist", ("a", "b"), image_shape=(1, 28, 28, 28))
    cfg = fit_to_data(validate_config(_silent()), volumes, _sites(100, 100, 100))
    # 4 batches of 32 an epoch: 2 epochs is 8 steps, over 80 rounds (benchmarks/small_volumes.py)
    assert (cfg.training.batch_size, cfg.federation.local_epochs, cfg.federation.rounds) == (32, 2, 80)
    named = fit_to_data(validate_config(_silent(federation={"rounds": 60})), volumes, _sites(100, 100, 100))
    assert (named.federation.local_epochs, named.federation.rounds) == (2, 60)  # a raised round count keeps the work
    images = fit_to_data(validate_config(_silent()), IMAGES, _sites(100, 100, 100))
    assert images.federation.rounds == 20


def test_a_flower_run_sends_what_the_config_sets(tmp_path: Path):
    """`privmed run --runner flower` hands the coordinator the keys the config sets: a full dump
    would name every default and leave none to follow the hospitals' data."""
    from privmed.cli.flower import _resolved_config

    cfg = validate_config(_silent(federation={"rounds": 5}, training={"lr": 0.05}))
    sent = validate_config(yaml.safe_load(_resolved_config(cfg, tmp_path, "run").read_text()))
    assert sent.to_dict() == cfg.to_dict()
    assert left_to_data(sent) == left_to_data(cfg) == {
        "training.batch_size", "federation.local_epochs", "training.lr_schedule", "federation.model_selection"}

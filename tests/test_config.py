import pytest

from privmed.config import apply_overrides, load_config, validate_config
from privmed.errors import ConfigError


def test_defaults_and_name_from_file(tmp_path):
    f = tmp_path / "my-exp.yaml"
    f.write_text("seed: 3\nfederation: {rounds: 2}\n")
    cfg = load_config(f)
    assert cfg.name == "my-exp" and cfg.seed == 3 and cfg.federation.rounds == 2
    assert cfg.federation.strategy == "fedavg" and cfg.model.name == "cnn"


def test_issue_example_is_valid(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("""
name: pneumonia-fedavg
seed: 0
task: classification
data: {source: medmnist, name: pneumoniamnist, root: ../shared/data/medmnist, size: 28}
sites: {count: 3, partition: dirichlet, alpha: 0.5, names: [site-a, site-b, site-c]}
model: {name: resnet18}
federation: {strategy: fedavg, rounds: 20, local_epochs: 1}
training: {batch_size: 64, lr: 0.01, optimizer: sgd}
""")
    cfg = load_config(f)
    assert cfg.sites.site_names() == ["site-a", "site-b", "site-c"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sites": {"partiton": "iid"}}, "unknown key 'sites.partiton'; did you mean 'partition'"),
        ({"federaton": {}}, "did you mean 'federation'"),
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"federation": {"rounds": "many"}}, "federation.rounds"),
        ({"federation": {"strategy": "fedsgd"}}, "federation.strategy"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"data": {"source": "medmnist", "root": "x"}}, "data.name is required"),
        ({"data": {"source": "medmnist", "name": "p", "root": "x", "size": 32}}, "data.size: 32"),
        ({"sites": {"count": 2, "names": ["a"]}}, "sites.names has 1 names"),
        ({"data": {"class_names": ["a", "b"]}}, "source 'phantom' names its own classes; data.class_names "
                                                "applies to image-folder, dicom, nifti"),
        ({"data": {"source": "image-folder", "root": "x", "class_names": ["a", "a"]}}, "each once"),
        ({"data": {"source": "image-folder", "root": "x", "class_names": ["a"]}}, "at least 2 classes"),
        # a key the source does not read is refused, naming the source, not silently ignored
        ({"data": {"test_subjects": 5}}, "data.test_subjects: 5 does not apply to source 'phantom'"),
        ({"data": {"source": "image-folder", "root": "x", "download": False}},
         "data.download: False does not apply to source 'image-folder', which reads only data.channels, "
         "data.class_names, data.csv, data.root, data.size, data.source, data.test_fraction, data.val_fraction"),
        ({"data": {"source": "heart-disease", "root": "x", "size": 28}}, "data.size: 28 does not apply to source"),
        ({"data": {"source": "medmnist", "name": "p", "root": "x", "test_fraction": 0.3}},
         "data.test_fraction: 0.3 does not apply to source 'medmnist'"),
        ({"data": {"source": "ixi", "root": "x", "samples_per_site": 50}}, "data.samples_per_site: 50 does not"),
    ],
)
def test_bad_config_names_the_field(raw, message):
    with pytest.raises(ConfigError) as e:
        validate_config(raw, source="c.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("c.yaml")


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"federation": {"rounds": 3}}, ["federation.rounds=7", "sites.alpha=0.1",
                                                          "sites.names=[a, b]"])
    assert raw["federation"]["rounds"] == 7
    assert raw["sites"] == {"alpha": 0.1, "names": ["a", "b"]}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["rounds"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)

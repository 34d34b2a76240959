"""The synthetic phantom source: shapes, determinism, per-site scanners, a visible label."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.config import DataConfig, SitesConfig
from privmed.data import load_source
from privmed.data.phantom import CLASS_NAMES, site_scanner


def _load(seed: int = 0, n: int = 200, count: int = 3, **data) -> object:
    return load_source(
        DataConfig(source="phantom", samples_per_site=n, **data), SitesConfig(count=count), seed
    )


@pytest.fixture(scope="module")
def src():
    return _load(seed=0, n=400)


def test_shapes_types_and_ranges(src):
    assert src.synthetic is True
    assert "SYNTHETIC" in src.description and "not patient data" in src.description
    assert src.citation == "synthetic (privmed phantom generator)"
    assert src.class_names == CLASS_NAMES and src.val is None
    assert src.train.images.shape == (3 * 400, 1, 32, 32)
    assert src.test.images.shape == (3 * 100, 1, 32, 32)  # 25% of samples_per_site per site
    for s in (src.train, src.test):
        assert s.images.dtype == np.float32 and s.labels.dtype == np.int64
        assert s.images.min() >= 0.0 and s.images.max() <= 1.0
        assert set(np.unique(s.labels)) == {0, 1}
    assert src.in_channels == 1 and src.image_size == 32 and src.n_classes == 2


def test_sites_and_patients(src):
    names = ["site-1", "site-2", "site-3"]
    for s in (src.train, src.test):
        assert sorted(np.unique(s.site)) == names
        assert all((s.site == n).sum() == len(s) // 3 for n in names)
    patients = np.concatenate([src.train.patient, src.test.patient])
    assert len(np.unique(patients)) == len(patients)  # one image per patient


def test_small_sites_get_at_least_20_test_images():
    src = _load(n=20, count=2)
    assert len(src.train) == 40 and len(src.test) == 40


def test_site_names_size_and_channels():
    src = load_source(
        DataConfig(source="phantom", samples_per_site=30, size=48, channels=3),
        SitesConfig(count=2, names=["Leeds", "Lyon"]),
        1,
    )
    assert src.train.images.shape[1:] == (3, 48, 48)
    assert sorted(np.unique(src.test.site)) == ["Leeds", "Lyon"]


def test_deterministic_per_seed():
    a, b, c = _load(seed=3, n=50), _load(seed=3, n=50), _load(seed=4, n=50)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    np.testing.assert_array_equal(a.train.patient, b.train.patient)
    assert not np.array_equal(a.train.images, c.train.images)


def test_leaves_global_random_state_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    _load(n=20)
    assert np.random.random() == before


def test_sites_are_different_scanners(src):
    scanners = [site_scanner(i, 0) for i in range(3)]
    for field in ("scale", "offset", "gamma", "noise", "blur", "prevalence"):
        values = sorted(getattr(s, field) for s in scanners)
        assert np.diff(values).min() > 0, field

    tr = src.train
    means, noise = [], []
    for name in ("site-1", "site-2", "site-3"):
        imgs = tr.images[tr.site == name][:, 0]
        means.append(imgs.mean())
        # Noise from a Laplacian of the body's centre, where the anatomy is smooth.
        c = imgs[:, 12:20, 12:20]
        lap = 4 * c[:, 1:-1, 1:-1] - c[:, :-2, 1:-1] - c[:, 2:, 1:-1] - c[:, 1:-1, :-2] - c[:, 1:-1, 2:]
        noise.append(lap.std() / np.sqrt(20))
    assert max(means) - min(means) > 0.03, means
    np.testing.assert_allclose(noise, [s.noise for s in scanners], rtol=0.15)


def test_labels_balanced_ish(src):
    assert 0.35 <= src.train.labels.mean() <= 0.65
    for name in np.unique(src.train.site):
        assert 0.25 <= src.train.labels[src.train.site == name].mean() <= 0.75


def test_lesion_is_a_small_modest_disc_inside_the_body():
    """Same anatomy with and without the lesion: the difference is one disc of the stated size."""
    from privmed.data.phantom import _anatomy

    n, size = 200, 32
    without = _anatomy(n, size, np.zeros(n, np.int64), np.random.default_rng(5))
    with_ = _anatomy(n, size, np.ones(n, np.int64), np.random.default_rng(5))
    diff = with_ - without
    assert diff.min() >= 0
    peak = diff.max(axis=(1, 2))
    assert peak.min() > 0.15 and peak.max() <= 0.35 + 1e-6
    half = (diff > peak[:, None, None] / 2).sum(axis=(1, 2))  # pixels above half maximum
    r_lo, r_hi = size / 14, size / 8  # a soft disc: half maximum at its radius
    assert half.min() > 0.6 * np.pi * r_lo**2 and half.max() < 1.3 * np.pi * r_hi**2


def _python_calls(fn) -> int:
    """How many Python and C functions `fn()` calls, counted by a profiler: work, not seconds. The
    garbage collector is off meanwhile: finalizers it might run would count as calls of `fn`."""
    import gc
    import sys

    calls = [0]

    def count(frame, event, arg):  # noqa: ANN001, ANN202
        if event in ("call", "c_call"):
            calls[0] += 1

    gc.collect()
    gc.disable()
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls[0]


def test_generation_is_vectorised_over_images():
    """The generator does no per-image Python work (what once made it slow): 30 times the images,
    exactly the same function calls, each an array operation over all of a site's images at once.
    (Its speed is timed by hand: benchmarks/phantom_speed.py.)"""
    _load(n=20)  # imports and caches out of the count
    assert _python_calls(lambda: _load(n=20)) == _python_calls(lambda: _load(n=600))

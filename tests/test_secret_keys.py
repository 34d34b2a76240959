"""A party's secret key (privmed.privacy.secret): every generator that protects patients derives
from it, one stream per (purpose, digest), so

- domain separation: other parts (a part boundary moved, another purpose, another digest, another
  key) give another stream; the same key and parts the same stream, whoever loads the key file;
- a key file that is not a privmed key (corrupt, short, long, empty, not hex) is refused with
  SecretKeyError naming the file, and never replaced by a new key;
- a new key file is owner-only (0600) from its first byte, whatever the umask;
- the key's bytes appear in no repr or str of the key or of a site's guard and client, and none
  of them can be pickled or copied.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import pickle
import stat

import numpy as np
import pytest
import torch

from privmed.privacy.secret import KEY_BYTES, SecretKey, SecretKeyError

KEY = bytes(range(KEY_BYTES))
OTHER = bytes(range(1, KEY_BYTES + 1))


def _torch_draws(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(16, generator=gen, dtype=torch.float64)


def _numpy_draws(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(16)


def _streams(key: SecretKey, *parts: object) -> tuple[bytes, torch.Tensor, np.ndarray, int]:
    """What `parts` give under `key`: the HMAC, torch's and numpy's first draws, the legacy seed."""
    return (key.digest(*parts), _torch_draws(key.torch_generator(*parts)),
            _numpy_draws(key.numpy_generator(*parts)), key.legacy_seed(*parts))


def _same(a, b) -> bool:  # noqa: ANN001
    return a[0] == b[0] and torch.equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and a[3] == b[3]


def _disjoint(a, b) -> bool:  # noqa: ANN001
    """Every part of the two streams differs (16 normal draws never coincide by chance)."""
    return (a[0] != b[0] and not torch.any(a[1] == b[1]) and not np.any(a[2] == b[2]) and a[3] != b[3])


D1, D2 = hashlib.sha256(b"release 1").hexdigest(), hashlib.sha256(b"release 2").hexdigest()


@pytest.mark.parametrize(("parts", "others"), [
    (("ab", "c"), ("a", "bc")),  # a part boundary moved: the same bytes concatenated
    (("abc",), ("ab", "c")),
    (("train", D1), ("score", D1)),  # another purpose, the same digest
    (("train", D1), ("central", D1)),
    (("train", D1), ("train", D2)),  # another digest (another release)
    (("train", D1), (D1, "train")),  # the same parts in another order
    (("",), ()),  # an empty part is a part
    (("", ""), ("",)),
    (("train", D1), ("train", D1, "")),
])
def test_other_parts_give_another_stream_and_the_same_parts_the_same(parts, others):
    key = SecretKey(KEY)
    assert _same(_streams(key, *parts), _streams(SecretKey(KEY), *parts))
    assert _disjoint(_streams(key, *parts), _streams(key, *others))


def test_the_digest_is_hmac_sha256_of_the_length_prefixed_parts():
    """The reference: HMAC-SHA256 keyed by the secret (a PRF: without the key the streams cannot
    be predicted), of each part as its 4-byte big-endian length and UTF-8 bytes."""
    msg = b"".join(len(p).to_bytes(4, "big") + p for p in (b"train", D1.encode(), "r\u00e9".encode()))
    assert SecretKey(KEY).digest("train", D1, "r\u00e9") == hmac.new(KEY, msg, hashlib.sha256).digest()


def test_the_generators_derive_from_the_key(tmp_path):
    """Another key, another stream for the same parts; the same key file loaded twice (a restarted
    site) the same stream, in torch and numpy both."""
    path = tmp_path / "secret.key"
    created = SecretKey.load_or_create(path)
    loaded, again = SecretKey.load(path), SecretKey.load_or_create(path)
    for parts in (("train", D1), ("score", D2), ("secagg", D1)):
        assert _same(_streams(created, *parts), _streams(loaded, *parts))
        assert _same(_streams(created, *parts), _streams(again, *parts))
        assert _disjoint(_streams(SecretKey(KEY), *parts), _streams(SecretKey(OTHER), *parts))
        assert _disjoint(_streams(created, *parts), _streams(SecretKey.generate(), *parts))
    # a generator is a fresh stream each time it is asked for, never a shared, advancing one
    key = SecretKey(KEY)
    gen = key.torch_generator("train", D1)
    _torch_draws(gen)
    assert torch.equal(_torch_draws(key.torch_generator("train", D1)),
                       _torch_draws(torch.Generator().manual_seed(key.legacy_seed("train", D1))))


def test_a_new_key_is_32_random_bytes_and_two_are_never_alike(tmp_path):
    a, b = SecretKey.load_or_create(tmp_path / "a.key"), SecretKey.load_or_create(tmp_path / "b.key")
    assert a.digest("x") != b.digest("x")
    lines = (tmp_path / "a.key").read_text(encoding="ascii").splitlines()
    keys = [ln for ln in lines if not ln.startswith("#")]
    assert len(keys) == 1 and len(bytes.fromhex(keys[0])) == KEY_BYTES
    assert any("NEVER SHARE" in ln for ln in lines if ln.startswith("#"))
    with pytest.raises(ValueError, match="32 bytes"):
        SecretKey(KEY[:-1])
    with pytest.raises(ValueError, match="32 bytes"):
        SecretKey(KEY.hex())  # the hex text is not the key


GOOD = "# privmed secret key: NEVER SHARE.\n" + KEY.hex() + "\n"


@pytest.mark.parametrize(("name", "content"), [
    ("empty", b""),
    ("only the header", b"# privmed secret key: NEVER SHARE.\n"),
    ("short", ("# h\n" + KEY[:-1].hex() + "\n").encode()),
    ("long", ("# h\n" + (KEY + b"\x00").hex() + "\n").encode()),
    ("odd length", ("# h\n" + KEY.hex()[:-1] + "\n").encode()),
    ("not hex", ("# h\n" + "zz" * KEY_BYTES + "\n").encode()),
    ("truncated", GOOD.encode()[: len(GOOD) // 2]),
    ("binary", bytes(range(256))),
    ("raw bytes", KEY),
])
def test_a_key_file_that_is_not_a_key_is_refused_naming_the_file_and_kept(tmp_path, name, content):
    path = tmp_path / "secret.key"
    path.write_bytes(content)
    with pytest.raises(SecretKeyError, match=f"secret key {path}: not a privmed key file"):
        SecretKey.load(path)
    # never silently replaced by a fresh key: the site's DP history would no longer replay
    with pytest.raises(SecretKeyError, match=str(path)):
        SecretKey.load_or_create(path)
    assert path.read_bytes() == content


def test_a_key_path_that_is_no_file_is_refused_naming_it(tmp_path):
    with pytest.raises(SecretKeyError, match=str(tmp_path / "missing.key")):
        SecretKey.load(tmp_path / "missing.key")
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(SecretKeyError, match=str(tmp_path / "dir.key")):
        SecretKey.load_or_create(tmp_path / "dir.key")


def test_a_new_key_file_is_owner_only_from_its_first_byte(tmp_path, monkeypatch):
    """Every write into the file is watched: before the first byte, the file is already 0600, and
    so under umask 0 (where a file created the ordinary way would be 0666)."""
    seen = []
    fdopen = os.fdopen

    class Watched:
        def __init__(self, f):  # noqa: ANN001
            self._f = f

        def write(self, data: bytes) -> int:
            st = os.fstat(self._f.fileno())
            seen.append((stat.S_IMODE(st.st_mode), st.st_size))  # the mode, the bytes already there
            return self._f.write(data)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self._f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Watched(fdopen(fd, *a, **k)))
    old = os.umask(0)
    try:
        key = SecretKey.load_or_create(tmp_path / "secret.key")
    finally:
        os.umask(old)
    assert seen, "the key was written without passing through a watched file"
    assert seen[0] == (0o600, 0)  # the first byte went into an owner-only, empty file
    assert all(mode == 0o600 for mode, _ in seen)
    path = tmp_path / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SecretKey.load(path).digest("x") == key.digest("x")
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]  # no temporary copy left behind


def _key_texts(raw: bytes) -> list[bytes]:
    """The forms the key could leak in: its bytes, its hex (either case), its repr."""
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), repr(raw).encode()]


def test_no_key_in_any_repr_and_a_key_is_never_pickled_or_copied():
    key = SecretKey(KEY)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", repr([key]), repr({"k": key})):
        assert not any(s in text.encode() for s in _key_texts(KEY)), text
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps(key, protocol=protocol)
    for how in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="not picklable"):
            how(key)


def test_no_key_in_a_sites_guard_or_client_and_neither_is_pickled(tmp_path):
    from conftest import tiny_config

    from privmed.config import validate_config
    from privmed.federation.experiment import prepare_experiment
    from privmed.federation.hospital import Hospital

    cfg = validate_config(tiny_config(privacy__mode="dp-sgd", privacy__epsilon=4.0, privacy__accountant="rdp",
                                      federation__rounds=1))
    hospital = Hospital.rehearsal(cfg, "site-1", tmp_path / "state")
    client = hospital.setup(prepare_experiment(cfg).plan.setup_for("site-1"))
    hexkey = [ln for ln in (tmp_path / "state" / "secret.key").read_text().splitlines() if not ln.startswith("#")][0]
    leaks = _key_texts(bytes.fromhex(hexkey))
    guard = client.guard
    for obj in (client, guard, hospital):  # they and what they hold, as a log line would show them
        for text in (repr(obj), str(obj), repr(list(vars(obj).values()))):
            assert not any(s in text.encode() for s in leaks), (type(obj).__name__, text)
        with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
            pickle.dumps(obj)
        with pytest.raises(TypeError, match="not picklable"):  # the key stops a deep copy
            copy.deepcopy(obj)
    # and it is the key itself that stops the guard's pickle, not only the lock beside it
    with pytest.raises(TypeError, match="SecretKey is not picklable"):
        pickle.dumps({k: v for k, v in vars(guard).items() if k != "lock"})

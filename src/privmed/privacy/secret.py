"""A party's secret key for the randomness that protects its patients.

DP-SGD's guarantee assumes the attacker cannot predict the noise or the Poisson batches. If they
came from the run's seed (which every party knows and the run directory records), anyone holding
the released model could re-run training with and without a patient and compare. So each party
that draws DP randomness (a site: sampling and noise; the server under central DP: its noise)
holds a key of its own:

    key = SecretKey.load_or_create(path)        # 32 bytes from the OS's CSPRNG, file 0600
    gen = key.torch_generator("dp-sgd", run, round, purpose, turn)   # one release's generator
    rng = key.numpy_generator("central-noise", run, round)

Each generator is seeded from HMAC-SHA256(key, the release's identity), so the same key replays a
run exactly (`--resume`, a retried round) and without the key nothing can be replayed. The torch
generator is Mersenne Twister seeded with 63 bits of the HMAC (torch takes no more); the numpy
generator is PCG64 seeded with all 256. The key itself is never written into a config, summary,
report, checkpoint or message.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import numpy as np
import torch

from privmed import io
from privmed.errors import PrivmedError

KEY_BYTES = 32
_HEADER = "# privmed secret key: NEVER SHARE. Whoever holds it can replay this party's DP noise.\n"


class SecretKeyError(PrivmedError):
    """A key file that cannot be read or is not a privmed key."""


class SecretKey:
    """32 secret bytes and the generators derived from them."""

    def __init__(self, key: bytes):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a secret key is {KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def generate(cls) -> SecretKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def load_or_create(cls, path: Path) -> SecretKey:
        """The key in `path`, or a new one written there (owner-only from the first byte)."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        io.write_bytes(path, (_HEADER + key._key.hex() + "\n").encode("ascii"), private=True)
        return key

    @classmethod
    def load(cls, path: Path) -> SecretKey:
        path = Path(path)
        try:
            lines = path.read_text(encoding="ascii").splitlines()
            hexkey = [ln for ln in lines if ln and not ln.startswith("#")][0]
            return cls(bytes.fromhex(hexkey.strip()))
        except (OSError, UnicodeDecodeError, IndexError, ValueError) as e:
            raise SecretKeyError(f"secret key {path}: not a privmed key file ({type(e).__name__})") from None

    def digest(self, *parts: object) -> bytes:
        """HMAC-SHA256 of the parts (ints, strings), each length-prefixed so no two lists collide."""
        msg = b"".join(len(b).to_bytes(4, "big") + b for b in (str(p).encode("utf-8") for p in parts))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def torch_generator(self, *parts: object) -> torch.Generator:
        seed = int.from_bytes(self.digest(*parts)[:8], "big") >> 1
        return torch.Generator().manual_seed(seed)

    def numpy_generator(self, *parts: object) -> np.random.Generator:
        words = np.frombuffer(self.digest(*parts), dtype=np.uint32)
        return np.random.default_rng(np.random.SeedSequence(words.tolist()))

    def legacy_seed(self, *parts: object) -> int:
        """A 63-bit seed (for generators that take an integer, such as numpy's legacy global one)."""
        return int.from_bytes(self.digest(*parts)[:8], "big") >> 1

    def __repr__(self) -> str:  # never print the key
        return "SecretKey(<hidden>)"

    def __reduce__(self):  # noqa: ANN204 - a key is never pickled into a checkpoint or message
        raise TypeError("a SecretKey is not picklable: it never leaves the party that holds it")

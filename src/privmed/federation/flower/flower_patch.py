"""The waits privmed shortens inside Flower 1.41.0, which has no setting for them: the one place
privmed patches Flower. Each is a fixed sleep that a fast round on a small model mostly waits on:

- the SuperNode (flwr.supernode.start_client_internal) sleeps 3 s whenever a pull from the
  SuperLink returns no message, and 0.5 s between looks for its ClientApp's reply. A SuperNode
  pulls again right after it sent a reply, and the coordinator's next message comes only after
  that reply, so nearly every message waited the full 3 s. Here that module's `time` is replaced
  by one whose `sleep` waits `PULL_INTERVAL` instead of 3 s and `REPLY_POLL` instead of 0.5 s.
- every pull of a message's content (flwr.supercore.inflatable.inflatable_utils.pull_objects: the
  SuperNode's from the SuperLink, the ClientApp's from its SuperNode, the ServerApp's of a reply)
  that finds an object not yet uploaded waits 1 s, then 2, 4, ... up to 10 s. Once the polls above
  are short, a pull usually comes while the sender is still uploading, and loses a second or more.
  Here the first wait is `PULL_BACKOFF` and the longest `PULL_BACKOFF_CAP`.

Everything else is Flower's, unchanged. `privmed join` starts its SuperNode through this module
(`python -m privmed.federation.flower.flower_patch [flower-supernode's arguments]`), the warm
ClientApp server and the ServerApp apply `patch_object_pulls` in their own processes.
Pinned to flwr 1.41.0 (`PATCHED_FOR`): under another version nothing is patched (a warning says
so); tests/test_flower_speed.py fails when a patched symbol is gone from Flower.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version

PATCHED_FOR = "1.41.0"
PULL_INTERVAL = 0.2  # s, instead of Flower's 3 s after an empty pull
REPLY_POLL = 0.05  # s, instead of Flower's 0.5 s between looks for a reply
SUPERNODE_WAITS = {3: PULL_INTERVAL, 0.5: REPLY_POLL}  # Flower's sleep -> ours
PULL_BACKOFF = 0.05  # s, first wait for an object not yet uploaded (Flower: 1 s)
PULL_BACKOFF_CAP = 1.0  # s, the longest such wait (Flower: 10 s)


class _Waits:
    """The `time` module as start_client_internal sees it, with its fixed sleeps shortened."""

    def __init__(self, waits: dict[float, float]):
        self.waits = waits

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(time, name)


def _pinned() -> bool:
    if version("flwr") == PATCHED_FOR:
        return True
    print(f"privmed: flwr {version('flwr')} is not {PATCHED_FOR}: Flower's own waits are kept "
          "(3 s after a SuperNode's empty pull, 1 s and more for a content not yet uploaded)", file=sys.stderr)
    return False


def patch_supernode_waits(waits: dict[float, float] = SUPERNODE_WAITS) -> bool:
    """Shorten the SuperNode loop's sleeps; False (nothing changed) under another flwr version."""
    if not _pinned():
        return False
    import flwr.supernode.start_client_internal as sci

    sci.time = _Waits(waits)
    return True


def patch_object_pulls(backoff: float = PULL_BACKOFF, cap: float = PULL_BACKOFF_CAP) -> bool:
    """Shorten the backoff of content pulls in this process (the defaults of Flower's
    `pull_objects` and `pull_and_inflate_object_from_tree`, which every caller uses)."""
    if not _pinned():
        return False
    from flwr.supercore.inflatable import inflatable_utils as iu

    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(initial_backoff=backoff, backoff_cap=cap)
    return True


def main() -> None:
    """`flower-supernode` with its waits shortened."""
    patch_supernode_waits()
    patch_object_pulls()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()

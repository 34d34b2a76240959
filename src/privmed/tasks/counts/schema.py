"""What counts hold: the keys and shapes of each task's counts, and `check_counts`."""

from __future__ import annotations

import numpy as np

Counts = dict[str, np.ndarray]

RELIABILITY_BINS = 15  # as classification.reliability_bins and the ECE

CLASSIFICATION_KEYS = ("n", "loss_sum", "confusion", "score_hist", "nonfinite",
                       "rel_count", "rel_conf_sum", "rel_correct_sum")
SURVIVAL_KEYS = ("n", "events", "loss_sum", "concordant", "comparable", "nonfinite")

# The dense tasks' counts (privmed.tasks.segmentation, privmed.tasks.reconstruction): sums over
# volumes or slices, and how many; each *_sum has the shape of its *_n.
SEGMENTATION_KEYS = ("dice_sum", "dice_n", "fg_dice_sum", "fg_dice_n", "hd95_sum", "hd95_n", "loss_sum", "n", "volumes")
RECONSTRUCTION_KEYS = ("psnr_sum", "ssim_sum", "nmse_sum", "psnr_zf_sum", "ssim_zf_sum", "nmse_zf_sum",
                       "loss_sum", "n", "volumes")
_DENSE = {"dice_sum": SEGMENTATION_KEYS, "psnr_sum": RECONSTRUCTION_KEYS}


def _check_dense(c: Counts, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in c]
    if missing:
        raise ValueError(f"counts lack {', '.join(missing)} (have: {', '.join(sorted(c)) or 'none'})")
    for key in keys:
        n_key = key[: -len("_sum")] + "_n"
        if n_key in c:  # a per-class sum: the shape of its count
            want = np.shape(c[n_key])
        elif key.endswith("_n") and key[:-2] + "_sum" in c:
            continue
        else:
            want = ()
        if np.shape(c[key]) != want:
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, expected {want}")


def check_counts(c: Counts) -> None:
    """ValueError saying what is wrong when `c` is not one task's counts with consistent shapes."""
    dense = next((keys for key, keys in _DENSE.items() if key in c), None)
    if dense is not None:
        return _check_dense(c, dense)
    keys = CLASSIFICATION_KEYS if "score_hist" in c else SURVIVAL_KEYS
    missing = [k for k in keys if k not in c]
    if missing:
        raise ValueError(f"counts lack {', '.join(missing)} (have: {', '.join(sorted(c)) or 'none'})")
    scalars = ("n", "loss_sum", "nonfinite") + (("events", "concordant", "comparable")
                                                if keys is SURVIVAL_KEYS else ())
    for key in scalars:
        if np.shape(c[key]) != ():
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, expected a number")
    if keys is SURVIVAL_KEYS:
        return
    k = np.shape(c["confusion"])[0] if np.ndim(c["confusion"]) == 2 else -1
    if k < 2 or np.shape(c["confusion"]) != (k, k):
        raise ValueError(f"counts: 'confusion' has shape {np.shape(c['confusion'])}, expected (K, K)")
    hist = np.shape(c["score_hist"])
    if len(hist) != 3 or hist[:2] != (k, 2) or hist[2] < 1:
        raise ValueError(f"counts: 'score_hist' has shape {hist}, expected ({k}, 2, bins)")
    for key in ("rel_count", "rel_conf_sum", "rel_correct_sum"):
        if np.shape(c[key]) != (RELIABILITY_BINS,):
            raise ValueError(f"counts: '{key}' has shape {np.shape(c[key])}, "
                             f"expected ({RELIABILITY_BINS},)")

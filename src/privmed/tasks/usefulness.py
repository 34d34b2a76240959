"""Whether the selected model is of any use, from its pooled test scores: the flags a run writes to
summary.json (`warnings`), prints on the command line and shows at the top of the report, each
with what to try.

    usefulness_warnings("classification", test, counts, class_names=("normal", "pneumonia"), private=False)
    -> [{"kind": "one-class", "message": "the selected model predicts 'pneumonia' for 100% of ..."}]

Classification: the model predicts one class for (nearly) every test patient, its balanced accuracy
is near chance (1/K), or its AUC is below 0.5. Survival: a C-index near or below 0.5. Segmentation:
a Dice near 0. Reconstruction: no better than the zero-filled input. Under privacy the scores and
counts are the sites' noisy ones: the flags are post-processing of released figures (no patient's
record is read here), so a flag near its threshold may come and go with the noise.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

ONE_CLASS_SHARE = 0.99  # of the test predictions in one class: "predicts one class"
NEAR_CHANCE = 0.05  # balanced accuracy within this of 1/K, a C-index within it of 0.5
DICE_NOTHING = 0.05  # a mean Dice below this: the model segments (next to) nothing

_TRAIN_MORE = ("more local work a round (federation.local_epochs: 5, or federation.local_steps), more "
               "federation.rounds, or another training.lr with training.lr_schedule: cosine")
_PRIVATE = ("; under DP-SGD the noise may drown a small site's signal: a larger privacy.epsilon, more "
            "patients a site or fewer rounds (privmed privacy plan shows the noise each choice adds)")


def usefulness_warnings(task: str, test: Mapping[str, Any], counts: Mapping[str, np.ndarray] | None = None,
                        class_names: Sequence[str] = (), private: bool = False) -> list[dict[str, str]]:
    """The flags of the selected model's pooled `test` scores (a metrics dict of `task`), with its
    pooled test `counts` where the run has them (classification: the confusion matrix gives what
    the model predicts). `private`: the run trained under privacy (the advice says so). [] when
    the scores show nothing wrong, or there are none."""
    if not test:
        return []
    try_ = _TRAIN_MORE + (_PRIVATE if private else "")
    if task in ("classification", "tabular-classification"):
        return _classification(test, counts, class_names, try_)
    if task == "survival":
        return _survival(test, try_)
    if task == "segmentation":
        dice = _num(test.get("dice"))
        if dice is not None and dice < DICE_NOTHING:
            return [_flag("segments-nothing", f"the selected model's test Dice is {dice:.3f}: it segments next to "
                          f"nothing. Try {try_}; for volumes unlike the phantoms, data.spacing (a coarser "
                          "grid) and data.min_foreground (slices that show the structure)")]
        return []
    if task == "reconstruction":
        psnr, zero = _num(test.get("psnr")), _num(test.get("psnr_zero_filled"))
        if psnr is not None and zero is not None and psnr <= zero:
            return [_flag("no-better-than-input", f"the selected model's test PSNR ({psnr:.2f} dB) is no better "
                          f"than the zero-filled input's ({zero:.2f} dB): it learned nothing. Try {try_}")]
    return []


def _classification(test: Mapping[str, Any], counts: Mapping[str, np.ndarray] | None,
                    class_names: Sequence[str], try_: str) -> list[dict[str, str]]:
    out = []
    confusion = None if counts is None or "confusion" not in counts else np.maximum(counts["confusion"], 0)
    k = confusion.shape[0] if confusion is not None else max(len(class_names), 2)
    predicted = None if confusion is None or not confusion.sum() > 0 else confusion.sum(axis=0) / confusion.sum()
    if predicted is not None and predicted.max() >= ONE_CLASS_SHARE:
        top = int(predicted.argmax())
        name = class_names[top] if top < len(class_names) else f"class {top}"
        out.append(_flag("one-class", f"the selected model predicts '{name}' for {predicted.max():.0%} of the "
                         "test set: it has learned the commonest class, not to tell the classes apart. "
                         f"Try {try_}; and check that every class has patients at the sites"))
    ba = _num(test.get("balanced_accuracy"))
    if not out and ba is not None and ba <= 1 / k + NEAR_CHANCE:
        out.append(_flag("chance", f"the selected model's balanced accuracy is {ba:.3f}, near chance "
                         f"({1 / k:.2f} with {k} classes). Try {try_}"))
    auc = _num(test.get("auc"))
    if auc is not None and auc < 0.5:
        out.append(_flag("auc-below-chance", f"the selected model's test AUC is {auc:.3f}, below chance (0.5): "
                         "it ranks patients worse than a coin. Check the labels (data.class_names, in the "
                         f"order the sites' labels count), then try {try_}"))
    return out


def _survival(test: Mapping[str, Any], try_: str) -> list[dict[str, str]]:
    c = _num(test.get("c_index"))
    if c is None or c >= 0.5 + NEAR_CHANCE:
        return []
    where = "below" if c < 0.5 else "near"
    return [_flag("chance", f"the selected model's test C-index is {c:.3f}, {where} chance (0.5): it does not "
                  f"order the patients' risks. Try {try_}")]


def _flag(kind: str, message: str) -> dict[str, str]:
    return {"kind": kind, "message": message}


def _num(x: Any) -> float | None:
    """A finite number, else None (a score read back from JSON may be null)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None

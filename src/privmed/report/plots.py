"""The report's figures: pure functions, arrays in, PNG bytes out; one function per figure.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, never pyplot, so
nothing here touches matplotlib's global state or needs a display. Missing values are NaN: a metric
that is NaN in some round leaves a gap in its line, it does not fail.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from privmed.privacy.figures import format_budget
from privmed.tasks.classification import expected_calibration_error, reliability_bins, roc_auc

DPI = 110
TITLE_SIZE = 11
LABEL_SIZE = 10
TICK_SIZE = 9
LEGEND_SIZE = 8


def learning_curves(
    rounds: Sequence[int],
    val_auc_by_site: Mapping[str, Sequence[float]],
    train_loss_by_site: Mapping[str, Sequence[float]],
    pooled_val_auc: Sequence[float],
    pooled_test_auc: Sequence[float],
    best_round: int | None = None,
    val_label: str = "pooled validation",
    test_label: str = "pooled test",
    metric_label: str = "validation AUC",
    mean_test_auc: Sequence[float] | None = None,
    mean_test_label: str = "own test, mean over sites",
    title: str = "Learning curves",
) -> bytes:
    """Two panels over `rounds` (R,): validation AUC per site plus pooled validation and pooled test
    AUC (legend entries `val_label`, `test_label`), with the selected round marked; below, the
    training loss per site. Every series is (R,) floats aligned with `rounds`, NaN (or None) where a
    round has no value. The top panel's metric is any score where higher is better (its axis:
    `metric_label`, e.g. "validation C-index"; a score in [0, 1] gets an axis up to 1); `mean_test_auc`, when given, adds the mean over
    sites of their own test scores (`mean_test_label`). A pooled line with no value at all is left
    out of the legend."""
    many = len(val_auc_by_site) > 6  # legend goes outside the axes: widen the figure for it
    fig = _figure((6.4 + 2.2 * many + 1.4 * (len(val_auc_by_site) > 14), 6.2))
    ax_auc, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    x = np.asarray(rounds, dtype=float)
    colours = _colours(list(val_auc_by_site) + [s for s in train_loss_by_site if s not in val_auc_by_site])
    pooled = ((pooled_val_auc, dict(color="black", lw=2.4, marker="o", ms=4, label=val_label)),
              (pooled_test_auc, dict(color="dimgray", lw=1.8, ls="--", marker="s", ms=3, label=test_label)),
              (mean_test_auc, dict(color="tab:purple", lw=1.6, ls="-.", marker="^", ms=3, label=mean_test_label)))
    _score_lines(ax_auc, x, val_auc_by_site, pooled, colours)
    _mark_round(ax_auc, ax_loss, best_round)
    ax_auc.set_ylabel(metric_label, fontsize=LABEL_SIZE)
    ax_auc.set_title(title, fontsize=TITLE_SIZE)
    groups = [val_auc_by_site.values(), [pooled_val_auc, pooled_test_auc, mean_test_auc or []]]
    _score_limits_and_legend(ax_auc, groups, many, len(val_auc_by_site) > 14)
    for site, values in train_loss_by_site.items():
        ax_loss.plot(x, _floats(values), marker="o", ms=3, lw=1.2, color=colours[site], label=site)
    ax_loss.set_ylabel("training loss\n(per site, colours as above)", fontsize=LABEL_SIZE)
    ax_loss.set_xlabel("round", fontsize=LABEL_SIZE)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(x):
        ax_loss.set_xlim(x.min() - 0.5, x.max() + 0.5)  # else one round gets fractional ticks
    return _png(fig)


def _score_lines(ax, x: np.ndarray, by_site: Mapping[str, Sequence[float]], pooled, colours: dict) -> None:
    """The top panel's lines: one per site, then each pooled (values, style) with a finite value."""
    for site, values in by_site.items():
        # Above the pooled lines: a site whose score equals the pooled one must stay visible.
        ax.plot(x, _floats(values), marker="o", ms=3, lw=1.2, color=colours[site], label=site, zorder=3)
    for values, style in pooled:
        if values is not None and np.isfinite(_floats(values)).any():
            ax.plot(x, _floats(values), zorder=2, **style)


def _mark_round(ax_auc, ax_loss, best_round: int | None) -> None:
    """The selected round, dotted red on both panels and in the top legend; grids and ticks."""
    for ax in (ax_auc, ax_loss):
        if best_round is not None:
            ax.axvline(best_round, color="tab:red", lw=1, ls=":", zorder=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=TICK_SIZE)
    if best_round is not None:
        ax_auc.plot([], [], color="tab:red", lw=1, ls=":", label=f"selected round ({best_round})")


def _score_limits_and_legend(ax, groups, many: bool, two_columns: bool) -> None:
    """The top panel's y range (a score in [0, 1] up to 1; any other, such as PSNR in dB, keeps
    matplotlib's limits around its values) and legend (beside the axes with `many` sites)."""
    lo, hi = _finite_min(groups), _finite_max(groups)
    if lo is not None and hi is not None and hi <= 1.0:  # a score in [0, 1] (AUC, C-index, Dice)
        ax.set_ylim(max(0.0, min(lo, 0.9) - 0.03), 1.01)
    if not many:  # wherever it hides the fewest points (C-index curves sit low, AUC curves high)
        ax.legend(fontsize=LEGEND_SIZE, loc="best")
    else:  # too many to fit inside without hiding the curves; constrained layout makes room
        ax.legend(fontsize=LEGEND_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=1 + two_columns)


def roc(
    probs_by_model: Mapping[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> bytes:
    """ROC curves on one test set. `labels` (N,) ints; each probs (N, K) with the same K.

    K = 2: one curve per model, class 1 positive, AUC in the legend. K > 2: one one-vs-rest curve per
    class present in `labels`, for a single model only (ValueError for several). ValueError when
    `labels` holds a single class (ROC is undefined)."""
    labels = np.asarray(labels)
    k = _n_classes(probs_by_model)
    if len(np.unique(labels)) < 2:
        raise ValueError("ROC needs test labels of at least two classes")
    if k > 2 and len(probs_by_model) != 1:
        raise ValueError(f"ROC for {k} classes is drawn for one model, got {len(probs_by_model)}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]

    if k == 2:
        curves = {}
        for model, probs in probs_by_model.items():
            fpr, tpr, _ = roc_curve(labels, probs[:, 1])
            curves[model] = (fpr, tpr, roc_auc(probs, labels))
        title = f"ROC, test set (positive class: {names[1]})"
    else:
        [(model, probs)] = probs_by_model.items()
        curves = {}
        for c in np.unique(labels):
            fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            auc = roc_auc(np.stack([1 - probs[:, c], probs[:, c]], axis=1), (labels == c).astype(int))
            curves[names[c]] = (fpr, tpr, auc)
        title = f"ROC, test set, one class vs rest ({model})"
    return roc_curves(curves, title)


def roc_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> bytes:
    """ROC curves already computed: `curves` maps a legend name (a model, or a class against the
    rest) to (fpr, tpr, auc), fpr and tpr (M,) from (0, 0) to (1, 1); the AUC goes in the legend."""
    fig = _figure((5.4, 4.8))
    ax = fig.subplots()
    colours = _colours(list(curves))
    lw = 1.8 if len(curves) <= 2 else 1.5
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=lw, color=colours[name], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)", fontsize=LABEL_SIZE)
    ax.set_ylabel("true positive rate (sensitivity)", fontsize=LABEL_SIZE)
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE, loc="lower right")
    return _png(fig)


def membership_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], n_nonmembers: int) -> bytes:
    """Membership-inference ROC curves on log-log axes (what matters is the true positive rate at
    a low false positive rate: the patients an attacker can name with confidence). `curves`: attack
    -> (fpr, tpr, auc). The axes start at the lowest FPR the non-members resolve, 1/n."""
    fig = _figure((5.4, 4.8))
    ax = fig.subplots()
    colours = _colours(list(curves))
    lo = 1.0 / max(n_nonmembers, 1)
    for name, (fpr, tpr, auc) in curves.items():
        keep = (fpr >= lo) & (tpr > 0)
        ax.plot(fpr[keep], tpr[keep], lw=1.6, color=colours[name], label=f"{name} (AUC {auc:.3f})")
    grid = np.logspace(np.log10(lo), 0, 50)
    ax.plot(grid, grid, color="gray", lw=1, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("false positive rate (non-members called members)", fontsize=LABEL_SIZE)
    ax.set_ylabel("true positive rate (members found)", fontsize=LABEL_SIZE)
    ax.set_title("Membership inference, log scale", fontsize=TITLE_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=LEGEND_SIZE, loc="lower right")
    return _png(fig)


def inversion_examples(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], max_images: int = 8) -> bytes:
    """Originals above their reconstructions, one pair of image rows per attacked setting. `rows`:
    (label, originals (n, C, H, W), reconstructions (n, C, H, W) in the originals' order, PSNR (n,)
    in dB), images in [0, 1], C 1 (grey) or 3 (RGB); at most `max_images` of each row are drawn."""
    width = max(min(len(o), max_images) for _, o, _, _ in rows)
    fig = _figure((max(6.4, 2.2 + 0.9 * width), 0.5 + 1.9 * len(rows)))
    grid = fig.subplots(2 * len(rows), width, squeeze=False)
    for r, (label, originals, recs, psnr) in enumerate(rows):
        for k, (kind, images) in enumerate((("original", originals), ("rebuilt", recs))):
            for j in range(width):
                ax = grid[2 * r + k][j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= min(len(images), max_images):
                    ax.axis("off")
                    continue
                img = np.clip(np.asarray(images[j], dtype=np.float64), 0.0, 1.0)
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.imshow(np.transpose(img[:3], (1, 2, 0)))
                if k == 1:
                    ax.set_xlabel(f"{psnr[j]:.1f} dB", fontsize=TICK_SIZE - 1, labelpad=1)
            text = f"{label}\n{kind}" if k == 0 else kind
            grid[2 * r + k][0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=LEGEND_SIZE)
    fig.suptitle("Gradient inversion: originals, and what the attacker rebuilt (PSNR)", fontsize=TITLE_SIZE)
    return _png(fig)


def calibration(
    probs_by_model: Mapping[str, np.ndarray], labels: np.ndarray, n_bins: int = 15,
    items: str = "images",
) -> bytes:
    """Reliability diagram of top-label confidence in `n_bins` equal-width bins (as the ECE metric),
    above a histogram of how many test `items` (images, patients) fall in each bin. `labels` (N,)
    ints; each probs (N, K). ECE in the title for one model, in the legend for several."""
    labels = np.asarray(labels)
    k = _n_classes(probs_by_model)
    bins = {m: reliability_bins(p, labels, n_bins) for m, p in probs_by_model.items()}
    ece = {m: expected_calibration_error(p, labels, n_bins) for m, p in probs_by_model.items()}
    return calibration_bins(bins, ece, k, items=items)


def calibration_bins(
    bins_by_model: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    ece_by_model: Mapping[str, float],
    n_classes: int,
    items: str = "images",
) -> bytes:
    """The reliability diagram of `calibration` from bins already computed: each model's
    (mean confidence, accuracy, count), each (B,) over B equal-width bins on [0, 1] (NaN means where
    the count is 0), as `reliability_bins` gives them; its ECE; `n_classes` sets the axis' left end
    (confidence is at least 1 / K)."""
    fig = _figure((6.0, 5.2))
    ax_rel, ax_cnt = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    colours = _colours(list(bins_by_model))
    single = len(bins_by_model) == 1

    ax_rel.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="perfect calibration")
    for model, (conf, acc, count) in bins_by_model.items():
        edges = np.linspace(0.0, 1.0, len(count) + 1)
        ece = ece_by_model[model]
        seen = count > 0
        label = "model" if single else f"{model} (ECE {ece:.3f})"
        ax_rel.plot(conf[seen], acc[seen], marker="o", ms=4, lw=1.5, color=colours[model], label=label)
        ax_cnt.stairs(count, edges, color=colours[model], fill=single, alpha=0.6 if single else 1.0,
                      lw=1.2)
    if single:
        title = f"Calibration, test set: ECE {ece:.3f}"
    else:
        title = "Calibration, test set (ECE per model in the legend)"
    lo = max(0.0, 1.0 / n_classes - 0.05)
    ax_rel.set_xlim(lo, 1.0)
    ax_rel.set_ylim(-0.02, 1.02)
    ax_rel.set_ylabel("observed accuracy", fontsize=LABEL_SIZE)
    ax_rel.set_title(title, fontsize=TITLE_SIZE)
    ax_rel.legend(fontsize=LEGEND_SIZE, loc="upper left")
    ax_cnt.set_ylabel(items, fontsize=LABEL_SIZE)
    ax_cnt.set_xlabel("predicted confidence (probability of the predicted class)", fontsize=LABEL_SIZE)
    ax_cnt.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    for ax in (ax_rel, ax_cnt):
        ax.tick_params(labelsize=TICK_SIZE)
        ax.grid(alpha=0.3)
    return _png(fig)


def kaplan_meier(
    panels: Mapping[str, Sequence[Mapping]],
    time_label: str = "time",
) -> bytes:
    """Kaplan-Meier survival curves, one axes per entry of `panels` (its key is the axes' title).
    Each panel is a sequence of curves, lowest risk first; a curve is a mapping with "label" (legend
    entry), "times" and "survival" (the right-continuous step function, (T,) each), and
    "censored_times" with "censored_survival" ((C,) each), where a tick marks a censored patient.
    Lowest risk is drawn blue, highest red."""
    if not panels:
        raise ValueError("no Kaplan-Meier panels given")
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    size = (6.4, 4.6) if n == 1 else (4.3 * cols, 3.5 * rows + 0.4)
    fig = _figure(size)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, (title, curves) in zip(axes, panels.items()):
        colours = _risk_colours(len(curves))
        for colour, curve in zip(colours, curves):
            t = np.asarray(curve["times"], dtype=float)
            sv = np.asarray(curve["survival"], dtype=float)
            ax.step(t, sv, where="post", color=colour, lw=1.8, label=curve["label"])
            ct = np.asarray(curve.get("censored_times", []), dtype=float)
            if len(ct):
                ax.plot(ct, np.asarray(curve["censored_survival"], dtype=float), ls="none",
                        marker="|", ms=7, mew=1.2, color=colour)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=TITLE_SIZE if n == 1 else LABEL_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=LEGEND_SIZE, loc="lower left")
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n]:
        if ax.get_subplotspec().is_last_row() or n == 1:
            ax.set_xlabel(time_label, fontsize=LABEL_SIZE)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("share event-free (Kaplan-Meier)", fontsize=LABEL_SIZE)
    axes[0].plot([], [], ls="none", marker="|", ms=7, color="gray", label="censored")
    axes[0].legend(fontsize=LEGEND_SIZE, loc="lower left")
    if n > 1:
        fig.suptitle("Kaplan-Meier curves by predicted risk group, pooled test set",
                     fontsize=TITLE_SIZE)
    return _png(fig)


def privacy_spent(
    rounds: Sequence[int],
    epsilon_by_site: Mapping[str, Sequence[float]],
    budget: float | None = None,
    delta: float | None = None,
) -> bytes:
    """Epsilon each site has spent after each of `rounds` (R,), one line per site (each series (R,)
    floats, NaN or None where unknown), with the budget as a dashed horizontal line; y from 0.
    `delta` goes in the axis label."""
    many = len(epsilon_by_site) > 6
    fig = _figure((6.4 + 2.2 * many + 1.4 * (len(epsilon_by_site) > 14), 4.2))
    ax = fig.subplots()
    x = np.asarray(rounds, dtype=float)
    colours = _colours(list(epsilon_by_site))
    for site, values in epsilon_by_site.items():
        ax.plot(x, _floats(values), marker="o", ms=3, lw=1.4, color=colours[site], label=site, zorder=3)
    top = _finite_max([epsilon_by_site.values()])
    if budget is not None and math.isfinite(budget):
        label = f"budget (ε = {format_budget(budget)})"  # as given; a computed one rounded up
        ax.axhline(budget, color="black", lw=1.2, ls="--", zorder=2, label=label)
        top = budget if top is None else max(top, budget)
    ax.set_ylim(0.0, 1.1 * top if top else 1.0)
    ax.set_ylabel("ε spent" + ("" if delta is None else f" (δ = {delta:g})"), fontsize=LABEL_SIZE)
    ax.set_xlabel("round", fontsize=LABEL_SIZE)
    ax.set_title("Privacy spent per site", fontsize=TITLE_SIZE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(x):
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(alpha=0.3)
    if not many:
        ax.legend(fontsize=LEGEND_SIZE, loc="lower right")
    else:
        ax.legend(fontsize=LEGEND_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=1 + (len(epsilon_by_site) > 14))
    return _png(fig)


def tuning_trials(trials: Sequence[int], scores: Sequence[float | None], label: str) -> bytes:
    """Each trial's score (a dot; refused or diverged trials left out) and the best so far (a step
    line), over the trials in the order they ran."""
    fig = _figure((6.4, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    y = _floats(scores)
    ax.plot(trials, y, "o", color="#1f77b4", label="trial")
    best = np.fmax.accumulate(np.where(np.isnan(y), -np.inf, y))
    best[np.isinf(best)] = np.nan
    ax.step(trials, best, where="post", color="black", linewidth=1.5, label="best so far")
    ax.set_xlabel("trial", fontsize=LABEL_SIZE)
    ax.set_ylabel(label, fontsize=LABEL_SIZE)
    ax.set_title(f"Tuning: {label} per trial", fontsize=TITLE_SIZE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE, loc="best")
    return _png(fig)


def patch_slices(targets: np.ndarray) -> np.ndarray:
    """(n,) the slice (along D) of each class map `targets` (n, D, H, W) to draw: where the mask's
    foreground covers most, the middle slice where the patch has none."""
    cover = (np.asarray(targets) > 0).reshape(*np.shape(targets)[:2], -1).sum(axis=2)  # (n, D)
    return np.where(cover.max(axis=1) > 0, cover.argmax(axis=1), np.shape(targets)[1] // 2)


def dense_examples(
    inputs: np.ndarray, preds: Mapping[str, np.ndarray], targets: np.ndarray, task: str,
    class_names: Sequence[str] = (),
) -> bytes:
    """One row per example: the input, each model's prediction, the target.
    segmentation: `inputs` (n, C, H, W) in [0, 1], predictions and `targets` (n, H, W) class maps,
    drawn as colours over the image; reconstruction: `inputs` (n, 1, H, W) the zero-filled images,
    predictions and `targets` (n, 1, H, W) images, each panel titled with its PSNR (dB, data range
    the target's maximum). Segmentation of 3D patches, `inputs` (n, C, D, H, W) and class maps
    (n, D, H, W): each row draws one slice of its patch (`patch_slices`)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if task == "segmentation" and np.ndim(targets) == 4:
        at = patch_slices(targets)
        rows = np.arange(len(at))
        inputs, targets = np.asarray(inputs)[rows, :, at], np.asarray(targets)[rows, at]
        preds = {name: np.asarray(p)[rows, at] for name, p in preds.items()}

    n, names = len(targets), list(preds)
    cols = 2 + len(names)
    fig = _figure((1.9 * cols + 0.6, 0.4 + 1.9 * n))
    grid = fig.subplots(n, cols, squeeze=False)
    tab = colormaps["tab10"]
    k = max(len(class_names), int(max(np.max(targets, initial=0), *(np.max(p, initial=0) for p in preds.values()))) + 1)
    overlay = ListedColormap([(0, 0, 0, 0)] + [(*tab(i % 10)[:3], 0.45) for i in range(k - 1)])

    def grey(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return v[0] if v.ndim == 3 else v

    for r in range(n):
        base = grey(inputs[r])
        panels = [("input" if task == "segmentation" else "zero-filled", None)]
        panels += [(name, preds[name][r]) for name in names] + [("target", targets[r])]
        for c, (title, value) in enumerate(panels):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if task == "segmentation":
                ax.imshow(base, cmap="gray", vmin=0.0, vmax=1.0)
                if value is not None:
                    ax.imshow(np.asarray(value), cmap=overlay, vmin=0, vmax=k - 1, interpolation="nearest")
            else:
                img = base if value is None else grey(value)
                top = float(np.max(grey(targets[r]))) or 1.0
                ax.imshow(img, cmap="gray", vmin=0.0, vmax=top)
                if c < cols - 1:
                    mse = float(np.mean((img - grey(targets[r])) ** 2))
                    title = f"{title}\n{10 * np.log10(top ** 2 / mse):.1f} dB" if mse > 0 else title
            if r == 0 or task != "segmentation":
                ax.set_title(title, fontsize=LEGEND_SIZE)
    if task == "segmentation" and len(class_names) > 1:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=tab(i % 10), label=c) for i, c in enumerate(class_names[1:])],
                   loc="outside lower center", ncols=len(class_names) - 1, fontsize=LEGEND_SIZE)
    return _png(fig)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" tag: the same data gives the same bytes across matplotlib patch versions.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _risk_colours(n: int) -> list:
    """Blue (lowest risk) to red (highest) for `n` groups."""
    if n <= 2:
        return ["tab:blue", "tab:red"][:n]
    from matplotlib import colormaps

    return [colormaps["coolwarm"](i / (n - 1)) for i in range(n)]


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _finite_min(groups) -> float | None:
    finite = [v for group in groups for series in group for v in _floats(series) if np.isfinite(v)]
    return min(finite) if finite else None


def _finite_max(groups) -> float | None:
    finite = [v for group in groups for series in group for v in _floats(series) if np.isfinite(v)]
    return max(finite) if finite else None


def _n_classes(probs_by_model: Mapping[str, np.ndarray]) -> int:
    if not probs_by_model:
        raise ValueError("no model probabilities given")
    ks = {np.shape(p)[1] for p in probs_by_model.values()}
    if len(ks) != 1:
        raise ValueError(f"models disagree on the number of classes: {sorted(ks)}")
    return ks.pop()

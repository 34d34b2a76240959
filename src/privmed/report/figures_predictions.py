"""The test set's figures: ROC and calibration of a classification run, from its predictions
(predictions.npz) or from the counts the sites reported (test_counts.npz); and a dense task's
examples (input, each model's prediction, target)."""

from __future__ import annotations

import numpy as np

from privmed.report import plots
from privmed.report.figure import FigureOut
from privmed.report.run_files import RunFiles
from privmed.report.task_view import TaskView, task_view
from privmed.tasks import counts as evaluation_counts


ROC_TITLE = "ROC curve"


CAL_TITLE = "Calibration"


def _roc_caption(k: int = 2, n_models: int = 1) -> str:
    """The ROC's caption, for `k` classes and `n_models` curves' models (the defaults: the caption
    of a slot with no curve)."""
    caption = ("Sensitivity against 1 − specificity of the selected model(s) on the pooled test set as "
               "the decision threshold varies. The dashed diagonal is a model that guesses; the closer a "
               "curve runs to the top-left corner, the better the model separates the classes.")
    if k > 2:
        caption += " With more than two classes, each curve is one class against the rest."
    if n_models > 1:
        caption += " One curve per site's own model, all on the same pooled test set."
    return caption


def _roc_note(n_present: int, k: int, n_models: int) -> str | None:
    """Why no ROC is drawn for a test set with `n_present` of `k` classes scored by `n_models`
    models (from predictions or from counts alike); None where it is drawn."""
    if n_present < 2:
        return "Not drawn: the test labels hold a single class, so ROC is undefined."
    if k > 2 and n_models > 1:
        return (f"Not drawn: with {k} classes the one-vs-rest curves are drawn for a single model, and "
                f"this run has {n_models}; see each site's AUC in the table above.")
    return None


def _cal_caption(items: str) -> str:
    return (f"Top: for test {items} grouped by the model's confidence in its prediction, the share it "
            "got right. A calibrated model lies on the diagonal: of the predictions made with 80% "
            "confidence, 80% are right. Below the diagonal the model is over-confident. Bottom: how "
            f"many test {items} fall in each confidence bin.")


def _not_drawn(why: str, items: str) -> list[FigureOut]:
    return [FigureOut("roc", ROC_TITLE, _roc_caption(), note=why),
            FigureOut("calibration", CAL_TITLE, _cal_caption(items), note=why)]


def prediction_figures(run: RunFiles, view: TaskView | None = None) -> list[FigureOut]:
    items = (view or task_view(run)).items
    if run.labels is None or not run.probs:
        counts = {m: c for m, c in run.counts.items() if "score_hist" in c}
        if counts:
            return _count_figures(run, counts, items)
        return _not_drawn("Not drawn: the run directory has no predictions.npz (or it holds no "
                          "probabilities).", items)
    if len(run.labels) == 0:
        return _not_drawn("Not drawn: the test set is empty.", items)
    probs, skipped = _finite_models(run.probs, lambda p: bool(np.isfinite(p).all()))
    if not probs:
        return _not_drawn(NO_FINITE, items)
    k = next(iter(probs.values())).shape[1]
    note = _roc_note(len(np.unique(run.labels)), k, len(probs))
    if note is not None:
        roc_out = FigureOut("roc", ROC_TITLE, _roc_caption(), note=note)
    else:
        png = plots.roc(probs, run.labels, _class_names(run, k))
        roc_out = FigureOut("roc", ROC_TITLE, _roc_caption(k, len(probs)) + skipped, png=png)
    cal_png = plots.calibration(probs, run.labels, items=items)
    return [roc_out, FigureOut("calibration", CAL_TITLE, _cal_caption(items) + skipped, png=cal_png)]


def _count_roc(run: RunFiles, finite: dict[str, dict], k: int, present: np.ndarray, n_bins: int,
               items: str, skipped: str) -> FigureOut:
    """The ROC from the models' counts (`finite`: each model's counts of `k` classes, `present`:
    the classes the test set holds): each model's curve of the positive class when k is 2, else
    one class against the rest for the single model."""
    names = _class_names(run, k)
    if k == 2:
        curves = {m: (*evaluation_counts.roc_from_counts(c, 1),
                      evaluation_counts.one_vs_rest_auc(c, 1)) for m, c in finite.items()}
        title = f"ROC, test set (positive class: {names[1]})"
    else:
        [(model, c)] = finite.items()
        curves = {names[i]: (*evaluation_counts.roc_from_counts(c, i),
                             evaluation_counts.one_vs_rest_auc(c, i)) for i in present}
        title = f"ROC, test set, one class vs rest ({model})"
    classes = [1] if k == 2 else present
    bound = max(evaluation_counts.auc_rounding_bound(c, int(i)) for c in finite.values() for i in classes)
    sent = (f" Computed from counts the sites reported, no patient's prediction left a site: per "
            f"class, how many test {items} have a score in each of {n_bins:,} bins of the logit "
            "scale, so each score is rounded to that grid")
    caption = _roc_caption(k, len(finite))
    if run.facts.scoring:
        caption += (f"{sent}, each count with Gaussian noise added at the site (the scoring "
                    "mechanism of the privacy section): the curve and AUC are those of the noisy "
                    f"counts, clipped at zero.{skipped}")
    else:
        caption += (f"{sent}; the rounding moves an AUC by at most {bound:.2g} from that of the "
                    f"unrounded scores.{skipped}")
    return FigureOut("roc", ROC_TITLE, caption, png=plots.roc_curves(curves, title))


NO_FINITE = "Not drawn: no model has finite test probabilities (training diverged?)."


EXAMPLES_TITLE = "Examples from the test set: input, prediction and target"


def dense_figures(run: RunFiles, view: TaskView) -> list[FigureOut]:
    """Input, each model's prediction and the target, side by side, for the few test slices the
    run kept (predictions.npz: example_input, example_target, example_index and the models'
    predictions of every test slice)."""
    arrays = run.predictions
    inputs, targets, index = (arrays.get(k) for k in ("example_input", "example_target", "example_index"))
    prefix = "mask:" if view.task == "segmentation" else "image:"
    preds = {k.removeprefix(prefix): v[index] for k, v in arrays.items()
             if k.startswith(prefix) and index is not None and v.ndim >= 3 and len(v) > int(index.max(initial=0))}
    if view.task == "segmentation":
        item = ("one test patch, drawn by its slice where the reference mask covers most (the middle "
                "one where it has none)" if targets is not None and targets.ndim == 4 else "one test slice")
        caption = (f"Each row is {item} (of a different patient where the test set has several): "
                   "the image, then each model's predicted classes, then the reference mask. Colours: "
                   + ", ".join(f"{c}" for c in view.class_names[1:]) + " over the image.")
    else:
        caption = ("Each row is one test slice: the zero-filled reconstruction from the undersampled "
                   "k-space (what the scanner's measurement gives without a model), then each model's "
                   "reconstruction, then the fully sampled image. PSNR against the fully sampled image "
                   "is in each panel's title.")
    if inputs is None or targets is None or index is None or not preds:
        return [FigureOut("examples", EXAMPLES_TITLE, caption, note=(
            "Not drawn: the run kept no test examples (a run whose test data is held by the sites: "
            "no slice leaves a site)."))]
    png = plots.dense_examples(inputs, preds, targets, view.task, list(view.class_names))
    return [FigureOut("examples", EXAMPLES_TITLE, caption, png=png)]


def _finite_models(by_model: dict, finite) -> tuple[dict, str]:
    """The models whose test predictions (or counts) are finite by `finite`, and the caption's note
    naming those left out ('' when none)."""
    kept = {m: v for m, v in by_model.items() if finite(v)}
    dropped = [m for m in by_model if m not in kept]
    return kept, (f" Left out, their probabilities are not finite: {', '.join(dropped)}." if dropped else "")


def _count_figures(run: RunFiles, counts: dict[str, dict], items: str) -> list[FigureOut]:
    """ROC and calibration from the sites' classification counts (no predictions.npz): the ROC of
    the scores rounded to the counts' grid, the reliability bins exactly as from predictions."""
    if all(int(c["n"]) == 0 for c in counts.values()):
        return _not_drawn("Not drawn: the test set is empty.", items)
    finite, skipped = _finite_models(counts, lambda c: int(c["nonfinite"]) == 0)
    if not finite:
        return _not_drawn(NO_FINITE, items)
    shapes = {c["score_hist"].shape for c in finite.values()}
    if len(shapes) > 1:
        return _not_drawn("Not drawn: the models' test counts disagree on the number of classes or "
                          f"score bins ({', '.join(map(str, sorted(shapes)))}).", items)
    k, _, n_bins = shapes.pop()
    present = np.flatnonzero(next(iter(finite.values()))["confusion"].sum(axis=1) > 0)
    note = _roc_note(len(present), k, len(finite))
    if note is not None:
        roc_out = FigureOut("roc", ROC_TITLE, _roc_caption(), note=note)
    else:
        roc_out = _count_roc(run, finite, k, present, n_bins, items, skipped)
    bins = {m: evaluation_counts.reliability_from_counts(c) for m, c in finite.items()}
    ece = {m: evaluation_counts.classification_metrics_from_counts(c)["ece"] for m, c in finite.items()}
    cal_caption = (_cal_caption(items) + " Computed from counts the sites reported, no patient's "
                   f"prediction left a site: per confidence bin, how many test {items} fall there, "
                   f"their summed confidence and how many the model got right.{skipped}")
    cal_png = plots.calibration_bins(bins, ece, k, items=items)
    return [roc_out, FigureOut("calibration", CAL_TITLE, cal_caption, png=cal_png)]


def _class_names(run: RunFiles, k: int) -> list[str]:
    names = run.facts.data.class_names
    if names is not None and len(names) == k:
        return list(names)
    return [f"class {i}" for i in range(k)]

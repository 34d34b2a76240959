"""The tasks' metrics in words: no torch, so that the report and the CLI can import it."""

from __future__ import annotations

# Each headline metric's name in words (progress bars, tables, the report).
METRIC_LABELS = {"auc": "AUC", "c_index": "C-index", "dice": "Dice", "psnr": "PSNR (dB)"}


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def scores_text(m: dict) -> str:
    """A metrics dict in a few words: 'AUC 0.912, accuracy 0.850, balanced accuracy 0.801', 'C-index 0.781',
    'Dice 0.912 (foreground 0.950), HD95 2.1', 'PSNR 31.20 dB, SSIM 0.912'."""
    def fmt(x, digits: int = 3) -> str:  # noqa: ANN001
        return "n/a" if x is None or x != x else f"{x:.{digits}f}"

    if "c_index" in m:
        return f"C-index {fmt(m['c_index'])}"
    if "dice" in m:
        return f"Dice {fmt(m['dice'])} (all foreground {fmt(m.get('dice_foreground'))}), HD95 {fmt(m.get('hd95'), 1)}"
    if "psnr" in m:
        return (f"PSNR {fmt(m['psnr'], 2)} dB, SSIM {fmt(m.get('ssim'))} (zero-filled: "
                f"{fmt(m.get('psnr_zero_filled'), 2)} dB, {fmt(m.get('ssim_zero_filled'))})")
    text = f"AUC {fmt(m.get('auc'))}, accuracy {fmt(m.get('accuracy'))}"
    if "balanced_accuracy" in m:  # accuracy alone hides a model that predicts the commonest class
        text += f", balanced accuracy {fmt(m['balanced_accuracy'])}"
    return text

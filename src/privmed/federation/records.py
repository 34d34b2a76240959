"""The run directory's records, typed: what summary.json and each line of metrics.jsonl hold.

    rows = read_metrics(run_dir)          list[MetricsRow], one per completed round
    rows = read_metrics_json(run_dir)     list[dict], each line as written, by round
    summary = read_summary(run_dir)       Summary (its `privacy` a PrivacySummary)
    d = read_summary_json(run_dir)        summary.json's object as written (dict)
    ledger = read_ledger(run_dir)         the coordinator's PrivacyLedger (privacy_ledger.json)

`to_json()` gives the dict privmed writes (the same keys in the same order, so the files come out
byte for byte as they always have); `from_json()` reads it back. Metrics are written in one place,
`RunDir.write_metrics`. A field an older privmed did not write reads as None; a file that lacks a
field every privmed wrote, or is not JSON, raises RunDirError naming the file, the field, the
version that wrote it and the one reading it. Scores stay dicts (metric name -> value; the metrics
depend on the task: privmed.tasks), and NaN is written as null, so a score read back may be None.
`from_json(d, partial=True)` reads a summary as far as it goes (every missing field None, an unknown
privacy mode None): for readers that show whatever a run directory holds, such as the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from privmed._version import __version__
from privmed.catalog import PrivacyMode
from privmed.errors import RunDirError
from privmed.privacy.ledger import LEDGER_FILE, PrivacyLedger

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
SelectionRule = Literal["last", "best-validation"]
Scores = dict[str, Any]  # metric name -> value (NaN read back as None), e.g. {"auc": 0.71, "n": 90}


@dataclass
class MetricsRow:
    """One completed round, as a line of metrics.jsonl. Seconds are wall-clock, the coordinator's;
    `sample_gradient_steps` is the run's total so far; `epsilon`: site -> the ledger's epsilon after
    the round (private runs only). A round that was not scored (under privacy, not a validation
    round) has empty scores and `scored` False."""

    round: int
    val: Scores
    test: Scores
    sites: dict[str, dict]  # site -> {"val": Scores, "test": Scores, "test_pooled": Scores (local)}
    finished: str | None = None  # UTC, ISO 8601 to the second (absent before privmed's round times)
    seconds: float | None = None
    train_seconds: float | None = None
    sample_gradient_steps: int | None = None
    train_loss: dict[str, float] | None = None  # site -> its mean training loss
    dropped: list[str] | None = None  # sites that did not answer this round (none: no field)
    attempts: int | None = None  # when the round was started again (none: no field)
    epsilon: dict[str, float] | None = None
    test_mean_over_sites: Scores | None = None  # absent in a round that was not scored
    scored: bool | None = None  # written only as False
    unscored: list[str] | None = None  # sites that did not answer a scoring request
    best_round: int | None = None  # the selected global model's round so far (None: per site)
    best_round_per_site: dict[str, int] | None = None  # `local`: site -> its model's round

    # the order of the keys in the file; optional ones are left out when None
    _ORDER = ("round", "finished", "seconds", "train_seconds", "sample_gradient_steps", "train_loss",
              "dropped", "attempts", "epsilon", "val", "test", "test_mean_over_sites", "sites", "scored",
              "unscored", "best_round", "best_round_per_site")
    _ALWAYS = frozenset({"round", "val", "test", "sites", "best_round"})

    def to_json(self) -> dict:
        """The line's dict, keys in the order privmed has always written them."""
        return {k: getattr(self, k) for k in self._ORDER if k in self._ALWAYS or getattr(self, k) is not None}

    @classmethod
    def from_json(cls, d: Mapping, where: str = METRICS_FILE, version: str | None = None) -> MetricsRow:
        """The row `to_json` wrote; RunDirError (naming `where`, the field and `version`, the privmed
        that wrote it) when one every privmed wrote is missing. Unknown keys are ignored."""
        _require(d, ("round", "val", "test", "sites"), where, version)
        return cls(**{k: d[k] for k in cls._ORDER if k in d})


@dataclass
class PrivacySummary:
    """summary.json's `privacy`: the run's guarantee, every epsilon the coordinator ledger's. Under
    mode none only `mode`, `epsilon` (None) and `statement` are set."""

    mode: PrivacyMode  # None only as read with partial=True (a mode missing or unknown)
    epsilon: float | None
    statement: str  # None only as read with partial=True
    unit: str | None = None  # what one guarantee protects: 'patient', 'record' or 'site'
    mechanism: str | None = None
    delta: float | None = None
    accountant: str | None = None
    budget_epsilon: float | None = None
    sites: dict[str, float] = field(default_factory=dict)  # site -> epsilon spent on its training patients
    max_grad_norm: float | None = None
    plan: dict[str, dict] = field(default_factory=dict)  # site -> its planned releases (PrivacyPlan.to_dict)
    scoring: dict | None = None  # the validation and test patients' line (None: no scoring plan)
    honest_secure_epsilon: float | None = None  # central DP with SecAgg+, honest-but-curious coordinator
    honest_min_sites: int | None = None

    def to_json(self) -> dict:
        if self.mode == PrivacyMode.NONE:
            return {"mode": str(self.mode), "epsilon": self.epsilon, "statement": self.statement}
        honest = {} if self.honest_secure_epsilon is None else {
            "honest_secure_epsilon": self.honest_secure_epsilon, "honest_min_sites": self.honest_min_sites}
        return {
            "mode": str(self.mode), "unit": self.unit, "mechanism": self.mechanism, "epsilon": self.epsilon,
            "delta": self.delta, "accountant": self.accountant, "budget_epsilon": self.budget_epsilon,
            "sites": self.sites, "max_grad_norm": self.max_grad_norm, "plan": self.plan, "scoring": self.scoring,
            **honest, "statement": self.statement,
        }

    @classmethod
    def from_json(cls, d: Mapping, where: str = SUMMARY_FILE, partial: bool = False) -> PrivacySummary:
        """The entry `to_json` wrote; RunDirError naming the field when `mode`, `epsilon` or
        `statement` is missing or the mode is unknown. `partial`: those read as None instead."""
        if partial:
            mode = d.get("mode")
            rest = {k: d[k] for k in cls.__dataclass_fields__ if k not in ("mode", "epsilon", "statement") and k in d}
            return cls(mode=PrivacyMode(mode) if mode in tuple(PrivacyMode) else None,
                       epsilon=d.get("epsilon"), statement=d.get("statement"), **rest)
        _require(d, ("mode", "epsilon", "statement"), f"{where}: privacy")
        try:
            mode = PrivacyMode(d["mode"])
        except ValueError:
            known = ", ".join(repr(str(m)) for m in PrivacyMode)
            raise RunDirError(f"{where}: privacy.mode {d['mode']!r} is not one of {known}") from None
        return cls(mode=mode, **{k: d[k] for k in cls.__dataclass_fields__ if k != "mode" and k in d})


@dataclass
class Summary:
    """summary.json: the run's result. Scores are the selected model's (pooled test, validation);
    `sites`: site -> its row (n_train, n_val, n_test, its scores, `best_round` for `local`,
    `test_finetuned`); seconds wall-clock. Fields an older privmed did not write read as None."""

    name: str
    task: str
    strategy: str
    rounds_completed: int
    rounds_planned: int
    best_round: int | None  # the selected global model's round (None for `local`)
    selection: str  # how the result was chosen, in words
    selection_rule: SelectionRule | None
    test: Scores
    evaluation: dict[str, str] | None  # 'test', 'sites': where the test figures come from, in words
    test_mean_over_sites: Scores | None
    val: Scores
    sites: dict[str, dict]
    wall_seconds: float
    train_seconds: float | None
    sample_gradient_steps: int
    privacy: PrivacySummary | None
    secure_aggregation: dict | None  # protocol, shares, threshold, ... (None: not used)
    data: dict  # source, synthetic, description, citation, class_names, image_shape, tabular, ...
    model: dict  # name, parameters
    seed: int
    privmed_version: str | None
    test_finetuned_mean_over_sites: Scores | None = None  # federation.finetune_steps only
    # what is wrong with the selected model (privmed.tasks.usefulness): [{"kind", "message"}];
    # None: a summary from before the field (not written then)
    warnings: list[dict[str, str]] | None = None

    _OPTIONAL = ("selection_rule", "evaluation", "test_mean_over_sites", "train_seconds", "privacy",
                 "secure_aggregation", "privmed_version", "test_finetuned_mean_over_sites", "warnings")

    def to_json(self) -> dict:
        """summary.json's dict, keys in the order privmed has always written them."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "test_finetuned_mean_over_sites"}
        d["privacy"] = None if self.privacy is None else self.privacy.to_json()
        if self.warnings is None:
            del d["warnings"]
        if self.test_finetuned_mean_over_sites is None:
            return d
        items = list(d.items())
        at = [k for k, _ in items].index("val")  # written just before the validation scores
        return dict(items[:at] + [("test_finetuned_mean_over_sites", self.test_finetuned_mean_over_sites)] + items[at:])

    @classmethod
    def from_json(cls, d: Mapping, where: str = SUMMARY_FILE, partial: bool = False) -> Summary:
        """The summary `to_json` wrote; RunDirError naming the field when one every privmed wrote is
        missing. `partial`: every missing field reads as None, and a `privacy` that is not an
        object as None (the values are the file's, unchecked)."""
        fields = list(cls.__dataclass_fields__)
        if not partial:
            _require(d, [f for f in fields if f not in cls._OPTIONAL], where, d.get("privmed_version"))
        values = {k: d.get(k) for k in fields}
        if partial and not isinstance(values["privacy"], Mapping):
            values["privacy"] = None
        if values["privacy"] is not None:
            values["privacy"] = PrivacySummary.from_json(values["privacy"], where, partial)
        return cls(**values)


def read_summary(run_dir: Path) -> Summary:
    """RUN_DIR/summary.json (written at the end of a run); RunDirError if missing or unreadable."""
    return Summary.from_json(read_summary_json(run_dir), str(Path(run_dir) / SUMMARY_FILE))


def read_summary_json(run_dir: Path) -> dict:
    """RUN_DIR/summary.json's object as written, unchecked; RunDirError naming the file if it is
    missing, unreadable or not a JSON object."""
    path = Path(run_dir) / SUMMARY_FILE
    d = _load_json(path, json.loads)
    if not isinstance(d, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_metrics(run_dir: Path) -> list[MetricsRow]:
    """RUN_DIR/metrics.jsonl, one row per completed round ([] when no round completed)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = _load_json(path, lambda text: [json.loads(x) for x in text.splitlines() if x.strip()])
    version = _written_by(Path(run_dir))
    return [MetricsRow.from_json(row, f"{path} line {i}", version) for i, row in enumerate(lines, 1)]


def read_metrics_json(run_dir: Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl's lines as written, unchecked but for an integer 'round', sorted by
    round; a round written twice (a resumed run) keeps its last line ([] without the file).
    RunDirError naming the file and line when one is not such an object."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_round: dict[int, dict] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # accepts NaN, as Python's json writes it
        except ValueError as e:
            raise RunDirError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise RunDirError(f"{path}:{i}: expected an object with an integer 'round'")
        by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]


def read_ledger(run_dir: Path) -> PrivacyLedger | None:
    """RUN_DIR/privacy_ledger.json, the coordinator's ledger (None in a run without privacy);
    its releases as records: `ledger.records(site)` (privmed.privacy.ledger.LedgerRelease)."""
    path = Path(run_dir) / LEDGER_FILE
    return PrivacyLedger.load(path) if path.is_file() else None


def _written_by(run_dir: Path) -> str | None:
    """The privmed version summary.json says wrote the run, or None (no summary yet, or unreadable)."""
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("privmed_version")
    except (OSError, ValueError, AttributeError):
        return None


def _load_json(path: Path, parse) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None


def _require(d: Any, keys, where: str, version: str | None = None) -> None:
    """RunDirError naming the first of `keys` missing from `d`, the privmed version that wrote the
    file (its summary's privmed_version, when known) and the one reading it."""
    if not isinstance(d, Mapping):
        raise RunDirError(f"{where}: expected a JSON object, found {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        found = f"privmed {version}" if version else "a privmed of unknown version"
        raise RunDirError(
            f"{where}: no field '{missing[0]}' (run records written by {found}; "
            f"this privmed {__version__} reads those of privmed {__version__})"
        )

"""What travels between the coordinator and a site, in Flower's records.

A training instruction is a legacy `FitIns` (the format SecAgg+ expects): the weights to train from
(then SCAFFOLD's correction, when there is one) and a config of scalars. The reply is a `FitRes`:
the trained weights, or under secure aggregation the site's contribution (see
`privmed.federation.strategies.contribution`), with the site's sample count and metrics. Arrays keep
their dtypes, so weights arrive bit for bit.

Arrays travel packed (`pack`): all of a message's arrays as the bytes of one, with a manifest of
their dtypes and shapes. Flower sends each array as an object of its own, one authenticated HTTPS
request each, and waits for every one before a ClientApp starts: a model of 23 arrays was about 38
objects, 1-2 s a message on loopback (benchmarks/results/flower_breakdown.md). The one exception is
a secure contribution: SecAgg+'s mod masks and quantises each of the reply's float arrays, so those
stay as they are.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.compat.common import recorddict_compat as compat

from privmed.federation.instructions import Instruction
from privmed.federation.strategies import SiteUpdate, TrainTask
from privmed.privacy.accountants import Release
from privmed.privacy.site_ledger import SiteRefused

TRAIN_PLAIN = "train.plain"  # training whose result the coordinator sees (no secure aggregation)
DESCRIBE = "query.describe"  # which site a node serves
__all__ = ["Instruction", "encode_instruction", "decode_instruction", "encode_update", "decode_update",
           "encode_scores", "decode_scores"]


def pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, str]:
    """(one uint8 array holding every array's bytes in turn, the manifest: JSON of each one's dtype
    and shape). `unpack` gives the arrays back bit for bit."""
    arrays = [np.asarray(a, order="C") for a in arrays]  # (ascontiguousarray makes a 0-d array 1-d)
    manifest = json.dumps([[a.dtype.str, list(a.shape)] for a in arrays])
    if not arrays:
        return np.zeros(0, np.uint8), manifest
    return np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]), manifest


def unpack(packed: np.ndarray, manifest: str) -> list[np.ndarray]:
    """The arrays `pack` packed; ValueError when the bytes and the manifest disagree."""
    out, at = [], 0
    for dtype, shape in json.loads(manifest):
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"packed arrays: dtype {dtype} is not plain data")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if at + n > packed.size:
            raise ValueError(f"packed arrays: {packed.size} bytes, the manifest needs more")
        out.append(packed[at : at + n].view(dt).reshape(shape).copy())
        at += n
    if at != packed.size:
        raise ValueError(f"packed arrays: {packed.size} bytes, the manifest accounts for {at}")
    return out


def _packed_parameters(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], str]:
    packed, manifest = pack(arrays)
    return [packed], manifest


def encode_instruction(ins: Instruction) -> RecordDict:
    t = ins.task
    arrays, manifest = _packed_parameters(list(t.weights) + (list(t.correction) if t.correction is not None else []))
    config = {
        "packed": manifest,
        "site": t.site, "model_key": t.model_key, "prox_mu": float(t.prox_mu),
        "n_weights": len(t.weights), "has_correction": t.correction is not None,
        "round": ins.rnd, "run": ins.run, "steps": ins.steps or 0, "purpose": ins.purpose,
        "secure": ins.secure,
        "weighting": ins.weighting, "clip": ins.clip or 0.0, "max_weight": float(ins.max_weight),
        "clipping_range": float(ins.clipping_range),
    }
    return compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), keep_input=True)


def decode_instruction(content: RecordDict) -> Instruction:
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    c = fitins.config
    arrays = unpack(parameters_to_ndarrays(fitins.parameters)[0], str(c["packed"]))
    n = int(c["n_weights"])
    task = TrainTask(
        site=str(c["site"]), weights=arrays[:n], model_key=str(c["model_key"]),
        prox_mu=float(c["prox_mu"]), correction=arrays[n:] if c["has_correction"] else None,
    )
    return Instruction(
        task, int(c["round"]), run=str(c["run"]), steps=int(c["steps"]) or None,
        purpose=str(c["purpose"]), secure=bool(c["secure"]), weighting=str(c["weighting"]),
        clip=float(c["clip"]) or None,
        max_weight=float(c["max_weight"]), clipping_range=float(c["clipping_range"]),
    )


def encode_update(update: SiteUpdate, arrays: list[np.ndarray], num_examples: int, secure: bool = False) -> RecordDict:
    """`arrays`: the weights, or (`secure`) the secure contribution, which SecAgg+'s mod masks
    array by array (so it is not packed); `num_examples`: SecAgg+'s weight."""
    metrics = {k: (float(v) if isinstance(v, float) else v) for k, v in update.metrics.items()}
    r = update.release
    if r is not None:
        metrics.update(
            release_noise_multiplier=float(r.noise_multiplier),
            release_sample_rate=float(r.sample_rate),
            release_steps=int(r.steps),
        )
    metrics.update(site=update.site, model_key=update.model_key, n_samples=int(update.n_samples))
    if not secure:
        arrays, metrics["packed"] = _packed_parameters(arrays)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(num_examples), metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def decode_update(content: RecordDict, with_weights: bool = True) -> SiteUpdate:
    """The site's update; `with_weights` False (secure aggregation): the report only, weights []."""
    res = compat.recorddict_to_fitres(content, keep_input=True)
    return update_from_fitres(res, with_weights)


def update_from_fitres(res: FitRes, with_weights: bool) -> SiteUpdate:
    m = dict(res.metrics)
    site, key, n = str(m.pop("site")), str(m.pop("model_key")), int(m.pop("n_samples"))
    manifest = m.pop("packed", None)
    release = None
    if "release_steps" in m:
        release = Release(
            noise_multiplier=float(m.pop("release_noise_multiplier")),
            sample_rate=float(m.pop("release_sample_rate")),
            steps=int(m.pop("release_steps")),
        )
    if "train_loss" in m and m["train_loss"] is None:
        m["train_loss"] = math.nan
    weights = []
    if with_weights:
        weights = parameters_to_ndarrays(res.parameters)
        if manifest is not None:
            weights = unpack(weights[0], str(manifest))
    return SiteUpdate(site=site, weights=weights, n_samples=n, model_key=key, metrics=m, release=release)


def encode_scores(site: str, scores: dict) -> RecordDict:
    """A site's metrics ({name: number}) as a reply without arrays (fine-tuning: the model stays)."""
    metrics = {f"score.{k}": (float(v) if isinstance(v, float) else v) for k, v in scores.items()}
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 0, {"site": site, **metrics})
    return compat.fitres_to_recorddict(res, keep_input=True)


def decode_scores(content: RecordDict) -> tuple[str, dict]:
    """(site, metrics) from `encode_scores`; a reply that carries arrays is refused (ValueError)."""
    res = compat.recorddict_to_fitres(content, keep_input=True)
    if parameters_to_ndarrays(res.parameters):
        raise ValueError("a scores reply carries arrays")
    m = dict(res.metrics)
    scores = {k.removeprefix("score."): v for k, v in m.items() if k.startswith("score.")}
    return str(m["site"]), {k: (math.nan if v is None else v) for k, v in scores.items()}


# ---------------------------------------------------------------------------- setup and scoring

SETUP = "query.setup"  # the run's public settings, before a site's first instruction
EVALUATE = "evaluate"  # score weights on the site's own validation / test patients


def encode_setup(setup_json: str) -> RecordDict:
    return RecordDict({"setup": ConfigRecord({"json": setup_json})})


def decode_setup(content: RecordDict) -> str:
    return str(content.config_records["setup"]["json"])


def encode_score_request(site: str, model_key: str, weights: list[np.ndarray], splits: tuple[str, ...],
                         rnd: int, run: str) -> RecordDict:
    packed, manifest = pack([np.asarray(w) for w in weights])
    return RecordDict({
        "weights": ArrayRecord([packed]),
        "score": ConfigRecord({"site": site, "model_key": model_key, "splits": list(splits),
                               "round": rnd, "run": run, "packed": manifest}),
    })


def decode_score_request(content: RecordDict) -> tuple[str, str, list[np.ndarray], tuple[str, ...], int, str]:
    """(site, model_key, weights, splits, round, run)."""
    c = content.config_records["score"]
    weights = unpack(content.array_records["weights"].to_numpy_ndarrays()[0], str(c["packed"]))
    return (str(c["site"]), str(c["model_key"]), weights, tuple(str(s) for s in c["splits"]),
            int(c["round"]), str(c["run"]))


def encode_score_reply(site: str, model_key: str, scores: dict[str, tuple[dict, dict]]) -> RecordDict:
    """Per split: the site's metrics (numbers) and its counts (arrays that sum across sites)."""
    rd = RecordDict({"reply": ConfigRecord({"site": site, "model_key": model_key, "splits": list(scores)})})
    for split, (metrics, counts) in scores.items():
        packed, manifest = pack([np.asarray(v) for v in counts.values()])
        rd[f"metrics.{split}"] = ConfigRecord(
            {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()})
        rd[f"counts.{split}"] = ArrayRecord(array_dict={"packed": Array(packed)})
        rd[f"counts.{split}.keys"] = ConfigRecord({"keys": list(counts), "manifest": manifest})
    return rd


def decode_score_reply(content: RecordDict) -> tuple[str, str, dict[str, tuple[dict, dict]]]:
    c = content.config_records["reply"]
    out = {}
    for split in c["splits"]:
        metrics = {k: (math.nan if v is None else v) for k, v in content.config_records[f"metrics.{split}"].items()}
        index = content.config_records[f"counts.{split}.keys"]
        arrays = unpack(content.array_records[f"counts.{split}"]["packed"].numpy(), str(index["manifest"]))
        out[str(split)] = (metrics, dict(zip((str(k) for k in index["keys"]), arrays)))
    return str(c["site"]), str(c["model_key"]), out


# ------------------------------------------------------------------ error replies


def reason(error: str) -> str:
    """The site's own words from Flower's "<class 'E'>:<'E: WORDS'>" error text."""
    at = error.find(":<'")
    return error[at + 3:].removesuffix("'>") if at >= 0 else error


def refusal(error: str) -> str | None:
    """The site's reason when an error reply is a refusal by its guard, else None. The relay
    raises 'SiteRefused: REASON', which Flower's ClientApp runner reports as
    "<class 'RuntimeError'>:<'SiteRefused: REASON'>"."""
    marker = f"{SiteRefused.__name__}: "
    at = error.find(marker)
    if at < 0:
        return None
    text = error[at + len(marker):].strip()
    return text[:-2] if text.endswith("'>") else text

"""Open-set answers: photos of known spots the phone still answers, photos of elsewhere it declines.

Two kinds of elsewhere. *Held-out landmarks* (:func:`landmarks`): a part of the spots
(:data:`HELD_OUT`, chosen by the evaluation seed) is left out of a second index of the
same gallery, and their photos ask it: the tourist's most common unknown photo, another
landmark of the same kind. *Other domains* (:func:`evaluate`): out-of-catalogue photos are those of another dataset (a fixed random sample of
a few hundred, features cached like any dataset's) and the three sample photos
in ``../shared/models`` (a parrot, a cat, Grace Hopper). Every one goes through
the real client, as the in-catalogue queries do. The operating point is the
phone's ``keep``; the curve recomputes the decision at other operating points
from each answer's confidence (answered iff confidence >= 1 - keep, the rule
of ``edge_client.privacy.recognizer.rerank`` up to interpolation ties).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.config import ClientConfig
from edge_client.privacy.recognizer import Recognition
from edge_client.privacy.transforms import Transform
from lite_server.index.store import BadIndexError, Index
from lite_server.search.lookup import Lookup
from tools import dataset as ds
from tools.evaluate import ceiling
from tools.evaluate import intervals as iv
from tools.evaluate.testbed import Env

SAMPLE_PHOTOS = [ds.ROOT.parent / "shared" / "models" / n for n in ("parrot.jpg", "cat.bmp", "grace_hopper.bmp")]
#: Out-of-catalogue photos drawn from each other dataset.
OUTSIDE_SAMPLE = 300
KEEPS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 1.0)
#: Share of the spots left out of the index for the held-out-landmarks figures.
HELD_OUT = 0.2


def landmarks(env: Env, transform: Transform, seed: int = 0, share: float = HELD_OUT) -> dict[str, Any]:
    """kept_correct, rejected_outside and auroc for held-out landmarks of the same dataset.

    A ``share`` of the indexed spots (drawn with ``seed``) is left out of a second index of
    the gallery (the others' gallery photos only; its public structure and calibration derived
    from those alone, as a server would). The queries of the remaining spots ask it as known
    spots; every photo of the split (gallery and queries, never a photo the split holds back)
    of a left-out spot asks it as an unknown landmark. All go through the real client and
    transform. ``auroc``: the phone's evidence of its correct answers against the unknown
    photos' (ties count half).
    """
    ids = np.array([s.id for s in env.index.spots])
    out_spots = set(np.random.default_rng(seed).choice(ids, max(1, round(share * len(ids))), replace=False).tolist())
    spot_of = env.data.labels
    gallery = np.array([r for r in env.gallery if spot_of[r] not in out_spots])
    sub = replace_index(env, gallery)
    known = [(spot_of[q], q) for q in env.queries if spot_of[q] not in out_spots]
    unknown = sorted(r for r in np.concatenate([env.gallery, env.queries]) if spot_of[r] in out_spots)
    with sub.client(transform, seed) as client:
        known_answers = [(spot, client.ask(env.features[q])[1]) for spot, q in known]
        unknown_answers = [client.ask(env.features[r])[1] for r in unknown]
    return summarize(known_answers, unknown_answers, [spot_of[r] for r in unknown],
                     held_out_spots=len(out_spots), indexed_spots=len(ids) - len(out_spots),
                     held_out=sorted(out_spots), calibration=sub.lookup.calibration.get("weights"),
                     ceiling=ceiling.open_set(sub, known, [(spot_of[r], r) for r in unknown]))


def replace_index(env: Env, gallery: np.ndarray) -> Env:
    """``env`` served in-process from an index of the photos ``gallery`` (built once, cached
    beside ``env``'s), with the same server settings."""
    key = hashlib.sha256(f"{env.index.path}|{np.asarray(gallery, np.int64).tobytes().hex()}".encode()).hexdigest()
    index_dir = env.cache_dir / f"eval-index-{key[:16]}"
    try:
        index = Index.load(index_dir)
    except BadIndexError:
        index = ds.build_from_features(env.data, gallery, env.features, env.extractor, index_dir)
    # Always served in-process: a --server holds the whole gallery.
    return dataclasses.replace(env, gallery=gallery, index=index, lookup=Lookup(index, env.lookup.config),
                               server_url=None, state_dir=env.cache_dir / f"eval-state-{key[:16]}")


def summarize(known: list[tuple[str, Recognition]], unknown: list[Recognition], places: list[str],
              **extra: Any) -> dict[str, Any]:
    """The open-set figures of ``known`` (true spot, answer) and ``unknown`` answers (``places``:
    each one's bootstrap cluster), each with its spot-clustered 95% interval."""
    correct = [(spot, r) for spot, r in known if r.best == spot]
    kept = [r.spot_id == r.best for _, r in correct]
    rejected = [r.spot_id is None for r in unknown]
    evidence = np.array([_evidence(r) for _, r in correct] + [_evidence(r) for r in unknown])
    labels = np.array([1] * len(correct) + [0] * len(unknown))
    clusters = [spot for spot, _ in correct] + list(places)
    return {"operating_point": ClientConfig().keep,
            "kept_correct": _share(kept), "kept_correct_ci95": iv.mean_ci95(kept, [s for s, _ in correct]),
            "rejected_outside": _share(rejected), "rejected_outside_ci95": iv.mean_ci95(rejected, places),
            "auroc": auroc(evidence, labels), "auroc_ci95": iv.statistic_ci95(
                lambda weights: auroc(evidence, labels, weights), clusters),
            # The same evidence with the operating point set on these very answers: what the
            # server's gallery-fitted calibration costs, apart from what the evidence can tell.
            "at_kept": {"kept": ceiling.KEPT, **(ceiling.figures(evidence, labels, ceiling.KEPT)
                                                 if 0 < labels.sum() < len(labels) else {})},
            "user_top1_closed": _share(r.best == s for s, r in known),
            "user_top1_open": _share(r.spot_id == s for s, r in known),
            "n_known": len(known), "n_correct": len(correct), "n_outside": len(unknown), **extra}


def _evidence(answer: Recognition) -> float:
    """The phone's evidence of an answer (its score when the server publishes no calibration)."""
    return float(answer.evidence if answer.evidence is not None else answer.score)


def auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The probability that a positive ``labels`` scores above a negative (ties half), with
    optional unit ``weights``; NaN without both kinds."""
    from sklearn.metrics import roc_auc_score

    if len(set(np.asarray(labels).tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def other_datasets(dataset: Path) -> list[Path]:
    """The datasets beside ``dataset`` (``../shared/datasets/*``): places its index does not hold."""
    parent = dataset.resolve().parent
    return sorted(p for p in parent.iterdir() if p.is_dir() and p != dataset.resolve()
                  and ((p / "images").is_dir() or (p / "landmarks.csv").is_file()))


def outside_features(env: Env, others: list[Path], n: int = OUTSIDE_SAMPLE,
                     seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Features of ``n`` photos of each dataset in ``others`` (fixed seed) and of the sample
    photos, and each photo's place ("dataset/spot", or the sample's name): its bootstrap cluster."""
    rows, places = [], []
    for root in others:
        data = ds.load_dataset(root)
        pick = np.sort(np.random.default_rng(seed).choice(len(data.photos), min(n, len(data.photos)), replace=False))
        sample = ds.Dataset(data.root, [data.photos[i] for i in pick], data.spots)
        rows.append(ds.features(sample, env.extractor, env.cache_dir))
        places += [f"{root.name}/{spot}" for spot, _ in sample.photos]
    samples = [p for p in SAMPLE_PHOTOS if p.is_file()]
    rows.append(np.stack([env.extractor.extract(p) for p in samples]))
    return np.concatenate(rows), places + [p.name for p in samples]


def evaluate(env: Env, transform: Transform, known: list[tuple[str, Recognition]], others: list[Path],
             seed: int = 0) -> dict[str, Any]:
    """kept_correct, rejected_outside and the users' top-1 at the phone's default operating point
    (each with its 95% interval, clustered by spot), and the curve."""
    features, places = outside_features(env, others, seed=seed)
    with env.client(transform, seed) as client:
        outside = [client.ask(f)[1] for f in features]
    correct = [r for spot, r in known if r.best == spot]
    curve = {str(keep): {"kept_correct": _share(r.confidence is not None and r.confidence >= 1 - keep - 1e-9
                                                for r in correct),
                         "rejected_outside": _share(r.confidence is not None and r.confidence < 1 - keep - 1e-9
                                                    for r in outside)} for keep in KEEPS}
    kept = [r.spot_id == r.best for r in correct]
    rejected = [r.spot_id is None for r in outside]
    closed = [r.best == spot for spot, r in known]
    opened = [r.spot_id == spot for spot, r in known]
    correct_spots = [spot for spot, r in known if r.best == spot]
    known_spots = [spot for spot, _ in known]
    return {
        "operating_point": ClientConfig().keep,
        "kept_correct": _share(kept), "kept_correct_ci95": iv.mean_ci95(kept, correct_spots),
        "rejected_outside": _share(rejected), "rejected_outside_ci95": iv.mean_ci95(rejected, places),
        "user_top1_closed": _share(closed), "user_top1_closed_ci95": iv.mean_ci95(closed, known_spots),
        "user_top1_open": _share(opened), "user_top1_open_ci95": iv.mean_ci95(opened, known_spots),
        "n_correct": len(correct), "n_outside": len(outside),
        "outside": [p.name for p in others] + [p.name for p in SAMPLE_PHOTOS],
        "samples_rejected": [r.spot_id is None for r in outside[-len(SAMPLE_PHOTOS):]],
        "curve": curve,
    }


def _share(flags: Any) -> float:
    values = list(flags)
    return float(np.mean(values)) if values else 0.0


def report(run: dict[str, Any]) -> list[str]:
    """The report's open-set lines."""
    o = run.get("open_set")
    if not o:
        return []
    return ["## Open set", "",
            f"Operating point keep = {o['operating_point']:g}: kept {o['kept_correct']:.3f} of the "
            f"{o['n_correct']} correct answers, rejected {o['rejected_outside']:.3f} of {o['n_outside']} "
            f"out-of-catalogue photos ({', '.join(o['outside'])}); user top-1 {o['user_top1_closed']:.3f} closed set, "
            f"{o['user_top1_open']:.3f} with rejections counted as wrong.", "",
            iv.verdict("correct answers kept", o["kept_correct"], o.get("kept_correct_ci95"), 0.93, at_most=False),
            iv.verdict("out-of-catalogue photos rejected", o["rejected_outside"], o.get("rejected_outside_ci95"),
                       0.80, at_most=False), ""]


def landmarks_report(run: dict[str, Any]) -> list[str]:
    """The report's held-out-landmarks lines, beside the other-domain ones."""
    o = run.get("open_set_landmarks")
    if not o:
        return []
    return ["## Open set: held-out landmarks", "",
            f"{o['held_out_spots']} spots left out of a second index of the gallery ({o['indexed_spots']} kept); "
            f"operating point keep = {o['operating_point']:g}: kept {o['kept_correct']:.3f} of the {o['n_correct']} "
            f"correct answers to the kept spots' {o['n_known']} queries, rejected {o['rejected_outside']:.3f} of the "
            f"{o['n_outside']} photos of held-out spots; AUROC of the phone's evidence {o['auroc']:.3f}"
            f"{_interval(o.get('auroc_ci95'))}.", "",
            iv.verdict("held-out landmarks: correct answers kept", o["kept_correct"], o.get("kept_correct_ci95"), 0.93,
                       at_most=False),
            iv.verdict("held-out landmarks: photos rejected", o["rejected_outside"], o.get("rejected_outside_ci95"),
                       0.70, at_most=False), "", *_ceiling_lines(o)]


def _ceiling_lines(o: dict[str, Any]) -> list[str]:
    """How far the evidence itself goes (``tools.evaluate.ceiling``), beside the operating point's figures."""
    at, top = o.get("at_kept") or {}, o.get("ceiling")
    lines = []
    if "rejected" in at:
        lines.append(f"The phone's evidence with the operating point set on these answers (kept {at['kept']:g}): "
                     f"rejected {at['rejected']:.3f}.")
    if top:
        terms = ", ".join(f"{name} {v['auroc']:.3f} / {v['rejected']:.3f}" for name, v in top["terms"].items())
        lines += ["", f"Non-private ceiling (every spot a candidate, thresholds set on these answers, kept "
                      f"{top['kept']:g}), AUROC / rejected: {terms}; all terms combined (logistic, cross-validated "
                      f"by spot) {top['combined']['auroc']:.3f} / {top['combined']['rejected']:.3f}."]
    return [*lines, ""] if lines else []


def _interval(ci: list[float] | None) -> str:
    return f" (95% interval {ci[0]:.3f}..{ci[1]:.3f})" if ci else ""


def plot(metrics: dict[str, Any], path: Path) -> None:
    """kept_correct and rejected_outside against the operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = metrics["default"]["open_set"]
    keeps = sorted(float(k) for k in o["curve"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("kept_correct", "correct answers kept"), ("rejected_outside", "out-of-catalogue rejected")):
        ax.plot(keeps, [o["curve"][str(k)][key] for k in keeps], marker="o", label=label)
    ax.axvline(o["operating_point"], ls=":", c="k", lw=1, label=f"default keep = {o['operating_point']:g}")
    ax.axhline(0.93, ls="--", c="C0", lw=0.8)
    ax.axhline(0.80, ls="--", c="C1", lw=0.8)
    ax.set_xlabel("operating point: keep (share of photos of known spots still answered)")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Open set: {Path(metrics['dataset']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Would texture statistics help the value head on unseen sources? Leave-one-source-out, choice nested.

Why this experiment: under grouped cross-validation the value head calls the brain FDG-PET volumes MR and the
Philips MR (RescaleSlope applied) PET (docs/results.md, issue 14). PET is blurred at the scale of its pixels
and MR has sharp edges, so scale-free texture statistics of the decoded slice (foreground fraction and
quantiles on a percentile-normalised slice; neighbour differences at lags 1 and 2 over the intensity spread;
lag-1 autocorrelation; distinct values per pixel) are a natural candidate; a coarser "edge at anatomical
scale" set is a second. Whether to add them is itself a choice, so it is made the way every choice should
be: for each held-out source, the candidate set with the best inner cross-validation (5 folds over the
OTHER sources) is fitted on all other sources and scores the held-out one. The plain per-candidate LOSO rows
are printed beside the nested one; only the nested row is an estimate of "the recipe that picks features".

Candidates are computed here from the raw files (the readers, modality units, the native matrix), not from
prepared shards, so nothing in the pool has to change to try them. ~15 s to read, ~5 min to fit (2 cores).

    python scripts/value_features_nested.py [/path/to/shared/data/real] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from modality.intensity.value_stats import value_features
from modality.models.value_head import ValueStatsHead, fit_on_training_samples
from modality.readers import read_slices
from modality.records import RejectedInput
from modality.sources.manifest import ManifestSource

CLASSES = ("CT", "MR", "PT", "XR")
TEXTURE = (
    "foreground_fraction",
    "foreground_q10",
    "foreground_q25",
    "foreground_q50",
    "foreground_q75",
    "foreground_q90",
    "lag1_difference_over_sd",
    "lag2_difference_over_sd",
    "lag1_over_lag2",
    "lag1_autocorrelation",
    "log2_distinct_per_1000",
)
COARSE = ("coarse_gradient_over_sd", "coarse_gradient_p90_over_sd", "coarse_edge_fraction")
INNER_FOLDS = 5


def _normalised(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    v = np.asarray(pixels, dtype=np.float64)
    if v.ndim == 3:
        v = v.mean(-1)
    finite = np.isfinite(v)
    if not finite.all():
        v = np.where(finite, v, np.min(v[finite]))
    h, w = v.shape
    lo, hi = np.percentile(v[:: max(1, h // 64), :: max(1, w // 64)], [0.5, 99.5])
    return v, float(lo), float(hi if hi > lo else lo + 1.0)


def texture_features(pixels: np.ndarray) -> list[float]:
    """:data:`TEXTURE` on the central (up to) 256x256 crop at the native matrix, then :data:`COARSE` on the
    whole slice block-averaged to ~48 pixels on its long side."""
    v, lo, hi = _normalised(pixels)
    h, w = v.shape
    ch, cw = min(h, 256), min(w, 256)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    u = np.clip((v[y0 : y0 + ch, x0 : x0 + cw] - lo) / (hi - lo), 0, 1)
    fg = u > 0.1
    inside = u[fg] if fg.sum() > 10 else u.ravel()
    quantiles = np.percentile(inside, [10, 25, 50, 75, 90])
    m1, m2 = fg[:, 1:] & fg[:, :-1], fg[:, 2:] & fg[:, :-2]
    n1, n2 = fg[1:] & fg[:-1], fg[2:] & fg[:-2]
    d1 = (np.abs(np.diff(u, axis=1))[m1].sum() + np.abs(np.diff(u, axis=0))[n1].sum()) / max(
        1, m1.sum() + n1.sum()
    )
    d2 = (np.abs(u[:, 2:] - u[:, :-2])[m2].sum() + np.abs(u[2:] - u[:-2])[n2].sum()) / max(
        1, m2.sum() + n2.sum()
    )
    sd = inside.std() + 1e-6
    a, b = u[:, 1:][m1], u[:, :-1][m1]
    autocorrelation = float(np.corrcoef(a, b)[0, 1]) if a.size > 10 and a.std() > 0 and b.std() > 0 else 1.0
    distinct = np.unique(u).size / u.size
    full = np.clip((v - lo) / (hi - lo), 0, 1)
    f = max(1, max(h, w) // 48)
    hh, ww = (h // f) * f, (w // f) * f
    s = full[:hh, :ww].reshape(hh // f, f, ww // f, f).mean((1, 3))
    sfg = s > 0.1
    mx, my = sfg[:, 1:] | sfg[:, :-1], sfg[1:] | sfg[:-1]
    g = np.concatenate([np.abs(np.diff(s, axis=1))[mx], np.abs(np.diff(s, axis=0))[my]])
    g = g if g.size > 10 else np.zeros(1)
    ssd = (s[sfg].std() if sfg.sum() > 10 else s.std()) + 1e-6
    return [
        float(fg.mean()),
        *map(float, quantiles),
        d1 / sd,
        d2 / sd,
        d1 / (d2 + 1e-6),
        autocorrelation,
        math.log2(distinct * 1000 + 1),
        float(g.mean() / ssd),
        float(np.percentile(g, 90) / ssd),
        float(np.mean(g > 0.2)),
    ]


def collect(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Counter]:
    """(source per slice, class index, base value features, texture + coarse features), and skip reasons."""
    sources, labels, base, texture, skipped = [], [], [], [], Counter()
    for item in ManifestSource(root).items():
        if item.label not in CLASSES:
            continue
        try:
            slices = read_slices(item, None, colour="grey")
        except RejectedInput as error:
            skipped[str(error).split(":")[0]] += 1
            continue
        for decoded in slices:
            pixels = np.asarray(decoded.pixels)
            try:
                row_base, row_texture = value_features(pixels), texture_features(pixels)
            except ValueError:
                skipped["no finite pixel values"] += 1
                continue
            if not np.all(np.isfinite(row_texture)):
                skipped["non-finite texture (blank slice)"] += 1
                continue
            sources.append(item.dataset)
            labels.append(CLASSES.index(item.label))
            base.append(row_base)
            texture.append(row_texture)
    return np.array(sources), np.array(labels), np.array(base), np.array(texture), skipped


def _fit_predict(
    x: np.ndarray, y: np.ndarray, sources: np.ndarray, train: np.ndarray, test: np.ndarray
) -> np.ndarray:
    head = ValueStatsHead(x.shape[1], len(CLASSES))
    # as training fits it: sources alike within a class, export copies, balanced, seed 0
    fit_on_training_samples(head, x[train], y[train], sources=sources[train].tolist())
    with torch.inference_mode():
        return head(torch.as_tensor(x[test], dtype=torch.float32)).argmax(1).numpy()


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([np.mean(predicted[y == c] == c) for c in range(len(CLASSES)) if np.any(y == c)]))


def nested_loso(sources: np.ndarray, y: np.ndarray, candidates: dict[str, np.ndarray]) -> dict:
    names = sorted(set(sources.tolist()))
    plain = {name: np.full(len(y), -1) for name in candidates}
    nested = np.full(len(y), -1)
    picks: dict[str, str] = {}
    for held_out in names:
        rest = [n for n in names if n != held_out]
        inner = {n: i % INNER_FOLDS for i, n in enumerate(rest)}  # sorted names dealt round-robin
        fold_of = np.array([inner.get(s, -1) for s in sources])
        scores = {}
        for name, x in candidates.items():
            predicted = np.full(len(y), -1)
            for f in range(INNER_FOLDS):
                test, train = fold_of == f, (fold_of >= 0) & (fold_of != f)
                if test.any():
                    predicted[test] = _fit_predict(x, y, sources, train, test)
            scores[name] = balanced_accuracy(y[fold_of >= 0], predicted[fold_of >= 0])
            out = sources == held_out
            plain[name][out] = _fit_predict(x, y, sources, ~out, out)
        picks[held_out] = max(scores, key=lambda n: (scores[n], -list(candidates).index(n)))
        nested[sources == held_out] = plain[picks[held_out]][sources == held_out]
        print(
            f"  {held_out}: inner {', '.join(f'{n} {s:.3f}' for n, s in scores.items())} -> {picks[held_out]}",
            flush=True,
        )

    def summary(predicted: np.ndarray) -> dict:
        recall = {c: float(np.mean(predicted[y == i] == i)) for i, c in enumerate(CLASSES) if np.any(y == i)}
        return {"balanced_accuracy": float(np.mean(list(recall.values()))), "recall": recall}

    return {
        "plain": {name: summary(p) for name, p in plain.items()},
        "nested": summary(nested),
        "picks": picks,
        "pick_counts": dict(Counter(picks.values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_root = Path(
        os.environ.get("MODALITY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser.add_argument("root", type=Path, nargs="?", default=default_root / "real")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sources, y, base, texture, skipped = collect(args.root)
    print(
        f"{len(y)} slices from {len(set(sources.tolist()))} sources; skipped {dict(skipped)}", file=sys.stderr
    )
    n_texture = len(TEXTURE)
    candidates = {
        "base": base,
        "base+texture": np.hstack([base, texture[:, :n_texture]]),
        "base+texture+coarse": np.hstack([base, texture]),
    }
    result = nested_loso(sources, y, candidates)
    for name, s in result["plain"].items():
        print(
            f"LOSO, always {name}: balanced {s['balanced_accuracy']:.3f} "
            + str({k: round(v, 3) for k, v in s["recall"].items()})
        )
    s = result["nested"]
    print(
        f"LOSO, set chosen inside each fold: balanced {s['balanced_accuracy']:.3f} "
        + str({k: round(v, 3) for k, v in s["recall"].items()})
    )
    print(f"picks: {result['pick_counts']}")
    if args.json:
        args.json.write_text(json.dumps({"slices": len(y), "skipped": dict(skipped), **result}, indent=2))


if __name__ == "__main__":
    main()

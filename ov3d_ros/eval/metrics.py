"""3D semantic-segmentation metrics on GT points (OpenScene / ScanNet protocol): mIoU, mAcc, boundary mIoU,
instance fragmentation, aggregation over scenes, and Markdown / PNG reports.

Predictions are per GT point; ``pred == -1`` (or any label outside ``[0, C)``) means the map never observed
the point and counts as a miss (a false negative of its GT class, a false positive of no class). GT labels
outside ``[0, C)`` or equal to ``ignore_index`` are skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


def _valid_gt(gt: np.ndarray, num_classes: int, ignore_index: int = -1) -> np.ndarray:
    gt = np.asarray(gt).astype(np.int64)
    return np.where((gt >= 0) & (gt < num_classes) & (gt != ignore_index), gt, -1)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows GT, columns prediction; GT outside [0, C) skipped, pred outside [0, C)
    (unobserved) in no column (see :func:`miss_counts`)."""
    gt, pred = np.asarray(gt).astype(np.int64), np.asarray(pred).astype(np.int64)
    ok = (gt >= 0) & (gt < num_classes) & (pred >= 0) & (pred < num_classes)
    flat = np.bincount(gt[ok] * num_classes + pred[ok], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def miss_counts(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64: per GT class, points with a prediction outside [0, C) (unobserved)."""
    gt, pred = np.asarray(gt).astype(np.int64), np.asarray(pred).astype(np.int64)
    miss = (gt >= 0) & (gt < num_classes) & ((pred < 0) | (pred >= num_classes))
    return np.bincount(gt[miss], minlength=num_classes).astype(np.int64)


@dataclass
class SegmentationMetrics:
    """mIoU / mAcc / overall accuracy in percent over the classes present in GT (NaN when none);
    ``iou`` / ``acc``: per present class, percent."""

    miou: float
    macc: float
    overall_acc: float
    iou: Dict[str, float]
    acc: Dict[str, float]
    num_points: int
    num_unobserved: int
    confusion: np.ndarray  # (C, C) int64
    misses: np.ndarray  # (C,) int64


def metrics_from_confusion(conf: np.ndarray, misses: np.ndarray,
                           class_names: Sequence[str]) -> SegmentationMetrics:
    """Metrics from a (C, C) confusion matrix and (C,) unobserved-miss counts: IoU = TP / (TP + FP + FN)."""
    conf, misses = np.asarray(conf, dtype=np.int64), np.asarray(misses, dtype=np.int64)
    tp = np.diag(conf).astype(np.float64)
    gt_total = conf.sum(1) + misses
    present = gt_total > 0
    union = gt_total + conf.sum(0) - tp
    iou = 100.0 * tp[present] / union[present]
    acc = 100.0 * tp[present] / gt_total[present]
    names = [str(n) for n, p in zip(class_names, present) if p]
    n = int(gt_total.sum())
    return SegmentationMetrics(
        miou=float(iou.mean()) if len(iou) else math.nan, macc=float(acc.mean()) if len(acc) else math.nan,
        overall_acc=100.0 * float(tp.sum()) / n if n else math.nan,
        iou=dict(zip(names, iou.tolist())), acc=dict(zip(names, acc.tolist())),
        num_points=n, num_unobserved=int(misses.sum()), confusion=conf, misses=misses)


def evaluate_semantic(gt: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                      ignore_index: int = -1) -> SegmentationMetrics:
    """Score per-point predictions (N,) against GT labels (N,)."""
    c = len(class_names)
    gt = _valid_gt(gt, c, ignore_index)
    return metrics_from_confusion(confusion_matrix(gt, pred, c), miss_counts(gt, pred, c), class_names)


def boundary_mask(xyz: np.ndarray, gt: np.ndarray, radius_m: float = 0.05, ignore_index: int = -1) -> np.ndarray:
    """(N,) bool: labelled GT points with a point of another label within ``radius_m`` (negative labels and
    ``ignore_index`` are neither boundary points nor neighbours)."""
    xyz, gt = np.asarray(xyz, dtype=np.float64), np.asarray(gt).astype(np.int64)
    valid = (gt >= 0) & (gt != ignore_index)
    out = np.zeros(len(gt), dtype=bool)
    for c in np.unique(gt[valid]):
        mine, other = gt == c, valid & (gt != c)
        if other.any():
            out[mine] = cKDTree(xyz[other]).query_ball_point(xyz[mine], radius_m, return_length=True) > 0
    return out


def fragment_counts(xyz: np.ndarray, gt_instance: np.ndarray, pred: np.ndarray, gt_semantic: np.ndarray,
                    link_radius_m: float = 0.1) -> np.ndarray:
    """(I,) int: per GT instance (id >= 0 with a labelled class, the majority GT class of its points), the
    number of connected components of its correctly predicted points linked within ``link_radius_m``
    (0 when none is correct)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    inst, pred, sem = (np.asarray(a).astype(np.int64) for a in (gt_instance, pred, gt_semantic))
    counts = []
    for i in np.unique(inst[(inst >= 0) & (sem >= 0)]):
        members = (inst == i) & (sem >= 0)
        cls = np.bincount(sem[members]).argmax()
        pts = xyz[members & (pred == cls)]
        if len(pts) == 0:
            counts.append(0)
            continue
        pairs = cKDTree(pts).query_pairs(link_radius_m, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(pts), len(pts)))
        counts.append(connected_components(graph, directed=False)[0])
    return np.asarray(counts, dtype=np.int64)


def fragmentation(xyz: np.ndarray, gt_instance: np.ndarray, pred: np.ndarray, gt_semantic: np.ndarray,
                  link_radius_m: float = 0.1) -> float:
    """Mean components per GT instance over instances with a correct point (1.0 = each in one piece; NaN
    when none); see :func:`fragment_counts` for the missed instances."""
    k = fragment_counts(xyz, gt_instance, pred, gt_semantic, link_radius_m)
    return float(k[k > 0].mean()) if (k > 0).any() else math.nan


def _nan_none(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _summary(class_names, conf, misses, b_conf, b_misses, frag_components, frag_instances, frag_missed) -> dict:
    m, b = metrics_from_confusion(conf, misses, class_names), metrics_from_confusion(b_conf, b_misses, class_names)
    return {
        "class_names": list(map(str, class_names)), "num_points": m.num_points, "num_unobserved": m.num_unobserved,
        "miou": _nan_none(m.miou), "macc": _nan_none(m.macc), "overall_acc": _nan_none(m.overall_acc),
        "iou": m.iou, "acc": m.acc, "confusion": m.confusion.tolist(), "misses": m.misses.tolist(),
        "boundary_miou": _nan_none(b.miou), "boundary_macc": _nan_none(b.macc), "boundary_iou": b.iou,
        "boundary_num_points": b.num_points, "boundary_confusion": b.confusion.tolist(),
        "boundary_misses": b.misses.tolist(),
        "fragmentation": float(frag_components) / float(frag_instances) if frag_instances else None,
        "frag_components": int(frag_components), "frag_instances": int(frag_instances),
        "frag_missed_instances": int(frag_missed)}


def evaluate_scene(xyz: np.ndarray, gt_semantic: np.ndarray, gt_instance: np.ndarray, pred: np.ndarray,
                   class_names: Sequence[str], boundary_radius_m: float = 0.05, link_radius_m: float = 0.1,
                   ignore_index: int = -1) -> dict:
    """All metrics of one scene (points (N, 3), labels (N,)) as a JSON-serialisable dict (NaN -> None)."""
    c = len(class_names)
    gt, pred = _valid_gt(gt_semantic, c, ignore_index), np.asarray(pred).astype(np.int64)
    bm = boundary_mask(xyz, gt, boundary_radius_m)
    k = fragment_counts(xyz, gt_instance, pred, gt, link_radius_m)
    return _summary(class_names, confusion_matrix(gt, pred, c), miss_counts(gt, pred, c),
                    confusion_matrix(gt[bm], pred[bm], c), miss_counts(gt[bm], pred[bm], c),
                    int(k.sum()), int((k > 0).sum()), int((k == 0).sum()))


def aggregate(scenes: List[dict]) -> dict:
    """Dataset metrics from summed confusion matrices (not a mean of per-scene mIoUs); fragmentation over all
    instances of all scenes. Same keys as :func:`evaluate_scene` plus ``num_scenes`` and ``per_scene``: the mean
    and 95 % confidence interval over scenes of each of :data:`SCENE_METRICS` (:func:`scene_statistics`)."""
    s = lambda key: np.sum([np.asarray(d[key], dtype=np.int64) for d in scenes], axis=0)  # noqa: E731
    out = _summary(scenes[0]["class_names"], s("confusion"), s("misses"), s("boundary_confusion"),
                   s("boundary_misses"), s("frag_components"), s("frag_instances"), s("frag_missed_instances"))
    out["num_scenes"] = sum(d.get("num_scenes", 1) for d in scenes)
    out["per_scene"] = scene_statistics(scenes)
    return out


SCENE_METRICS = ("miou", "macc", "boundary_miou", "fragmentation")
"""Per-scene metrics summarised with a mean and a 95 % confidence interval."""


def mean_ci95(values: Sequence[float]) -> dict:
    """Mean and half-width of the two-sided 95 % confidence interval of the mean (Student's t, n - 1 degrees of
    freedom) of ``values`` (None / NaN skipped): {'mean', 'ci95', 'std', 'n'}; ci95 None when n < 2."""
    from scipy.stats import t
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if n > 1 else None
    ci = float(t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return {"mean": float(v.mean()), "ci95": ci, "std": std, "n": n}


def scene_statistics(scenes: List[dict], keys: Sequence[str] = SCENE_METRICS) -> dict:
    """{metric: :func:`mean_ci95` over the scenes' values} for the ``keys`` every scene dict has."""
    return {k: mean_ci95([d.get(k) for d in scenes]) for k in keys if all(k in d for d in scenes)}


def paired_difference(scenes: List[dict], baseline: List[dict], key: str = "miou") -> dict:
    """:func:`mean_ci95` of the per-scene differences ``scenes[i][key] - baseline[i][key]`` (matched by the
    'scene' entry when both have one, else by position)."""
    if all("scene" in d for d in scenes + baseline):
        base = {d["scene"]: d.get(key) for d in baseline}
        pairs = [(d.get(key), base.get(d["scene"])) for d in scenes]
    else:
        pairs = [(a.get(key), b.get(key)) for a, b in zip(scenes, baseline)]
    return mean_ci95([a - b for a, b in pairs if a is not None and b is not None])


def seed_average(runs: List[List[dict]], keys: Sequence[str] = SCENE_METRICS) -> List[dict]:
    """Per-scene metrics averaged over training seeds: ``runs`` is one list of scene dicts per seed (same scenes);
    returns one dict per scene with the seed-mean of each of ``keys`` (and its 'scene')."""
    out = []
    for i, first in enumerate(runs[0]):
        row = {"scene": first.get("scene", i)}
        for k in keys:
            vals = [r[i].get(k) for r in runs if r[i].get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def _pm(stat: Optional[dict], digits: int = 1, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    ci = "" if stat.get("ci95") is None else f" ± {stat['ci95']:.{digits}f}"
    return f"{stat['mean']:{sign}.{digits}f}{ci}"


def ci_table(rows: Dict[str, dict], baseline: Optional[str] = None) -> str:
    """Markdown table of per-scene means with 95 % confidence intervals (``row['per_scene']``), the paired
    differences to ``baseline`` (``row['vs_baseline']``: {'miou': stat, 'boundary_miou': stat}), the seed spread
    of multi-seed rows (``row['seeds']``: the mean_ci95 of the seeds' mean mIoUs) and ms per keyframe."""
    head = ("| method | scenes | mIoU | boundary mIoU | fragmentation | Δ mIoU vs " + (baseline or "-") +
            " | Δ boundary mIoU | seeds: mIoU over seeds | ms / keyframe (mapping, of which purification) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ps, d = r.get("per_scene", {}), r.get("vs_baseline", {})
        seeds = r.get("seeds")
        seed_txt = f"{_pm(seeds)} (n = {seeds['n']})" if seeds else ""
        t = r.get("timing", {})
        ms = f"{t['keyframe_ms']:.0f} ({t['purify_ms']:.0f})" if t.get("keyframe_ms") is not None else ""
        if t.get("whole_purify_s") is not None:
            ms += f"{' + ' if ms else ''}whole map {t['whole_purify_s']:.1f} s"
        if t.get("superpoints_s") is not None:
            ms += f"{' + ' if ms else ''}superpoints {t['superpoints_s']:.2f} s"
        lines.append(f"| {name} | {ps.get('miou', {}).get('n', r.get('num_scenes', ''))} | {_pm(ps.get('miou'))} | "
                     f"{_pm(ps.get('boundary_miou'))} | {_pm(ps.get('fragmentation'), 2)} | "
                     f"{_pm(d.get('miou'), signed=True) if d else ''} | "
                     f"{_pm(d.get('boundary_miou'), signed=True) if d else ''} | {seed_txt} | {ms} |")
    return "\n".join(lines) + "\n"


def _fmt(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: Dict[str, dict]) -> str:
    """Markdown table, one row per method (name -> aggregate / scene dict); bytes per voxel and synonym-query
    recall / precision columns when every row has them."""
    sizes = all('bytes_per_voxel' in r for r in rows.values())
    queries = all('queries' in r for r in rows.values())
    head = "| method | mIoU | mAcc | boundary mIoU | fragmentation |" + " bytes/voxel |" * sizes + \
        " synonym recall | synonym precision |" * queries
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for name, r in rows.items():
        line = f"| {name} | {_fmt(r['miou'])} | {_fmt(r['macc'])} | {_fmt(r['boundary_miou'])} | " \
               f"{_fmt(r['fragmentation'], 2)} |"
        line += f" {r['bytes_per_voxel']} |" if sizes else ""
        line += f" {_fmt(r['queries']['recall'])} | {_fmt(r['queries']['precision'])} |" if queries else ""
        lines.append(line)
    return "\n".join(lines) + "\n"


def per_class_table(agg: dict) -> str:
    """Markdown table of per-class IoU / Acc / boundary IoU / GT points for the classes present in GT."""
    conf, misses = np.asarray(agg["confusion"]), np.asarray(agg["misses"])
    totals = dict(zip(agg["class_names"], (conf.sum(1) + misses).tolist()))
    lines = ["| class | IoU | Acc | boundary IoU | points |", "|---|---:|---:|---:|---:|"]
    for name, iou in agg["iou"].items():
        lines.append(f"| {name} | {_fmt(iou)} | {_fmt(agg['acc'][name])} | "
                     f"{_fmt(agg['boundary_iou'].get(name))} | {totals[name]} |")
    return "\n".join(lines) + "\n"


def bar_chart_png(path: str, rows: Dict[str, dict], width: int = 800, height: int = 420) -> None:
    """Grouped bar chart (Pillow only) of mIoU and boundary mIoU per method, 0-100 axis, bars labelled."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 50, width - 20, 40, height - 50
    y = lambda v: bottom - (bottom - top) * v / 100.0  # noqa: E731
    for v in range(0, 101, 20):
        d.line([(left, y(v)), (right, y(v))], fill=(225, 225, 225))
        d.text((left - 30, y(v) - 6), str(v), fill="black", font=font)
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    series = [("mIoU", "miou", (66, 133, 244)), ("boundary mIoU", "boundary_miou", (244, 160, 0))]
    for k, (label, _, color) in enumerate(series):
        d.rectangle([left + 10 + 140 * k, 12, left + 22 + 140 * k, 24], fill=color)
        d.text((left + 28 + 140 * k, 12), label, fill="black", font=font)
    group = (right - left) / max(len(rows), 1)
    bar = min(60.0, group * 0.35)
    for g, (name, r) in enumerate(rows.items()):
        x0 = left + g * group + (group - 2 * bar) / 2
        for k, (_, key, color) in enumerate(series):
            v = r.get(key)
            xa = x0 + k * bar
            if v is not None:
                d.rectangle([xa + 2, y(v), xa + bar - 2, bottom], fill=color)
            d.text((xa + 4, (y(v) if v is not None else bottom) - 14), _fmt(v), fill="black", font=font)
        d.text((left + g * group + group / 2 - 3 * len(name), bottom + 8), name, fill="black", font=font)
    img.save(path, format="PNG")

"""Free-text query evaluation: synonyms and paraphrases of the evaluation world's classes.

Each query names one target class in words other than its class name ("couch" for sofa, "the thing you sleep
on" for bed). A query is asked with the mapper's defaults (negatives, threshold) like a ``/segment_by_text``
call; the GT points of the scene are then split by whether their nearest voxel was returned:
recall = returned target points / target points, precision = returned target points / returned points.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

SYNONYMS: Dict[str, str] = {
    'couch': 'sofa', 'settee': 'sofa', 'somewhere to lounge with friends': 'sofa',
    'fridge': 'refrigerator', 'the thing that keeps food cold': 'refrigerator',
    'seat': 'chair', 'the thing you sit on': 'chair',
    'dining table': 'table', 'somewhere to eat a meal': 'table',
    'mattress': 'bed', 'the thing you sleep on': 'bed',
    'cupboard': 'cabinet', 'storage cupboard with doors': 'cabinet',
    'houseplant': 'plant', 'something green growing in a pot': 'plant',
    'light': 'lamp', 'something that lights the room': 'lamp',
    'bookcase': 'bookshelf', 'shelves full of books': 'bookshelf',
    'doorway': 'door', 'the way out of the room': 'door',
    'window pane': 'window', 'glass to look outside through': 'window',
    'painting': 'picture', 'a framed photo on the wall': 'picture',
    'writing desk': 'desk', 'somewhere to work on a laptop': 'desk',
    'countertop': 'counter', 'kitchen worktop': 'counter',
    'drapes': 'curtain', 'fabric hanging by the window': 'curtain',
    'loo': 'toilet', 'lavatory': 'toilet',
    'washbasin': 'sink', 'where you wash your hands': 'sink',
    'bath': 'bathtub', 'tub to bathe in': 'bathtub',
}
"""{query: target class name} over the classes of ov3d_ros.sim.classes."""


def query_scores(mapper, gt: dict, queries: Dict[str, str], ignored: Sequence[str] = (),
                 thresholds: Sequence[float] = ()) -> List[dict]:
    """Recall and precision of each query whose target class has GT points in this scene.

    Args:
        mapper: a Mapper holding the scene's map.
        gt: ground truth with xyz (N, 3), label (N,), names (C,).
        queries: {query text: target class name}.
        thresholds: also score each query at these score thresholds (one scoring pass per query: the answer at
            threshold t is the voxels of the lowest-threshold answer with score >= t).
    Returns:
        one dict per asked query: query, target, recall, precision, returned (voxels) at the mapper's default
        threshold, and with ``thresholds`` 'sweep': [{threshold, recall, precision, returned}, ...].
    """
    names = [str(n) for n in gt['names']]
    label = np.asarray(gt['label']).astype(np.int64)
    counted = ~np.isin(label, [i for i, n in enumerate(names) if n in ignored])
    default = float(mapper.cfg.query.default_threshold)
    levels = sorted({default, *[float(t) for t in thresholds]})      # answers at each level, nested
    # every GT point's nearest observed voxel (-1: none within a voxel), found once for all queries
    nearest = mapper.label_points(gt['xyz'], torch.arange(mapper.map.size, device=mapper.device))
    out = []
    for text, target in queries.items():
        if target not in names or not np.any(label == names.index(target)):
            continue
        res = mapper.query(text, threshold=min(levels))
        # per voxel, how many levels its score reaches (0 = not returned at any)
        reached = torch.zeros(mapper.map.size, dtype=torch.int64, device=mapper.device)
        reached[res.rows] = (res.scores[:, None] >= torch.tensor(levels, device=res.scores.device)).sum(1)
        point_level = np.concatenate([[0], reached.cpu().numpy()])[nearest + 1]      # no voxel: level 0
        is_target = label == names.index(target)
        counts = [int((reached > i).sum()) for i in range(len(levels))]

        def at(i):
            returned = (point_level > i) & counted
            return {'recall': float(np.mean(returned[is_target])),
                    'precision': float(np.mean(is_target[returned])) if returned.any() else 0.0,
                    'returned': counts[i]}
        row = {'query': text, 'target': target, **at(levels.index(default))}
        if len(thresholds):
            row['sweep'] = [{'threshold': float(t), **at(levels.index(float(t)))} for t in thresholds]
        out.append(row)
    return out


def sweep_table(per_scene: Dict[str, List[dict]]) -> str:
    """Markdown table of the threshold sweep: per variant and threshold, recall, precision and F1 (2PR / (P + R)
    of the scene means), each the mean over scenes of the per-scene mean over queries, with a 95 % CI.

    per_scene: {variant: [scene dict with 'queries' holding 'sweep' entries, ...]}.
    """
    from ov3d_ros.eval.metrics import mean_ci95
    lines = ['| variant | threshold | queries | recall | precision | F1 |', '|---|---:|---:|---:|---:|---:|']
    for name, scenes in per_scene.items():
        if not scenes or not all(s.get('queries') and 'sweep' in s['queries'][0] for s in scenes):
            continue
        for k, t in enumerate(q['threshold'] for q in scenes[0]['queries'][0]['sweep']):
            rec, prec, f1 = [], [], []
            for s in scenes:
                r = 100 * float(np.mean([q['sweep'][k]['recall'] for q in s['queries']]))
                p = 100 * float(np.mean([q['sweep'][k]['precision'] for q in s['queries']]))
                rec.append(r)
                prec.append(p)
                f1.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
            cells = []
            for v in (rec, prec, f1):
                st = mean_ci95(v)
                cells.append(f"{st['mean']:.1f} ± {st['ci95']:.1f}" if st.get('ci95') is not None
                             else f"{st['mean']:.1f}")
            n = sum(len(s['queries']) for s in scenes)
            lines.append(f'| {name} | {t:g} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def summarize(results: List[dict]) -> dict:
    """Mean recall and precision (percent) over queries, and how many were asked."""
    if not results:
        return {'queries': 0, 'recall': None, 'precision': None}
    return {'queries': len(results), 'recall': 100 * float(np.mean([r['recall'] for r in results])),
            'precision': 100 * float(np.mean([r['precision'] for r in results]))}

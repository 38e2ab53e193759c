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


def query_scores(mapper, gt: dict, queries: Dict[str, str], ignored: Sequence[str] = ()) -> List[dict]:
    """Recall and precision of each query whose target class has GT points in this scene.

    Args:
        mapper: a Mapper holding the scene's map.
        gt: ground truth with xyz (N, 3), label (N,), names (C,).
        queries: {query text: target class name}.
    Returns:
        one dict per asked query: query, target, recall, precision, returned (voxels).
    """
    names = [str(n) for n in gt['names']]
    label = np.asarray(gt['label']).astype(np.int64)
    counted = ~np.isin(label, [i for i, n in enumerate(names) if n in ignored])
    out = []
    for text, target in queries.items():
        if target not in names or not np.any(label == names.index(target)):
            continue
        seg_rows = mapper.query(text).rows
        hit = torch.zeros(mapper.map.size, dtype=torch.int64, device=mapper.device)
        hit[seg_rows] = 1
        returned = (mapper.label_points(gt['xyz'], hit) == 1) & counted
        is_target = label == names.index(target)
        out.append({'query': text, 'target': target, 'returned': int(len(seg_rows)),
                    'recall': float(np.mean(returned[is_target])),
                    'precision': float(np.mean(is_target[returned])) if returned.any() else 0.0})
    return out


def summarize(results: List[dict]) -> dict:
    """Mean recall and precision (percent) over queries, and how many were asked."""
    if not results:
        return {'queries': 0, 'recall': None, 'precision': None}
    return {'queries': len(results), 'recall': 100 * float(np.mean([r['recall'] for r in results])),
            'precision': 100 * float(np.mean([r['precision'] for r in results]))}

"""Precision and recall of a segmented cloud against a labelled ground-truth point cloud."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.spatial import cKDTree


@dataclass
class SegmentationScore:
    """precision: fraction of predicted points whose nearest GT point has the class; recall: fraction of the
    class's GT points with a predicted point within ``radius_m``."""

    points: int
    precision: float
    recall: float


def score_segmentation(pred_xyz: np.ndarray, gt_xyz: np.ndarray, gt_label: np.ndarray, class_id: int,
                       radius_m: float, observed_xyz: Optional[np.ndarray] = None) -> SegmentationScore:
    """Score predicted points (N, 3) for ``class_id`` against GT points (M, 3) with labels (M,).

    A predicted point is correct when the nearest GT point within ``radius_m`` carries the class (a point with
    no GT point that close is wrong). A GT point of the class is recalled when a predicted point lies within
    ``radius_m`` of it. With ``observed_xyz`` (the map's points), recall only counts GT points the map
    observed (within ``radius_m`` of an observed point).
    """
    if observed_xyz is not None and len(observed_xyz):
        d_obs, _ = cKDTree(observed_xyz).query(gt_xyz, k=1, distance_upper_bound=radius_m)
        gt_xyz, gt_label = gt_xyz[np.isfinite(d_obs)], gt_label[np.isfinite(d_obs)]
    target = gt_label == class_id
    n_target = int(target.sum())
    if len(pred_xyz) == 0:
        return SegmentationScore(0, 0.0, 0.0)
    dist, idx = cKDTree(gt_xyz).query(pred_xyz, k=1, distance_upper_bound=radius_m)
    hit = np.isfinite(dist)
    correct = np.zeros(len(pred_xyz), dtype=bool)
    correct[hit] = target[idx[hit]]
    precision = float(correct.mean())
    if n_target == 0:
        return SegmentationScore(len(pred_xyz), precision, 0.0)
    d_gt, _ = cKDTree(pred_xyz).query(gt_xyz[target], k=1, distance_upper_bound=radius_m)
    return SegmentationScore(len(pred_xyz), precision, float(np.isfinite(d_gt).mean()))

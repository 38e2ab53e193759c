"""Precomputed features of "another 2D model" for evaluation: the simulated features through a fixed random
projection to another dimension, written as dataset folders that ``--features precomputed`` reads.

    python -m ov3d_ros.eval.project_features scenes/scene_01?? --out scenes_d64 --dim 64 --config config/eval.yaml

Per input folder, ``OUT/<name>/`` links the input's images, poses, intrinsics and ground truth and adds
``features/NNNNNN.npy`` (h x w x dim float16: each simulated token times a fixed Gaussian matrix, re-normalised)
and ``text_embeddings.npz`` (the ground-truth class names and their prompt-ensemble text embeddings through the
same matrix). SIMULATED: it measures whether a component works in a feature space of another dimension, not
another real model.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LINKED = ('color', 'depth', 'pose', 'intrinsic', 'label', 'instance', 'timestamps.txt', 'gt_points.npz')


def projection_matrix(in_dim: int, out_dim: int, seed: int = 0, keep=None) -> torch.Tensor:
    """(in_dim, out_dim) fixed random matrix with orthonormal columns; ``keep`` (in_dim,) is one of them (up to
    sign) when given. Keeping the simulated source's image-modality direction g keeps its modality gap: texts
    are orthogonal to g and stay orthogonal to its image, which a plain random projection would not guarantee
    (then every text would get a random bias from the dominant g component of every feature)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(in_dim, out_dim, generator=g, dtype=torch.float64)
    if keep is not None:
        G[:, 0] = torch.as_tensor(keep, dtype=torch.float64)
    return torch.linalg.qr(G)[0].float()


def project_folder(src: Path, dst: Path, dim: int, cfg, seed: int = 0) -> dict:
    """Write ``dst`` from the dataset folder ``src`` (see the module docstring); returns a summary."""
    from ov3d_ros.cli.common import make_mapper, open_input
    source = open_input(src)
    names = [str(n) for n in source.gt_points()['names']]
    mapper = make_mapper(cfg, source, names)
    ext = mapper.extractor
    keep = ext.modality_direction().cpu() if hasattr(ext, 'modality_direction') and \
        ext.error_model().text_cosine < 1.0 else None
    R = projection_matrix(mapper.extractor.dim, dim, seed, keep).to(mapper.device)
    dst.mkdir(parents=True, exist_ok=True)
    for item in LINKED:
        if (src / item).exists() and not (dst / item).exists():
            os.symlink((src / item).resolve(), dst / item)
    (dst / 'features').mkdir(exist_ok=True)
    for k, frame in enumerate(source):
        stem = source.reader.stems[k]
        feats = mapper.extractor.extract(frame.rgb, frame.labels, depth_m=frame.depth_m, camera=frame.camera,
                                         T_W_C=frame.T_W_C).float()
        np.save(dst / 'features' / f'{stem}.npy', F.normalize(feats @ R, dim=-1).cpu().numpy().astype(np.float16))
    text = F.normalize(mapper.embed_texts(names).float() @ R, dim=-1)
    np.savez(dst / 'text_embeddings.npz', names=np.array(names), vectors=text.cpu().numpy().astype(np.float32))
    return {'scene': str(dst), 'frames': len(source), 'dim': dim, 'source_dim': mapper.extractor.dim}


def main(argv=None) -> int:
    from ov3d_ros.cli.common import add_config_arguments, build_config
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('inputs', nargs='+', type=Path, help='dataset folders with label/ images and gt_points.npz')
    p.add_argument('--out', required=True, type=Path)
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--seed', type=int, default=0, help='seed of the projection matrix')
    add_config_arguments(p)
    args = p.parse_args(argv)
    cfg = build_config(args)
    if cfg.features.source != 'simulated':
        p.error('the projected features are made from the simulated source (features.source: simulated)')
    for src in args.inputs:
        print(json.dumps(project_folder(src, args.out / src.name, args.dim, cfg, args.seed)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

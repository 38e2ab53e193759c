"""Label given points with a vocabulary from a saved map (nearest observed voxel; unobserved = -1).

    ov3d label scene.ov3dmap --vocab names.txt --points points.npz --out pred.npz
    ov3d label scene.ov3dmap --text-embeddings text_embeddings.npz --points gt_points.npz --out pred.npz

points.npz holds ``xyz`` (N, 3); pred.npz gets ``label`` (N,) int64 indices into ``names`` (-1 unobserved),
and ``names``.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from ov3d_ros.cli.common import CliError, check_output, number_in
from ov3d_ros.core.io import read_npz, read_text
from ov3d_ros.core.map_io import write_atomic
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.datasets.scannet_folder import read_text_embeddings


def add_arguments(p) -> None:
    p.add_argument('map', type=Path, help='map file')
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument('--vocab', type=Path, help='text file, one class name per line')
    vocab.add_argument('--text-embeddings', type=Path, help='npz with names (K,) and vectors (K, D)')
    p.add_argument('--points', required=True, type=Path, help='npz with xyz (N, 3)')
    p.add_argument('--out', required=True, type=Path, help='npz to write')
    p.add_argument('--max-distance', type=number_in(0.0), default=0.0,
                   help='farthest voxel centre that labels a point, metres (0 = one voxel size)')
    p.add_argument('--device', default='auto', help='torch device')


def read_vocab(path: Path) -> list:
    """Class names of a vocabulary file, one a line; CliError for none, or for a name given twice (up to case: its
    second index would never be used)."""
    text = read_text(path, 'the vocabulary', 'class names, one per line', CliError)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise CliError(f'{path}: no class names (one per line)')
    seen = {}
    for n in names:
        if n.lower() in seen:
            raise CliError(f'{path}: class name {n!r} appears twice (as {seen[n.lower()]!r}); names must be unique '
                           '(case-insensitive)')
        seen[n.lower()] = n
    return names


def npz_path(path: Path) -> Path:
    """The file np.savez writes for ``path`` (it adds .npz to a name without it)."""
    return path if str(path).endswith('.npz') else path.with_name(path.name + '.npz')


def run(args) -> int:
    out = check_output(npz_path(args.out), [args.map, args.vocab, args.text_embeddings, args.points], 'npz')
    xyz = read_npz(args.points, ('xyz',))['xyz']
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise CliError(f'{args.points}: xyz must be (N, 3), got {xyz.shape}')
    names, vectors = (read_vocab(args.vocab), None) if args.vocab else read_text_embeddings(args.text_embeddings)
    mapper = Mapper.from_file(args.map, args.device)
    if args.vocab:
        labels = mapper.voxel_labels(names)
    else:
        dim = mapper.extractor.dim
        if vectors.shape[1] != dim:
            raise CliError(f'{args.text_embeddings}: vectors must be (K, {dim}), got {vectors.shape}')
        labels = mapper.classify(torch.nn.functional.normalize(torch.from_numpy(vectors), dim=-1))[0]
    label = mapper.label_points(xyz, labels, args.max_distance)
    buf = io.BytesIO()
    np.savez_compressed(buf, label=label, names=np.array(names))
    write_atomic(out, buf.getvalue())
    print(json.dumps({'points': len(label), 'unobserved': int((label < 0).sum()), 'out': str(out)}))
    return 0

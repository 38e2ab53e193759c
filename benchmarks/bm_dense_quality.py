"""Benchmark: dense CLIP feature quality per dense mode on the evaluation scenes (3D mIoU, ms per keyframe).

    python benchmarks/bm_dense_quality.py --pretrained ~/weights/ViT-B-16.pt
    python benchmarks/bm_dense_quality.py --pretrained openai --modes naclip sclip --windows 0 224:112 \\
        eval_output/scenes/scene_0100 eval_output/scenes/scene_0101
    python benchmarks/bm_dense_quality.py --pretrained none --max-frames 10   # random weights: exercises the script
    python benchmarks/bm_dense_quality.py --pretrained openai --modes naclip --dtypes float32 bfloat16   # precision

Each scene (a dataset folder made by ``ov3d make-scenes``, with gt_points.npz) is mapped with features.source=clip
once per variant (precision x dense mode x short side x window setting) and scored like ``ov3d eval`` (3D mIoU over
the GT points, every scene's class names as vocabulary). The model and weights are loaded once per precision
(``features.dtype``) and shared by the variants of that precision.
Prints one JSON line per variant (dataset-level metrics, ms per keyframe for features alone and in total), then a
Markdown table. Without local weights it exits with one line saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's ov3d_ros first

from ov3d_ros.cli.common import build_config, map_input, open_input  # noqa: E402
from ov3d_ros.cli.evaluate import score_mapper  # noqa: E402
from ov3d_ros.core.features.clip_dense import DENSE_MODES, DTYPES, OpenClipDenseExtractor  # noqa: E402
from ov3d_ros.core.features.weights import RANDOM_TAGS, WeightsNotFoundError  # noqa: E402
from ov3d_ros.core.mapper import Mapper, resolve_device  # noqa: E402
from ov3d_ros.eval.metrics import aggregate, markdown_table  # noqa: E402

DEFAULT_SCENES = 'eval_output/scenes/scene_01??'


class TimedExtractor:
    """Passes everything to ``ext`` and records the wall time of each ``extract`` call (synchronised on CUDA)."""

    def __init__(self, ext):
        self.ext, self.ms = ext, []

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def extract(self, rgb, labels=None):
        t0 = time.perf_counter()
        feats = self.ext.extract(rgb, labels)
        if feats.is_cuda:
            torch.cuda.synchronize(feats.device)
        self.ms.append(1e3 * (time.perf_counter() - t0))
        return feats


@dataclasses.dataclass
class FirstFrames:
    """The first ``n`` frames of a dataset reader."""

    reader: object
    n: int

    def __len__(self) -> int:
        return min(len(self.reader), self.n)

    def __iter__(self):
        return itertools.islice(iter(self.reader), self.n)


def parse_window(text: str) -> tuple:
    """'0' (whole image), 'PX' (stride: half a window) or 'PX:STRIDE' -> (window_px, window_stride_px)."""
    px, _, stride = text.partition(':')
    return int(px), int(stride or 0)


def variant_name(f) -> str:
    window = f' win{f.window_px}:{f.window_stride_px or f.window_px // 2}' if f.window_px else ''
    return f'{f.dense_mode}@{f.image_short_side}{window}' + ('' if f.dtype == 'auto' else f' {f.dtype}')


def mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rounded(x, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def load_extractor(cfg, device) -> OpenClipDenseExtractor:
    """The dense extractor of ``cfg.features``; exits with one line when its weights are not available locally."""
    try:
        return OpenClipDenseExtractor(cfg.features, device)
    except WeightsNotFoundError as e:
        reason = str(e).splitlines()[0].split(' Fix:')[0].removesuffix(' Searched:')
        sys.exit(f'WeightsNotFoundError: {reason} Pass --pretrained with a local checkpoint file or an open_clip tag '
                 f'in the local cache (--cache-dir), or --pretrained none for a dry run with random weights.')


def run_variant(cfg, ext, scenes, max_frames, quiet) -> dict:
    """Map and score every scene with the features of ``cfg``; dataset metrics and timings."""
    ext.reconfigure(cfg.features)
    timed, per_scene, keyframe_ms = TimedExtractor(ext), [], []
    for path in scenes:
        source = open_input(path)
        if max_frames:
            source = dataclasses.replace(source, reader=FirstFrames(source.reader, max_frames))
        gt = source.gt_points()
        ext.extract(next(iter(source)).rgb)  # warm-up (kernels, positional embedding), not timed
        mapper = Mapper(cfg, timed)
        stats = map_input(mapper, source, quiet)
        per_scene.append(score_mapper(mapper, gt))
        keyframe_ms += [stats['keyframe_ms_mean']] * stats['keyframes']
    row = aggregate(per_scene)
    summary = {'variant': variant_name(cfg.features), 'scenes': len(scenes), 'keyframes': len(timed.ms),
               **{k: rounded(row[k], 2) for k in ('miou', 'macc', 'boundary_miou')},  # percent, as in `ov3d eval`
               'features_ms_per_keyframe': rounded(mean(timed.ms)), 'total_ms_per_keyframe': rounded(mean(keyframe_ms))}
    return {'summary': summary, 'row': row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('scenes', nargs='*', help=f'dataset folders with gt_points.npz (default: {DEFAULT_SCENES})')
    p.add_argument('--pretrained', default='openai',
                   help="local checkpoint file or open_clip tag in the local cache; 'none' = random weights")
    p.add_argument('--model', default='ViT-B-16', help='open_clip architecture')
    p.add_argument('--cache-dir', default='', help='directory searched for cached open_clip weights')
    p.add_argument('--modes', nargs='+', default=list(DENSE_MODES), choices=DENSE_MODES)
    p.add_argument('--dtypes', nargs='+', default=['auto'], choices=['auto', *DTYPES],
                   help='features.dtype values (auto: float16 on CUDA, float32 otherwise)')
    p.add_argument('--short-side', nargs='+', type=int, default=[448], help='features.image_short_side values')
    p.add_argument('--windows', nargs='+', type=parse_window, default=[(0, 0)], metavar='PX[:STRIDE]',
                   help="window settings: 0 = whole image, 224 = 224 px windows at half-window stride, 336:112 ...")
    p.add_argument('--max-frames', type=int, default=0, help='use only the first N frames of each scene (0 = all)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    p.add_argument('--config', action='append', default=[], metavar='YAML', help='node parameter file(s)')
    p.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE', help='config override')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    args = p.parse_args()
    scenes = args.scenes or sorted(str(d) for d in REPO.glob(DEFAULT_SCENES) if d.is_dir())
    if not scenes:
        sys.exit(f'no scenes given and none found at {REPO / DEFAULT_SCENES} (make them with `ov3d make-scenes`)')
    cfg = build_config(args)
    cfg.features = dataclasses.replace(cfg.features, source='clip', model=args.model, pretrained=args.pretrained,
                                       cache_dir=args.cache_dir)
    device, rows = resolve_device(args.device), {}
    for dtype in args.dtypes:
        cfg.features = dataclasses.replace(cfg.features, dtype=dtype)
        ext = load_extractor(cfg, device)
        print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {ext.device}, model {args.model}, '
              f'weights {ext.weights}, {ext.dtype}, {len(scenes)} scene(s)')
        if args.pretrained.strip().lower() in RANDOM_TAGS:
            print('WARNING: random weights (--pretrained none): the scores below are meaningless; this run only '
                  'exercises the script and measures speed.')
        for side, (px, stride), mode in itertools.product(args.short_side, args.windows, args.modes):
            features = dataclasses.replace(cfg.features, dense_mode=mode, image_short_side=side, window_px=px,
                                           window_stride_px=stride)
            result = run_variant(dataclasses.replace(cfg, features=features), ext, scenes, args.max_frames,
                                 args.quiet)
            print(json.dumps(result['summary']), flush=True)
            rows[result['summary']['variant']] = result['row']
    print(markdown_table(rows), end='')


if __name__ == '__main__':
    main()

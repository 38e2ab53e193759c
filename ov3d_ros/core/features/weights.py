"""Offline resolution and loading of open_clip weights. Nothing here ever touches the network.

``pretrained`` may be (1) a local checkpoint file (.pt/.pth/.bin/.safetensors, a state dict or OpenAI's TorchScript
release), (2) an open_clip pretrained tag such as 'openai', looked up in the local caches open_clip and the
Hugging Face hub would have downloaded it to, or (3) '', 'none' or 'random' for random initialisation.

OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain model names build GELU, which runs but gives
wrong features. :func:`uses_quick_gelu` recognises OpenAI weights by tag, by TorchScript file, by the
``input_resolution`` / ``context_length`` / ``vocab_size`` entries OpenAI's state dicts carry, by an
``open_clip_config.json`` beside the file (Hugging Face hub snapshots), or by 'openai' in the file's path (e.g.
the hub's ``vit_base_patch16_clip_224.openai``); for anything else pick a '-quickgelu' model name.
"""
from __future__ import annotations

import glob
import json
import os
import re
import zipfile
from pathlib import Path
from typing import List, Optional

import torch

RANDOM_TAGS = ('', 'none', 'random')
OPENAI_EXTRA_KEYS = ('input_resolution', 'context_length', 'vocab_size')
"""Non-tensor entries of OpenAI's released CLIP state dicts (open_clip's own state dicts have none of them)."""
CHECKPOINT_SUFFIXES = ('.pt', '.pth', '.bin', '.safetensors')
FIX_HINT = ('Fix: set features.pretrained to a local checkpoint file (.pt/.bin/.safetensors), copy the weights '
            'into one of the searched places, or use features.source: simulated.')


class WeightsNotFoundError(RuntimeError):
    """CLIP weights were asked for but cannot be found or loaded locally."""


def _hub_dirs(cache_dir: str) -> List[str]:
    """Hugging Face hub cache roots, most specific first."""
    hf_home = os.environ.get('HF_HOME', os.path.join('~', '.cache', 'huggingface'))
    dirs = [cache_dir, os.path.join(cache_dir, 'hub')] if cache_dir else []
    dirs += [os.environ.get('HF_HUB_CACHE', ''), os.path.join(hf_home, 'hub'), '~/.cache/huggingface/hub']
    return list(dict.fromkeys(os.path.expanduser(d) for d in dirs if d))


def candidate_paths(model: str, tag: str, cache_dir: str = '') -> List[str]:
    """Every local path where the weights of open_clip pretrained ``tag`` of ``model`` may lie (existing or not)."""
    import open_clip
    cfg = open_clip.pretrained.get_pretrained_cfg(model, tag)
    paths = [cfg['file']] if cfg.get('file') else []
    if cfg.get('url'):  # open_clip's URL downloads go to cache_dir, or ~/.cache/clip
        name = os.path.basename(cfg['url'])
        paths += [os.path.join(d, name) for d in (cache_dir, os.path.expanduser('~/.cache/clip')) if d]
    if cfg.get('hf_hub'):  # 'org/repo/' or 'org/repo/file', cached as <hub>/models--org--repo/snapshots/<rev>/<file>
        hub_id = cfg['hf_hub']
        repo_id, filename = (hub_id[:-1], '') if hub_id.endswith('/') else os.path.split(hub_id)
        names = ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin']  # open_clip's defaults
        if filename and filename not in names:  # open_clip prefers a .safetensors twin of a named .bin/.pth
            names = ([filename[:-4] + '.safetensors'] if filename.endswith(('.bin', '.pth')) else []) + [filename]
        for hub in _hub_dirs(cache_dir):
            repo_dir = os.path.join(hub, 'models--' + repo_id.replace('/', '--'))
            ref = os.path.join(repo_dir, 'refs', 'main')
            revs = [Path(ref).read_text().strip()] if os.path.isfile(ref) else []
            revs += sorted(os.path.basename(p) for p in glob.glob(os.path.join(repo_dir, 'snapshots', '*')))
            revs = list(dict.fromkeys(revs)) or ['*']
            paths += [os.path.join(repo_dir, 'snapshots', r, n) for r in revs for n in names]
    return list(dict.fromkeys(paths))


def resolve_weights(model: str, pretrained: str, cache_dir: str = '') -> Optional[str]:
    """Local checkpoint path for ``pretrained``; None for random init. Raises WeightsNotFoundError otherwise."""
    import open_clip
    value = (pretrained or '').strip()
    if value.lower() in RANDOM_TAGS:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        return path
    if os.sep in value or value.lower().endswith(CHECKPOINT_SUFFIXES):
        raise WeightsNotFoundError(f'CLIP checkpoint file {path!r} (features.pretrained) does not exist. {FIX_HINT}')
    if not open_clip.pretrained.get_pretrained_cfg(model, value):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsNotFoundError(f'features.pretrained={value!r} is neither an existing file nor a known open_clip '
                                   f'pretrained tag of model {model!r} (known tags: {tags}). {FIX_HINT}')
    searched = candidate_paths(model, value, cache_dir)
    for path in searched:
        if os.path.isfile(path):
            return path
    listing = '\n  '.join(searched)
    raise WeightsNotFoundError(
        f'No local weights for open_clip model {model!r} with pretrained tag {value!r}; nothing is downloaded '
        f'(offline). Searched:\n  {listing}\n{FIX_HINT}')


def fetch_weights(model: str, pretrained: str, cache_dir: str = '') -> Optional[str]:
    """:func:`resolve_weights`, and when the weights of an open_clip pretrained tag are not found locally, download
    them with open_clip into ``cache_dir`` (or its default cache) and return that file (``features.allow_download``).
    A file path or an unknown tag is never downloaded. Raises WeightsNotFoundError naming the download error."""
    import open_clip
    try:
        return resolve_weights(model, pretrained, cache_dir)
    except WeightsNotFoundError as e:
        tag = (pretrained or '').strip()
        if os.sep in tag or tag.lower().endswith(CHECKPOINT_SUFFIXES) or \
                not open_clip.pretrained.get_pretrained_cfg(model, tag):
            raise
        local_error = str(e)
    try:
        path = open_clip.pretrained.download_pretrained(open_clip.pretrained.get_pretrained_cfg(model, tag),
                                                        prefer_hf_hub=True, cache_dir=cache_dir or None)
    except Exception as e:  # network, hub or offline-mode errors
        raise WeightsNotFoundError(f'features.allow_download: downloading open_clip weights {model!r}/{tag!r} '
                                   f'failed ({type(e).__name__}: {str(e)[:300]}).\n{local_error}') from e
    if not path or not os.path.isfile(path):
        raise WeightsNotFoundError(f'features.allow_download: open_clip returned no file for {model!r}/{tag!r}.\n'
                                   f'{local_error}')
    return path


def is_torchscript(path: str) -> bool:
    """True for TorchScript archives (OpenAI's original CLIP releases)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('constants.pkl') for n in z.namelist())


def _raw_state_dict(path: str) -> dict:
    """The tensors of a non-TorchScript checkpoint file as saved ('state_dict' unwrapped, 'module.' stripped)."""
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        sd = load_file(path, device='cpu')
    else:
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: no mmap
            sd = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict):
        raise ValueError(f'{path} holds a {type(sd).__name__}, not a state dict')
    return {(k[7:] if k.startswith('module.') else k): v for k, v in sd.items()}


def openai_provenance(path: str) -> Optional[str]:
    """Why the checkpoint file ``path`` holds OpenAI CLIP weights (a short reason), or None when nothing says so.

    Evidence, in order: a TorchScript archive (OpenAI's release format); OpenAI's extra state-dict entries
    (:data:`OPENAI_EXTRA_KEYS`); an ``open_clip_config.json`` beside the file whose ``model_cfg.quick_gelu`` is
    true (Hugging Face hub snapshots); 'openai' as a word in the file's path.
    """
    if is_torchscript(path):
        return 'OpenAI TorchScript release'
    try:
        keys = set(_raw_state_dict(path))
    except Exception:   # unreadable here; load_weights reports it
        keys = set()
    if keys & set(OPENAI_EXTRA_KEYS):
        return f'OpenAI state dict (has {sorted(keys & set(OPENAI_EXTRA_KEYS))})'
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), 'open_clip_config.json')
    if os.path.isfile(sidecar):
        try:
            with open(sidecar) as f:
                if json.load(f).get('model_cfg', {}).get('quick_gelu', False):
                    return f'quick_gelu in {sidecar}'
        except (OSError, ValueError, AttributeError):
            pass
    if re.search(r'(^|[^a-z])openai([^a-z]|$)', os.path.abspath(path).lower()):
        return "'openai' in the file path"
    return None


def uses_quick_gelu(model: str, pretrained: str) -> bool:
    """Whether the weights named by ``pretrained`` were trained with QuickGELU (OpenAI's and some others): from the
    tag's open_clip entry, or for a file from :func:`openai_provenance`. For other QuickGELU files pick a
    '-quickgelu' model name (e.g. 'ViT-B-16-quickgelu')."""
    import open_clip
    value = (pretrained or '').strip()
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        return openai_provenance(path) is not None
    if value.lower() in RANDOM_TAGS:
        return False
    return bool(open_clip.pretrained.get_pretrained_cfg(model, value).get('quick_gelu', False))


def load_weights(model_obj: torch.nn.Module, model_name: str, pretrained: str, cache_dir: str = '') -> str:
    """Load ``pretrained`` into ``model_obj`` (an open_clip CLIP); returns a description of what was loaded."""
    import open_clip
    from open_clip.model import resize_pos_embed
    path = resolve_weights(model_name, pretrained, cache_dir)
    if path is None:
        return f'random (pretrained={(pretrained or "").strip().lower() or "none"})'
    try:
        if is_torchscript(path):  # OpenAI release: same key names as open_clip's CLIP
            sd = torch.jit.load(path, map_location='cpu').state_dict()
            sd = {k: v for k, v in sd.items() if k not in ('input_resolution', 'context_length', 'vocab_size')}
            resize_pos_embed(sd, model_obj)
            model_obj.load_state_dict(sd, strict=True)
        elif set(OPENAI_EXTRA_KEYS) & set(sd := _raw_state_dict(path)):  # an OpenAI state dict saved as such
            sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
            resize_pos_embed(sd, model_obj)
            model_obj.load_state_dict(sd, strict=True)
        else:  # state dicts (.pt/.bin/.safetensors); converts formats and resizes the positional embedding
            open_clip.load_checkpoint(model_obj, path, strict=True, device='cpu')
    except Exception as e:  # unreadable file or a checkpoint of another architecture
        raise WeightsNotFoundError(f'cannot load CLIP checkpoint {path!r} into open_clip model {model_name!r}: '
                                   f'{type(e).__name__}: {str(e)[:500]}. {FIX_HINT}') from e
    return path

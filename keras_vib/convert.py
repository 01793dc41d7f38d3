"""timm_vib weights <-> keras_vib models.

``from_timm(source)`` takes a timm_vib model, a timm state dict, a ``.safetensors`` file, a model
folder (``model.safetensors`` + timm's ``config.json``, what ``timm_vib`` saves and the Hub holds)
or a Hub repo id, and returns the Keras model with the same weights. ``to_timm_state_dict(model)``
goes back. Layout changes: Dense kernels are timm's Linear weights transposed ([in, out] vs
[out, in]); the patch convolution kernel is [p, p, in, out] vs timm's [out, in, p, p]; everything
else (pos_embed, the stacked per-head bottleneck weights, norms) is stored as timm stores it.
The images change layout too: Keras takes NHWC, timm NCHW.
"""
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import keras
import numpy as np

from .models import PRESETS, VisionTransformerVIB, create_model

__all__ = ['from_timm', 'load_timm_weights', 'to_timm_state_dict', 'timm_config_from_state_dict']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'

# timm model_args keys keras_vib reproduces, and those that only matter for training / input handling
_SUPPORTED_ARGS = {'img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth', 'num_heads',
                   'mlp_ratio', 'qkv_bias', 'vib_dim', 'vib_hidden', 'beta', 'vib_logvar_init', 'attn_mode',
                   'vib_small_init_dec', 'pos_embed_init'}
_IGNORED_ARGS = {'drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate',
                 'patch_drop_rate', 'stochastic_eval', 'dynamic_img_size', 'dynamic_img_pad',
                 'pretrained_cfg_overlay', 'pretrained_strict', 'weight_init', 'fix_init'}
_DEFAULT_ARGS = {'class_token': False, 'global_pool': 'avg', 'fc_norm': False, 'reg_tokens': 0,
                 'qk_norm': False, 'init_values': None, 'no_embed_class': False, 'pre_norm': False,
                 'proj_bias': True, 'final_norm': True}


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, 'detach'):  # torch tensor (bfloat16 has no numpy dtype)
        v = v.detach().cpu()
        if str(v.dtype) in ('torch.bfloat16', 'torch.float16'):
            v = v.float()
        return v.numpy()
    return np.asarray(v)


# --- the name / layout table ----------------------------------------------------------------------

def _linear(w):  # timm [out, in] <-> keras [in, out]
    return np.transpose(w)


def _weight_table(model: VisionTransformerVIB) -> List[Tuple[str, Any, str]]:
    """(timm name, keras variable, layout) for every weight; layout 'same', 'linear' or 'conv'."""
    t = [('pos_embed', model.patch_embed.pos_embed, 'same'),
         ('patch_embed.proj.weight', model.patch_embed.proj.kernel, 'conv'),
         ('patch_embed.proj.bias', model.patch_embed.proj.bias, 'same')]

    def norm(prefix, layer):
        return [(f'{prefix}.weight', layer.gamma, 'same'), (f'{prefix}.bias', layer.beta, 'same')]

    def dense(prefix, layer):
        out = [(f'{prefix}.weight', layer.kernel, 'linear')]
        if layer.use_bias:
            out.append((f'{prefix}.bias', layer.bias, 'same'))
        return out

    for i, blk in enumerate(model.blocks):
        p = f'blocks.{i}'
        if hasattr(blk, 'attn'):
            t += norm(f'{p}.norm1', blk.norm1)
            t += dense(f'{p}.attn.qkv', blk.attn.qkv)
            t += dense(f'{p}.attn.proj', blk.attn.proj)
            vib = blk.attn.vib
            if vib is not None:
                t += [(f'{p}.attn.vib.{n}', getattr(vib, n), 'same') for n in vib.weight_names]
        t += norm(f'{p}.norm2', blk.norm2)
        t += dense(f'{p}.mlp.fc1', blk.mlp.fc1) + dense(f'{p}.mlp.fc2', blk.mlp.fc2)
    t += norm('norm', model.head.norm)
    if model.head.head is not None:
        t += dense('head', model.head.head)
    return t


def _to_keras(v: np.ndarray, layout: str) -> np.ndarray:
    if layout == 'linear':
        return _linear(v)
    if layout == 'conv':
        return np.transpose(v, (2, 3, 1, 0))  # [out, in, p, p] -> [p, p, in, out]
    return v


def _to_timm(v: np.ndarray, layout: str) -> np.ndarray:
    if layout == 'linear':
        return _linear(v)
    if layout == 'conv':
        return np.transpose(v, (3, 2, 0, 1))
    return v


# --- reading a timm checkpoint ----------------------------------------------------------------------

def timm_config_from_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """The keras_vib model arguments that a timm_vib state dict determines by its names and shapes.

    Neither the image grid (16 tokens may be 4 x 4 or 2 x 8 patches) nor, without a bottleneck, the
    number of heads (qkv is [3 x dim, dim] for any count) is determined: they are not returned.
    """
    if 'patch_embed.proj.weight' not in sd or 'pos_embed' not in sd:
        raise ValueError('not a timm ViT state dict: it has no patch_embed.proj.weight / pos_embed')
    if 'cls_token' in sd or 'reg_token' in sd:
        raise ValueError('this checkpoint has a class / register token; keras_vib models have none '
                         '(timm_vib uses average pooling over patch tokens only)')
    e, c, ph, pw = sd['patch_embed.proj.weight'].shape
    n = sd['pos_embed'].shape[1]
    depth = len({int(m.group(1)) for k in sd for m in [re.match(r'blocks\.(\d+)\.', k)] if m})
    if any('.attn.vib.' in k for k in sd):
        mode = 'vib'
    elif any('.attn.' in k for k in sd):
        mode = 'plain'
    else:
        mode = 'none'
    cfg = dict(embed_dim=int(e), in_chans=int(c), patch_size=(int(ph), int(pw)), depth=depth, attn_mode=mode,
               num_classes=int(sd['head.weight'].shape[0]) if 'head.weight' in sd else 0)
    if 'blocks.0.mlp.fc1.weight' in sd:
        cfg['mlp_ratio'] = sd['blocks.0.mlp.fc1.weight'].shape[0] / e
    if mode != 'none':
        cfg['qkv_bias'] = 'blocks.0.attn.qkv.bias' in sd
    if mode == 'vib':
        if 'blocks.0.attn.vib.enc_out_weight' in sd:  # MLP encoder / decoder: [H, hidden, 2r]
            h, hidden, r2 = sd['blocks.0.attn.vib.enc_out_weight'].shape
            cfg['num_heads'], cfg['vib_dim'], cfg['vib_hidden'] = int(h), int(r2) // 2, int(hidden)
        else:
            h, r, _ = sd['blocks.0.attn.vib.dec_weight'].shape
            cfg['num_heads'], cfg['vib_dim'], cfg['vib_hidden'] = int(h), int(r), 0
    cfg['_num_patches'] = int(n)
    return cfg


def _config_from_folder_json(cfg: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """keras_vib arguments from timm's config.json (architecture, num_classes, model_args)."""
    arch = cfg.get('architecture')
    if arch not in PRESETS:
        raise ValueError(f'{where}: architecture {arch!r} is not a timm_vib model; keras_vib converts '
                         f'{", ".join(PRESETS)}')
    args = dict(cfg.get('model_args') or {})
    unsupported = {k: v for k, v in args.items()
                   if k not in _SUPPORTED_ARGS | _IGNORED_ARGS and _DEFAULT_ARGS.get(k, object()) != v}
    if unsupported:
        raise ValueError(f'{where}: {arch} was created with {unsupported}, which keras_vib does not implement')
    out: Dict[str, Any] = {'name': arch}
    for timm_key, key in (('img_size', 'image_size'), ('patch_size', 'patch_size'), ('in_chans', 'in_chans'),
                          ('embed_dim', 'embed_dim'), ('depth', 'depth'), ('num_heads', 'num_heads'),
                          ('mlp_ratio', 'mlp_ratio'), ('qkv_bias', 'qkv_bias'), ('vib_dim', 'vib_dim'),
                          ('vib_hidden', 'vib_hidden'),
                          ('beta', 'beta'), ('vib_logvar_init', 'vib_logvar_init'),
                          ('vib_small_init_dec', 'vib_small_init_dec'), ('pos_embed_init', 'pos_embed_init')):
        if timm_key in args:
            out[key] = args[timm_key]
    if 'num_classes' in args or 'num_classes' in cfg:
        out['num_classes'] = args.get('num_classes', cfg.get('num_classes'))
    if 'image_size' not in out:
        size = (cfg.get('pretrained_cfg') or {}).get('input_size')
        if size:
            out['image_size'] = tuple(size[-2:])
    return out


_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16'}


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays, torch not needed (bfloat16 through ml_dtypes, which Keras
    depends on: numpy itself has no bfloat16, so safetensors.numpy cannot read it)."""
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except TypeError:
        pass  # a dtype numpy does not know: read the format (8-byte header size, JSON header, data)
    except Exception as e:  # safetensors' own error type for a truncated or corrupt file
        raise ValueError(f'{path} is not a readable .safetensors file ({e})') from None
    import ml_dtypes
    with open(path, 'rb') as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == '__metadata__':
            continue
        if info['dtype'] not in _SAFETENSORS_DTYPES:
            raise ValueError(f'{path}: {key} has dtype {info["dtype"]}; keras_vib reads float weights only')
        dtype = getattr(ml_dtypes, 'bfloat16') if info['dtype'] == 'BF16' else np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
        start, end = info['data_offsets']
        out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(info['shape']).astype('float32')
    return out


def _resolve(source) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], str]:
    """(state dict as numpy, model arguments known besides the shapes, description)."""
    torch = sys.modules.get('torch')  # a torch module can only come from an imported torch
    if torch is not None and isinstance(source, torch.nn.Module):
        return _from_module(source)
    if isinstance(source, Mapping):
        sd = source.get('state_dict', source.get('model', source)) if 'pos_embed' not in source else source
        for prefix in ('module.', '_orig_mod.'):  # DistributedDataParallel's, torch.compile's
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
        if any(k.startswith('vit.') for k in sd) and any('.attn.ib.' in k for k in sd):
            raise ValueError('this state dict is in the layout of the paper\'s reference code (murphyka/vit_ib): '
                             'convert it first with timm_vib.convert_reference_state_dict')
        return {k: _to_numpy(v) for k, v in sd.items()}, {}, 'the state dict'
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f'from_timm takes a timm_vib model, a state dict, a .safetensors file, a model folder or '
                        f'a Hub repo id, got {type(source).__name__}')
    s = str(source)
    path = Path(s)
    if s.startswith('hf-hub:') or (not path.exists() and re.fullmatch(r'[\w.-]+/[\w.-]+', s) and not s.endswith('.safetensors')):
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(s.removeprefix('hf-hub:'), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    if path.is_dir():
        weights, cfg_path = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            raise FileNotFoundError(f'{path} has no {WEIGHTS_NAME}: not a model folder ({CONFIG_NAME} + {WEIGHTS_NAME})')
    elif path.is_file():
        if path.suffix != '.safetensors':
            raise ValueError(f'{path}: from_timm reads .safetensors files (or a folder holding {WEIGHTS_NAME})')
        weights, cfg_path = path, path.with_name(CONFIG_NAME)
        if path.name != WEIGHTS_NAME:
            cfg_path = None
    else:
        raise FileNotFoundError(f'{s} is neither a file, a folder nor a Hub repo id')
    extra: Dict[str, Any] = {}
    if cfg_path is not None and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f'{cfg_path} is corrupt (not valid JSON: {e})') from None
        extra = _config_from_folder_json(cfg, str(cfg_path))
    return _read_safetensors(weights), extra, str(weights)


def _from_module(m) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], str]:
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(m, VisionTransformer) or not hasattr(m, 'attn_mode'):
        raise TypeError(f'from_timm takes a timm_vib model (vit_tiny_vib*, vit_tiny_noattn, vit_tiny_gap), '
                        f'got {type(m).__name__}')
    import torch.nn as nn
    problems = []
    if m.num_prefix_tokens:
        problems.append(f'{m.num_prefix_tokens} prefix (class / register) tokens')
    if m.global_pool != 'avg':
        problems.append(f'global_pool={m.global_pool!r}')
    for name in ('fc_norm', 'norm_pre'):
        if not isinstance(getattr(m, name), nn.Identity):
            problems.append(f'a {name}')
    blk = m.blocks[0]
    for name in ('ls1', 'ls2'):
        if not isinstance(getattr(blk, name, nn.Identity()), nn.Identity):
            problems.append('LayerScale')
    attn = getattr(blk, 'attn', None)
    if attn is not None and not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)):
        problems.append('qk_norm / scale_norm')
    act = getattr(blk.mlp, 'act', None)
    if not (type(act) is nn.GELU and act.approximate == 'none'):
        problems.append(f'MLP activation {act!r} (keras_vib has the exact GELU)')
    if not isinstance(getattr(blk.mlp, 'norm', nn.Identity()), nn.Identity) or not hasattr(blk.mlp, 'fc2'):
        problems.append(f'another MLP ({type(blk.mlp).__name__} with a norm or gates)')
    if not isinstance(m.norm, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
        problems.append('no final LayerNorm (final_norm=False) or another norm layer')
    if problems:
        raise ValueError(f'this timm model has {", ".join(problems)}, which keras_vib does not implement')
    num_heads = attn.num_heads if attn is not None else getattr(blk, 'num_heads', 3)
    extra = dict(image_size=tuple(m.patch_embed.img_size), num_heads=num_heads, beta=m.beta,
                 layer_norm_epsilon=float(m.norm.eps), attn_mode=m.attn_mode)
    if m.attn_mode == 'vib':
        extra['vib_logvar_init'] = float(m.blocks[0].attn.vib.logvar_init)
        extra['vib_small_init_dec'] = bool(m.blocks[0].attn.vib.small_init_dec)
    extra['pos_embed_init'] = getattr(m, 'pos_embed_init', 'trunc_normal')
    return {k: _to_numpy(v) for k, v in m.state_dict().items()}, extra, type(m).__name__


# --- public ------------------------------------------------------------------------------------------

def _describe(cfg: Mapping[str, Any]) -> str:
    return (f"{cfg['attn_mode']} attention, depth {cfg['depth']}, embed_dim {cfg['embed_dim']}"
            + (f", vib_dim {cfg['vib_dim']}, vib_hidden {cfg['vib_hidden']}" if cfg.get('attn_mode') == 'vib' else '')
            + f", {cfg.get('num_classes')} classes")


def load_timm_weights(model: VisionTransformerVIB, state_dict: Mapping[str, Any], source: str = 'the checkpoint') -> VisionTransformerVIB:
    """Copy a timm_vib state dict into an existing keras_vib model, with errors naming any mismatch."""
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    theirs = timm_config_from_state_dict(sd)
    mine = dict(attn_mode=model.attn_mode, depth=model.depth, embed_dim=model.embed_dim,
                vib_dim=model.vib_dim, vib_hidden=model.vib_hidden, num_classes=model.num_classes)
    if theirs['attn_mode'] != model.attn_mode:
        what = {'vib': 'has a bottleneck on every attention head (".attn.vib.*")',
                'plain': 'has attention without bottleneck (a vit_tiny_gap-style model)',
                'none': 'has no attention (MLP-only blocks, vit_tiny_noattn)'}
        raise ValueError(f'{source} {what[theirs["attn_mode"]]}, but the Keras model '
                         f'{what[model.attn_mode]}: different architectures')
    diffs = [f'{k}: checkpoint {theirs.get(k)} vs model {v}' for k, v in mine.items()
             if not (k in ('vib_dim', 'vib_hidden') and model.attn_mode != 'vib') and theirs.get(k) != v]
    if theirs['_num_patches'] != model.num_patches:
        diffs.append(f'tokens: checkpoint {theirs["_num_patches"]} vs model {model.num_patches} '
                     f'({model.image_size[0]}x{model.image_size[1]} px / patch {model.patch_size[0]})')
    if diffs:
        raise ValueError(f'{source} does not fit the Keras model ({_describe(mine)}): ' + '; '.join(diffs))
    table = _weight_table(model)
    missing = [k for k, _, _ in table if k not in sd]
    unexpected = sorted(set(sd) - {k for k, _, _ in table})
    bad = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(_to_timm(np.zeros(var.shape), lay).shape)}'
           for k, var, lay in table if k in sd and tuple(_to_keras(sd[k], lay).shape) != tuple(var.shape)]
    if missing or unexpected or bad:
        parts = ([f'missing {missing[:5]}'] if missing else []) + ([f'unexpected {unexpected[:5]}'] if unexpected else []) \
            + ([f'shape mismatch {bad[:5]}'] if bad else [])
        raise ValueError(f'{source} does not fit the Keras model: ' + '; '.join(parts))
    for k, var, lay in table:
        var.assign(_to_keras(sd[k], lay).astype('float32'))
    return model


def from_timm(source, *, model: Optional[VisionTransformerVIB] = None, **kwargs: Any) -> VisionTransformerVIB:
    """A keras_vib model holding the weights of a timm_vib checkpoint.

    Args:
        source: a timm_vib model (``timm.create_model('vit_tiny_vib_b4', ...)``), its state dict,
            a ``.safetensors`` file, a model folder (``model.safetensors`` + timm's ``config.json``)
            or a Hugging Face Hub repo id (``'org/name'`` or ``'hf-hub:org/name'``).
        model: load into this existing Keras model instead of building one (errors name any mismatch).
        **kwargs: model arguments the checkpoint does not determine or to override (``beta``,
            ``dtype``, ``name``, ``seed``). Without a ``config.json`` (a state dict, a lone
            ``.safetensors``) the weights fix most of the architecture but not the image grid, nor the
            head count of attention without bottleneck: pass ``image_size`` (and ``num_heads``), or
            from_timm raises ValueError rather than guess.

    Returns:
        The model; in inference its logits and KL match the timm model's on the same images
        (Keras NHWC, timm NCHW).
    """
    sd, extra, where = _resolve(source)
    if model is not None:
        # the head count and the grid's orientation leave the weights' shapes alone: compare what the source states
        stated = {k: extra[k] for k in ('num_heads', 'image_size') if k in extra}
        stated.update({k: kwargs[k] for k in ('num_heads', 'image_size') if k in kwargs})
        if 'image_size' in stated:
            size = stated['image_size']
            stated['image_size'] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        mine = {'num_heads': model.num_heads, 'image_size': tuple(model.image_size)}
        diffs = [f'{k}: {where} {v} vs model {mine[k]}' for k, v in stated.items() if v != mine[k]]
        if diffs:
            raise ValueError(f'{where} does not fit the Keras model: ' + '; '.join(diffs))
        return load_timm_weights(model, sd, where)
    cfg = timm_config_from_state_dict(sd)
    n = cfg.pop('_num_patches')
    name = extra.pop('name', None)
    cfg.update(extra)
    cfg.update(kwargs)
    # what the weights do not determine comes from config.json (or the module, or kwargs), never a guess:
    # a wrong grid or head count loads without error and changes every prediction
    if name is None:
        missing = []
        if cfg.get('image_size') is None:
            missing.append(f'image_size=(height, width) ({n} tokens of {cfg["patch_size"][0]}x{cfg["patch_size"][1]} '
                           'patches fit several grids)')
        if cfg['attn_mode'] == 'plain' and cfg.get('num_heads') is None:
            missing.append('num_heads (attention without a bottleneck has the same weight shapes for any head count)')
        if cfg['attn_mode'] == 'none' and cfg.get('num_heads') is None:
            missing.append('num_heads (a model without attention has no weights that show it; its KL has a '
                           'heads axis)')
        if missing:
            raise ValueError(f'{where} has no {CONFIG_NAME} and its weights do not determine the architecture: pass '
                             + ' and '.join(missing) + f', or load the model folder with its {CONFIG_NAME}')
    if isinstance(cfg.get('image_size'), list):
        cfg['image_size'] = tuple(cfg['image_size'])
    if cfg['attn_mode'] != 'vib':
        cfg.pop('vib_dim', None)
        cfg.pop('vib_hidden', None)
        cfg.setdefault('beta', 0.0)
    if name is not None and 'name' not in kwargs:
        preset = PRESETS[name]
        if preset['attn_mode'] != cfg['attn_mode']:
            raise ValueError(f'{where}: config.json says {name} but the weights have {cfg["attn_mode"]} attention')
        return load_timm_weights(create_model(name, **cfg), sd, where)
    return load_timm_weights(VisionTransformerVIB(**cfg), sd, where)


def to_timm_state_dict(model: VisionTransformerVIB, as_torch: bool = False) -> Dict[str, Any]:
    """The keras_vib model's weights under timm_vib's names and layouts (numpy float32, or torch
    tensors with ``as_torch``): ``timm_model.load_state_dict(to_timm_state_dict(m, as_torch=True))``."""
    out = {k: np.ascontiguousarray(_to_timm(keras.ops.convert_to_numpy(var), lay))
           for k, var, lay in _weight_table(model)}
    if as_torch:
        import torch
        out = {k: torch.from_numpy(v.astype('float32')) for k, v in out.items()}
    return out

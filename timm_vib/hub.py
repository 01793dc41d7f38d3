"""Publishing runs to the Hugging Face Hub: a Hub folder per run (weights, timm config, card, metrics).

``export(run_dir, folder)`` turns a finished training run into the folder a Hub repo holds;
``push(run_dir, repo_id)`` uploads it with ``HfApi`` (create_repo + upload_folder). The card is built
from ``hub_cards/`` (template + per-model metadata) with huggingface_hub's ``ModelCard`` /
``ModelCardData``, and carries the run's measured numbers. A published folder loads with
``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``; the registered names load their default
repos under ``TIMM_VIB_HUB_NAMESPACE`` with ``pretrained=True``.
"""
import inspect
import json
import math
import os
import shutil
import socket
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Union
from urllib.parse import urlparse

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .checkpoints import CONFIG_NAME, WEIGHTS_NAME, copy_model, read_config
from .errors import command
from .files import move_into, staging_folder
from .figures import plot_accuracy_vs_information
from .runs import RUN_FILES, find_runs, is_finished, read_json as _read_json, read_summary, run_top1
from .vision_transformer_vib import VisionTransformerVIB, name_for_beta

__all__ = ['export', 'push', 'push_sweep', 'build_card', 'repo_name', 'HubUnreachableError', 'FIGURE_NAME']

PathLike = Union[str, os.PathLike]
FIGURE_NAME = 'accuracy_vs_information.png'


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached (offline mode, or no network): nothing was uploaded."""


def _check_run(run_dir: Path) -> Dict[str, Any]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f'run folder {run_dir} does not exist')
    summary = read_summary(run_dir)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f'{run_dir} has no {name}: the run did not write its final weights')
    read_config(run_dir)
    top1 = summary.get('val_top1')
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        raise ValueError(f'{run_dir / "summary.json"} has no finite val_top1 ({top1!r}): the run diverged or the file '
                         'is damaged; nothing to publish')
    return summary


def _card_metadata() -> Dict[str, Any]:
    return json.loads(resources.files('hub_cards').joinpath('models.json').read_text())


def _recipe(run_cfg: Dict[str, Any], summary: Dict[str, Any]) -> Dict[str, Any]:
    """The training recipe the card states, from run_config.json (its optimizer, schedule and args sections)."""
    args, opt, sched = run_cfg.get('args', {}), run_cfg.get('optimizer', {}), run_cfg.get('schedule', {})
    data = run_cfg.get('data') or {}
    aug = data.get('augmentation') or {}
    parts = []
    if aug:
        parts.append(f"RandomResizedCrop scale {tuple(aug.get('scale', ()))}")
        if aug.get('hflip'):
            parts.append(f"horizontal flip p {aug['hflip']:g}")
        if aug.get('color_jitter'):
            parts.append(f"colour jitter {aug['color_jitter']:g}")
        ra = aug.get('rand_augment')
        if ra:
            parts.append(f"{ra.get('implementation', '')} RandAugment ({ra.get('num_ops')} ops, magnitude {ra.get('magnitude')})".strip())
        if aug.get('auto_augment'):
            parts.append(f"timm auto-augment `{aug['auto_augment']}`")
    return dict(
        lr=opt.get('lr', args.get('lr')),
        weight_decay=opt.get('weight_decay', args.get('weight_decay')),
        warmup_epochs=sched.get('warmup_epochs', args.get('warmup_epochs')),
        epochs=summary.get('epochs', args.get('epochs')),
        batch_size=run_cfg.get('global_batch_size', args.get('batch_size')),
        class_list=args.get('class_list'),
        augmentation=', '.join(parts),
        num_val=data.get('num_val'),
        num_train=data.get('num_train'),
    )


def build_card(run_dir: PathLike, repo_id: str, figure: Optional[str] = None) -> ModelCard:
    """The model card of a finished run: YAML metadata (library timm, tags, datasets, license,
    model-index with the measured top-1 / top-5 / nats) and the text from ``hub_cards/``."""
    run_dir = Path(run_dir)
    summary = _check_run(run_dir)
    run_cfg = _read_json(run_dir / 'run_config.json') if (run_dir / 'run_config.json').is_file() else {}
    timm_cfg = read_config(run_dir)
    arch = timm_cfg['architecture']
    meta_all = _card_metadata()
    # by the beta the run trained with: `--model vit_tiny_vib_b1 --beta 4` is a beta-4 model
    meta = meta_all.get(repo_name(summary)) or meta_all.get(arch) or meta_all['vit_tiny_vib']
    dataset = str(summary.get('dataset', run_cfg.get('dataset', 'unknown')))
    dataset_name = {'digits': 'scikit-learn digits', 'fashion-mnist': 'Fashion-MNIST'}.get(dataset, Path(dataset).name or dataset)
    model_name = repo_id.split('/')[-1]

    results = [EvalResult(
        task_type='image-classification', dataset_type=dataset, dataset_name=dataset_name,
        dataset_split='validation', metric_type='accuracy', metric_name='top-1 accuracy (%)',
        metric_value=round(run_top1(summary), 3))]  # the mean of the sampled passes where there are some
    if summary.get('val_top5') is not None:
        results.append(EvalResult(
            task_type='image-classification', dataset_type=dataset, dataset_name=dataset_name,
            dataset_split='validation', metric_type='top-5-accuracy', metric_name='top-5 accuracy (%)',
            metric_value=round(float(summary['val_top5']), 3)))
    if summary.get('attn_mode') != 'plain' and summary.get('nats_per_image') is not None:
        results.append(EvalResult(
            task_type='image-classification', dataset_type=dataset, dataset_name=dataset_name,
            dataset_split='validation', metric_type='information', metric_name='nats per image written by attention',
            metric_value=round(float(summary['nats_per_image']), 4)))
    card_data = ModelCardData(
        library_name='timm',
        license='apache-2.0',
        tags=['image-classification', 'timm', 'timm-vib', 'vision-transformer', 'information-bottleneck',
              'interpretability'],
        datasets=[dataset],
        metrics=['accuracy'],
        pipeline_tag='image-classification',
        model_name=model_name,
        eval_results=results,
        # the measured numbers, machine-readable beside model-index
        timm_vib={k: summary.get(k) for k in (
            'model', 'beta', 'attn_mode', 'kl_reduction', 'vib_dim', 'vib_hidden', 'val_top1', 'val_top5',
            'nats_per_image', 'nats_per_patch', 'num_active_heads', 'active_heads', 'stochastic_eval')},
    )
    args = timm_cfg.get('model_args', {})
    # the initial weights' options, as created (the constructor's defaults where the config leaves them out)
    init_defaults = {k: p.default for k, p in inspect.signature(VisionTransformerVIB.__init__).parameters.items()}
    init = {k: args.get(k, init_defaults[k]) for k in ('vib_logvar_init', 'vib_small_init_dec', 'pos_embed_init')}
    img = args.get('img_size', timm_cfg.get('pretrained_cfg', {}).get('input_size', [3, 224])[-1])
    img = img[0] if isinstance(img, (list, tuple)) else img
    template = resources.files('hub_cards').joinpath('modelcard_template.md').read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        repo_id=repo_id,
        meta=meta,
        dataset_name=dataset_name,
        attn_mode=summary.get('attn_mode', 'vib'),
        beta=f"{float(summary.get('beta', 0)):g}",
        vib_dim=summary.get('vib_dim'),
        depth=summary.get('depth', args.get('depth', 12)),
        num_heads=summary.get('num_heads', args.get('num_heads', 3)),
        embed_dim=args.get('embed_dim', 192),
        patch_size=summary.get('patch_size', args.get('patch_size', 16)),
        img_size=summary.get('img_size', img),
        num_classes=summary.get('num_classes', timm_cfg.get('num_classes')),
        top1=float(summary['val_top1']),
        # how the last validation saw the bottlenecks (the default since --eval-z samples z, as the paper does)
        top1_label={'sample': 'top-1, one validation pass with z sampled',
                    'mean': 'top-1, one validation pass in eval mode (posterior mean)'}.get(summary.get('eval_z'), 'top-1'),
        top5=summary.get('val_top5'),
        stochastic=summary.get('stochastic_eval'),
        nats_per_image=summary.get('nats_per_image') or 0.0,
        nats_per_patch=summary.get('nats_per_patch') or 0.0,
        num_active_heads=summary.get('num_active_heads', 0),
        active_heads=summary.get('active_heads') or [],
        figure=figure,
        **_recipe(run_cfg, summary),
        seed=run_cfg.get('seed'),
        mixed_precision=run_cfg.get('mixed_precision', 'no'),
        kl_reduction=summary.get('kl_reduction', run_cfg.get('kl_reduction', 'mean')),
        beta_warmup_epochs=run_cfg.get('beta_warmup_epochs', 0),
        beta_schedule=run_cfg.get('beta_schedule', 'linear'),
        vib_hidden=summary.get('vib_hidden', args.get('vib_hidden')),
        init=init,
    )


EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, 'README.md', FIGURE_NAME) + RUN_FILES  # all that export writes
STAGING_PREFIX = '.timm-vib-export-'


def _check_destination(run_dir: Path, folder: Path, overwrite: bool) -> None:
    """Export writes only its own files: refuse a folder it could not update without losing something."""
    run, dest = run_dir.resolve(), folder.resolve()
    if dest == run or dest in run.parents:
        raise ValueError(f'the Hub folder {folder} is the run folder {run_dir} or one of its parents: choose a '
                         'new folder (e.g. RUN_DIR/hub)')
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'{folder} exists and is not a folder: choose another Hub folder')
    if not folder.is_dir() or overwrite:
        return
    found = {p.name for p in folder.iterdir() if not p.name.startswith(STAGING_PREFIX)}
    if not found:
        return  # empty (or only the leftovers of an interrupted export)
    same = all((folder / n).is_file() and (folder / n).read_bytes() == (run_dir / n).read_bytes()
               for n in RUN_FILES if (run_dir / n).is_file())
    if not (found <= set(EXPORT_FILES) and same):
        raise ValueError(f'{folder} exists and is not an earlier export of {run_dir}: choose a new folder, or pass '
                         '--overwrite to replace the files export writes there (other files are left alone)')


def export(run_dir: PathLike, folder: PathLike, repo_id: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the Hub folder of a finished run: model.safetensors, config.json (timm's format),
    README.md (the card), metrics.jsonl, run_config.json, summary.json, and the
    accuracy-vs-information figure when the run sits in a sweep folder beside other runs.

    ``folder`` must be new, empty, or an earlier export of this run; ``overwrite`` lets export replace
    its own files in any other folder. Export never deletes a file it does not write. The weights are
    loaded into the recorded architecture before anything is written (a corrupt file is not published).
    The files are assembled in a hidden staging folder inside ``folder`` and each is renamed into place,
    so an interruption never leaves a half-written file. Returns the folder.
    """
    from .checkpoints import load_model
    run_dir, folder = Path(run_dir), Path(folder)
    summary = _check_run(run_dir)
    repo_id = repo_id or f"{os.environ.get('TIMM_VIB_HUB_NAMESPACE', 'timm-vib')}/{repo_name(summary)}"
    _check_destination(run_dir, folder, overwrite)
    load_model(run_dir)  # the weights load into the recorded architecture, or a clear error before any write
    with staging_folder(folder, STAGING_PREFIX) as staging:
        copy_model(run_dir, staging)
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        siblings = find_runs(run_dir.parent)
        figure = None
        if len(siblings) > 1 and run_dir.resolve() in [r.resolve() for r in siblings]:
            plot_accuracy_vs_information(
                [_read_json(r / 'summary.json') for r in siblings], staging / FIGURE_NAME,
                title=f'{run_dir.parent.name}: accuracy vs information')
            figure = FIGURE_NAME
        build_card(run_dir, repo_id, figure=figure).save(staging / 'README.md')
        written = {p.name for p in staging.iterdir()}
        # the weights last: until then an earlier export's files still describe its weights
        move_into(staging, folder, last=WEIGHTS_NAME)
        for name in set(EXPORT_FILES) - written:  # e.g. the figure of a sweep this run no longer sits in
            if (folder / name).is_file():
                (folder / name).unlink()
    return folder


def check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when the Hub cannot be reached (never hang)."""
    from huggingface_hub import constants
    if constants.is_offline_mode():
        raise HubUnreachableError(
            'the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE=1): nothing was uploaded. Unset '
            'HF_HUB_OFFLINE to push, or use --dry-run to only write the Hub folder')
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == 'https' else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise HubUnreachableError(
            f'cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({e}): nothing was uploaded. '
            'Check the network, or use --dry-run to only write the Hub folder') from None


def push(
        run_dir: PathLike,
        repo_id: str,
        folder: Optional[PathLike] = None,
        dry_run: bool = False,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        overwrite: bool = False,
) -> str:
    """Export ``run_dir`` and upload it to ``repo_id`` (create_repo + upload_folder).

    The token comes from ``token``, HF_TOKEN or ``huggingface-cli login``. With ``dry_run`` only the
    folder is written (``folder``, or ``RUN_DIR/hub``). Returns the repo URL, or the folder path.
    """
    if not repo_id or repo_id.count('/') != 1:
        raise ValueError(f'repo_id must look like ORG/NAME, got {repo_id!r}')
    if not dry_run:
        check_hub_reachable()  # before any work: offline must fail fast
    out = export(run_dir, Path(folder) if folder else Path(run_dir) / 'hub', repo_id=repo_id, overwrite=overwrite)
    if dry_run:
        return str(out)
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    api.upload_folder(folder_path=out, repo_id=repo_id, repo_type='model',
                      commit_message=commit_message or f'Upload {Path(run_dir).name} with timm-vib')
    return str(url)


def repo_name(summary: Dict[str, Any]) -> str:
    """Repo name of a run: the registered name whose beta it has (``vit_tiny_vib_b0p01``) for ViT-Tiny
    bottleneck runs, else the model name (``vit_tiny_noattn``, ``vit_tiny_gap``, ...)."""
    model = summary['model']
    if summary.get('attn_mode') == 'vib' and model.startswith('vit_tiny_vib'):
        return name_for_beta(summary['beta'])
    return model


def push_sweep(
        sweep_dir: PathLike, namespace: str, suffix: str = '', folder: Optional[PathLike] = None, **kwargs: Any,
) -> List[str]:
    """Push every finished run of a sweep folder to ``NAMESPACE/<repo_name><suffix>`` (suffix e.g. '.in100').

    With ``folder`` each run's Hub folder is written to ``folder/<repo_name><suffix>``."""
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f'{sweep_dir} holds no finished runs (no */summary.json)')
    names = [repo_name(_read_json(run / 'summary.json')) + suffix for run in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # e.g. a sweep over seeds: one repo per model, so push one seed folder
        raise ValueError(f'{sweep_dir} holds several runs for {", ".join(twice)} (several seeds?): '
                         f'push one seed folder (e.g. {sweep_dir}/seed0)')
    if not kwargs.get('dry_run'):
        check_hub_reachable()
    out = []
    for run, name in zip(runs, names):
        out.append(push(run, f'{namespace}/{name}', folder=Path(folder) / name if folder else None, **kwargs))
    return out


def add_commands(sub: Any) -> None:
    """``timm-vib export`` and ``timm-vib push`` sub-commands."""
    p = sub.add_parser('export', help='write the Hugging Face Hub folder of a finished run')
    p.add_argument('run_dir', type=Path)
    p.add_argument('folder', type=Path)
    p.add_argument('--repo-id', default=None, help='repo the card refers to (default NAMESPACE/<model>)')
    p.add_argument('--overwrite', action='store_true',
                   help='write into a folder that is not an earlier export of this run (only export\'s own files are replaced)')
    p.set_defaults(func=command(_cmd_export))

    p = sub.add_parser('push', help='upload a run (or every run of a sweep folder) to the Hugging Face Hub')
    p.add_argument('run_dir', type=Path, help='a run folder, or a sweep folder of runs')
    p.add_argument('--repo-id', default=None, help='ORG/NAME for one run')
    p.add_argument('--namespace', default=None, help='ORG for a sweep: each run goes to ORG/<model><suffix>')
    p.add_argument('--suffix', default='', help="appended to each sweep repo name, e.g. '.in100'")
    p.add_argument('--folder', type=Path, default=None, help='where to write the Hub folder(s)')
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='only write the Hub folder(s), upload nothing')
    p.add_argument('--overwrite', action='store_true',
                   help='write into folders that are not earlier exports of these runs (only export\'s own files are replaced)')
    p.set_defaults(func=command(_cmd_push, errors=(HubUnreachableError,)))


def _cmd_export(args: Any) -> None:
    print(export(args.run_dir, args.folder, repo_id=args.repo_id, overwrite=args.overwrite))


def _cmd_push(args: Any) -> None:
    if is_finished(args.run_dir):
        if not args.repo_id:
            raise ValueError('--repo-id ORG/NAME is required to push one run')
        out = [push(args.run_dir, args.repo_id, folder=args.folder, dry_run=args.dry_run, private=args.private,
                    overwrite=args.overwrite)]
    else:
        namespace = args.namespace or (args.repo_id.split('/')[0] if args.repo_id else None)
        if not namespace:
            raise ValueError('--namespace ORG is required to push a sweep folder')
        out = push_sweep(args.run_dir, namespace, suffix=args.suffix, folder=args.folder,
                         dry_run=args.dry_run, private=args.private, overwrite=args.overwrite)
    print('\n'.join(out))

"""``timm-vib sweep``: the beta spectrum (plus the no-attention and ViT ends) for every seed, run
one after another, ``--jobs N`` at a time on this machine, or as Slurm jobs through submitit.

The sweep folder (:mod:`timm_vib.runs`) has one ``seed<S>`` sub-folder per seed holding one run
folder per model. Every invocation skips finished runs and resumes unfinished ones from their
latest checkpoint, so rerunning the same command after a kill, a time-out or a pre-emption finishes
the sweep. ``--status`` shows every run's state without training anything.
"""
import argparse
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import command
from .files import atomic_write_json, atomic_write_text
from .runs import RUN_CONFIG, find_runs, is_finished, read_json, read_metrics, read_summary, run_top1, seed_folder

__all__ = ['SweepRun', 'SweepError', 'LAUNCHERS', 'sweep_model_name', 'plan_runs', 'parse_seeds', 'add_sweep_args',
           'run_sweep', 'run_local', 'sweep_table', 'sweep_status', 'threads_per_job', 'register_cli']

LAUNCHERS = ('local', 'slurm', 'submitit-local')
JOBS_FILE = 'jobs.json'  # submitit job ids and logs, per run
_ACTIVE_SLURM = {'PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'RESIZING', 'SUSPENDED'}


class SweepError(RuntimeError):
    """Some runs of a sweep failed; the message names them and their logs. Rerun to resume them."""


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: ``folder`` is relative to the sweep folder (``seed0/vit_tiny_vib_b1``);
    ``beta`` overrides the registered model's (for betas without a registered name)."""
    seed: int
    name: str
    model: str
    beta: Optional[float]

    @property
    def folder(self) -> str:
        return f'{seed_folder(self.seed)}/{self.name}'


def sweep_model_name(beta: float) -> Tuple[str, Optional[float]]:
    """beta -> (registered name, beta override): 0.01 -> ('vit_tiny_vib_b0p01', None); 2 -> ('vit_tiny_vib', 2.0)."""
    import timm
    from .vision_transformer_vib import name_for_beta
    name = name_for_beta(beta)
    return (name, None) if timm.is_model(name) else ('vit_tiny_vib', beta)


def parse_seeds(text: str) -> List[int]:
    """'0,1,2' -> [0, 1, 2]; clear errors for anything else."""
    try:
        seeds = [int(s) for s in str(text).split(',') if s.strip()]
    except ValueError:
        raise ValueError(f'--seeds takes comma-separated integers, got {text!r}') from None
    if not seeds:
        raise ValueError('--seeds names no seed')
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'--seeds names a seed twice: {text!r}')
    if min(seeds) < 0:
        raise ValueError(f'seeds must be >= 0, got {text!r}')
    return seeds


def parse_betas(text: str) -> List[float]:
    try:
        betas = [float(b) for b in str(text).split(',') if b.strip()]
    except ValueError:
        raise ValueError(f'--betas takes comma-separated numbers, got {text!r}') from None
    if not betas:
        raise ValueError('--betas names no beta')
    return betas


def plan_runs(betas: Sequence[float], seeds: Sequence[int], ends: bool = True) -> List[SweepRun]:
    """Every run of the sweep, seed by seed: no attention, the betas in the order given, the
    unrestricted ViT."""
    plan = []
    for seed in seeds:
        if ends:
            plan.append(SweepRun(seed, 'vit_tiny_noattn', 'vit_tiny_noattn', None))
        for b in betas:
            name, override = sweep_model_name(b)
            plan.append(SweepRun(seed, name if override is None else f'vit_tiny_vib_beta{b:g}', name, override))
        if ends:
            plan.append(SweepRun(seed, 'vit_tiny_gap', 'vit_tiny_gap', None))
    return plan


def threads_per_job(jobs: int, threads: int = 0) -> int:
    """CPU threads for each of ``jobs`` concurrent runs sharing ``threads`` (0: every core)."""
    return max(1, (threads or os.cpu_count() or 1) // max(1, jobs))


# --- arguments ----------------------------------------------------------------------------------

def add_sweep_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sweep's own arguments (``timm-vib sweep`` adds them to the training arguments)."""
    g = p.add_argument_group('sweep')
    g.add_argument('--betas', default='0,0.01,0.1,1,4,10', help='comma-separated betas')
    g.add_argument('--no-ends', action='store_true', help='without vit_tiny_noattn and vit_tiny_gap')
    g.add_argument('--seeds', default=None, help='comma-separated seeds, each a full spectrum (default: --seed)')
    g.add_argument('--status', action='store_true', help='show the state of every run and exit')
    g = p.add_argument_group('launching')
    g.add_argument('--launcher', choices=LAUNCHERS, default='local',
                   help="local: on this machine, --jobs at a time; slurm: one Slurm job per run (submitit); "
                        "submitit-local: submitit's local executor, the Slurm path without Slurm")
    g.add_argument('--jobs', type=int, default=1,
                   help='local: runs at a time, one process each, the CPU threads divided between them')
    g.add_argument('--threads', type=int, default=0, help='CPU threads in all, divided between jobs (0: every core)')
    g.add_argument('--gpus-per-job', type=int, default=1, help='slurm: GPUs (one process each) per run')
    g.add_argument('--cpus-per-job', type=int, default=None, help='slurm: CPUs per process (data loading workers)')
    g.add_argument('--partition', default=None, help='slurm: partition')
    g.add_argument('--account', default=None, help='slurm: account')
    g.add_argument('--time', type=int, default=60 * 24, help='slurm: time limit per job, minutes')
    g.add_argument('--mem-gb', type=float, default=None, help='slurm: memory per job, GB')
    g.add_argument('--slurm-args', nargs='*', default=[], metavar='KEY=VALUE',
                   help='more sbatch options, e.g. constraint=a100 qos=high')
    g.add_argument('--wait', action='store_true', help='slurm: wait for the jobs and write the sweep table')
    return p


def _check_sweep_args(args: argparse.Namespace) -> None:
    for name in ('jobs', 'gpus_per_job', 'time'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.threads < 0:
        raise ValueError(f'--threads must be >= 0, got {args.threads}')
    for kv in args.slurm_args:
        if '=' not in kv:
            raise ValueError(f'--slurm-args takes KEY=VALUE, got {kv!r}')


def _run_args(args: argparse.Namespace, root: Path, run: SweepRun) -> argparse.Namespace:
    """The training arguments of one run: the sweep's, with its model, beta, seed and folder."""
    from .training import parse_args
    a = argparse.Namespace(**{k: copy.copy(getattr(args, k)) for k in vars(parse_args([]))})
    a.model, a.beta, a.seed, a.output, a.resume = run.model, run.beta, run.seed, str(root / run.folder), 'latest'
    return a


# --- launching ----------------------------------------------------------------------------------

def _log_path(root: Path, run: SweepRun) -> Path:
    return root / 'logs' / seed_folder(run.seed) / f'{run.name}.log'


def _pid_path(root: Path, run: SweepRun) -> Path:
    return root / 'logs' / seed_folder(run.seed) / f'{run.name}.pid'


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (Linux /proc; None elsewhere): tells a live run from a reused pid."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def running_marker(root: Path, run: SweepRun, pid: int) -> Iterator[None]:
    """``logs/seed<S>/<name>.pid`` while process ``pid`` trains ``run`` on this machine: ``--status``
    shows it as running and another invocation leaves it alone."""
    path = _pid_path(root, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {'pid': pid, 'start': _start_time(pid), 'host': socket.gethostname()})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def local_pid(root: Path, run: SweepRun) -> Optional[int]:
    """The pid of a live process of this machine training ``run`` (from its marker), else None."""
    path = _pid_path(root, run)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get('host') != socket.gethostname():
        return None  # another node's process: its job record tells
    pid = int(rec['pid'])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    if rec.get('start') is not None and _start_time(pid) != rec['start']:
        return None  # the pid was reused by another process
    return pid


def _child_env(threads: int) -> Dict[str, str]:
    """The environment of a run's process: ``threads`` CPU threads, and this process's timm_vib first on
    the path (a checkout on sys.path must not lose to another installed copy)."""
    import timm_vib
    here = str(Path(timm_vib.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=path,
                PYTHONUNBUFFERED='1')  # a killed run's log keeps its last lines


def _error_line(log: Path) -> Optional[str]:
    """The one-line error (``timm-vib train: error: ...``, the CLI's answer to bad input) of the latest
    attempt in a run's log, if it ended with one."""
    prefix = 'timm-vib train: error: '
    text = log.read_text(encoding='utf-8', errors='replace').rsplit('\n=== ', 1)[-1]
    errors = [ln[len(prefix):].strip() for ln in text.splitlines() if ln.startswith(prefix)]
    return errors[-1] if errors else None


def run_local(runs: Sequence[Tuple[SweepRun, argparse.Namespace]], root: Path, jobs: int = 1, threads: int = 0,
              print_fn=print) -> List[Tuple[SweepRun, str]]:
    """Train ``runs`` on this machine, ``jobs`` at a time, each in its own ``timm-vib train`` process
    with ``threads_per_job`` CPU threads and its output in ``root/logs/seed<S>/<name>.log``.
    Returns the failed runs with a reason (exit code or signal)."""
    from .training import to_argv
    per_job = threads_per_job(jobs, threads)
    env = _child_env(per_job)

    def one(item: Tuple[SweepRun, argparse.Namespace]) -> Optional[str]:
        run, targs = item
        log = _log_path(root, run)
        log.parent.mkdir(parents=True, exist_ok=True)
        print_fn(f'start  {run.folder} ({per_job} thread{"s" * (per_job > 1)}, log {log})')
        t0 = time.perf_counter()
        with open(log, 'a', encoding='utf-8') as f:
            f.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} timm-vib train {run.folder}\n')
            f.flush()
            argv = [sys.executable, '-m', 'timm_vib.cli', 'train', *to_argv(targs), '--no-progress']
            proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            with running_marker(root, run, proc.pid):
                code = proc.wait()
        took = time.perf_counter() - t0
        if code == 0:
            print_fn(f'done   {run.folder} in {took:.0f} s')
            return None
        why = f'killed by signal {-code}' if code < 0 else f'exit code {code}'
        error = _error_line(log)
        why += f' ({error})' if error else ''
        print_fn(f'failed {run.folder} ({why}) after {took:.0f} s: see {log}')
        return f'{why}; log {log}'

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait for the processes
        reasons = list(pool.map(one, runs))
    return [(run, why) for (run, _), why in zip(runs, reasons) if why is not None]


def _executor(args: argparse.Namespace, root: Path):
    import submitit
    cluster = 'local' if args.launcher == 'submitit-local' else 'slurm'
    ex = submitit.AutoExecutor(folder=root / 'jobs' / '%j', cluster=cluster)
    params: Dict[str, Any] = dict(name='timm-vib', timeout_min=args.time, nodes=1, tasks_per_node=args.gpus_per_job,
                                  gpus_per_node=args.gpus_per_job if not args.cpu else 0)
    if args.cpus_per_job:
        params['cpus_per_task'] = args.cpus_per_job
    if args.mem_gb:
        params['mem_gb'] = args.mem_gb
    if cluster == 'slurm':
        extra = dict(kv.split('=', 1) for kv in args.slurm_args)
        if args.account:
            extra['account'] = args.account
        if args.partition:
            params['slurm_partition'] = args.partition
        if extra:
            params['slurm_additional_parameters'] = extra
    ex.update_parameters(**params)
    return ex


class TrainJob:
    """What a submitit job runs: one ``train`` with Accelerate on the GPUs Slurm gave it (one task
    per GPU: submitit's environment becomes torch.distributed's, which Accelerate reads).

    Near its time limit or on pre-emption, submitit calls :meth:`checkpoint` and requeues the same
    call; the run's arguments hold ``--resume latest``, so it goes on from its latest checkpoint.
    """

    def __call__(self, argv: List[str], threads: int = 0) -> str:
        import submitit
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if threads:
            import torch
            torch.set_num_threads(threads)
        from .training import parse_args, train
        return str(train(parse_args(argv)))

    def checkpoint(self, argv: List[str], threads: int = 0):
        """The same job again (submitit's requeue hook); the training checkpoints are the state."""
        import submitit
        if '--resume' not in argv:
            argv = [*argv, '--resume', 'latest']
        return submitit.helpers.DelayedSubmission(TrainJob(), argv, threads)


def _job_active(record: Dict[str, Any], root: Path) -> bool:
    """Whether a recorded submitit job may still be running (then it is not submitted again)."""
    if record.get('launcher') == 'submitit-local':
        try:
            os.kill(int(record['job_id']), 0)  # a local job's id is its process id
        except (OSError, ValueError):
            return False
        return True
    import submitit
    try:
        state = submitit.SlurmJob(root / 'jobs' / '%j', record['job_id']).state
    except Exception:  # noqa: BLE001 (sacct unavailable: assume it may run rather than submit twice)
        return True
    return state.split(' ')[0] in _ACTIVE_SLURM


def run_submitit(runs: Sequence[Tuple[SweepRun, argparse.Namespace]], root: Path, args: argparse.Namespace,
                 print_fn=print) -> List[Tuple[SweepRun, str]]:
    """Submit one job per unfinished run (not already queued or running), record job ids and logs in
    ``root/jobs.json``; wait for them with ``--wait`` (always for submitit's local executor, whose
    jobs end with this process). Returns the failed runs (only known when waiting)."""
    from .training import to_argv
    jobs_file = root / JOBS_FILE
    records: Dict[str, Any] = read_json(jobs_file) if jobs_file.is_file() else {}
    todo = []
    for run, targs in runs:
        rec = records.get(run.folder)
        if rec and _job_active(rec, root):
            print_fn(f'queued {run.folder}: job {rec["job_id"]} is still active')
            continue
        todo.append((run, targs))
    if not todo:
        return []
    ex = _executor(args, root)
    threads = args.threads or 0  # on Slurm: each job has its own CPUs (0: torch's default)
    if args.launcher == 'submitit-local':  # every job's processes share this machine's CPUs
        threads = threads_per_job(len(todo) * args.gpus_per_job, args.threads)
    with ex.batch():
        submitted = [ex.submit(TrainJob(), to_argv(t) + ['--no-progress'], threads) for _, t in todo]
    for (run, _), job in zip(todo, submitted):
        old = records.get(run.folder)
        earlier = (old.pop('earlier', []) + [old]) if old else []  # every attempt's job id and log stay on record
        records[run.folder] = {'job_id': str(job.job_id), 'launcher': args.launcher, 'log': str(job.paths.stdout),
                               'err': str(job.paths.stderr), 'submitted': time.strftime('%Y-%m-%d %H:%M:%S'),
                               'earlier': earlier}
        print_fn(f'submitted {run.folder}: job {job.job_id}, log {job.paths.stdout}')
    atomic_write_json(jobs_file, records)
    if not (args.wait or args.launcher == 'submitit-local'):
        return []
    failed = []
    for (run, _), job in zip(todo, submitted):
        try:
            job.results()  # one result per task (per GPU)
        except Exception as e:  # noqa: BLE001 (the job's own error, reported per run)
            # the job's own traceback is in its log; here: how it ended (a kill leaves no exception)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failed.append((run, f'job {job.job_id} {job.state}: {first[:200]}; log {job.paths.stdout}'))
    return failed


# --- the sweep ----------------------------------------------------------------------------------

def _state(root: Path, run: SweepRun, records: Dict[str, Any]) -> Dict[str, Any]:
    d = root / run.folder
    rows = read_metrics(d)
    epochs = None
    if (d / RUN_CONFIG).is_file():
        epochs = read_json(d / RUN_CONFIG)['args'].get('epochs')
    if is_finished(d):
        state = 'finished'
    elif rows or (d / 'checkpoints').is_dir():
        state = 'unfinished'
    else:
        state = 'not started'
    rec = records.get(run.folder)
    local_log = _log_path(root, run)
    local_log = local_log if local_log.is_file() else None
    pid = local_pid(root, run) if state != 'finished' else None
    if pid is not None:
        state, rec = 'running', {'job_id': f'pid {pid}', 'log': local_log and str(local_log)}
    elif rec and state != 'finished' and _job_active(rec, root):
        state = 'running' if rows or state == 'unfinished' else 'queued'
    last = rows[-1] if rows else {}
    log = rec.get('log') if rec else local_log
    # a finished run's top-1 is the one its tables report (runs.run_top1: the mean of its sampled
    # validation passes where it made them); a run in progress shows its latest epoch's
    top1 = run_top1(read_summary(d)) if state == 'finished' else last.get('val_top1')
    return {'run': run.folder, 'seed': run.seed, 'state': state, 'epoch': last.get('epoch', 0), 'epochs': epochs,
            'top1': top1, 'nats_per_image': last.get('nats_per_image'),
            'job': rec.get('job_id') if rec else None, 'log': _relative(log, root) if log else None}


def _relative(path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def sweep_status(root: Path, plan: Sequence[SweepRun]) -> List[Dict[str, Any]]:
    """Every planned run's state (finished / running / queued / unfinished / not started), epoch, top-1
    (a finished run's as its tables give it, runs.run_top1; else the latest epoch's) and nats, job id and
    log; printed as a rich table."""
    from rich.console import Console
    from rich.table import Table
    records = read_json(root / JOBS_FILE) if (root / JOBS_FILE).is_file() else {}
    rows = [_state(root, r, records) for r in plan]
    t = Table(title=f'sweep {root}: {sum(r["state"] == "finished" for r in rows)} of {len(rows)} runs finished')
    for c in ('run', 'state', 'epoch', 'top-1', 'nats / image', 'job', 'log'):
        t.add_column(c, justify='right' if c in ('epoch', 'top-1', 'nats / image') else 'left')
    colour = {'finished': 'green', 'running': 'cyan', 'queued': 'blue', 'unfinished': 'yellow', 'not started': 'dim'}
    for r in rows:
        t.add_row(r['run'], f"[{colour[r['state']]}]{r['state']}[/]", f"{r['epoch']}/{r['epochs'] or '?'}",
                  '-' if r['top1'] is None else f"{r['top1']:.1f}%",
                  '-' if r['nats_per_image'] is None else f"{r['nats_per_image']:.3g}", r['job'] or '-', r['log'] or '-')
    Console().print(t)
    return rows


def sweep_table(root: Path) -> List[Dict[str, Any]]:
    """Write ``sweep.json`` and ``sweep.md`` (one row per finished run, with its seed); returns the rows."""
    from .report import load_runs
    table = []
    finished = find_runs(root)
    for r in load_runs(finished) if finished else []:
        s = r.summary
        st = s.get('stochastic_eval') or {}
        table.append({'run': str(r.dir.relative_to(root)), 'seed': s.get('seed'), 'model': s['model'], 'beta': s['beta'],
                      'attn_mode': s['attn_mode'], 'top1': run_top1(s), 'top1_std': st.get('top1_std'),
                      'stochastic_k': st.get('k'), 'val_top1': s['val_top1'], 'val_top5': s['val_top5'],
                      'nats_per_image': s['nats_per_image'], 'nats_per_patch': s['nats_per_patch'],
                      'num_active_heads': s['num_active_heads'], 'steps': s['steps'],
                      'train_samples_per_second': s['train_samples_per_second']})
    table.sort(key=lambda t: (t['seed'] if t['seed'] is not None else -1))  # stable: spectrum order per seed
    atomic_write_json(root / 'sweep.json', table)
    fmt = lambda v, f: '-' if v is None else format(v, f)  # noqa: E731
    # top-1: the mean ± std of the K sampled validation passes where the run made them (runs.run_top1), else
    # the last validation; top-5 and the rest from the last validation
    lines = ['| run | seed | beta | top-1 (%) | val top-5 (%) | nats / image | nats / patch | active heads |',
             '|---|---|---|---|---|---|---|---|']
    lines += [f'| {t["run"]} | {t["seed"]} | {format(t["beta"], "g") if t["attn_mode"] == "vib" else "-"} | {t["top1"]:.2f}'
              + ('' if t['top1_std'] is None else f' ± {t["top1_std"]:.2f} ({t["stochastic_k"]} passes)')
              + f' | {t["val_top5"]:.2f} | '
              f'{fmt(t["nats_per_image"], ".2f")} | {fmt(t["nats_per_patch"], ".4f")} | {fmt(t["num_active_heads"], "d")} |'
              for t in table]
    atomic_write_text(root / 'sweep.md', '\n'.join(lines) + '\n')
    return table


def run_sweep(args: argparse.Namespace) -> List[Path]:
    """Train the spectrum for every seed under ``args.output`` (``seed<S>/<model>``), skipping finished
    runs and resuming unfinished ones; writes ``sweep.json`` and ``sweep.md``. Returns the run folders
    in plan order (for ``--launcher slurm`` without ``--wait``, some may not be finished yet)."""
    from .training import check_args, train
    _check_sweep_args(args)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    plan = plan_runs(parse_betas(args.betas), seeds, not args.no_ends)
    root = Path(args.output or 'runs/sweep')
    if args.status:
        sweep_status(root, plan)
        return [root / r.folder for r in plan]
    runs = [(r, _run_args(args, root, r)) for r in plan]
    for _, a in runs:  # every run's arguments checked before any is trained
        check_args(a)
    # a finished run is reused only if it is this sweep's run: same options, as --resume and the demo require
    from .training import run_differences
    other = [f'{r.folder} ({"; ".join(d)})' for r, a in runs if is_finished(root / r.folder)
             for d in [run_differences(root / r.folder, a)] if d]
    if other:
        raise ValueError(f'{root} holds finished runs with other settings than this sweep\'s: {", ".join(other)}. '
                         'Pass another --output, or delete those runs')
    todo = [(r, a) for r, a in runs if not is_finished(root / r.folder)]
    if len(todo) < len(runs):
        print(f'{len(runs) - len(todo)} of {len(runs)} runs already finished')
    busy = {r.folder: local_pid(root, r) for r, _ in todo}
    for folder, pid in busy.items():
        if pid is not None:
            print(f'{folder} is being trained by process {pid} on this machine: left to it')
    todo = [(r, a) for r, a in todo if busy[r.folder] is None]
    if args.launcher == 'local' and args.jobs == 1 and not _is_distributed():
        for r, a in todo:  # in this process (also under torchrun / accelerate launch)
            with running_marker(root, r, os.getpid()) if _is_main() else contextlib.nullcontext():
                train(a)
        failed = []
    elif args.launcher == 'local':
        failed = run_local(todo, root, args.jobs, args.threads)
    else:
        failed = run_submitit(todo, root, args)
    if _is_main():
        table = sweep_table(root)
        if table:
            print((root / 'sweep.md').read_text(), end='')
    if failed:
        raise runs_failed(failed, len(todo))
    return [root / r.folder for r in plan]


def runs_failed(failed: Sequence[Tuple[SweepRun, str]], total: int) -> SweepError:
    """The error that ends a sweep (or the demo) some of whose ``total`` runs failed, naming each."""
    return SweepError(f'{len(failed)} of {total} runs failed (rerun the same command to resume them): '
                      + '; '.join(f'{r.folder}: {why}' for r, why in failed))


def _is_distributed() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def _is_main() -> bool:
    from accelerate import PartialState
    return PartialState().is_main_process


def register_cli(sub) -> None:
    """Add ``sweep`` to the ``timm-vib`` sub-command parser ``sub``."""
    from .training import add_train_args
    s = add_sweep_args(add_train_args(sub.add_parser(
        'sweep', help='train the beta spectrum (plus the noattn and gap ends) for every seed')))
    s.set_defaults(func=command(run_sweep, errors=(SweepError,)))

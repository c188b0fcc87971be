"""Small-scale reproduction of PFGM++'s robustness claims, through the public CLIs, with a written report.

    python scripts/reproduce.py            # full run: ~1.5-2 h on 2 CPU cores; report in docs/reproduction.md
    python scripts/reproduce.py --quick    # tiny sizes, a few minutes (the tests run this)

One model per D on the offline digits (identical recipe and seed otherwise), the three robustness sweeps of the
paper (noise injection α, number of steps, weight quantization) with generate_alpha/steps/quant.py, FID and KID
(with its bootstrap spread) with fid.py against the whole dataset, then tables, plots and a verdict. Everything runs as a user would type it (one
subprocess per command, logs in <out>/logs/). Re-running resumes: finished trainings, image folders and scores are
skipped, so an interrupted run is simply started again. Scores from an older run that lack KID are redone from the
folders' cached Inception features (computed once per folder, then reused), without sampling again.
"""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import click
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dnnlib.util import atomic_write               # noqa: E402
from training.generation import folder_name, missing_seeds, network_kimg   # noqa: E402
import reproduce_report                            # noqa: E402


SCORED_METRICS = 'fid,kid'
SCORE_KEYS = ('fid', 'kid', 'kid_std', 'kid_spread')


@dataclasses.dataclass(frozen=True)
class Recipe:
    resolution: int            # digits are upscaled to resolution x resolution, grayscale: N = resolution²
    kimg: int                  # training length per model
    network: tuple             # train.py options of the (small) DDPM++
    models: tuple              # (label, D) with D None for EDM (--pfgmpp=0)
    alphas: tuple              # generate_alpha.py --alpha_list; 0 is the baseline of all three sweeps
    steps: tuple               # generate_steps.py --step_list (Heun: NFE = 2 steps - 1); 18 is the baseline
    bits: tuple                # generate_quant.py --bits_list
    num_images: int            # images per folder (seeds 0..n-1; the second seed set uses 50000..)
    ref_images: int            # dataset images in the FID reference statistics (0: all 1,797)
    second_seed_set: str       # label of the model also sampled with seeds 50000.. to show the sampling noise
    sec_per_kimg: float        # rough costs on 2 CPU cores, only for the time-left estimate
    sec_per_image_nfe: float
    sec_per_fid_image: float = 0.15


_NETWORK = ('--arch=ddpmpp', '--cbase=32', '--cres=1,2', '--nblock=2', '--batch=64', '--lr=2e-3',
            '--lr-rampup=0.005', '--ema=0.005', '--dropout=0', '--augment=0', '--seed=0')

FULL = Recipe(resolution=16, kimg=60, network=_NETWORK,
              models=(('D=8', 8), ('D=128', 128), ('D=2048', 2048), ('EDM', None)),
              alphas=(0, 0.1, 0.2), steps=(3, 4, 6, 9), bits=(4, 5, 6), num_images=300, ref_images=0,
              second_seed_set='D=128', sec_per_kimg=6.0, sec_per_image_nfe=0.0025)

QUICK = Recipe(resolution=8, kimg=1, network=('--arch=ddpmpp', '--cbase=16', '--cres=1', '--nblock=1', '--batch=32',
                                             '--lr=2e-3', '--lr-rampup=0.001', '--ema=0.001', '--dropout=0',
                                             '--augment=0', '--seed=0'),
               models=(('D=8', 8), ('EDM', None)), alphas=(0, 0.2), steps=(3,), bits=(4,), num_images=16,
               ref_images=64, second_seed_set='D=8', sec_per_kimg=10.0, sec_per_image_nfe=0.0005)



def model_slug(label):
    return 'edm' if label == 'EDM' else 'd' + label.split('=')[1]


def seed_range(seed_set, num_images):
    first = 0 if seed_set == 1 else 50000
    return range(first, first + num_images)


@dataclasses.dataclass
class Job:
    name: str
    estimate: float            # seconds, from the recipe's rough costs
    done: callable             # () -> bool
    run: callable              # () -> None


class Reproduction:
    """The recipe's jobs (dataset, reference statistics, trainings, sweeps, scores) over one output folder."""

    def __init__(self, recipe, out_dir):
        self.recipe, self.out = recipe, os.path.abspath(out_dir)
        res = recipe.resolution
        self.dataset = os.path.join(self.out, 'datasets', f'digits-{res}x{res}.zip')
        self.ref_dataset = os.path.join(self.out, 'datasets', f'digits-{res}x{res}-ref{recipe.ref_images}.zip')
        self.ref_stats = os.path.join(self.out, 'fid-refs', f'digits-{res}x{res}.npz')
        self.scores_path = os.path.join(self.out, 'scores.json')
        self.timings_path = os.path.join(self.out, 'timings.json')
        self.scores = _read_json(self.scores_path)
        self.timings = _read_json(self.timings_path)

    # --- paths and names -------------------------------------------------------------------------------------

    def run_dir(self, label):
        return os.path.join(self.out, 'runs', model_slug(label))

    def sweeps(self):
        """(axis, values, script, list option) of the three sweeps."""
        r = self.recipe
        return [('alpha', r.alphas, 'generate_alpha.py', '--alpha_list'),
                ('steps', r.steps, 'generate_steps.py', '--step_list'),
                ('quant', r.bits, 'generate_quant.py', '--bits_list')]

    def seed_sets(self, label):
        return (1, 2) if label == self.recipe.second_seed_set else (1,)

    def folder(self, label, seed_set, axis, value):
        seeds = seed_range(seed_set, self.recipe.num_images)
        return os.path.join(self.run_dir(label), folder_name(self.recipe.kimg, seeds, axis, value))

    def folder_complete(self, seed_set, path):
        return not missing_seeds(path, seed_range(seed_set, self.recipe.num_images), subdirs=True)

    def training_done(self, label):
        states = glob.glob(os.path.join(self.run_dir(label), 'training-state-*.pt'))
        return any(network_kimg(state) >= self.recipe.kimg for state in states)

    # --- commands --------------------------------------------------------------------------------------------

    def command(self, log_name, script, *args):
        """Run one of the repository's scripts as a user would; its output goes to <out>/logs/<log_name>.log."""
        log_path = os.path.join(self.out, 'logs', f'{log_name}.log')
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        argv = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
        with open(log_path, 'a') as log:
            log.write('$ ' + ' '.join(argv[1:]) + '\n')
            log.flush()
            result = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = open(log_path).read().strip().splitlines()[-1:]
            raise RuntimeError(f'{script} failed (exit {result.returncode}): {" ".join(tail)}  [log: {log_path}]')
        return open(log_path).read().strip().splitlines()[-1]

    def make_dataset(self):
        res = f'--resolution={self.recipe.resolution}x{self.recipe.resolution}'
        self.command('dataset', 'dataset_tool.py', '--source=sklearn-digits', f'--dest={self.dataset}', res)
        if self.recipe.ref_images:
            self.command('dataset', 'dataset_tool.py', '--source=sklearn-digits', f'--dest={self.ref_dataset}',
                         res, f'--max-images={self.recipe.ref_images}')

    def make_ref_stats(self):
        data = self.ref_dataset if self.recipe.ref_images else self.dataset
        self.command('fid-ref', 'fid.py', 'ref', f'--data={data}', f'--dest={self.ref_stats}', '--workers=1',
                     '--features=1')

    def ref_has_features(self):
        if not os.path.exists(self.ref_stats):
            return False
        with np.load(self.ref_stats) as data:
            return 'features' in data

    def train(self, label, D):
        prior = ['--pfgmpp=0'] if D is None else ['--pfgmpp=1', f'--aug_dim={D}']
        self.command(f'train-{model_slug(label)}', 'train.py', f'--outdir={os.path.join(self.out, "runs")}',
                     f'--name={model_slug(label)}', f'--data={self.dataset}', *prior, *self.recipe.network,
                     f'--duration={self.recipe.kimg / 1000}', f'--tick={max(self.recipe.kimg // 30, 1)}',
                     '--dump=100000')

    def sample(self, label, seed_set, axis, values, script, list_option):
        seeds = seed_range(seed_set, self.recipe.num_images)
        self.command(f'{axis}-{model_slug(label)}', script, f'--outdir={self.run_dir(label)}',
                     f'--seeds={seeds.start}-{seeds.stop - 1}', f'--ckpt={self.recipe.kimg}',
                     f'--end_ckpt={self.recipe.kimg}', f'{list_option}=' + ','.join(map(str, values)),
                     '--batch=100')

    def score(self, path):
        """FID and KID of one folder; its Inception features are cached beside it, so a rescore is cheap."""
        rel = os.path.relpath(path, self.out)
        table = os.path.join(self.out, 'tables', rel.replace(os.sep, '--') + '.json')
        self.command('fid', 'fid.py', 'calc', f'--images={path}', f'--ref={self.ref_stats}',
                     f'--num={self.recipe.num_images}', '--workers=1', f'--metrics={SCORED_METRICS}', '--cache=1',
                     f'--table={table}')
        [row] = _read_json(table)
        self.scores[rel] = {key: row[key] for key in SCORE_KEYS}
        _write_json(self.scores_path, self.scores)

    def scored(self, rel):
        """Scored with every metric of this version (an older run's scores.json holds bare FIDs)."""
        return isinstance(self.scores.get(rel), dict) and all(key in self.scores[rel] for key in SCORE_KEYS)

    # --- the job list ----------------------------------------------------------------------------------------

    def jobs(self):
        r = self.recipe
        jobs = [Job('dataset', 5, lambda: os.path.exists(self.dataset) and (
                    not r.ref_images or os.path.exists(self.ref_dataset)), self.make_dataset),
                Job('FID reference statistics', (r.ref_images or 1797) * r.sec_per_fid_image,
                    self.ref_has_features, self.make_ref_stats)]
        for label, D in r.models:
            jobs.append(Job(f'train {label}', r.kimg * r.sec_per_kimg,
                            lambda label=label: self.training_done(label),
                            lambda label=label, D=D: self.train(label, D)))
        for label, _ in r.models:
            for seed_set in self.seed_sets(label):
                jobs += self.sweep_jobs(label, seed_set)
        return jobs

    def sweep_jobs(self, label, seed_set):
        r = self.recipe
        jobs = []
        for axis, values, script, list_option in self.sweeps():
            folders = [self.folder(label, seed_set, axis, v) for v in values]
            nfe = sum(2 * v - 1 if axis == 'steps' else 2 * reproduce_report.BASELINE_STEPS - 1 for v in values)
            jobs.append(Job(f'{axis} sweep {label} seeds {seed_set}', r.num_images * nfe * r.sec_per_image_nfe,
                            lambda folders=folders, seed_set=seed_set: all(
                                self.folder_complete(seed_set, f) for f in folders),
                            lambda a=(label, seed_set, axis, values, script, list_option): self.sample(*a)))
            for path in folders:
                rel = os.path.relpath(path, self.out)
                jobs.append(Job(f'FID and KID {rel}', 6 + r.num_images * r.sec_per_fid_image,
                                lambda rel=rel: self.scored(rel), lambda path=path: self.score(path)))
        return jobs

    def run_all(self):
        jobs = self.jobs()
        todo = [job for job in jobs if not job.done()]
        print(f'{len(jobs) - len(todo)} of {len(jobs)} jobs already done; {len(todo)} to run in {self.out}',
              flush=True)
        estimated_total = sum(job.estimate for job in todo)
        estimated_done, elapsed = 0.0, 0.0
        for index, job in enumerate(todo):
            # Measured seconds per estimated second, started at 1 with a minute's weight so one job can't swing it.
            speed = (elapsed + 60) / (estimated_done + 60)
            left = (estimated_total - estimated_done) * speed
            print(f'[{index + 1}/{len(todo)}] {job.name} ... (about {_minutes(left)} left)', flush=True)
            start = time.time()
            job.run()
            seconds = time.time() - start
            self.timings[job.name] = round(seconds, 1)
            _write_json(self.timings_path, self.timings)
            estimated_done += job.estimate
            elapsed += seconds
        print(f'All jobs done ({_minutes(sum(self.timings.values()))} of work in total, over all runs).', flush=True)


def _minutes(seconds):
    return f'{seconds / 60:.1f} min'


def _read_json(path):
    return json.load(open(path)) if os.path.exists(path) else {}


def _write_json(path, data):
    with atomic_write(path, 'w') as f:
        json.dump(data, f, indent=1, sort_keys=True)


@click.command()
@click.option('--out', 'out_dir', metavar='DIR', default='reproduce-run', show_default=True,
              help='Working folder: datasets, runs, images, scores, logs')
@click.option('--report', 'report_path', metavar='MD', default=None,
              help='Report to write, plots beside it  [default: docs/reproduction.md; with --quick <out>/report.md]')
@click.option('--quick', is_flag=True, help='Tiny sizes, a few minutes: checks the pipeline, measures nothing')
def main(out_dir, report_path, quick):
    """Reproduce the paper's robustness comparison across D at small scale, on this machine."""
    recipe = QUICK if quick else FULL
    report_path = report_path or (os.path.join(out_dir, 'report.md') if quick else
                                  os.path.join(ROOT, 'docs', 'reproduction.md'))
    reproduction = Reproduction(recipe, out_dir)
    try:
        reproduction.run_all()
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    reproduce_report.write_report(reproduction, report_path, quick=quick)
    print(f'Report: {report_path}')


if __name__ == '__main__':
    main()

"""Training and sampling throughput of the precision / compile / memory-layout modes, with their parity to fp32.

    python benchmarks/throughput.py --out results/bench      # ddpmpp + ncsnpp CIFAR-10, every mode (~7 min, H100)
    python benchmarks/throughput.py --quick --out /tmp/bench  # CPU smoke test: tiny network, 8×8 images

Everything runs through the code the CLIs use: training_loop.prepare_training / training_step / update_ema with
the real EDMLoss (PFGM++ D=128) and train.py's AugmentPipe; sampling through generation.prepare_network and
generation.generate_batch (per-seed PFGM++ prior, edm_sampler, float64 ODE state). The method and the table
layout are described in docs/benchmarks.md.

Work is done in order of importance (the first arch's reference and fastest modes, then the parity runs, then
the other archs) and the results are rewritten to --out after every measurement, so a run stopped by a time limit
keeps every finished row. A failing mode is reported in one line and the run goes on.
"""

import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
from dnnlib.util import error_summary  # noqa: E402
import train  # noqa: E402
from benchmarks import profile_summary  # noqa: E402
from torch_utils import misc  # noqa: E402
from torch_utils import precision as precision_mod  # noqa: E402
from training import generation, training_loop  # noqa: E402

# Most important first. The measured best (bf16+compile+channels_last) and the candidates to beat it: bfloat16 or
# float16 activations end to end (fp16's eager path is 31 % faster than bf16 autocast), and max-autotune.
DEFAULT_MODES = ('ref,bf16+compile+channels_last,bf16-native+compile+channels_last,fp16+compile+channels_last,'
                 'bf16,bf16-native,fp16,tf32,bf16+compile,bf16+compile+channels_last+autotune')
DEFAULT_PARITY_MODES = 'bf16,bf16-native,fp16,tf32,bf16+compile+channels_last,bf16-native+compile+channels_last'
MODE_FLAGS = {'compile': 'compile', 'channels_last': 'channels_last', 'cl': 'channels_last',
              'cudagraphs': 'cudagraphs', 'autotune': 'autotune'}
D = 128.0  # PFGM++ augmentation dimension of the benchmarked configuration
LR = 1e-3
AUGMENT_P = 0.12  # train.py's --augment default
DROPOUT = 0.13  # train.py's --dropout default
PARITY_SAMPLE_STEPS = 3  # samples are compared after a 3-step (5 NFE) run, cheap even in fp32


# ----------------------------------------------------------------------------------------------------------------
# Modes.


class Mode:
    """A benchmark mode: 'ref' (fp32, TF32 off, eager) or
    '<precision>[+compile][+channels_last][+cudagraphs][+autotune]'. cudagraphs and autotune imply compile:
    torch.compile modes 'reduce-overhead' (CUDA graphs), 'max-autotune-no-cudagraphs' (kernel choice by timing,
    including Triton convolution/matmul templates) or, with both, 'max-autotune'."""

    def __init__(self, name):
        parts = name.strip().split('+')
        self.name = name.strip()
        self.precision = 'fp32' if parts[0] == 'ref' else parts[0]
        if self.precision not in precision_mod.PRECISIONS or (parts[0] == 'ref' and len(parts) > 1):
            raise click.BadParameter(f'{name!r}: a mode is ref or <{"|".join(precision_mod.PRECISIONS)}>'
                                     f'[+compile][+channels_last][+cudagraphs][+autotune]')
        unknown = [p for p in parts[1:] if p not in MODE_FLAGS]
        if unknown:
            raise click.BadParameter(f'{name!r}: unknown flag {unknown[0]!r} (use {", ".join(MODE_FLAGS)})')
        flags = {MODE_FLAGS[p] for p in parts[1:]}
        self.channels_last = 'channels_last' in flags
        self.cudagraphs = 'cudagraphs' in flags
        self.autotune = 'autotune' in flags
        self.compile = 'compile' in flags or self.cudagraphs or self.autotune

    def compile_arg(self, backend):
        if not self.compile:
            return False
        kwargs = {} if backend == 'inductor' else dict(backend=backend)
        if self.cudagraphs or self.autotune:
            kwargs['mode'] = {(True, False): 'reduce-overhead', (False, True): 'max-autotune-no-cudagraphs',
                              (True, True): 'max-autotune'}[(self.cudagraphs, self.autotune)]
        return kwargs or True

    @property
    def slow(self):
        """fp32/tf32 eager sampling is timed on a shorter run and scaled per NFE (a 35-NFE batch takes ~20 s)."""
        return self.precision in ('fp32', 'tf32') and not self.compile


def parse_modes(_ctx, _param, value):
    names = [v for v in value.split(',') if v.strip()]
    modes = [Mode(v) for v in names]
    if len({m.name for m in modes}) != len(modes):
        raise click.BadParameter(f'{value!r} repeats a mode')
    return modes


# ----------------------------------------------------------------------------------------------------------------
# The benchmarked configuration.


def network_kwargs(arch, quick, dropout, use_fp16=False):
    kwargs = dict(train.ARCH_PRESETS[arch], class_name='training.networks.EDMPrecond', augment_dim=9,
                  dropout=dropout, use_fp16=use_fp16)
    if quick:
        kwargs.update(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return kwargs


def build_network(arch, s, dropout, use_fp16=False):
    torch.manual_seed(0)  # the same initial weights in every mode
    return training_loop.build_network(network_kwargs(arch, s.quick, dropout, use_fp16), s.resolution, 3, 0, D)


@torch.no_grad()
def make_nontrivial(net):
    """Redraw the near-zero-initialised layers (EDM's init_zero, weights ~1e-5) at unit gain.

    A fresh network returns D(x) ≈ c_skip·x, which would hide any precision error in the sample comparison;
    with every layer at unit gain the network's own output dominates. Speed does not depend on the values.
    """
    for param in net.parameters():
        if param.ndim >= 2 and float(param.abs().max()) < 1e-3:
            param.copy_(torch.randn_like(param) / math.sqrt(param[0].numel()))


def release(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def prepare_mode(mode, device):
    """Process-wide state for one measurement: TF32 switches, cuDNN autotuning (as train.py), fresh compile caches
    (every mode compiles from scratch and never meets another mode's graphs or recompile limits)."""
    precision_mod.configure_backends(mode.precision)
    torch.backends.cudnn.benchmark = True
    torch._dynamo.reset()
    release(device)


# ----------------------------------------------------------------------------------------------------------------
# Training.


class TrainingRun:
    """The training loop's pieces for one mode, stepping on fixed random uint8 batches kept on the device."""

    def __init__(self, arch, mode, s, dropout=DROPOUT, num_batches=4):
        device = s.device
        prepare_mode(mode, device)
        self.batch = s.batch_train
        # fp16: the network's use_fp16, as training_loop sets it for precision='fp16'.
        self.net = build_network(arch, s, dropout, use_fp16=mode.precision == 'fp16')
        self.net.train().requires_grad_(True).to(device)
        kwargs = dict(class_name='torch.optim.Adam', lr=LR, betas=[0.9, 0.999], eps=1e-8)
        self.ddp, self.forward, self.optimizer = training_loop.prepare_training(
            self.net, kwargs, device, precision=mode.precision, compile=mode.compile_arg(s.compile_backend),
            channels_last=mode.channels_last)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.loss_fn = training_loop.build_loss(dict(class_name='training.loss.EDMLoss', D=D, stf=False))
        self.augment_pipe = training_loop.build_augment_pipe(train.augment_preset(AUGMENT_P))
        generator = torch.Generator().manual_seed(1)
        shape = [num_batches, self.batch, 3, s.resolution, s.resolution]
        self.data = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).to(device)
        self.labels = torch.zeros([self.batch, 0], device=device)
        self.cur_nimg = 0
        self.index = 0
        torch.manual_seed(2)  # the steps' random stream (σ, noise, augmentation, dropout): the same in every mode

    def _next_micro_batch(self):
        images = self.data[self.index % len(self.data)].to(torch.float32) / 127.5 - 1  # as training_loop
        self.index += 1
        return images, self.labels, None

    def step(self):
        """One optimizer step and EMA update exactly as training_loop's loop body; returns the mean loss (device)."""
        loss = training_loop.training_step(self.ddp, self.forward, self.net, self.optimizer, self.loss_fn,
                                           self.augment_pipe, self._next_micro_batch, 1, grad_scale=1 / self.batch,
                                           lr=LR, loss_scaling=1)
        training_loop.update_ema(self.ema, self.net, training_loop.ema_beta(self.batch, self.cur_nimg, 500, 0.05))
        self.cur_nimg += self.batch
        return loss.mean()

    def flat_parameters(self):
        return torch.cat([p.detach().float().flatten() for p in self.net.parameters()])


def measure_training(arch, mode, s):
    device = s.device
    run = TrainingRun(arch, mode, s)
    misc.synchronize(device)
    start = time.perf_counter()
    for _ in range(s.warmup_steps):
        run.step()
    misc.synchronize(device)
    probe_start = time.perf_counter()
    run.step()  # one steady step sizes the timed run
    misc.synchronize(device)
    probe = time.perf_counter() - probe_start
    warmup = time.perf_counter() - start
    steps = max(s.min_steps, min(s.max_steps, math.ceil(s.seconds / max(probe, 1e-6))))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    misc.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    misc.synchronize(device)
    elapsed = time.perf_counter() - start
    step_time = elapsed / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    values = dict(train_img_s=steps * s.batch_train / elapsed, peak_gib=peak, train_steps=steps,
                  compile_s=max(warmup - (s.warmup_steps + 1) * step_time, 0.0))
    if s.profile:
        values['train_profile'] = profile_summary.profile(run.step, device, repeats=s.profile_repeats)
    del run
    release(device)
    return values


def training_trajectory(arch, mode, s, steps):
    """`steps` steps from the common initial state with dropout off (so eager and compiled modes draw the same
    random numbers): per-step mean losses, initial and final parameters."""
    run = TrainingRun(arch, mode, s, dropout=0)
    initial = run.flat_parameters()
    losses = torch.stack([run.step() for _ in range(steps)]).double().cpu()
    final = run.flat_parameters()
    del run
    release(s.device)
    return dict(losses=losses, initial=initial, final=final)


def compare_trajectories(result, reference):
    rel = (result['losses'] - reference['losses']).abs() / reference['losses'].abs()
    delta = (result['final'] - reference['final']).double().norm()
    update = (reference['final'] - reference['initial']).double().norm()
    return dict(parity_steps=len(rel), loss_rel_diff_mean=float(rel.mean()), loss_rel_diff_max=float(rel.max()),
                param_rel_diff=float(delta / reference['final'].double().norm()),
                update_rel_diff=float(delta / max(float(update), 1e-30)))


# ----------------------------------------------------------------------------------------------------------------
# Sampling.


def measure_sampling(arch, mode, s):
    """img/s of generate_batch at s.nfe (timed on a shorter run for slow modes), plus a PARITY_SAMPLE_STEPS run
    on the same seeds for the sample comparison."""
    device = s.device
    prepare_mode(mode, device)
    net = build_network(arch, s, dropout=0).eval().requires_grad_(False)
    make_nontrivial(net)
    # cuDNN autotuning as in training: what generate.py runs with --bench=1.
    net_call = generation.prepare_network(net.to(device), mode.precision, compile=mode.compile_arg(s.compile_backend),
                                          channels_last=mode.channels_last, cudnn_benchmark=True)
    seeds = list(range(s.batch_sample))

    def run(steps):
        images = generation.generate_batch(net_call, seeds, dict(num_steps=steps))
        misc.synchronize(device)
        return images

    start = time.perf_counter()
    run(2)  # warm-up: compilation, cuDNN autotuning; the same batch shape as the timed run
    warmup = time.perf_counter() - start
    steps = (s.nfe + 1) // 2
    if mode.slow:
        steps = min(steps, s.slow_sample_steps)
    measured_nfe = 2 * steps - 1
    start = time.perf_counter()
    images = run(steps)
    elapsed = time.perf_counter() - start
    per_nfe = elapsed / measured_nfe
    parity = images if steps == PARITY_SAMPLE_STEPS else run(PARITY_SAMPLE_STEPS)
    values = dict(sample_img_s=s.batch_sample / (per_nfe * s.nfe), measured_nfe=measured_nfe,
                  sample_compile_s=max(warmup - 3 * per_nfe, 0.0))
    if s.profile:  # a 2-step (3 NFE) batch, reported per network evaluation
        values['sample_profile'] = profile_summary.profile(lambda: run(2), device, repeats=1, units_per_call=3)
    del net, net_call, images
    release(device)
    return values, parity.cpu()


def compare_samples(images, reference):
    diff = (images - reference).double()
    return dict(sample_max_abs_diff=float(diff.abs().max()),
                sample_rel_rms_diff=float(diff.square().mean().sqrt() / reference.double().square().mean().sqrt()))


# ----------------------------------------------------------------------------------------------------------------
# Results: one row per (arch, mode), rewritten to --out after every measurement.


class Results:
    def __init__(self, out, meta, archs, modes, parity_modes):
        self.out = out
        self.meta = meta
        self.rows = {(a, m.name): dict(arch=a, mode=m.name, train='pending', sample='pending')
                     for a in archs for m in modes}
        self.parity = {m: dict(arch=archs[0], mode=m, status='pending') for m in parity_modes}

    def update_row(self, arch, mode, **values):
        self.rows[(arch, mode)].update(values)
        self.write()

    def update_parity(self, mode, **values):
        self.parity[mode].update(values)
        self.write()

    def table_rows(self):
        rows = []
        for (arch, mode), row in self.rows.items():
            row = dict(row)
            ref = self.rows.get((arch, 'ref'), {})
            for key, ratio in (('train_img_s', 'train_ratio'), ('sample_img_s', 'sample_ratio')):
                if row.get(key) and ref.get(key):
                    row[ratio] = row[key] / ref[key]
            rows.append(row)
        return rows

    def markdown(self):
        m = self.meta
        lines = [f'# Throughput: {m["device_name"]}', '',
                 f'torch {m["torch"]} (CUDA {m["cuda"]}), {m["date"]}, python {m["python"]}, elapsed '
                 f'{m.get("elapsed_s", 0):.0f} s  ', f'`{m["command"]}`', '', m['setup'], '',
                 '| arch | mode | train img/s | × ref | peak GiB | compile s | sample img/s | × ref | measured_nfe '
                 '| sample compile s | status |',
                 '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
        for row in self.table_rows():
            status = 'ok' if row['train'] == 'ok' and row['sample'] == 'ok' else \
                f'train {row["train"]}; sample {row["sample"]}'
            lines.append(f'| {row["arch"]} | {row["mode"]} | {_fmt(row.get("train_img_s"), 0)} | '
                         f'{_fmt(row.get("train_ratio"), 2)} | {_fmt(row.get("peak_gib"), 2)} | '
                         f'{_fmt(row.get("compile_s"), 1)} | {_fmt(row.get("sample_img_s"), 1)} | '
                         f'{_fmt(row.get("sample_ratio"), 2)} | {row.get("measured_nfe", "–")} | '
                         f'{_fmt(row.get("sample_compile_s"), 1)} | {status} |')
        lines += ['', '## Parity with fp32', '', m['parity_note'], '',
                  '| arch | mode | steps | loss rel. diff mean | loss rel. diff max | param rel. diff | '
                  'update rel. diff | sample max abs diff | sample rel. RMS diff | status |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
        sample_parity = {key: row for key, row in self.rows.items() if 'sample_max_abs_diff' in row}
        for mode, row in self.parity.items():
            sample = sample_parity.get((row['arch'], mode), {})
            lines.append(f'| {row["arch"]} | {mode} | {row.get("parity_steps", "–")} | '
                         f'{_fmt(row.get("loss_rel_diff_mean"), "e")} | {_fmt(row.get("loss_rel_diff_max"), "e")} | '
                         f'{_fmt(row.get("param_rel_diff"), "e")} | {_fmt(row.get("update_rel_diff"), "e")} | '
                         f'{_fmt(sample.get("sample_max_abs_diff"), "e")} | '
                         f'{_fmt(sample.get("sample_rel_rms_diff"), "e")} | {row["status"]} |')
        for (arch, mode), row in sample_parity.items():
            if mode != 'ref' and (mode not in self.parity or arch != self.parity[mode]['arch']):
                lines.append(f'| {arch} | {mode} | – | – | – | – | – | '
                             f'{_fmt(row["sample_max_abs_diff"], "e")} | '
                             f'{_fmt(row["sample_rel_rms_diff"], "e")} | samples only |')
        profiles = [(row['arch'], row['mode'], kind, row[f'{kind}_profile']) for row in self.rows.values()
                    for kind in ('train', 'sample') if f'{kind}_profile' in row]
        if profiles:
            lines += ['', '## Where the device time goes (--profile)', '', m['profile_note'], '',
                      profile_summary.markdown(profiles)]
        return '\n'.join(lines) + '\n'

    def write(self):
        self.meta['elapsed_s'] = time.perf_counter() - self.meta['_start']
        if self.out is None:
            return
        meta = {k: v for k, v in self.meta.items() if not k.startswith('_')}
        try:
            with dnnlib.util.atomic_write(self.out + '.json', 'w') as f:
                json.dump(dict(meta=meta, rows=self.table_rows(), parity=list(self.parity.values())), f, indent=2)
            with dnnlib.util.atomic_write(self.out + '.md', 'w') as f:
                f.write(self.markdown())
        except Exception as err:  # a reporting problem must not cost the remaining measurements
            print(f'could not write {self.out}.md/.json: {error_summary(err)}', flush=True)


def _fmt(value, digits):
    if value is None:
        return '–'
    if digits == 'e':
        return f'{value:.1e}'
    return f'{value:,.{digits}f}'


def _profile_text(summary):
    if summary is None:
        return ''
    shares = sorted(profile_summary.category_shares(summary).items(), key=lambda item: -item[1])[:3]
    return f'  [busy {summary["busy"]:.2f}, ' + ', '.join(f'{name} {share:.0f} %' for name, share in shares) + ']'


# ----------------------------------------------------------------------------------------------------------------


def job_order(archs, modes, parity_modes, ref):
    """[(kind, arch, mode)] in order of importance. Per arch: ref, the eager modes and the first compiled mode
    (probably the fastest), then (first arch only) the parity runs, eager modes first, then the arch's other
    compiled modes. A run cut short by the time budget keeps what matters most."""
    compiled = [m for m in modes if m.compile]
    early = [m for m in modes if not m.compile or m is compiled[0]]
    late = [m for m in modes if m not in early]
    jobs = []
    for index, arch in enumerate(archs):
        jobs += [(kind, arch, m) for m in early for kind in ('train', 'sample')]
        if index == 0 and parity_modes:
            eager_first = sorted(parity_modes, key=lambda m: m.compile)
            jobs += [('parity', arch, ref)] + [('parity', arch, m) for m in eager_first]
        jobs += [(kind, arch, m) for m in late for kind in ('train', 'sample')]
    return jobs


def _settings(batch_train, batch_sample, nfe, slow_sample_steps, parity_steps, warmup_steps, seconds,
              compile_backend, device, profile, profile_repeats, quick):
    """The run's settings as an EasyDict (what the measure_* functions read), --quick's reductions applied."""
    if quick:
        batch_train, batch_sample, nfe = min(batch_train, 8), min(batch_sample, 8), 5
        warmup_steps, seconds, parity_steps = 1, 0, min(parity_steps, 3)
        if device.type == 'cpu':
            torch.set_num_threads(1)  # tiny tensors: threads only contend
    if compile_backend is None:
        compile_backend = 'eager' if quick and device.type == 'cpu' else 'inductor'
    return dnnlib.EasyDict(device=device, quick=quick, resolution=8 if quick else 32, batch_train=batch_train,
                           batch_sample=batch_sample, nfe=nfe, slow_sample_steps=slow_sample_steps,
                           warmup_steps=warmup_steps, seconds=seconds, min_steps=2 if quick else 5, max_steps=200,
                           compile_backend=compile_backend, profile=profile, profile_repeats=profile_repeats,
                           parity_steps=parity_steps)


def _meta(s, archs):
    """The results' header: versions, device, date, command line and how each number was measured."""
    device = s.device
    if device.type == 'cuda':
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'
    return dict(
        _start=time.perf_counter(), torch=torch.__version__, cuda=torch.version.cuda, device_name=device_name,
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), python=platform.python_version(),
        command=' '.join([os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                         + sys.argv[1:]),
        setup=(f'{"tiny (quick) " if s.quick else ""}EDMPrecond {"/".join(archs)}, {s.resolution}×{s.resolution}×3, '
               f'PFGM++ D={D:g}. Training: per-GPU batch {s.batch_train}, EDMLoss, train.py AugmentPipe '
               f'(p={AUGMENT_P}, augment_dim 9), dropout {DROPOUT}, Adam lr {LR:g} (fused on CUDA), EMA, '
               f'{s.warmup_steps} + 1 warm-up steps then ≥ {s.seconds:g} s timed. Sampling: generate_batch (per-seed '
               f'prior, edm_sampler, float64 ODE), batch {s.batch_sample}, {s.nfe} NFE; fp32/tf32 eager rows time '
               f'{2 * min(s.slow_sample_steps, (s.nfe + 1) // 2) - 1} NFE and scale per NFE (measured_nfe). '
               f'compile s: warm-up time beyond the steady step time. torch.compile backend: {s.compile_backend}. '
               f'Sampling runs with cuDNN autotuning (generate.py --bench=1).'),
        profile_note=(f'torch.profiler over {s.profile_repeats} training steps and one 3-NFE sampling batch per mode, '
                      f'after the timing (compiled and autotuned). device ms: the {"GPU kernels" if device.type == "cuda" else "operators"}\' '
                      f'own time per step / NFE; busy: device ms / wall ms (well below 1: the device waits for the '
                      f'host); launches: kernels per step / NFE; then each category\'s share of the device time. '
                      f'Wall times include the profiler\'s overhead.'),
        parity_note=(f'Training: {s.parity_steps} optimizer steps per mode from the same initial weights, data and '
                     f'random stream, dropout off (so eager and compiled modes draw the same numbers); relative '
                     f'differences of each step\'s mean loss, of the final parameters (param) and of the parameter '
                     f'change (update) against fp32. "fp32 repeat" is fp32 against itself: the run-to-run noise '
                     f'floor. Samples: {2 * PARITY_SAMPLE_STEPS - 1}-NFE runs on the same seeds of the sampling '
                     f'network (its zero-initialised layers redrawn, so the network output matters), in [-1, 1] '
                     f'units against fp32.'))


def _record_status(results, kind, arch, mode, ref, status):
    if kind == 'parity':
        results.update_parity('fp32 repeat' if mode is ref else mode.name, status=status)
    else:
        results.update_row(arch, mode.name, **{kind: status})


def _train_job(arch, mode, s, results):
    values = measure_training(arch, mode, s)
    results.update_row(arch, mode.name, train='ok', **values)
    return (f'{values["train_img_s"]:9.1f} img/s  peak {_fmt(values["peak_gib"], 2)} GiB  compile '
            f'{values["compile_s"]:.1f} s{_profile_text(values.get("train_profile"))}')


def _sample_job(arch, mode, s, results, ref, reference_samples):
    values, images = measure_sampling(arch, mode, s)
    if mode is ref:
        reference_samples[arch] = images
    if arch in reference_samples:
        values.update(compare_samples(images, reference_samples[arch]))
    results.update_row(arch, mode.name, sample='ok', **values)
    return (f'{values["sample_img_s"]:9.1f} img/s at {s.nfe} NFE (measured {values["measured_nfe"]})  '
            f'max |Δ| vs fp32 {_fmt(values.get("sample_max_abs_diff"), "e")}'
            f'{_profile_text(values.get("sample_profile"))}')


def _parity_job(arch, mode, s, results, ref, trajectories):
    if mode is not ref and arch not in trajectories:
        results.update_parity(mode.name, status='skipped (no fp32 reference run)')
        return 'skipped (no fp32 reference run)'
    trajectory = training_trajectory(arch, mode, s, s.parity_steps)
    if mode is ref:
        trajectories[arch] = trajectory
        values = compare_trajectories(training_trajectory(arch, mode, s, s.parity_steps), trajectory)
        name = 'fp32 repeat'
    else:
        values = compare_trajectories(trajectory, trajectories[arch])
        name = mode.name
    results.update_parity(name, status='ok', **values)
    return (f'{name}: loss rel. diff mean {values["loss_rel_diff_mean"]:.1e} max '
            f'{values["loss_rel_diff_max"]:.1e}, param rel. diff {values["param_rel_diff"]:.1e}')


def run_jobs(jobs, s, results, ref, time_budget, start_time):
    """Run the (kind, arch, mode) jobs in order, recording each in results; one that fails (e.g. a compile error)
    or would not finish within time_budget is marked so and the run goes on."""
    reference_samples, trajectories = {}, {}
    durations = {}  # (kind, compiled) -> seconds of the last such job, to foresee a compile that cannot finish
    for kind, arch, mode in jobs:
        label = f'{kind:<6s} {arch:<7s} {mode.name:<38s}'
        left = time_budget - (time.perf_counter() - start_time)
        # A compile that cannot finish in time is not started (a parity run compiles like a training run).
        expected = durations.get(('sample' if kind == 'sample' else 'train', True), 0) if mode.compile else 0
        if left <= 0 or expected > left:
            status = f'skipped (time budget {time_budget:g} s)'
            _record_status(results, kind, arch, mode, ref, status)
            print(f'{label} {status}', flush=True)
            continue
        start = time.perf_counter()
        try:
            if kind == 'train':
                text = _train_job(arch, mode, s, results)
            elif kind == 'sample':
                text = _sample_job(arch, mode, s, results, ref, reference_samples)
            else:
                text = _parity_job(arch, mode, s, results, ref, trajectories)
            duration = time.perf_counter() - start
            if kind != 'parity' or mode.compile:
                durations[('sample' if kind == 'sample' else 'train', mode.compile)] = duration
            print(f'{label} {text}  ({duration:.0f} s)', flush=True)
        except Exception as err:  # one mode failing (e.g. a compile error) must not end the run
            failure = f'{type(err).__name__}: {error_summary(err)}'[:300]
            _record_status(results, kind, arch, mode, ref, f'failed: {failure}')
            print(f'{label} FAILED {failure}', flush=True)
            torch._dynamo.reset()
            release(s.device)


@click.command()
@click.option('--archs', default='ddpmpp,ncsnpp', show_default=True, help='Architectures, in order of importance')
@click.option('--modes', default=DEFAULT_MODES, show_default=True, callback=parse_modes,
              help='Modes, most important first; ref (fp32, TF32 off, eager) is always measured first')
@click.option('--batch-train', type=click.IntRange(min=1), default=128, show_default=True, help='Per-GPU batch')
@click.option('--batch-sample', type=click.IntRange(min=1), default=512, show_default=True, help='Sampling batch')
@click.option('--nfe', type=click.IntRange(min=3), default=35, show_default=True,
              help='Sampling network evaluations (odd: 2·steps − 1)')
@click.option('--slow-sample-steps', type=click.IntRange(min=2), default=3, show_default=True,
              help='Steps actually run for fp32/tf32 eager sampling (scaled per NFE to --nfe)')
@click.option('--parity-steps', type=click.IntRange(min=0), default=20, show_default=True,
              help='Optimizer steps of the loss-parity runs (0: none)')
@click.option('--parity-modes', default=DEFAULT_PARITY_MODES, show_default=True, callback=parse_modes,
              help='Modes compared with fp32 step by step (first arch only)')
@click.option('--warmup-steps', type=click.IntRange(min=1), default=3, show_default=True,
              help='Untimed training steps (compilation happens here)')
@click.option('--seconds', type=click.FloatRange(min=0), default=3, show_default=True,
              help='Target length of each timed training run')
@click.option('--time-budget', type=click.FloatRange(min=0), default=420, show_default=True,
              help='Seconds; measurements not started by then are marked skipped')
@click.option('--compile-backend', default=None, help='torch.compile backend  [default: inductor; eager with '
                                                      '--quick on the CPU]')
@click.option('--device', default=None, help='[default: cuda if available, else cpu]')
@click.option('--profile', is_flag=True, help='After each timing, profile the same step (and a 3-NFE sampling '
                                               'batch) and report where the device time goes')
@click.option('--profile-steps', 'profile_repeats', type=click.IntRange(min=1), default=3, show_default=True,
              help='Training steps profiled per mode')
@click.option('--quick', is_flag=True, help='Tiny network, 8×8 images, small batches, few steps (CI smoke test)')
@click.option('--out', default=None, metavar='PATH', help='Write PATH.md and PATH.json (rewritten after every '
                                                         'measurement)')
def main(archs, modes, batch_train, batch_sample, nfe, slow_sample_steps, parity_steps, parity_modes, warmup_steps,
         seconds, time_budget, compile_backend, device, profile, profile_repeats, quick, out):
    """Measure training and sampling throughput per mode and compare each fast mode's loss and samples with fp32."""
    archs = [a.strip() for a in archs.split(',') if a.strip()]
    for arch in archs:
        if arch not in ('ddpmpp', 'ncsnpp'):
            raise click.BadParameter(f'{arch!r}: choose from ddpmpp, ncsnpp', param_hint='--archs')
    if nfe % 2 == 0:
        raise click.BadParameter(f'{nfe} is even; the Heun sampler does 2·steps − 1 evaluations', param_hint='--nfe')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    ref = Mode('ref')
    modes = [ref] + [m for m in modes if m.name != 'ref']
    parity_modes = [m for m in parity_modes if m.name != 'ref'] if parity_steps else []
    s = _settings(batch_train, batch_sample, nfe, slow_sample_steps, parity_steps, warmup_steps, seconds,
                  compile_backend, device, profile, profile_repeats, quick)
    out = os.path.splitext(out)[0] if out and os.path.splitext(out)[1] in ('.md', '.json') else out
    meta = _meta(s, archs)
    results = Results(out, meta, archs, modes, (['fp32 repeat'] if parity_modes else []) +
                      [m.name for m in parity_modes])
    results.write()
    print(f'torch {torch.__version__} (CUDA {torch.version.cuda}) on {meta["device_name"]}, {meta["date"]}')
    print(meta['setup'])
    run_jobs(job_order(archs, modes, parity_modes, ref), s, results, ref, time_budget, meta['_start'])
    results.write()
    print()
    print(results.markdown())

if __name__ == '__main__':
    main()

"""Guidance: the formula on hand-made denoisers, the interval, CFG's batched null-label forward, label dropout in
train.py, and generate.py's options end to end (W = 1 unchanged bytes, W = 0 = the null label, one-line errors)."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import generate_alpha
import generate_quant
import generate_steps
import train
from data_helpers import make_image_zip
from test_generate import read_bytes, tiny_config, write_checkpoint
from training import generation, guidance, sampler, training_loop
from training.checkpoint import load_network


class ToyDenoiser:
    """A hand-made denoiser with the attributes samplers read; records every call's batch and σ."""

    sigma_min, sigma_max, D, img_resolution, img_channels = 0.002, 80.0, None, 2, 1

    def __init__(self, function, label_dim=0):
        self.function, self.label_dim, self.calls = function, label_dim, []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x.shape[0], float(sigma[0])))
        return self.function(x, sigma.reshape(-1, 1, 1, 1), class_labels).to(torch.float32)


def main_function(x, sigma, labels):
    shift = 0 if labels is None else (labels * torch.arange(1, labels.shape[1] + 1)).sum(1).reshape(-1, 1, 1, 1)
    return torch.sin(x) + 0.1 * sigma + shift


def guide_function(x, sigma, labels):
    return 0.5 * x - 0.01 * sigma ** 2


def test_autoguidance_is_the_formula_on_a_hand_made_pair():
    """Catches a swapped main/guide, W applied to the wrong term, or the guide given other labels."""
    x = torch.randn([3, 1, 2, 2], dtype=torch.float64)
    sigma = torch.full([3], 1.7, dtype=torch.float64)
    labels = torch.eye(2)[[0, 1, 1]]
    main, guide = ToyDenoiser(main_function, label_dim=2), ToyDenoiser(guide_function, label_dim=2)
    for weight in (0, 0.5, 2.5):
        got = guidance.guided(main, weight, guide)(x, sigma, labels)
        d_main = main_function(x, sigma.reshape(-1, 1, 1, 1), labels).float().double()
        d_guide = guide_function(x, sigma.reshape(-1, 1, 1, 1), labels).float().double()
        expected = d_guide + weight * (d_main - d_guide)
        assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12), weight


def test_cfg_is_one_batched_forward_with_the_null_label():
    """Catches two forwards instead of one, a null label other than zeros, or the halves swapped."""
    x = torch.randn([3, 1, 2, 2], dtype=torch.float64)
    sigma = torch.full([3], 0.9, dtype=torch.float64)
    labels = torch.eye(3)[[2, 0, 1]]
    net = ToyDenoiser(main_function, label_dim=3)
    got = guidance.guided(net, 3.0)(x, sigma, labels)
    assert net.calls == [(6, 0.9)]
    d_cond = main_function(x, sigma.reshape(-1, 1, 1, 1), labels).float().double()
    d_null = main_function(x, sigma.reshape(-1, 1, 1, 1), torch.zeros_like(labels)).float().double()
    assert torch.allclose(got, d_null + 3 * (d_cond - d_null), rtol=0, atol=1e-12)


def test_weight_one_returns_the_network_itself():
    """Catches W = 1 still running the guide (EDM2: W = 1 skips it), which would change bytes and cost."""
    net, guide = ToyDenoiser(main_function, 2), ToyDenoiser(guide_function, 2)
    assert guidance.guided(net, 1) is net and guidance.guided(net, 1.0, guide) is net


@pytest.mark.parametrize('solver', sampler.SOLVERS)
def test_interval_switches_at_the_right_sigma(solver):
    """Catches an open instead of closed interval, a reversed test, or the interval ignored: the guide is called
    exactly at the evaluations whose σ lies in [σ_lo, σ_hi], which here are grid points themselves."""
    net, guide = ToyDenoiser(main_function), ToyDenoiser(guide_function)
    num_steps = 8
    grid = sampler.edm_sigma_steps(net, num_steps)
    lo, hi = grid[5], grid[2]  # both ends are evaluated σ values
    latents = torch.randn([2, 1, 2, 2], dtype=torch.float64) * grid[0]
    sampler.sample(guidance.guided(net, 2.0, guide, (lo, hi)), latents, solver=solver, num_steps=num_steps)
    evaluated = [sigma for _, sigma in net.calls]
    assert len(evaluated) == sampler.nfe_for_steps(solver, num_steps)
    assert [sigma for _, sigma in guide.calls] == [s for s in evaluated if lo <= s <= hi]
    assert len(guide.calls) == (8 if solver == 'heun' else 4)  # t2..t5, and heun's corrections at t2..t5 too


def test_an_unconditional_network_cannot_take_cfg_and_guides_must_fit():
    with pytest.raises(ValueError, match='class-conditional'):
        guidance.guided(ToyDenoiser(main_function), 2.0)
    main, guide = ToyDenoiser(main_function, 10), ToyDenoiser(guide_function, 10)
    guide.img_resolution, guide.D = 4, 128.0
    with pytest.raises(ValueError, match=r'resolution 4 \(main network: 2\), D 128.0 \(main network: None\)'):
        guidance.guided(main, 2.0, guide)


def test_interval_and_folder_tags():
    assert guidance.parse_interval('0.3,5') == (0.3, 5.0)
    assert guidance.parse_interval('0,inf') == (0.0, float('inf'))
    for bad in ('5,0.3', '1', '1,2,3', 'a,b', '-1,2', '1,1'):
        with pytest.raises(ValueError, match='sigma_lo'):
            guidance.parse_interval(bad)
    assert guidance.folder_tag(1, False, (0.3, 5)) == ''
    assert guidance.folder_tag(2, False) == 'cfg2' and guidance.folder_tag(1.5, True, (0.3, 5)) == 'ag1.5_gi0.3-5'
    assert generation.folder_name(7, [0], 'steps', 9, 'dpm2m', guidance='cfg2_gi0.3-5') == 'ckpt_000007_dpm2m_cfg2_gi0.3-5_steps_9'


# ----------------------------------------------------------------------------------------------------------------
# Label dropout in train.py.

def test_cond_drop_reaches_the_network_and_drops_labels_at_its_rate(tmp_path):
    """Catches --cond-drop not reaching the network config, or a wrong rate: measured on the labels that reach the
    network's label embedding (the dropout happens inside the network, so a hook sees its result)."""
    data = make_image_zip(str(tmp_path / 'digits-8x8.zip'), num=20, resolution=8, channels=1, labels=True)
    args = [f'--outdir={tmp_path}', f'--data={data}', '--dry-run', '--cond=1', '--cbase=16', '--cres=1',
            '--nblock=1', '--batch=32', '--augment=0']
    result = CliRunner().invoke(train.main, args + ['--cond-drop=0.25'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    options = json.loads(result.output[result.output.index('{'):result.output.index('\n}\n') + 2])
    net = training_loop.build_network(options['network_kwargs'], 8, 1, 10, None)
    assert guidance.label_dropout_of(net) == 0.25
    seen = []
    net.model.map_label.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    count = 2000
    labels = torch.eye(10)[torch.arange(count) % 10]
    torch.manual_seed(0)
    with torch.no_grad():
        net.train()(torch.zeros([count, 1, 8, 8]), torch.ones([count]), labels)
        dropped = (seen[-1].abs().sum(1) == 0).float().mean().item()
        assert abs(dropped - 0.25) < 0.04, dropped  # 4 standard deviations of a binomial rate over 2000 labels
        kept = seen[-1].abs().sum(1) > 0
        scale = seen[-1][kept].abs().max()  # SongUNet feeds the one-hot × √label_dim to its embedding
        assert torch.allclose(seen[-1][kept], labels[kept] * scale)  # the others pass unchanged
        net.eval()(torch.zeros([count, 1, 8, 8]), torch.ones([count]), labels)
        assert torch.allclose(seen[-1], labels * scale)  # sampling never drops labels
    # Default 0: the options (and so the run) are today's; --cond-drop without --cond is one line.
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    options = json.loads(result.output[result.output.index('{'):result.output.index('\n}\n') + 2])
    assert 'label_dropout' not in options['network_kwargs']
    result = CliRunner().invoke(train.main, [a.replace('--cond=1', '--cond=0') for a in args] + ['--cond-drop=0.1'])
    assert result.exit_code != 0 and 'needs --cond=1' in result.output and 'Traceback' not in result.output


# ----------------------------------------------------------------------------------------------------------------
# generate.py end to end on tiny checkpoints.

@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """A conditional PFGM++ run trained 'with label dropout', an earlier checkpoint of it, one without dropout,
    and a guide that does not fit (other D)."""
    folder = tmp_path_factory.mktemp('guided')
    config = dict(tiny_config(label_dim=3), label_dropout=0.1)
    paths = dict(main=write_checkpoint(str(folder / 'training-state-000008.pt'), config, seed=5),
                 early=write_checkpoint(str(folder / 'training-state-000002.pt'), config, seed=6),
                 nodrop=write_checkpoint(str(folder / 'nodrop.pt'), tiny_config(label_dim=3), seed=5),
                 otherD=write_checkpoint(str(folder / 'other-d.pt'), dict(config, D=64.0), seed=5))
    return paths


def generate_to(out, network, *extra):
    result = CliRunner().invoke(generate.main, [f'--network={network}', f'--outdir={out}', '--seeds=0-3',
                                                '--steps=3', '--batch=4', *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_weight_one_gives_todays_bytes_and_other_weights_change_them(checkpoints, tmp_path):
    """Catches W = 1 running anything but the plain network, and guidance options silently ignored."""
    generate_to(str(tmp_path / 'plain'), checkpoints['main'])
    plain = read_bytes(str(tmp_path / 'plain'))
    generate_to(str(tmp_path / 'w1'), checkpoints['main'], '--guidance=1', '--guidance-interval=0.3,5')
    generate_to(str(tmp_path / 'ag1'), checkpoints['main'], '--guidance=1', f'--guide-network={checkpoints["early"]}')
    assert len(plain) == 4 and read_bytes(str(tmp_path / 'w1')) == plain and read_bytes(str(tmp_path / 'ag1')) == plain
    result = generate_to(str(tmp_path / 'cfg'), checkpoints['main'], '--guidance=3')
    assert 'the guide ran at 5 of 5 network evaluations' in result.output
    generate_to(str(tmp_path / 'ag'), checkpoints['main'], '--guidance=3', f'--guide-network={checkpoints["early"]}')
    # EDM's 18-step grid has 4 levels in [0.3, 5], each evaluated twice by Heun (docs/guidance.md quotes this line).
    result = generate_to(str(tmp_path / 'interval'), checkpoints['main'], '--guidance=3', '--steps=18',
                         '--guidance-interval=0.3,5', '--seeds=0')
    assert ('Guidance W=3, CFG (batched with the null label) for sigma in [0.3, 5]: the guide ran at 8 of 35 '
            'network evaluations (23%)') in result.output
    cfg, ag = read_bytes(str(tmp_path / 'cfg')), read_bytes(str(tmp_path / 'ag'))
    assert all(cfg[k] != plain[k] and ag[k] != plain[k] and ag[k] != cfg[k] for k in plain)


def test_cfg_at_weight_zero_is_sampling_with_the_null_label(checkpoints):
    """Catches CFG guiding with anything but the zero label (W = 0 leaves the guide alone)."""
    net = load_network(checkpoints['main'])
    net_call = generation.prepare_network(net)
    kwargs = dict(num_steps=4)
    seeds = [0, 1, 2]
    null = generation.generate_batch(net_call, seeds, kwargs, null_label=True)
    cfg0 = generation.generate_batch(guidance.guided(net_call, 0), seeds, kwargs)
    conditional = generation.generate_batch(net_call, seeds, kwargs)
    assert np.array_equal(generation.to_uint8(cfg0), generation.to_uint8(null))
    assert torch.allclose(cfg0, null, rtol=0, atol=1e-5)
    assert not np.array_equal(generation.to_uint8(conditional), generation.to_uint8(null))


@pytest.mark.parametrize('script, sweep, folders', [
    (generate_steps, '--step_list=2,3', ['ckpt_000008_ag2_gi0.5-10_steps_2', 'ckpt_000008_ag2_gi0.5-10_steps_3']),
    (generate_alpha, '--alpha_list=0,0.1', ['ckpt_000008_ag2_gi0.5-10_alpha_0', 'ckpt_000008_ag2_gi0.5-10_alpha_0.1']),
    (generate_quant, '--bits_list=6', ['ckpt_000008_ag2_gi0.5-10_quant_6']),
])
def test_run_dir_sweep_folder_names_say_what_was_guided(script, sweep, folders, checkpoints, tmp_path):
    """Catches guided images landing in the unguided folder (a rerun would then skip or mix them), and a sweep
    that drops the guidance options."""
    run = tmp_path / 'run'
    run.mkdir()
    os.link(checkpoints['main'], run / 'training-state-000008.pt')
    result = CliRunner().invoke(script.main, [f'--outdir={run}', '--seeds=0-1', '--steps=2', sweep, '--guidance=2',
                                              '--guidance-interval=0.5,10', f'--guide-network={checkpoints["early"]}'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p for p in os.listdir(run) if p.startswith('ckpt')) == folders
    assert result.output.count('Guidance W=2, autoguidance for sigma in [0.5, 10]') == len(folders)


def test_cfg_on_a_network_without_label_dropout_warns(checkpoints, tmp_path):
    result = generate_to(str(tmp_path / 'out'), checkpoints['nodrop'], '--guidance=2')
    assert 'Warning: ' in result.output and 'without label dropout' in result.output
    result = generate_to(str(tmp_path / 'out2'), checkpoints['main'], '--guidance=2')
    assert 'Warning' not in result.output


@pytest.mark.parametrize('args, message', [
    (['--network={main}', '--guidance=2', '--guide-network={otherD}'], 'D 64.0 (main network: 128.0)'),
    (['--network={main}', '--guidance=2', '--guide-network={missing}'], '--guide-network: '),
    (['--network={uncond}', '--guidance=2'], 'unconditional network'),
    (['--network={main}', '--guidance-interval=5,1'], 'sigma_lo < sigma_hi'),
    (['--network={main}', '--guidance=-1'], '--guidance'),
])
def test_bad_guidance_input_is_one_line_and_writes_nothing(args, message, checkpoints, tmp_path):
    uncond = write_checkpoint(str(tmp_path / 'uncond.pt'), tiny_config(), seed=1)
    paths = dict(checkpoints, missing=str(tmp_path / 'nope.pt'), uncond=uncond)
    out = tmp_path / 'out'
    out.mkdir()
    result = CliRunner().invoke(generate.main, [a.format(**paths) for a in args] + [f'--outdir={out}'])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and message in result.output, result.output
    assert 'Traceback' not in result.output and os.listdir(out) == []


def test_fid_reads_guided_folder_names_back_and_keeps_them_apart():
    """Catches fid.py dropping guided folders, or grouping them with unguided ones (the minimum over seed sets
    and the plotted lines would then mix guided and unguided FIDs)."""
    import fid
    names = {generation.folder_name(8, [0], 'steps', 5, guidance=guidance.folder_tag(*tag)): tag
             for tag in [(1, False), (2, False), (1.5, True, (0.3, 5)), (3, False, (0.01, float('inf')))]}
    names[generation.folder_name(8, [50000], 'steps', 5, 'dpm2m', {'end': 'stop'}, guidance='cfg2')] = 'dpm2m'
    names[generation.folder_name(8, [0], 'steps', 5, 'dpm2m', {'end': 'stop'}, ema_std=0.07,
                                  guidance='ag2')] = 'ema'
    assert sorted(names) == ['ckpt_000008_ag1.5_gi0.3-5_steps_5', 'ckpt_000008_cfg2_steps_5',
                             'ckpt_000008_cfg3_gi0.01-inf_steps_5', 'ckpt_000008_ema0.070_dpm2m_end-stop_ag2_steps_5',
                             'ckpt_000008_steps_5', 'ckpt_2_000008_dpm2m_end-stop_cfg2_steps_5']
    folders = []
    for name in names:
        fields = fid.parse_folder_name(name)
        assert fields is not None and (fields['kimg'], fields['axis'], fields['value']) == (8, 'steps', 5), name
        folders.append(fid.ImageFolder(name, **fields))
        folders[-1].fid = float(len(folders))
    tags = {f.name: (f.solver, f.guidance) for f in folders}
    assert tags['ckpt_000008_steps_5'] == ('heun', '') and tags['ckpt_000008_cfg2_steps_5'] == ('heun', 'cfg2')
    assert tags['ckpt_000008_ag1.5_gi0.3-5_steps_5'] == ('heun', 'ag1.5_gi0.3-5')
    assert tags['ckpt_2_000008_dpm2m_end-stop_cfg2_steps_5'] == ('dpm2m', 'cfg2')
    assert tags['ckpt_000008_ema0.070_dpm2m_end-stop_ag2_steps_5'] == ('dpm2m', 'ag2')
    assert len(fid.plot_lines(folders, 'steps')) == 6 and fid.min_over_seed_sets(folders) == {}
    for bad in ['ckpt_000008_cfg_steps_5', 'ckpt_000008_steps_5_cfg2', 'ckpt_000008_cfg2_gi0.3_steps_5']:
        assert fid.parse_folder_name(bad) is None, bad


def test_experiment_knows_the_class_generate_gives_each_seed(checkpoints, tmp_path):
    """Catches the experiment scoring samples against other classes than generate.py drew for them (a draw-order
    drift would make every accuracy wrong): each seed's image equals its image with --class set to that class."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import guidance_experiment
    net_call = generation.prepare_network(load_network(checkpoints['main']))
    seeds, kwargs = list(range(6)), dict(num_steps=2)
    wanted = guidance_experiment.seed_class_indices(net_call, seeds, kwargs)
    assert len(set(wanted.tolist())) > 1
    free = generation.generate_batch(net_call, seeds, kwargs)
    for i, (seed, label) in enumerate(zip(seeds, wanted)):
        fixed = generation.generate_batch(net_call, [seed], kwargs, class_idx=int(label))
        other = generation.generate_batch(net_call, [seed], kwargs, class_idx=int(label + 1) % 3)
        assert torch.allclose(free[i:i + 1], fixed, rtol=1e-5, atol=1e-5)  # batch 6 vs 1: rounding only
        assert not torch.allclose(free[i:i + 1], other, rtol=1e-2, atol=1e-2)
    # The classifier's data: the dataset's images with their labels, in [0, 1].
    data = make_image_zip(str(tmp_path / 'labelled.zip'), num=12, resolution=8, channels=1, labels=True)
    images, labels = guidance_experiment.read_labelled_zip(data)
    assert images.shape == (12, 64) and 0 <= images.min() and images.max() <= 1 and images.max() > 0.5
    assert sorted(labels.tolist()) == sorted(i % 10 for i in range(12))


def test_torchrun_two_ranks_match_one_process_with_autoguidance(checkpoints, tmp_path):
    """Catches guidance that depends on the rank or the batch (e.g. a guide loaded on one rank only)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [f'--network={checkpoints["main"]}', '--seeds=0-3', '--steps=3', '--batch=2', '--guidance=2',
            f'--guide-network={checkpoints["early"]}', '--guidance-interval=0.5,10']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    assert CliRunner().invoke(generate.main, args + [f'--outdir={one}']).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != 'PFGMPP_DEVICE'}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'generate.py', *args, f'--outdir={two}'], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_bytes(one) == read_bytes(two) and len(read_bytes(one)) == 4


def test_experiment_report_tabulates_what_was_measured_and_names_the_rest(tmp_path):
    """Catches the report putting a number in the wrong cell or curve, or hiding what is not measured yet."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import guidance_experiment as ge
    experiment = ge.Experiment(str(tmp_path / 'run'), 200, [1, 2, 4], (0.3, 5), None)
    entry = lambda kind, w, interval, acc, fid: dict(model='D=128', kind=kind, weight=w, interval=interval,
                                                     accuracy=acc, fid=fid)
    results = dict(classifier_real_accuracy=0.99, seconds={'a': 1800, 'b': 1800}, folders={
        'a': entry('cfg', 1.0, None, 0.80, 30.0), 'b': entry('cfg', 2.0, None, 0.90, 25.5),
        'c': entry('ag', 4.0, [0.3, 5], 0.85, 40.25), 'd': dict(entry('cfg', 4.0, None, 0.95, 0), fid=None)})
    del results['folders']['d']['fid']  # sampled and classified, FID not computed yet
    report = tmp_path / 'guidance.md'
    report.write_text(f'# Title\n\n{ge.MARK_BEGIN}\nold\n{ge.MARK_END}\ntail\n')
    ge.write_report(results, experiment, str(report))
    text = report.read_text()
    assert text.startswith('# Title\n\n') and text.endswith('\ntail\n') and 'old' not in text
    assert '| CFG | 0.800 / 30.0 | 0.900 / 25.5 | 0.950 / FID pending |' in text
    assert '| autoguidance, σ ∈ [0.3, 5] | 0.800 / 30.0 | not measured | 0.850 / 40.2 |' in text
    assert 'EDM: not measured yet.' in text and 'scores 0.990' in text and '1.00 h of work' in text
    assert (tmp_path / 'guidance.png').stat().st_size > 1000

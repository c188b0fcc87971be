"""generate.py and the sweep scripts end to end on tiny checkpoints; quantisation; bad input."""

import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import generate_alpha
import generate_quant
import fid
import generate_steps
from torch_utils import distributed
from training import generation
from training import sampler as sampling
from training.checkpoint import save_training_state, state_file_name
from training.networks import build_network
from training.quantize import fake_quantize, quantize_weights, select_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(D=128.0, label_dim=0, channels=1, resolution=8):
    return dict(class_name='EDMPrecond', img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                D=D, model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[], dropout=0.0)


def write_checkpoint(path, config, seed=0):
    """A 'trained' tiny checkpoint: random weights with a few Adam steps of denoising on random data."""
    torch.manual_seed(seed)
    net = build_network(config).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.rand([8, config['img_channels'], config['img_resolution'], config['img_resolution']]) * 2 - 1
    for _ in range(2):
        sigma = torch.exp(torch.randn(8) * 1.2 - 1.2)
        noisy = images + torch.randn_like(images) * sigma.reshape(-1, 1, 1, 1)
        loss = (net(noisy, sigma) - images).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    save_training_state(path, network_config=net.config, net_state=state, ema_state=state,
                        optimizer_state=opt.state_dict(), progress=dict(cur_nimg=16, cur_tick=1))
    return path


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A training run directory with two PFGM++ (D=128) checkpoints."""
    path = tmp_path_factory.mktemp('run')
    write_checkpoint(str(path / state_file_name(0)), tiny_config(), seed=0)
    write_checkpoint(str(path / state_file_name(2)), tiny_config(), seed=1)
    (path / 'log.txt').write_text('not a checkpoint')
    return str(path)


@pytest.fixture(scope='module')
def edm_cond_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('cond') / 'training-state-000004.pt'
    return write_checkpoint(str(path), tiny_config(D=None, label_dim=3, channels=3), seed=2)


def invoke(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    return result


def pngs(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
                  for f in files if f.endswith('.png'))


def read_bytes(folder):
    return {name: open(os.path.join(folder, name), 'rb').read() for name in pngs(folder)}


def pixels(folder, names):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in names])


# ----------------------------------------------------------------------------------------------------------------

def test_network_mode_writes_images_grid_and_is_batch_independent(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, state_file_name(2))
    out_a, out_b = str(tmp_path / 'a'), str(tmp_path / 'b')
    grid = str(tmp_path / 'grids' / 'grid.png')
    result = invoke(generate.main, [f'--network={ckpt}', f'--outdir={out_a}', '--seeds=3,0-4', '--batch=4', '--steps=2',
                                    f'--grid={grid}'])
    assert result.exit_code == 0, result.output
    assert pngs(out_a) == [f'{s:06d}.png' for s in range(5)]
    image = PIL.Image.open(os.path.join(out_a, '000003.png'))
    assert image.mode == 'L' and image.size == (8, 8)
    # The grid holds the first --batch images of the seed list (3, 0, 1, 2) in a 2×2 layout.
    grid_image = np.asarray(PIL.Image.open(grid))
    assert grid_image.shape == (16, 16)
    assert np.array_equal(grid_image[:8, :8], np.asarray(image))
    assert np.array_equal(grid_image[8:, 8:], np.asarray(PIL.Image.open(os.path.join(out_a, '000002.png'))))
    # Different batch size and seed order, with subdirectories: the same image per seed, up to the network's
    # batch-size-dependent rounding (README: a rare pixel may differ by one level).
    result = invoke(generate.main, [f'--network={ckpt}', f'--outdir={out_b}', '--seeds=4,2,0,1,3', '--batch=1', '--steps=2',
                                    '--subdirs'])
    assert result.exit_code == 0, result.output
    assert pngs(out_b) == [f'000000/{s:06d}.png' for s in range(5)]
    a = pixels(out_a, [f'{s:06d}.png' for s in range(5)])
    b = pixels(out_b, [f'000000/{s:06d}.png' for s in range(5)])
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())
    # Images differ between seeds (the sampler actually uses the seed).
    assert len(set(read_bytes(out_a).values())) == 5
    # The same seeds, batch size and device: the same bytes.
    out_c = str(tmp_path / 'c')
    assert invoke(generate.main, [f'--network={ckpt}', f'--outdir={out_c}', '--seeds=3,0-4', '--batch=4',
                                  '--steps=2']).exit_code == 0
    assert read_bytes(out_c) == read_bytes(out_a)


def test_run_dir_mode_layout_skip_and_completion(run_dir, tmp_path):
    out = str(tmp_path / 'run')
    shutil.copytree(run_dir, out)
    args = ['--seeds=0-2', f'--outdir={out}', '--pfgmpp=1', '--aug_dim=128', '--batch=2', '--steps=2']
    result = invoke(generate.main, args)
    assert result.exit_code == 0, result.output
    for kimg in (0, 2):
        assert pngs(os.path.join(out, f'ckpt_{kimg:06d}')) == [f'000000/{s:06d}.png' for s in range(3)]
    folder = os.path.join(out, 'ckpt_000002')
    before = read_bytes(folder)
    # Break the folder: one image missing, one truncated (a crash of a non-atomic writer).
    os.remove(os.path.join(folder, '000000', '000001.png'))
    path2 = os.path.join(folder, '000000', '000002.png')
    with open(path2, 'r+b') as f:
        f.truncate(30)
    mtime0 = os.stat(os.path.join(folder, '000000', '000000.png')).st_mtime_ns
    result = invoke(generate.main, args + ['--ckpt=1'])
    assert result.exit_code == 0, result.output
    assert read_bytes(folder) == before  # completed with the same bytes
    assert os.stat(os.path.join(folder, '000000', '000000.png')).st_mtime_ns == mtime0  # good images untouched
    assert 'skipped' not in result.output and 'Generating 2 images' in result.output
    result = invoke(generate.main, args)
    assert result.output.count('skipped') == 2
    # Seeds of the second 50k set go to ckpt_2_ folders.
    result = invoke(generate.main, ['--seeds=50000-50001', f'--outdir={out}', '--end_ckpt=0', '--steps=2'])
    assert result.exit_code == 0, result.output
    assert pngs(os.path.join(out, 'ckpt_2_000000')) == ['050000/050000.png', '050000/050001.png']
    assert not os.path.exists(os.path.join(out, 'ckpt_2_000002'))


def test_sweeps_write_their_folders(run_dir, tmp_path):
    out = str(tmp_path / 'sweep')
    os.makedirs(out)
    shutil.copy(os.path.join(run_dir, state_file_name(2)), out)
    common = ['--seeds=0-1', f'--outdir={out}', '--steps=3', '--batch=2']
    assert invoke(generate_alpha.main, common + ['--alpha_list=0,0.1']).exit_code == 0
    assert invoke(generate_steps.main, common + ['--step_list=2,3']).exit_code == 0
    result = invoke(generate_quant.main, common + ['--bits_list=4,8'])
    assert result.exit_code == 0, result.output
    expected = ['ckpt_000002_alpha_0', 'ckpt_000002_alpha_0.1', 'ckpt_000002_quant_4', 'ckpt_000002_quant_8',
                'ckpt_000002_steps_2', 'ckpt_000002_steps_3']
    assert sorted(d for d in os.listdir(out) if d.startswith('ckpt_')) == expected
    for name in expected:
        assert pngs(os.path.join(out, name)) == ['000000/000000.png', '000000/000001.png']
    folders = {name: read_bytes(os.path.join(out, name)) for name in expected}
    # α = 0 with 3 steps is the steps_3 run; other values really change the images.
    assert folders['ckpt_000002_alpha_0'] == folders['ckpt_000002_steps_3']
    assert folders['ckpt_000002_alpha_0.1'] != folders['ckpt_000002_alpha_0']
    assert folders['ckpt_000002_quant_4'] != folders['ckpt_000002_alpha_0']
    # --save_images: grids only (one per folder), no image files.
    result = invoke(generate_alpha.main, ['--seeds=0-3', f'--outdir={out}', '--steps=2', '--alpha_list=0.2',
                                          '--save_images'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(os.path.join(out, 'grid_ckpt_000002_alpha_0.2.png'))
    assert not os.path.exists(os.path.join(out, 'ckpt_000002_alpha_0.2'))


def test_solvers_and_nfe_in_every_script(run_dir, tmp_path):
    out, ref = str(tmp_path / 'solvers'), str(tmp_path / 'reference')
    for folder in (out, ref):
        os.makedirs(folder)
        shutil.copy(os.path.join(run_dir, state_file_name(2)), folder)
    common = ['--seeds=0-1', '--batch=2']
    assert invoke(generate_steps.main, common + [f'--outdir={out}', '--nfe_list=3,5']).exit_code == 0
    result = invoke(generate_steps.main, common + [f'--outdir={out}', '--solver=dpm2m', '--nfe_list=1,5'])
    assert result.exit_code == 0, result.output
    assert invoke(generate_alpha.main, common + [f'--outdir={out}', '--solver=dpm3m', '--nfe=5',
                                                 '--alpha_list=0']).exit_code == 0
    result = invoke(generate.main, common + [f'--outdir={out}', '--solver=ipndm', '--nfe=2', '--ending=denoise',
                                             '--afs=1', '--sigma_grid=logsnr', '--lower_order_final=0'])
    assert result.exit_code == 0, result.output
    assert invoke(generate_steps.main, common + [f'--outdir={ref}', '--step_list=2,3']).exit_code == 0
    assert invoke(generate_steps.main, common + [f'--outdir={ref}', '--solver=dpm3m', '--step_list=6']).exit_code == 0
    stop = 'end-stop_grid-rho_lof-1_afs-0'
    folders = sorted(d for d in os.listdir(out) if d.startswith('ckpt_'))
    assert folders == [f'ckpt_000002_dpm2m_{stop}_steps_2', f'ckpt_000002_dpm2m_{stop}_steps_6',
                       f'ckpt_000002_dpm3m_{stop}_alpha_0', 'ckpt_000002_ipndm_end-denoise_grid-logsnr_lof-0_afs-1',
                       'ckpt_000002_steps_2', 'ckpt_000002_steps_3']
    images = {name: read_bytes(os.path.join(out, name)) for name in folders}
    reference = {name: read_bytes(os.path.join(ref, name)) for name in os.listdir(ref) if name.startswith('ckpt_')}
    # Heun by NFE is Heun by steps (NFE 3, 5 = steps 2, 3); --nfe=5 for dpm3m stopping at σ_min is 6 steps;
    # solvers differ (with the lower-order final steps dpm3m reaches third order only with 5 moves or more).
    assert images['ckpt_000002_steps_2'] == reference['ckpt_000002_steps_2']
    assert images['ckpt_000002_steps_3'] == reference['ckpt_000002_steps_3']
    assert images[f'ckpt_000002_dpm3m_{stop}_alpha_0'] == reference[f'ckpt_000002_dpm3m_{stop}_steps_6']
    assert images[f'ckpt_000002_dpm2m_{stop}_steps_2'] != images['ckpt_000002_steps_2']
    assert images[f'ckpt_000002_dpm2m_{stop}_steps_6'] != images[f'ckpt_000002_dpm3m_{stop}_alpha_0']
    # fid.py reads every setting back: the NFE of each steps folder.
    nfes = {f.name: f.nfe for f in fid.find_image_folders(out) if f.axis == 'steps'}
    assert nfes == {'ckpt_000002_steps_2': 3, 'ckpt_000002_steps_3': 5, f'ckpt_000002_dpm2m_{stop}_steps_2': 1,
                    f'ckpt_000002_dpm2m_{stop}_steps_6': 5}
    # Options of the one-evaluation solvers with heun: one line, nothing written.
    result = CliRunner().invoke(generate.main, common + [f'--network={out}/{state_file_name(2)}',
                                                         f'--outdir={out}/heun', '--ending=stop'])
    assert result.exit_code == 1 and 'applies to the one-evaluation solvers' in result.output
    assert not os.path.exists(f'{out}/heun')
    # An impossible NFE in the list: one line, nothing written.
    result = CliRunner().invoke(generate_steps.main, common + [f'--outdir={out}', '--nfe_list=5,8'])
    assert result.exit_code == 2 and 'NFE 8 is impossible for heun' in result.output
    result = CliRunner().invoke(generate_steps.main, common + [f'--outdir={out}', '--nfe_list=5', '--step_list=3'])
    assert result.exit_code == 2 and 'not both' in result.output
    assert sorted(d for d in os.listdir(out) if d.startswith('ckpt_')) == folders


def test_multistep_solver_images_do_not_depend_on_batch_or_order(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, state_file_name(2))
    out_a, out_b = str(tmp_path / 'a'), str(tmp_path / 'b')
    for out, seeds, batch in [(out_a, '0-3', '4'), (out_b, '3,1,0,2', '1')]:
        result = invoke(generate.main, [f'--network={ckpt}', f'--outdir={out}', f'--seeds={seeds}', f'--batch={batch}',
                                        '--solver=ipndm', '--nfe=4'])
        assert result.exit_code == 0, result.output
    assert read_bytes(out_a) == read_bytes(out_b) and len(set(read_bytes(out_a).values())) == 4


def test_class_conditional_rgb(edm_cond_ckpt, tmp_path):
    out = str(tmp_path / 'cond')
    result = invoke(generate.main, [f'--network={edm_cond_ckpt}', f'--outdir={out}', '--seeds=0-1', '--steps=2',
                                    '--class=2'])
    assert result.exit_code == 0, result.output
    assert PIL.Image.open(os.path.join(out, '000000.png')).mode == 'RGB'
    # --class reaches the network: each class gives other images for the same seeds, and without --class each
    # seed's image is that of one of the classes (its own one-hot label, drawn from its generator).
    images = {2: pixels(out, ['000000.png', '000001.png'])}
    for label in (0, 1, None):
        other = str(tmp_path / f'class_{label}')
        args = [f'--network={edm_cond_ckpt}', f'--outdir={other}', '--seeds=0-1', '--steps=2']
        assert invoke(generate.main, args + ([f'--class={label}'] if label is not None else [])).exit_code == 0
        images[label] = pixels(other, ['000000.png', '000001.png'])
    for i in range(2):
        assert len({images[k][i].tobytes() for k in range(3)}) == 3
        assert sum(np.array_equal(images[None][i], images[k][i]) for k in range(3)) == 1
    # The EDM network accepts --pfgmpp=0.
    assert invoke(generate.main, [f'--network={edm_cond_ckpt}', f'--outdir={out}', '--seeds=0', '--steps=2',
                                  '--pfgmpp=0']).exit_code == 0


@pytest.mark.parametrize('args, message', [
    (['--network={missing}'], 'no such file'),
    (['--network={corrupt}'], 'corrupt.pt'),
    (['--network={pfgm}', '--aug_dim=64'], '--aug_dim=64 contradicts'),
    (['--network={pfgm}', '--pfgmpp=0'], 'wrong prior'),
    (['--network={edm}', '--pfgmpp=1'], 'diffusion'),
    (['--network={pfgm}', '--class=0'], 'unconditional'),
    (['--network={edm}', '--class=3'], 'out of range'),
    (['--network={pfgm}', '--seeds=1-x'], '--seeds'),
    (['--network={pfgm}', '--seeds=5-3'], 'no seeds'),
    (['--network={pfgm}', '--steps=1'], '--steps'),
    ([], 'no checkpoints'),
    (['--network={pfgm}', '--nfe=10'], 'NFE 10 is impossible for heun'),
    (['--network={pfgm}', '--solver=euler', '--nfe=1', '--ending=denoise'], 'impossible for euler'),
    (['--network={pfgm}', '--steps=3', '--nfe=5'], 'not both'),
    (['--network={pfgm}', '--solver=dpm2m', '--S_churn=1'], 'S_churn'),
    (['--network={pfgm}', '--solver=dpm3m', '--disc=vp'], 'cannot be combined'),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, run_dir, edm_cond_ckpt, tmp_path):
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'PK\x03\x04 this is not a checkpoint')
    paths = dict(missing=str(tmp_path / 'nope.pt'), corrupt=str(corrupt), pfgm=os.path.join(run_dir, state_file_name(2)),
                 edm=edm_cond_ckpt)
    out = tmp_path / 'out'
    out.mkdir()
    result = CliRunner().invoke(generate.main, [a.format(**paths) for a in args] + [f'--outdir={out}'])
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and message in result.output, result.output
    assert 'Traceback' not in result.output
    assert os.listdir(out) == []


def test_torchrun_two_ranks_match_one_process(run_dir, tmp_path):
    ckpt = os.path.join(run_dir, state_file_name(0))
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    assert invoke(generate.main, [f'--network={ckpt}', f'--outdir={one}', '--seeds=0-4', '--steps=2',
                                  '--batch=2']).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k != 'PFGMPP_DEVICE'}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'generate.py', f'--network={ckpt}', f'--outdir={two}', '--seeds=0-4', '--steps=2',
                           '--batch=2'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_bytes(one) == read_bytes(two) and len(read_bytes(one)) == 5


# ----------------------------------------------------------------------------------------------------------------
# Pieces.

def test_rank_batches_cover_every_seed_once():
    seeds = list(range(23))
    for world in (1, 2, 3):
        got = [s for r in range(world) for batch in distributed.rank_batches(seeds, 4, r, world) for s in batch]
        assert sorted(got) == seeds
        assert all(len(b) <= 4 for r in range(world) for b in distributed.rank_batches(seeds, 4, r, world))


def test_an_unknown_sweep_axis_is_a_value_error():
    """Catches the axis check crashing on its own message (None among the choices) instead of naming the axis."""
    with pytest.raises(ValueError, match="got 'bits'"):
        generation.run({}, 'cpu', axis='bits')


def test_folder_names():
    assert generation.folder_name(2500, [0, 1]) == 'ckpt_002500'
    assert generation.folder_name(2500, range(50000, 99999), 'alpha', 0.1) == 'ckpt_2_002500_alpha_0.1'
    assert generation.folder_name(7, range(100000, 100005), 'steps', 18) == 'ckpt_3_000007_steps_18'
    assert generation.folder_name(0, [0], 'alpha', 0.0) == 'ckpt_000000_alpha_0'
    assert generation.folder_name(7, [0], 'steps', 9, 'heun') == 'ckpt_000007_steps_9'
    assert generation.folder_name(7, [50000], 'steps', 9, 'dpm3m', {'end': 'stop'}) == \
        'ckpt_2_000007_dpm3m_end-stop_steps_9'
    fields = generation.sampler_fields('ipndm_v', dict(afs=True))
    assert generation.folder_name(7, [0], solver='ipndm_v', fields=fields) == \
        'ckpt_000007_ipndm_v_end-stop_grid-rho_lof-1_afs-1'
    assert generation.sampler_fields('heun', dict(num_steps=5)) == {}
    with pytest.raises(ValueError, match='folder-name field'):
        generation.folder_name(7, [0], solver='euler', fields={'end': 'a_b'})


def test_folder_names_read_back_every_setting():
    """parse_folder_name inverts folder_name for every solver, setting, seed set and axis, and leaves room for more
    fields. Catches a field lost or misread (a folder scored as another setting), and a folder of the solvers'
    earlier forms (no `end-` field) taken for the published ones."""
    for solver in sampling.SOLVERS:
        for options in [dict(), dict(ending='denoise', sigma_grid='logsnr', lower_order_final=False, afs=True)]:
            if solver == 'heun' and options:
                continue
            fields = generation.sampler_fields(solver, options)
            for seeds, seed_set, axis, value in [([0], 1, None, None), ([50000], 2, 'steps', 9),
                                                 ([100000], 3, 'alpha', 0.25)]:
                name = generation.folder_name(60, seeds, axis, value, solver, fields)
                assert generation.parse_folder_name(name) == dict(
                    seed_set=seed_set, kimg=60, solver=solver, fields={k: str(v) for k, v in fields.items()},
                    guidance='', axis=axis, value=value, ema_std=None), name
    more = generation.folder_name(60, [0], 'steps', 5, 'dpm2m', {'end': 'stop', 'guidance': 1.5, 'x': 'p-0.1'},
                                  ema_std=0.07)
    parsed = generation.parse_folder_name(more)
    assert parsed['fields'] == {'end': 'stop', 'guidance': '1.5', 'x': 'p-0.1'} and parsed['ema_std'] == 0.07
    for old in ['ckpt_000060_dpm2m_steps_5', 'ckpt_000060_dpm3m', 'ckpt_2_000060_ipndm_v_alpha_0.1']:
        assert generation.parse_folder_name(old) is None, old
    assert generation.parse_folder_name('ckpt_000060_steps_5')['solver'] == 'heun'
    assert generation.grid_file('g/grid.png', 'ckpt_000001') == 'g/grid_ckpt_000001.png'


def test_fake_quantize_matches_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn([64, 9], generator=g) * 0.3 + 0.05
    for bits in (2, 5, 8):
        got = fake_quantize(w, bits)
        # Brute force: the reference's arithmetic in float64 with Python scalars.
        lo, hi, qmax = float(w.min()), float(w.max()), 2 ** bits - 1
        scale = (hi - lo) / qmax
        zp = int(min(max(-lo / scale, 0), qmax))
        want = [scale * (min(max(round(zp + float(v) / scale), 0), qmax) - zp) for v in w.flatten().tolist()]
        assert torch.allclose(got.flatten().double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
        assert len(torch.unique(got)) <= 2 ** bits
        assert (got - w).abs().max() <= scale * 1.0 + 1e-6  # ≤ one level (zero-point truncation shifts the grid)
    assert torch.equal(fake_quantize(torch.full([3], 0.7), 4), torch.full([3], 0.7))


def test_quantisation_filters():
    net = build_network(dict(tiny_config(D=None, label_dim=2, resolution=32), channel_mult=[1, 1], augment_dim=9,
                              attn_resolutions=[16]))
    layers = select_weights(net, 'layers')
    reference = select_weights(net, 'reference')
    assert 'model.enc.32x32_conv.weight' in layers and 'model.enc.32x32_conv.weight' not in reference
    assert 'model.enc.16x16_block0.qkv.weight' in layers and 'model.enc.16x16_block0.qkv.weight' in reference
    assert 'model.enc.16x16_block0.affine.weight' in layers and 'model.enc.16x16_block0.affine.weight' not in reference
    for name in layers:
        assert 'norm' not in name and 'map_' not in name and name.endswith('weight')
    assert not any('map_' in n or 'norm' in n or '32' in n or 'affine' in n for n in reference)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    touched = quantize_weights(net, 3)
    after = net.state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) == (name not in touched), name

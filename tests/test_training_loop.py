"""The training loop's parts (stats, sampler, EMA, batching, RNG capture) and short in-process runs: exact resume,
STF with and without augmentation, gradient accumulation."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_helpers import make_image_zip, tiny_training_options
from torch_utils import misc, training_stats
import train
from training import checkpoint, training_loop


# ---------------------------------------------------------------------------------------------------------- stats


def test_collector_matches_numpy_moments():
    values = [np.random.RandomState(0).randn(7) * 3 + 1, torch.tensor([2.5, -1.0]), 4.0]
    collector = training_stats.Collector(regex='Test/moments')
    for value in values:
        training_stats.report('Test/moments', value)
    collector.update()
    flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in values]).astype(np.float64)
    assert collector.num('Test/moments') == flat.size
    assert collector.mean('Test/moments') == pytest.approx(flat.mean(), rel=1e-12)
    assert collector.std('Test/moments') == pytest.approx(flat.std(), rel=1e-9)
    assert collector.as_dict() == {'Test/moments': dict(num=flat.size, mean=collector.mean('Test/moments'),
                                                        std=collector.std('Test/moments'))}


def test_collector_resets_and_keeps_previous():
    collector = training_stats.Collector(regex='Test/keep')
    training_stats.report('Test/keep', [1.0, 3.0])
    collector.update()
    assert collector.mean('Test/keep') == 2.0
    collector.update()  # nothing new: previous statistics stay
    assert collector.num('Test/keep') == 2 and collector.mean('Test/keep') == 2.0
    training_stats.report('Test/keep', [10.0])
    collector.update()  # only what was reported since the last update
    assert collector.num('Test/keep') == 1 and collector.mean('Test/keep') == 10.0 and collector.std('Test/keep') == 0
    assert math.isnan(training_stats.Collector(regex='Test/none').mean('Test/none'))


# -------------------------------------------------------------------------------------------------------- sampler


def _take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_sampler_passes_are_permutations_and_ranks_split_the_stream():
    dataset = list(range(10))
    stream = _take(misc.InfiniteSampler(dataset, seed=3), 30)
    for start in range(0, 30, 10):
        assert sorted(stream[start:start + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh order every pass
    ranks = [_take(misc.InfiniteSampler(dataset, rank=r, num_replicas=3, seed=3), 10) for r in range(3)]
    assert [ranks[i % 3][i // 3] for i in range(30)] == stream


def test_sampler_resumes_at_any_position():
    dataset = list(range(7))
    for world in (1, 2):
        for start in (0, 4, 14, 20):
            for rank in range(world):
                full = _take(misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=5), 40)
                resumed = _take(misc.InfiniteSampler(dataset, rank=rank, num_replicas=world, seed=5, start=start), 10)
                assert resumed == full[start // world:start // world + 10]


# ----------------------------------------------------------------------------------------------- EMA, batch, RNG


def test_ema_beta_closed_form():
    # Half-life h images: after h images the old average weighs exactly one half.
    assert training_loop.ema_beta(512, 10 ** 9, 500, 0.05) ** (500_000 / 512) == pytest.approx(0.5)
    assert training_loop.ema_beta(512, 0, 500, 0.05) == 0  # first step copies the network
    assert training_loop.ema_beta(100, 4000, 500, 0.05) == pytest.approx(0.5 ** (100 / 200))  # ramp-up: 0.05·4000
    assert training_loop.ema_beta(100, 4000, 500, None) == pytest.approx(0.5 ** (100 / 500_000))


def test_update_ema_formula():
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    training_loop.update_ema(ema, net, 0.25)
    for old, new, target in zip(before, ema.parameters(), net.parameters()):
        torch.testing.assert_close(new, target + 0.25 * (old - target), rtol=0, atol=1e-7)


@pytest.mark.parametrize('batch, batch_gpu, world, expected', [
    (512, None, 8, (64, 1)), (512, 16, 8, (16, 4)), (512, 100, 1, None), (30, None, 4, None), (32, 64, 2, (16, 1))])
def test_batch_layout(batch, batch_gpu, world, expected):
    if expected is None:
        with pytest.raises(ValueError, match='batch size'):
            training_loop.batch_layout(batch, batch_gpu, world)
    else:
        assert training_loop.batch_layout(batch, batch_gpu, world) == expected


def test_rng_state_round_trip():
    state = misc.get_rng_state('cpu')
    expected = (torch.randn(5), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    misc.set_rng_state(state, 'cpu')
    torch.testing.assert_close(torch.randn(5), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


def test_copy_params_and_buffers():
    src, dst = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        src.weight.fill_(3)
        src.running_mean.fill_(2)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.running_mean, src.running_mean)
    with pytest.raises(ValueError, match='shape'):
        misc.copy_params_and_buffers(torch.nn.BatchNorm1d(5), dst)


def test_accumulated_gradients_equal_one_big_batch():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 6, dtype=torch.float64)
    images = torch.randn(12, 6, dtype=torch.float64)

    def deterministic_loss(model, x, labels, augment_pipe=None, ref_images=None):
        return (model(x) - x.flip(1)).square()

    training_loop.accumulate_gradients(net, deterministic_loss, images, None, None, None, 1 / 12, True)
    whole = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    for part in images.split(4):
        training_loop.accumulate_gradients(net, deterministic_loss, part, None, None, None, 1 / 12, True)
    for expected, param in zip(whole, net.parameters()):
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-12)


def test_optimizer_step_sanitises_gradients_and_sets_lr():
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([float('nan'), float('inf'), -float('inf')])
    optimizer = torch.optim.SGD([param], lr=1.0)
    holder = torch.nn.Module()
    holder.p = param
    training_loop.optimizer_step(holder, optimizer, lr=0.5, loss_scaling=2)
    assert optimizer.param_groups[0]['lr'] == 0.5
    torch.testing.assert_close(param.grad, torch.tensor([0, 1e5, -1e5]))
    torch.testing.assert_close(param.detach(), torch.tensor([0, -5e4, 5e4]))


class HostReads(TorchDispatchMode):
    """Records every operator that makes the host wait for the device: reading a value (.item(), bool(), float()
    of a tensor) or data-dependent shapes (nonzero, boolean-mask indexing)."""

    DATA_DEPENDENT = {'aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.unique',
                      'aten._unique2', 'aten.equal', 'aten.is_nonzero'}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        indices = args[1] if name in ('aten.index', 'aten.index_put', 'aten.index_put_') and len(args) > 1 else ()
        if name in self.DATA_DEPENDENT or any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ()):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_host_read_detector_sees_reads():
    values = torch.tensor([1.0, 2.0])
    with HostReads() as detector:
        values.sum().item(), bool(values[0] > 0), values[values > 1]
    assert detector.reads == ['aten._local_scalar_dense', 'aten._local_scalar_dense', 'aten.index'], detector.reads


@pytest.mark.parametrize('loss_kwargs', [dict(class_name='training.loss.EDMLoss', D=128.0),
                                         dict(class_name='training.loss.EDMLoss', D=128.0, stf=True),
                                         dict(class_name='training.loss.VPLoss', D=128.0),
                                         dict(class_name='training.loss.VELoss', D=128.0)])
def test_training_step_never_waits_for_the_device(loss_kwargs):
    # The "step free of host synchronisations": σ, the PFGM++ noise, augmentation, dropout, the loss
    # statistics, fused Adam and the EMA run without a single value read back (fused Adam exists on the CPU too).
    torch.manual_seed(0)
    net = training_loop.build_network(_options('')['network_kwargs'], 8, 3, 0, 128.0).train().requires_grad_(True)
    optimizer = training_loop.build_optimizer(_options('')['optimizer_kwargs'], net.parameters(), fused=True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = training_loop.build_loss(loss_kwargs)
    augment_pipe = training_loop.build_augment_pipe(train.augment_preset(0.5))
    images = torch.rand([8, 3, 8, 8]) * 2 - 1
    batch = (images[:4], torch.zeros([4, 0]), images)  # STF: 4 trained on, all 8 as the reference set
    for _ in range(2):  # the first step also creates Adam's state
        with HostReads() as detector:
            training_loop.training_step(net, net, net, optimizer, loss_fn, augment_pipe, lambda: batch, 2,
                                        grad_scale=0.25, lr=1e-3, loss_scaling=2)
            training_loop.update_ema(ema, net, 0.9)
        assert detector.reads == []
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------------ in-process runs


def _options(zip_path, **overrides):
    return tiny_training_options(zip_path, **overrides)


@pytest.fixture(scope='module')
def tiny_zip(tmp_path_factory):
    return make_image_zip(str(tmp_path_factory.mktemp('data') / 'tiny.zip'), num=40, resolution=8)


def _all_tensors(result):
    return {**{f'net.{k}': v for k, v in result.net.state_dict().items()},
            **{f'ema.{k}': v for k, v in result.ema.state_dict().items()}}


def test_resume_in_process_is_bit_identical(tiny_zip, tmp_path):
    (tmp_path / 'full').mkdir()
    (tmp_path / 'split').mkdir()
    full = training_loop.training_loop(run_dir=str(tmp_path / 'full'), **_options(tiny_zip))
    training_loop.training_loop(run_dir=str(tmp_path / 'split'), **_options(tiny_zip, total_kimg=0.032))
    # 0.032 kimg → state at cur_nimg 32 (file 000000); continue to 64 images.
    [(kimg, path)] = checkpoint.find_checkpoints(str(tmp_path / 'split'))
    assert checkpoint.load_training_state(path)['progress']['cur_nimg'] == 32
    resumed = training_loop.training_loop(run_dir=str(tmp_path / 'split'), resume_state_dump=path,
                                          **_options(tiny_zip))
    assert full.cur_nimg == resumed.cur_nimg == 64
    expected, actual = _all_tensors(full), _all_tensors(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert not torch.equal(expected['net.model.dec.8x8_aux_conv.weight'],
                           training_loop.build_network(_options(tiny_zip)['network_kwargs'], 8, 3, 0, 128.0)
                           .state_dict()['model.dec.8x8_aux_conv.weight'])  # it did train


@pytest.mark.parametrize('augment', [True, False])
def test_stf_trains_with_and_without_augmentation(tiny_zip, tmp_path, augment):
    overrides = dict(loss_kwargs=dict(class_name='training.loss.EDMLoss', D=128.0, stf=True), stf=True, rbatch=24,
                     batch_gpu=8, total_kimg=0.032)
    if not augment:
        overrides['augment_kwargs'] = None
        overrides['network_kwargs'] = dict(_options(tiny_zip)['network_kwargs'], augment_dim=0)
    result = training_loop.training_loop(run_dir=str(tmp_path), **_options(tiny_zip, **overrides))
    assert result.cur_nimg == 32
    assert all(torch.isfinite(t).all() for t in result.net.state_dict().values())
    [(_kimg, path)] = checkpoint.find_checkpoints(str(tmp_path))
    progress = checkpoint.load_training_state(path)['progress']
    assert progress['data_position'] == 2 * 2 * 24  # 2 steps × 2 accumulation rounds × rbatch rows


def test_stf_rbatch_smaller_than_micro_batch_is_rejected(tiny_zip, tmp_path):
    with pytest.raises(ValueError, match='rbatch'):
        training_loop.training_loop(run_dir=str(tmp_path), **_options(tiny_zip, stf=True, rbatch=4))


def test_transfer_initialises_net_and_ema_from_a_training_state(tiny_zip, tmp_path):
    (tmp_path / 'source').mkdir()
    (tmp_path / 'target').mkdir()
    training_loop.training_loop(run_dir=str(tmp_path / 'source'), **_options(tiny_zip, total_kimg=0.032))
    [(_kimg, source)] = checkpoint.find_checkpoints(str(tmp_path / 'source'))
    source_ema = checkpoint.load_training_state(source)['ema']
    # One step: its lr is 0 (ramp from cur_nimg 0), so Adam leaves the transferred weights exactly as they were.
    result = training_loop.training_loop(run_dir=str(tmp_path / 'target'), resume_pkl=source, ema_rampup_ratio=None,
                                         **_options(tiny_zip, total_kimg=0.016, seed=99))
    assert result.cur_nimg == 16
    for name, tensor in result.net.state_dict().items():
        assert torch.equal(tensor, source_ema[name]), name
    for name, tensor in result.ema.state_dict().items():
        assert torch.equal(tensor, source_ema[name]), name

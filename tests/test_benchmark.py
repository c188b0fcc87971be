"""benchmarks/throughput.py --quick runs on the CPU and writes its table (Markdown + JSON) with every row, and
its profile summary adds up."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import profile_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ['ref', 'bf16+compile+channels_last', 'bf16-native+compile+channels_last', 'fp16+compile+channels_last',
         'bf16', 'bf16-native', 'fp16', 'tf32', 'bf16+compile', 'bf16+compile+channels_last+autotune']
PARITY_MODES = ['fp32 repeat', 'bf16', 'bf16-native', 'fp16', 'tf32', 'bf16+compile+channels_last',
                'bf16-native+compile+channels_last']


@pytest.mark.parametrize('name, category', [
    ('sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64', 'conv/matmul'),
    ('void cudnn::engines_precompiled::nchwToNhwcKernel<float>', 'conv/matmul'),  # cuDNN's own layout change
    ('aten::mkldnn_convolution', 'conv/matmul'), ('aten::addmm', 'conv/matmul'), ('aten::mm', 'conv/matmul'),
    ('pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>', 'attention'),
    ('triton_red_fused_native_group_norm_silu_0', 'normalisation'), ('aten::native_group_norm', 'normalisation'),
    ('void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>', 'optimizer/EMA'),
    ('Memcpy HtoD (Pageable -> Device)', 'copy/layout'), ('aten::cat', 'copy/layout'),
    ('void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<normal>', 'random'),
    ('triton_poi_fused_add_mul_silu_3', 'element-wise'), ('aten::summary', 'element-wise'),
    ('aten::commit', 'element-wise')])
def test_kernel_categories(name, category):
    assert profile_summary.categorise(name) == category


def test_profile_summary_arithmetic():
    events = [('aten::convolution_backward', 3000.0, 6), ('triton_poi_fused_add_1', 1000.0, 30),
              ('Memset (Device)', 2000.0, 2)]
    summary = profile_summary.summarise(events, wall_s=0.012, units=2, top=2)
    assert summary['wall_ms'] == 6 and summary['device_ms'] == 3 and summary['busy'] == 0.5
    assert summary['launches'] == 19
    assert summary['categories']['conv/matmul'] == 1.5 and summary['categories']['copy/layout'] == 1.0
    assert sum(summary['categories'].values()) == summary['device_ms']
    assert [k['name'] for k in summary['top']] == ['aten::convolution_backward', 'Memset (Device)']


def test_quick_benchmark_writes_every_row(tmp_path):
    out = str(tmp_path / 'bench')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--quick',
                             f'--out={out}.md', '--device=cpu', '--profile'], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'FAILED' not in result.stdout, result.stdout

    report = json.load(open(out + '.json'))
    rows = {(row['arch'], row['mode']): row for row in report['rows']}
    assert list(rows) == [(arch, mode) for arch in ('ddpmpp', 'ncsnpp') for mode in MODES]
    for (arch, mode), row in rows.items():
        assert row['train'] == 'ok' and row['sample'] == 'ok', row
        assert row['train_img_s'] > 0 and row['sample_img_s'] > 0 and row['measured_nfe'] == 5
        ref = rows[(arch, 'ref')]
        assert row['train_ratio'] == pytest.approx(row['train_img_s'] / ref['train_img_s'], rel=1e-12)
        assert row['sample_ratio'] == pytest.approx(row['sample_img_s'] / ref['sample_img_s'], rel=1e-12)
        assert math.isfinite(row['sample_max_abs_diff']), row  # a NaN sample would show here
        for kind in ('train', 'sample'):
            summary = row[f'{kind}_profile']
            assert summary['device_ms'] > 0 and 0 < summary['busy'] <= 1.5 and summary['launches'] > 0, summary
            assert abs(sum(summary['categories'].values()) - summary['device_ms']) < 1e-6 * summary['device_ms']
            assert summary['categories']['conv/matmul'] > 0 and summary['top']
    assert rows[('ddpmpp', 'bf16')]['sample_max_abs_diff'] > 0  # bf16 really ran
    assert rows[('ddpmpp', 'bf16-native')]['sample_max_abs_diff'] > 0

    parity = {row['mode']: row for row in report['parity']}
    assert list(parity) == PARITY_MODES
    for mode, row in parity.items():
        assert row['status'] == 'ok' and row['parity_steps'] == 3, row
    assert parity['fp32 repeat']['loss_rel_diff_max'] == 0  # the CPU is deterministic
    assert 0 < parity['bf16']['loss_rel_diff_max'] < 1e-2

    markdown = open(out + '.md').read()
    assert markdown.count('| ddpmpp |') >= len(MODES) and markdown.count('| ncsnpp |') >= len(MODES)
    assert '## Where the device time goes (--profile)' in markdown and '| ddpmpp | ref | step |' in markdown
    assert report['meta']['torch'] == __import__('torch').__version__ and 'date' in report['meta']
    assert '| arch | mode | train img/s | × ref | peak GiB | compile s | sample img/s |' in result.stdout


def test_time_budget_marks_the_rest_skipped(tmp_path):
    out = str(tmp_path / 'bench')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--quick',
                             f'--out={out}', '--device=cpu', '--time-budget=0', '--archs=ddpmpp', '--modes=ref,bf16',
                             '--parity-modes=bf16'], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.load(open(out + '.json'))
    assert [(r['mode'], r['train'], r['sample']) for r in report['rows']] == [
        ('ref', 'skipped (time budget 0 s)', 'skipped (time budget 0 s)'),
        ('bf16', 'skipped (time budget 0 s)', 'skipped (time budget 0 s)')]
    assert [r['status'] for r in report['parity']] == ['skipped (time budget 0 s)'] * 2


def test_written_bytes_counts_outputs_and_in_place_writes_but_not_views():
    from benchmarks.activation_traffic import WrittenBytes
    a, b = torch.ones(10), torch.ones(10, dtype=torch.float64)
    with WrittenBytes() as counter:
        a.view(2, 5).t()  # views: nothing written
        a.add_(1)  # in place: 10 float32
        c = a.to(torch.bfloat16) * 2  # a cast and a product: 2 × 10 bfloat16
        b + 1  # 10 float64
    assert dict(counter.bytes) == {'float32': 40, 'bfloat16': 40, 'float64': 80} and counter.operators == 4
    assert c.dtype == torch.bfloat16


def test_activation_traffic_quick(tmp_path):
    out = str(tmp_path / 'traffic')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'activation_traffic.py'), '--quick',
                             f'--out={out}', '--compile=aot_eager'], cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(row['arch'], row['mode'], row['compiled']): row for row in json.load(open(out + '.json'))['rows']}
    assert list(rows) == [(arch, mode, compiled) for arch in ('ddpmpp', 'ncsnpp') for compiled in (False, True)
                          for mode in ('fp32', 'bf16', 'bf16-native')]
    for arch in ('ddpmpp', 'ncsnpp'):
        fp32, bf16, native = (rows[(arch, mode, False)] for mode in ('fp32', 'bf16', 'bf16-native'))
        # Native bfloat16 activations halve the per-image bytes; autocast adds casts on top of float32 traffic.
        assert native['per_image_mib'] < 0.6 * fp32['per_image_mib'] < 0.6 * bf16['per_image_mib']
        assert native['per_image_by_dtype_mib'].get('float32', 0) < 0.05 * native['per_image_mib']  # σ embedding
        assert bf16['operators'] > fp32['operators'] > 0
        assert native['saved_per_image_mib'] < bf16['saved_per_image_mib'] < fp32['saved_per_image_mib']
        compiled = [rows[(arch, mode, True)] for mode in ('fp32', 'bf16', 'bf16-native')]
        assert all('per_image_mib' not in row for row in compiled)  # compiled kernels are not counted one by one
        assert 0 < compiled[2]['saved_per_image_mib'] < compiled[1]['saved_per_image_mib']
    markdown = open(out + '.md').read()
    assert '| ddpmpp | bf16-native |' in markdown and '| ddpmpp | bf16-native (compiled) | – |' in markdown
    assert markdown == result.stdout

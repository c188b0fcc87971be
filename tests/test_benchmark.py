"""benchmarks/throughput.py --quick runs on the CPU and writes its table (Markdown + JSON) with every row."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ['ref', 'bf16+compile+channels_last', 'bf16+compile', 'bf16', 'fp16', 'tf32']
PARITY_MODES = ['fp32 repeat', 'bf16', 'fp16', 'tf32', 'bf16+compile+channels_last']


def test_quick_benchmark_writes_every_row(tmp_path):
    out = str(tmp_path / 'bench')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'), '--quick',
                             f'--out={out}.md', '--device=cpu'], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'FAILED' not in result.stdout, result.stdout

    report = json.load(open(out + '.json'))
    rows = {(row['arch'], row['mode']): row for row in report['rows']}
    assert list(rows) == [(arch, mode) for arch in ('ddpmpp', 'ncsnpp') for mode in MODES]
    for row in rows.values():
        assert row['train'] == 'ok' and row['sample'] == 'ok', row
        assert row['train_img_s'] > 0 and row['sample_img_s'] > 0 and row['measured_nfe'] == 5
        assert row['train_ratio'] > 0 and row['sample_ratio'] > 0
        assert row['sample_max_abs_diff'] >= 0
    assert rows[('ddpmpp', 'ref')]['train_ratio'] == 1 and rows[('ddpmpp', 'ref')]['sample_max_abs_diff'] == 0
    assert rows[('ddpmpp', 'bf16')]['sample_max_abs_diff'] > 0  # bf16 really ran

    parity = {row['mode']: row for row in report['parity']}
    assert list(parity) == PARITY_MODES
    for mode, row in parity.items():
        assert row['status'] == 'ok' and row['parity_steps'] == 3, row
    assert parity['fp32 repeat']['loss_rel_diff_max'] == 0  # the CPU is deterministic
    assert 0 < parity['bf16']['loss_rel_diff_max'] < 1e-2
    assert parity['tf32']['param_rel_diff'] == 0  # TF32 does nothing on the CPU

    markdown = open(out + '.md').read()
    assert markdown.count('| ddpmpp |') >= len(MODES) and markdown.count('| ncsnpp |') >= len(MODES)
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

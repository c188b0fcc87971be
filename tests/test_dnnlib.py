"""dnnlib.util helpers used by every front-end."""

import json

import numpy as np
import pytest
import torch

from dnnlib.util import check_choice, error_summary, parse_int_list, plain_data


def test_error_summary_is_one_line_and_never_fails():
    assert error_summary(ValueError('bad thing\n  at line 3')) == 'bad thing'
    assert error_summary(ValueError('\n\n  real message\nmore')) == 'real message'
    assert error_summary(RuntimeError()) == 'RuntimeError'  # an empty message still gives a line
    assert error_summary(KeyError('net')) == "'net'"
    worker = ValueError('Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                        'last):\n  File "x.py", line 1, in f\nValueError: bad image\n')
    assert error_summary(worker, last=True) == 'ValueError: bad image'
    assert error_summary(RuntimeError(), last=True) == 'RuntimeError'


def test_plain_data_is_json_and_weights_only_safe(tmp_path):
    value = {'a': (1, np.float64(0.5), np.int64(3), np.bool_(True)), 2: [torch.tensor(1.5), None, 'x'],
             'inf': float('inf'), 'dev': torch.device('cpu'), 'nested': {'t': (np.float32(0.25),)}}
    plain = plain_data(value)
    assert plain == {'a': [1, 0.5, 3, True], '2': [1.5, None, 'x'], 'inf': float('inf'), 'dev': 'cpu',
                     'nested': {'t': [0.25]}}
    types = [type(v) for v in plain['a']] + [type(plain['2'][0])]
    assert types == [int, float, int, bool, float]  # numpy and torch scalars become Python numbers
    assert json.loads(json.dumps(plain)) == plain
    torch.save(plain, tmp_path / 'p.pt')
    assert torch.load(tmp_path / 'p.pt', weights_only=True) == plain


def test_check_choice():
    check_choice('solver', 'heun', ('euler', 'heun'))
    with pytest.raises(ValueError, match="solver must be one of euler, heun, got 'rk4'"):
        check_choice('solver', 'rk4', ('euler', 'heun'))


@pytest.mark.parametrize('text, expected', [('1,2,5-7', [1, 2, 5, 6, 7]), ('0-3', [0, 1, 2, 3]), ('3-1', []),
                                            ('4,4', [4, 4])])
def test_parse_int_list_reference_rules(text, expected):
    assert parse_int_list(text) == expected

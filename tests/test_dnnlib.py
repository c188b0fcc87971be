"""dnnlib.util helpers used by every front-end."""

import pytest

from dnnlib.util import error_summary, parse_int_list


def test_error_summary_is_one_line_and_never_fails():
    assert error_summary(ValueError('bad thing\n  at line 3')) == 'bad thing'
    assert error_summary(ValueError('\n\n  real message\nmore')) == 'real message'
    assert error_summary(RuntimeError()) == 'RuntimeError'  # an empty message still gives a line
    assert error_summary(KeyError('net')) == "'net'"


@pytest.mark.parametrize('text, expected', [('1,2,5-7', [1, 2, 5, 6, 7]), ('0-3', [0, 1, 2, 3]), ('3-1', []),
                                            ('4,4', [4, 4])])
def test_parse_int_list_reference_rules(text, expected):
    assert parse_int_list(text) == expected

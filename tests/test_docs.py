"""The docs that are generated from code must match the code."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import make_help_docs  # noqa: E402


def test_help_docs_are_up_to_date():
    stale = []
    for doc, text in make_help_docs.render_help().items():
        path = os.path.join(ROOT, 'docs', doc)
        if not os.path.exists(path) or open(path).read() != text:
            stale.append(doc)
    assert not stale, f'regenerate with `python scripts/make_help_docs.py`: {stale}'


def test_every_cli_option_is_documented_in_its_help_file():
    # Each option name a user can type appears in the help file (guards against hidden options).
    import click
    for doc, (script, paths) in make_help_docs.HELP_DOCS.items():
        command = make_help_docs._load_command(script)
        text = open(os.path.join(ROOT, 'docs', doc)).read()
        commands = [command.commands[p[0]] if p else command for p in paths]
        for cmd in commands:
            for param in cmd.params:
                if isinstance(param, click.Option) and not param.hidden:
                    assert any(opt in text for opt in param.opts), f'{script}: {param.opts} missing from {doc}'

"""Write docs/*-help.txt from the CLIs themselves, so the docs can never drift from the code.

    python scripts/make_help_docs.py          # rewrite the files
    python scripts/make_help_docs.py --check  # exit 1 if any file is out of date (tests/test_docs.py does this)
"""

import os
import sys
import importlib.util

import click
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# doc file -> (script, [sub-command paths whose --help is appended])
HELP_DOCS = {
    'train-help.txt': ('train.py', [[]]),
    'generate-help.txt': ('generate.py', [[]]),
    'generate-alpha-help.txt': ('generate_alpha.py', [[]]),
    'generate-steps-help.txt': ('generate_steps.py', [[]]),
    'generate-quant-help.txt': ('generate_quant.py', [[]]),
    'fid-help.txt': ('fid.py', [[], ['calc'], ['ref']]),
    'dataset-tool-help.txt': ('dataset_tool.py', [[]]),
    'likelihood-help.txt': ('likelihood.py', [[]]),
    'reconstruct-ema-help.txt': ('reconstruct_ema.py', [[]]),
}


def _load_command(script):
    """Import a top-level script by path and return its click command; every script names it `main`."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    name = '_help_' + os.path.splitext(script)[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = getattr(module, 'main', None)
    if not isinstance(command, click.Command):
        raise RuntimeError(f'{script}: expected a click command named `main`')
    return command


def render_help():
    """{doc file name: help text} at a fixed width of 120 columns."""
    runner = CliRunner()
    docs = {}
    for doc, (script, paths) in HELP_DOCS.items():
        command = _load_command(script)
        parts = []
        for path in paths:
            result = runner.invoke(command, path + ['--help'], prog_name=f'python {script}', terminal_width=120)
            if result.exit_code != 0:
                raise RuntimeError(f'{script} {" ".join(path)} --help failed: {result.output}')
            parts.append(result.output)
        docs[doc] = '\n'.join(parts)
    return docs


def main():
    check = '--check' in sys.argv[1:]
    stale = []
    for doc, text in render_help().items():
        path = os.path.join(ROOT, 'docs', doc)
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            stale.append(doc)
            if not check:
                with open(path, 'w') as f:
                    f.write(text)
    if check and stale:
        print('out of date: ' + ', '.join(stale) + ' (run: python scripts/make_help_docs.py)')
        sys.exit(1)
    print(('stale: ' if check else 'written: ') + (', '.join(stale) or 'nothing'))


if __name__ == '__main__':
    main()

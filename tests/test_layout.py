"""The package layout the docs promise (docs/internals.md, Conventions): the library knows nothing of click, imports
point down (scripts → training → torch_utils → dnnlib) and no two library modules import each other, not even
inside a function."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ['training', 'torch_utils', 'dnnlib']  # each may import only the ones after it


def library_modules():
    """{'training.sampler': path, ...} for every module of the three packages."""
    found = {}
    for package in LAYERS:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith('.py'):
                module = package if name == '__init__.py' else f'{package}.{name[:-3]}'
                found[module] = os.path.join(ROOT, package, name)
    return found


def imported_names(path):
    """Every module name an import statement in the file names, wherever the statement stands; `from a import b`
    gives both a and a.b (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names


def test_import_scanner_sees_imports_inside_functions(tmp_path):
    """The scanner must see a deferred import (how the old checkpoint ⇄ legacy cycle hid)."""
    path = tmp_path / 'm.py'
    path.write_text('def f():\n    from training.legacy import load_legacy_network\n    import click\n')
    assert {'training.legacy', 'training.legacy.load_legacy_network', 'click'} <= imported_names(str(path))


@pytest.mark.parametrize('module', sorted(library_modules()))
def test_library_module_imports_no_click_and_only_lower_layers(module):
    """Catches click creeping back into the library (generation.py used to raise ClickException) and an upward
    import (e.g. torch_utils importing training)."""
    names = imported_names(library_modules()[module])
    assert not any(name == 'click' or name.startswith('click.') for name in names), module
    layer = LAYERS.index(module.split('.')[0])
    for name in names:
        top = name.split('.')[0]
        if top in LAYERS:
            assert LAYERS.index(top) >= layer, f'{module} imports {name}, a layer above it'
        scripts = ('train', 'generate', 'generate_alpha', 'generate_steps', 'generate_quant', 'fid', 'dataset_tool',
                   'likelihood', 'reconstruct_ema')
        assert top not in scripts, f'{module} imports the script {name}'


def test_library_modules_import_no_cycle():
    """Catches a cycle such as checkpoint.py ⇄ legacy.py (a deferred import included)."""
    modules = library_modules()
    graph = {module: {name for name in imported_names(path) if name in modules and name != module}
             for module, path in modules.items()}

    def find_cycle(start, path):
        for nxt in graph[start]:
            if nxt == path[0]:
                return path + [nxt]
            if nxt not in path:
                cycle = find_cycle(nxt, path + [nxt])
                if cycle:
                    return cycle
        return None

    for module in graph:
        cycle = find_cycle(module, [module])
        assert cycle is None, ' -> '.join(cycle)

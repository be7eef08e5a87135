"""The book as a reader finds it, without running anything: the chapters carry their saved figures and no
error output, every notebook is small and opens the same way, and the exported code is shown or tested
beside it (the literate measure). Regenerate the outputs with tools/run_notebooks.sh."""
import ast, json, re
from pathlib import Path
import pytest
from conftest import REPO

NBS = REPO/'nbs'
CHAPTERS = ['00_data', '01_attention', '02_gpt', '03_train', '04_generate', '05_tokenizer']
NOTEBOOKS = sorted(p.stem for p in NBS.glob('*.ipynb'))
MAX_BYTES = 1_000_000
MIN_IMAGES = 8  # across the chapters
LITERATE = 0.9  # share of exported names shown or tested in a non-export cell
EXPORT = re.compile(r'^\s*#\s*\|\s*export', re.M)

def _nb(name) -> dict: return json.loads((NBS/f'{name}.ipynb').read_text(encoding='utf-8'))
def _src(cell) -> str: return ''.join(cell['source'])
def _outputs(nb) -> list: return [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
def _images(nb) -> int: return sum(any(k.startswith('image/') for k in o.get('data', {})) for o in _outputs(nb))

def _errors(nb) -> list:
    "Error outputs, and tracebacks printed on stderr"
    out = []
    for o in _outputs(nb):
        if o['output_type'] == 'error': out.append(f"{o.get('ename')}: {o.get('evalue')}")
        text = ''.join(o.get('text', '')) if o['output_type'] == 'stream' else ''
        if o.get('name') == 'stderr' and 'Traceback' in text: out.append(text[-300:])
    return out

def test_the_chapters_exist():
    assert set(CHAPTERS) <= set(NOTEBOOKS), sorted(set(CHAPTERS) - set(NOTEBOOKS))

@pytest.mark.parametrize('name', CHAPTERS)
def test_each_chapter_shows_a_figure(name):
    assert _images(_nb(name)) >= 1, f'{name} has no saved image: run tools/run_notebooks.sh {name}'

def test_the_chapters_show_enough_figures():
    counts = {n: _images(_nb(n)) for n in CHAPTERS}
    assert sum(counts.values()) >= MIN_IMAGES, counts

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_no_error_output_and_small(name):
    assert _errors(_nb(name)) == []
    size = (NBS/f'{name}.ipynb').stat().st_size
    assert size < MAX_BYTES, f'{name}.ipynb is {size:,} bytes; figures at dpi <= 100, no long logs'

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_each_notebook_opens_with_its_module_a_title_and_a_summary(name):
    cells = _nb(name)['cells']
    first_md = next(c for c in cells if c['cell_type'] == 'markdown')
    lines = [l for l in _src(first_md).splitlines() if l.strip()]
    assert cells.index(first_md) <= 1 and lines[0].startswith('# ') and lines[1].startswith('> '), lines[:2]
    if name != 'index':  # the landing page exports nothing
        assert any(_src(c).startswith('#| default_exp ') for c in cells[:3] if c['cell_type'] == 'code'), name

def _exported_names() -> dict:
    "{name: module} for every name in a module's `__all__`, console-script entry points aside"
    names = {}
    for py in sorted((REPO/'munchkin_nb').glob('*.py')):
        for node in ast.parse(py.read_text(encoding='utf-8')).body:
            if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == '__all__' for t in node.targets):
                names.update({n: py.stem for n in ast.literal_eval(node.value) if not n.endswith(('_cli', '_main'))})
    return names

def test_exported_names_are_shown_or_tested():
    "The literate measure: each exported name appears in a non-export code cell of some notebook"
    shown = '\n'.join(_src(c) for n in NOTEBOOKS for c in _nb(n)['cells']
                      if c['cell_type'] == 'code' and not EXPORT.search(_src(c)))
    names = _exported_names()
    missing = sorted(f'{m}.{n}' for n, m in names.items() if not re.search(rf'\b{re.escape(n)}\b', shown))
    share = 1 - len(missing) / len(names)
    assert share >= LITERATE, f'{share:.0%} of {len(names)} exported names shown or tested; not: {", ".join(missing)}'

def test_index_shows_the_readme_commands():
    "The landing page and the README give the same two commands"
    readme = (REPO/'README.md').read_text(encoding='utf-8')
    index = '\n'.join(_src(c) for c in _nb('index')['cells'])
    for block in ('main-command', 'test-command'):
        cmd = re.search(rf'<!-- {block} -->\s*```bash\n(.+?)\n```', readme, re.S).group(1)
        assert cmd in index, f'index.ipynb does not show the README {block}: {cmd}'

"""Saved outputs are checked against the code that makes them. Every notebook in nbs/ runs top to bottom
in a fresh kernel, as `nbdev_test` runs it (the same cells: those flagged `#| notest` or `#| slow`, and
`#| eval: false`, are skipped; the kernel starts in nbs/) and as tools/run_notebooks.sh saves it (nbclient,
streams coalesced), with tiny Shakespeare prepared in both its datasets in a temporary root, offline. Each cell's fresh text output must equal its saved one,
so a message changed in the code fails here until the notebook is run again (tools/run_notebooks.sh).

Numbers with a decimal point may differ by float noise (0.1%, or one unit of their last digit):
another CPU sums in another order. A cell whose output is a measurement (a time, a speed, a process
id, a machine's name, a result that depends on the machine or its load) carries the directive
`#| measured` among its leading `#|` lines. Its output is compared by shape: every number, yes/no,
lone `-` (a table's empty cell) and CPU or GPU name becomes `#` and runs of spaces one space, then
the lines must match one for one. nbdev 2.4.14 collects unknown `#|` directives and ignores them (no
warning from nbdev_export, nbdev_clean or nbdev_test; nbdev_docs drops them from the page as it
drops `#| notest`). Images are compared by presence, never by pixels. A cell that fails or whose
output went stale fails its notebook's test with the cell's index, its first line and a diff of
the saved and the fresh text.

Every saved output of every notebook must also be free of colour escape codes and of paths of the
machine that ran it (a temporary root, a home folder): the book is read on other machines.

Runs two notebooks at a time (MUNCHKIN_NOTEBOOK_WORKERS to change it); by itself:
`pytest tests/test_outputs.py`."""
import copy, difflib, json, os, re, shutil, subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbdev.clean import clean_nb
from conftest import REPO, BIN

NBS = REPO/'nbs'
NOTEBOOKS = sorted(p.stem for p in NBS.glob('*.ipynb'))
SKIP_FLAGS = ('notest', 'slow')  # settings.ini's tst_flags, as nbdev_test reads them
COST = {'14_cpu_speed': 23, '03_train': 22, '15_bench': 19, '16_runs': 17, '04_generate': 14,
        '05_tokenizer': 11, '02_gpt': 10}  # s, one at a time on the AMD EPYC: the long ones start first
CELL_TIMEOUT = 600  # s

_DIRECTIVES = re.compile(r'\A(?:[ \t]*(?:#\s*\|[^\n]*)?\n)*')  # the leading `#|` lines (and blank ones)
_ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
_MACHINE_PATH = re.compile(r'(?<![\w.~$])(?:/(?:tmp|root|home|work|Users|private|mnt|var/folders)/|[A-Z]:\\\\?Users)')
_NUMBER = re.compile(r'[-+]?\d[\d,._]*(?:[eE][-+]?\d+)?')
_VALUE = re.compile(_NUMBER.pattern + r'|\b(?:yes|no|True|False)\b|(?<!\S)-(?!\S)')
_MACHINE = re.compile(r"\b(?:Intel|AMD|Apple|Arm|ARM|Ampere|NVIDIA|Qualcomm)\b(?:\((?:R|TM)\)|[^(),'\"\n])*")
RTOL = 1e-3

def directives(cell) -> set:
    "The names in a code cell's leading `#|` lines: `#| notest` gives {'notest'}, `#| eval: false` {'eval:false'}"
    head = _DIRECTIVES.match(''.join(cell['source'])).group(0)
    return {re.sub(r'\s+', '', l.split('|', 1)[1]).lower() for l in head.splitlines() if '|' in l}

def skipped(cell) -> bool:
    "Whether nbdev_test skips this cell: not code, flagged, `#| eval: false`, or calling nbdev_export"
    if cell['cell_type'] != 'code': return True
    d = directives(cell)
    return bool(d & set(SKIP_FLAGS)) or 'eval:false' in d or 'nbdev_export(' in ''.join(cell['source'])

def measured(cell) -> bool: return 'measured' in directives(cell)

def texts(cell) -> list:
    "A cell's outputs as `kind: text` strings, each stream's text as one; an image is its kind alone"
    out, streams = [], {}
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream':  # as nbclient's coalesce_streams joins them
            if o['name'] not in streams: streams[o['name']] = len(out); out.append(f"{o['name']}: ")
            out[streams[o['name']]] += ''.join(o['text'])
        elif o['output_type'] == 'error': out.append(f"error: {o['ename']}: {o['evalue']}")
        else:
            data = o.get('data', {})
            out += [f'{k}: (image)' for k in sorted(data) if k.startswith('image/')]
            if 'text/plain' in data: out.append(f"{o['output_type']}: {''.join(data['text/plain'])}")
    return out

def _chosen() -> re.Pattern:
    "Names a measurement picks by timing on the machine it runs on: decode routes, the best weight reader"
    from munchkin_nb.kernels import DECODE_ROUTES
    names = {r for routes in DECODE_ROUTES.values() for r in routes} | {'sum', 'mv'}
    return re.compile(r'(?<![\w-])(?:%s)(?![\w-])' % '|'.join(sorted(names)))

def shape(text:str) -> str:
    "What a measurement keeps of `text`: values, machine names and timed choices as `#`, spaces as one"
    rx = _chosen()
    return '\n'.join(' '.join(rx.sub('#', _VALUE.sub('#', _MACHINE.sub('#', l))).split()) for l in text.splitlines())

def _close(a:str, b:str) -> bool:
    "Whether two printed numbers agree: equal, or decimals within float noise"
    if a == b: return True
    if not any(c in a + b for c in '.eE'): return False  # integers: counts, exactly
    try: x, y = float(a.replace(',', '').replace('_', '')), float(b.replace(',', '').replace('_', ''))
    except ValueError: return False
    unit = 10.0 ** -max(len(a.partition('.')[2]), len(b.partition('.')[2])) if 'e' not in (a + b).lower() else 0
    return abs(x - y) <= RTOL * max(abs(x), abs(y)) + unit

def same(a:str, b:str) -> bool:
    "Whether two output texts say the same: the same words, numbers equal up to float noise"
    na, nb = _NUMBER.findall(a), _NUMBER.findall(b)
    return _NUMBER.sub('#', a) == _NUMBER.sub('#', b) and len(na) == len(nb) and all(map(_close, na, nb))

def stale(saved, fresh, name='', index=0) -> str:
    "'' when `fresh` (a cell just run) shows what `saved` shows, else the notebook, cell and a diff"
    a, b = texts(saved), texts(fresh)
    if measured(saved): a, b = [shape(t) for t in a], [shape(t) for t in b]
    if len(a) == len(b) and all(map(same, a, b)): return ''
    first = next((l for l in ''.join(saved['source']).splitlines() if not l.lstrip().startswith('#|')), '')
    diff = difflib.unified_diff('\n'.join(a).splitlines(), '\n'.join(b).splitlines(), 'saved', 'fresh', lineterm='', n=2)
    how = ' (compared by shape: `#| measured`)' if measured(saved) else ''
    return f"{name} cell {index} `{first[:80]}`: saved output differs from a fresh run{how}\n" + '\n'.join(diff)

def output_text(o) -> str:
    "All the text an output holds: a stream, every text/* representation, an error's traceback"
    if o['output_type'] == 'stream': return ''.join(o['text'])
    if o['output_type'] == 'error': return '\n'.join([o['ename'], o['evalue'], *o['traceback']])
    return '\n'.join(''.join(v) for k, v in o.get('data', {}).items() if k.startswith('text/') or k.endswith('json') and isinstance(v, str))

def unclean(nb, name='') -> list:
    "Saved outputs holding colour escape codes or a machine's paths: 'notebook cell N: ...' each"
    bad = []
    for i, cell in enumerate(nb['cells']):
        for o in cell.get('outputs', []):
            t = output_text(o)
            for rx, what in ((_ANSI, 'escape code'), (_MACHINE_PATH, 'machine path')):
                if m := rx.search(t): bad.append(f'{name} cell {i}: {what} in {t[max(0, m.start() - 40):m.end() + 40]!r}')
    return bad

def execute(path:Path, env:dict) -> tuple:
    "Run the notebook at `path` in a fresh kernel (cwd: its folder), skipping what nbdev_test skips: (saved, fresh)"
    saved = nbformat.read(path, as_version=4)
    fresh = copy.deepcopy(saved)
    client = NotebookClient(fresh, timeout=CELL_TIMEOUT, kernel_name='python3', coalesce_streams=True,
                            resources={'metadata': {'path': str(path.parent)}})
    with client.setup_kernel(env=env):
        for i, cell in enumerate(fresh.cells):
            if not skipped(cell): client.execute_cell(cell, i)
    clean_nb(fresh)  # as tools/run_notebooks.sh's nbdev_clean: `<... at 0x7f..>` loses its address
    return saved, fresh

DATASETS = ('shakespeare_char', 'shakespeare')  # prepared before any notebook runs, as run_notebooks.sh does

def kernel_env() -> dict:
    "The environment a notebook's kernel gets: this one, less what would change its outputs"
    import munchkin_nb
    drop = {'MPLBACKEND', 'FORCE_COLOR', 'CLICOLOR_FORCE'} | ({'GOMP_SPINCOUNT'} if munchkin_nb.spin_default else set())
    return {k: v for k, v in os.environ.items() if k not in drop}  # the package set GOMP_SPINCOUNT, not the user

@pytest.fixture(scope='session')
def prepared_root(tmp_path_factory, shakespeare_path) -> Path:
    "A MUNCHKIN_ROOT with tiny Shakespeare prepared as both of its datasets"
    root = tmp_path_factory.mktemp('prepared-root')
    env = {**kernel_env(), 'MUNCHKIN_ROOT': str(root)}
    for ds in DATASETS:
        (root/'etc'/'dataset'/ds).mkdir(parents=True)
        shutil.copy(shakespeare_path, root/'etc'/'dataset'/ds/'input.txt')
        subprocess.run([BIN/'munchkin-nb-prepare', ds], env=env, check=True, capture_output=True)
    return root

@pytest.fixture(scope='session')
def runs(request, tmp_path_factory, prepared_root):
    "{notebook: future of (saved, fresh)}, for the notebooks this session tests, run a few at a time"
    wanted = {it.callspec.params['name'] for it in request.session.items
              if it.originalname == 'test_saved_outputs_are_fresh' and hasattr(it, 'callspec')}
    env = kernel_env()
    workers = int(os.environ.get('MUNCHKIN_NOTEBOOK_WORKERS', min(2, os.cpu_count() or 1)))
    pool = ThreadPoolExecutor(max(workers, 1))
    futures = {}
    for name in sorted(wanted, key=lambda n: -COST.get(n, 10)):
        root = tmp_path_factory.mktemp(f'root-{name}')/'root'
        shutil.copytree(prepared_root, root)
        futures[name] = pool.submit(execute, NBS/f'{name}.ipynb', {**env, 'MUNCHKIN_ROOT': str(root)})
    yield futures
    for f in futures.values(): f.cancel()
    pool.shutdown(wait=True)

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_saved_outputs_are_fresh(name, runs):
    try:
        saved, fresh = runs[name].result()
    except CellExecutionError as e:
        pytest.fail(f'{name} fails in a fresh kernel:\n{e}', pytrace=False)
    problems = [s for i, (a, b) in enumerate(zip(saved.cells, fresh.cells)) if not skipped(a) and (s := stale(a, b, name, i))]
    assert not problems, (f'{len(problems)} stale output(s) in {name}; run tools/run_notebooks.sh {name} '
                          'or mark a measurement `#| measured`\n\n' + '\n\n'.join(problems))

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_saved_outputs_have_no_escape_codes_or_machine_paths(name):
    bad = unclean(json.loads((NBS/f'{name}.ipynb').read_text(encoding='utf-8')), name)
    assert not bad, '\n'.join(bad)

# The comparison itself, on made-up cells and on a notebook run for real

def _cell(source, *outputs):
    return nbformat.v4.new_code_cell(source, outputs=[nbformat.v4.new_output('stream', name='stdout', text=t) for t in outputs])

def test_a_changed_message_is_stale():
    "04_generate once saved a message its code no longer printed; this is how that reads now"
    saved = _cell("print(check('bf16'))", "weights 'bf16'/'int8' are not supported yet\n")
    fresh = _cell("print(check('bf16'))", "weights 'bf16' load as bfloat16\n")
    msg = stale(saved, fresh, '04_generate', 7)
    assert msg.startswith("04_generate cell 7 `print(check('bf16'))`: saved output differs"), msg
    assert "-stdout: weights 'bf16'/'int8' are not supported yet" in msg and "+stdout: weights 'bf16' load as bfloat16" in msg
    assert stale(saved, copy.deepcopy(saved)) == ''

def test_a_measurement_is_compared_by_shape():
    saved = _cell('#| measured\nprint(timing())', 'step 483.8 ms, mfu 20%\n')
    assert stale(saved, _cell('', 'step 27.3 ms, mfu 44%\n')) == ''
    assert stale(saved, _cell('', 'step   1,027.3 ms, mfu 144%\n')) == ''  # wider numbers, realigned
    assert 'compared by shape' in stale(saved, _cell('', 'step 27.3 s, mfu 44%\n'))  # a unit changed
    assert stale(saved, _cell('', 'step 27.3 ms, mfu 44%\nwarm-up 3 ms\n'))  # a line more
    assert stale(_cell('print(timing())', 'step 483.8 ms\n'), _cell('', 'step 27.3 ms\n'))  # unmarked: by value
    route = _cell('#| measured\nprint(bench())', 'best reader: sum\nfp32  onednn  49.0 tok/s\n')
    assert stale(route, _cell('', 'best reader: mv\nfp32  linear  27.9 tok/s\n')) == ''  # chosen by timing here
    assert stale(route, _cell('', 'best reader: sum\nbf16  onednn  49.0 tok/s\n'))  # a format is not a choice
    saved = _cell('#| measured\nprint(report())', 'device: Intel(R) Xeon(R) Processor (cpu, 2 threads)\nbf16  yes  -\n')
    assert stale(saved, _cell('', 'device: AMD EPYC 7R13 (cpu, 1 threads)\nbf16  no  1.5\n')) == ''

def test_float_noise_is_not_staleness():
    "Another CPU adds in another order: the last digits of a float may move, nothing else"
    saved = _cell('print(losses())', "iter 120: loss 2.6401, best 2.440937042236328, 1,003,854 tokens\n")
    assert stale(saved, _cell('', "iter 120: loss 2.6402, best 2.4409375190734863, 1,003,854 tokens\n")) == ''
    assert stale(saved, _cell('', "iter 120: loss 2.7000, best 2.440937042236328, 1,003,854 tokens\n"))
    assert stale(saved, _cell('', "iter 120: loss 2.6401, best 2.440937042236328, 1,003,855 tokens\n"))  # a count
    assert stale(saved, _cell('', "iter 121: loss 2.6401, best 2.440937042236328, 1,003,854 tokens\n"))

def test_images_by_presence():
    png = lambda b: nbformat.v4.new_output('display_data', data={'image/png': b, 'text/plain': '<Figure size 640x480 with 1 Axes>'})
    saved, fresh = _cell('plot()'), _cell('plot()')
    saved.outputs, fresh.outputs = [png('aGVsbG8=')], [png('d29ybGQ=')]
    assert stale(saved, fresh) == ''
    fresh.outputs = []
    assert 'image/png' in stale(saved, fresh)

def test_directives_and_skips():
    assert directives(_cell('#| notest\n#|measured\nx = 1')) == {'notest', 'measured'}
    assert skipped(_cell('#| slow\nx = 1')) and skipped(_cell('#| eval: false\nx')) and not skipped(_cell('x = 1 #| notest'))
    assert not measured(_cell('x = 1\n#| measured'))  # directives lead the cell

def test_escape_codes_and_machine_paths_are_found():
    nb = nbformat.v4.new_notebook(cells=[_cell('', 'in /tmp/tmpab12/etc/dataset/alice\n'), _cell('', '\x1b[32mok\x1b[0m\n'),
                                         _cell('', 'in $MUNCHKIN_ROOT/etc/dataset/alice, see ./tmp/x and etc/dataset\n')])
    bad = unclean(nb, 'x')
    assert len(bad) == 2 and 'cell 0: machine path' in bad[0] and 'cell 1: escape code' in bad[1], bad

def test_a_stale_notebook_fails_when_run(tmp_path):
    "End to end: a notebook whose saved output came from older code, run in a kernel"
    nb = nbformat.v4.new_notebook(cells=[
        _cell("msg = 'weights bf16 load'\nprint(msg)", 'weights bf16 are not supported yet\n'),
        _cell("#| measured\nimport os\nprint('pid', os.getpid())", 'pid 12345\n'),
        _cell("#| notest\nraise SystemExit('never run')", 'old\n')])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'x.ipynb')
    saved, fresh = execute(tmp_path/'x.ipynb', dict(os.environ))
    found = [stale(a, b, 'x', i) for i, (a, b) in enumerate(zip(saved.cells, fresh.cells)) if not skipped(a)]
    assert found[1] == '' and found[0].startswith('x cell 0 `'), found
    assert '-stdout: weights bf16 are not supported yet' in found[0] and '+stdout: weights bf16 load' in found[0]

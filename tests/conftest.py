"Shared fixtures: offline data ($MUNCHKIN_OFFLINE), a temporary project root, and console scripts as subprocesses"
import os, sys, shutil, subprocess, urllib.request
from pathlib import Path
import pytest

from munchkin_nb.config import offline_file

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def bpe_available() -> bool:
    "Whether GPT-2's BPE loads here (online, from tiktoken's cache, or from $MUNCHKIN_OFFLINE)"
    from munchkin_nb.data import BPETokenizer
    try:
        BPETokenizer()
    except Exception:
        return False
    return True

@pytest.fixture(scope='session')
def shakespeare_path(tmp_path_factory) -> Path:
    "Tiny Shakespeare on disk: `$MUNCHKIN_OFFLINE/input.txt`, else the repository's copy, else downloaded once"
    for p in (offline_file('input.txt'), REPO/'etc'/'dataset'/'shakespeare_char'/'input.txt'):
        if p and p.is_file(): return p
    from munchkin_nb.prepare import SHAKESPEARE_URL
    dest = tmp_path_factory.mktemp('download')/'input.txt'
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r: dest.write_bytes(r.read())
        return dest
    except OSError as e:
        why = f'tiny Shakespeare could not be downloaded ({e}); offline, set MUNCHKIN_OFFLINE (see the README)'
    if os.environ.get('CI', '').lower() in ('1', 'true'): pytest.fail(why)
    pytest.skip(why)

@pytest.fixture(scope='session')
def _prepared_char(tmp_path_factory, shakespeare_path):
    "shakespeare_char prepared once per test session, in its own root"
    root = tmp_path_factory.mktemp('prepared')
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root)}
    subprocess.run([BIN/'munchkin-nb-prepare', 'shakespeare_char', '--source', str(shakespeare_path)],
                   env=env, check=True, capture_output=True)
    return root/'etc'/'dataset'/'shakespeare_char'

@pytest.fixture
def root(tmp_path, monkeypatch, _prepared_char) -> Path:
    "A temporary MUNCHKIN_ROOT with shakespeare_char already prepared"
    shutil.copytree(_prepared_char, tmp_path/'etc'/'dataset'/'shakespeare_char')
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    return tmp_path

def run_script(name, *args, root=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    "Run console script `name` with `args` as a subprocess (MUNCHKIN_ROOT=`root`), capturing text output"
    env = {**os.environ, **({'MUNCHKIN_ROOT': str(root)} if root else {}), **kw.pop('env', {})}
    return subprocess.run([str(BIN/name), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, **kw)

@pytest.fixture
def run_cli(root):
    "Run a console script in the temporary root: `run_cli('munchkin-nb-train', 'shakespeare-char-cpu', '--max_iters', 5)`"
    return lambda name, *args, **kw: run_script(name, *args, root=root, **kw)

def assert_one_line_error(r, *contains, midway=False):
    "Exit code 2, no traceback, and one `error:` line on stderr naming the problem (`midway`: progress output may precede it)"
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr
    lines = [l for l in r.stderr.replace('\r', '\n').splitlines() if l.strip()]
    if not midway: assert len(lines) == 1, r.stderr
    assert lines and lines[-1].startswith('error: ') and sum(l.startswith('error: ') for l in lines) == 1, r.stderr
    for s in contains: assert s in lines[-1], lines[-1]

def assert_one_line_fault(r, *contains):
    "Exit code 1 (a fault of the machine, not bad input), no traceback, one `error:` line naming it"
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr
    lines = [l for l in r.stderr.replace('\r', '\n').splitlines() if l.strip()]
    assert lines and lines[-1].startswith('error: ') and sum(l.startswith('error: ') for l in lines) == 1, r.stderr
    for s in contains: assert s in lines[-1], lines[-1]

"""The package installed like any other (`pip install .`, not editable) into a fresh virtual environment:
from an empty folder, the configs shipped as package data are listed, the user's own come first, and the
main job trains and samples with everything written under that folder, nothing in the install prefix."""
import os, shutil, subprocess, sys, sysconfig
from pathlib import Path
import pytest
from conftest import REPO

SHIPPED = ('setup.py', 'settings.ini', 'README.md', 'LICENSE', 'munchkin_nb', 'etc/training')
CONFIGS = ['openwebtext', 'shakespeare', 'shakespeare-char', 'shakespeare-char-cpu']

def _names(table:str) -> list:
    "The config names in munchkin-nb-configs' table (after its header; wrapped lines start with spaces)"
    return [l.split()[0] for l in table.splitlines()[1:] if l.strip() and not l.startswith(' ')]

@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    "A venv with this checkout's package built and installed as a wheel; returns (bin folder, site-packages)"
    base = tmp_path_factory.mktemp('install')
    src, venv = base/'src', base/'venv'
    src.mkdir()
    for name in SHIPPED:  # a copy: the build writes nothing into the checkout
        if (REPO/name).is_dir(): shutil.copytree(REPO/name, src/name, ignore=shutil.ignore_patterns('__pycache__'))
        elif (REPO/name).exists(): shutil.copy2(REPO/name, src/name)
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    py = str(venv/'bin'/'python')
    site = Path(subprocess.check_output([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                        text=True).strip())
    # the new venv sees this venv's packages (torch, pip, setuptools) through a .pth file: nothing is downloaded
    (site/'_this_venv.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    r = subprocess.run([py, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index', '-q', str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return venv/'bin', site

def _run(bin_dir, cwd, env, *args, timeout=300):
    r = subprocess.run([str(bin_dir/args[0]), *map(str, args[1:])], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f'{args}: exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}'
    return r

def test_installed_package_works_from_an_empty_folder(installed, tmp_path, shakespeare_path):
    bin_dir, site = installed
    work, offline = tmp_path/'work', tmp_path/'offline'
    work.mkdir()
    offline.mkdir()
    shutil.copy(shakespeare_path, offline/'input.txt')
    env = {k: v for k, v in os.environ.items() if k not in ('MUNCHKIN_ROOT', 'PYTHONPATH')}
    env['MUNCHKIN_OFFLINE'] = str(offline)

    r = _run(bin_dir, work, env, 'python', '-c', 'import munchkin_nb.config as c; print(c.__file__); print(c.root_dir())')
    module, root = r.stdout.split('\n')[:2]
    assert Path(module).is_relative_to(site) and Path(root) == work, r.stdout  # the installed copy; the data root is here
    assert _run(bin_dir, work, env, 'munchkin-nb-configs', '--version').stdout.strip() == 'munchkin-nb-configs 0.1.0'
    listed = _run(bin_dir, work, env, 'munchkin-nb-configs').stdout
    assert _names(listed) == CONFIGS, listed

    (work/'etc'/'training').mkdir(parents=True)  # a config of the user's own is found and listed first
    (work/'etc'/'training'/'mine.env').write_text('# my own\nDATASET=shakespeare_char\nN_LAYER=2\nN_HEAD=4\nN_EMBD=64\n')
    listed = _run(bin_dir, work, env, 'munchkin-nb-configs').stdout
    assert _names(listed) == ['mine'] + CONFIGS, listed
    assert 'my own [etc/training/mine.env]' in ' '.join(listed.split()), listed

    _run(bin_dir, work, env, 'munchkin-nb-train', 'shakespeare-char-cpu', '--max_iters', 20, '--eval_interval', 10,
         '--eval_iters', 2)
    sample = _run(bin_dir, work, env, 'munchkin-nb-generate', 'shakespeare-char-cpu', '--max_tokens', 20).stdout
    assert len(sample.strip()) > 0, sample
    assert (work/'etc'/'dataset'/'shakespeare_char'/'meta.json').is_file()
    assert (work/'models'/'shakespeare-char-cpu'/'checkpoint.pt').is_file()
    prefix = site.parents[2]  # venv/lib/pythonX.Y/site-packages
    written = [p for p in prefix.rglob('*') if p.name in ('dataset', 'models', 'checkpoint.pt', 'meta.json')]
    assert written == [], written  # nothing went into the install prefix

"""Faults a long-running user meets: signals, kills, closed pipes, two trainers at once, hostile or damaged files,
bad arguments, diverging runs. Each drives the real console scripts as subprocesses (the table of bad arguments
calls them in this process) and checks what is left on disk."""
import importlib, json, os, re, shlex, signal, subprocess, sys, threading, time
from types import SimpleNamespace
from pathlib import Path
import numpy as np
import pytest
import torch
from functools import partial
from conftest import bpe_available, BIN, run_script, assert_one_line_error, assert_one_line_fault
_one_line_error = partial(assert_one_line_error, midway=True)  # a run's progress output may come before its error

needs_bpe = pytest.mark.skipif(not bpe_available(), reason="GPT-2's BPE is not available offline")

def _corpus(d:Path, shakespeare_path:Path, docs=4000):
    "A corpus of .jsonl shards big enough that preparing it takes a few seconds"
    d.mkdir(parents=True)
    paras = [p for p in shakespeare_path.read_text().split('\n\n') if p.strip()]
    rng = np.random.default_rng(0)
    for shard in range(4):
        with open(d/f'shard{shard}.jsonl', 'w') as f:
            for _ in range(docs // 4):
                f.write(json.dumps({'text': '\n\n'.join(paras[i] for i in rng.integers(0, len(paras), 30))}) + '\n')
    return d

@needs_bpe
def test_killed_prepare_never_looks_complete(tmp_path, shakespeare_path):
    "SIGKILL at several moments of an openwebtext prepare: never bins that look complete; the next prepare finishes"
    corpus = _corpus(tmp_path/'corpus', shakespeare_path)
    ddir = tmp_path/'etc'/'dataset'/'openwebtext'
    env = {**os.environ, 'MUNCHKIN_ROOT': str(tmp_path)}
    from munchkin_nb.config import MunchkinError
    for delay in (0.3, 1.0, 1.8, 2.6):
        p = subprocess.Popen([BIN/'munchkin-nb-prepare', 'openwebtext', '--source', corpus, '--force'], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL); p.wait()
        os.environ['MUNCHKIN_ROOT'] = str(tmp_path)
        try:
            from munchkin_nb.data import load_meta
            from munchkin_nb.prepare import is_prepared
            if is_prepared('openwebtext'):  # the kill came after the end: then everything must agree
                m = load_meta('openwebtext')
                assert (ddir/'train.bin').stat().st_size == 2 * m['train_tokens']
            else:
                with pytest.raises(MunchkinError): load_meta('openwebtext')
        finally: del os.environ['MUNCHKIN_ROOT']
    r = run_script('munchkin-nb-prepare', 'openwebtext', '--source', corpus, root=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((ddir/'meta.json').read_text())
    assert m["documents"] == 4000
    assert (ddir/'train.bin').stat().st_size == 2 * m['train_tokens'] and (ddir/'val.bin').stat().st_size == 2 * m['val_tokens']
    assert not list(ddir.glob('.*.tmp')), 'temporary files of the killed runs were not cleaned up'
    # the result is the same as a prepare that was never interrupted
    r = run_script('munchkin-nb-prepare', 'openwebtext', '--source', corpus, root=tmp_path/'clean')
    assert (ddir/'train.bin').read_bytes() == (tmp_path/'clean/etc/dataset/openwebtext/train.bin').read_bytes()

def test_damaged_bins_are_refused(root):
    "A .bin that is not a whole number of tokens, or disagrees with meta.json: a clear error, not training on garbage"
    from munchkin_nb.config import MunchkinError
    from munchkin_nb.data import BatchSampler, load_meta
    ddir = root/'etc'/'dataset'/'shakespeare_char'
    with open(ddir/'val.bin', 'ab') as f: f.write(b'\x01')
    with pytest.raises(MunchkinError, match='val.bin is 223081 bytes, not a whole number of uint16 tokens'):
        BatchSampler('shakespeare_char', 'val', 8, 2)
    with pytest.raises(MunchkinError, match='does not match meta.json'): load_meta('shakespeare_char')
    with open(ddir/'val.bin', 'r+b') as f: f.truncate(1000)
    with pytest.raises(MunchkinError, match=r'val.bin does not match meta.json \(1000 bytes, expected 111540'): load_meta('shakespeare_char')
    (ddir/'meta.json').write_text('{"dataset": "shakespeare_char", ')
    with pytest.raises(MunchkinError, match='meta.json is not valid JSON; run munchkin-nb-prepare shakespeare_char --force'):
        load_meta('shakespeare_char')

# ---- training: signals, kills, pipes, one writer per run, hostile and damaged checkpoints, divergence ----

TINY = ['--n_layer', '2', '--n_head', '2', '--n_embd', '96', '--block_size', '32', '--batch_size', '4', '--device', 'cpu',
        '--eval_iters', '2', '--log_interval', '25', '--warmup_iters', '5', '--compile', 'False', '--dropout', '0.0',
        '--threads', '1']

def _train_args(name, max_iters, eval_interval, *extra):
    return ['shakespeare-char-cpu', *TINY, '--name', name, '--max_iters', str(max_iters), '--lr_decay_iters', '100000',
            '--eval_interval', str(eval_interval), *extra]

def _load(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)

def _env(root):
    return {**os.environ, 'MUNCHKIN_ROOT': str(root), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}

def _start(root, *args, **kw) -> subprocess.Popen:
    "A trainer as a subprocess, its output on pipes"
    return subprocess.Popen([str(BIN/'munchkin-nb-train'), *map(str, args)], env=_env(root), text=True,
                            stdout=kw.pop('stdout', subprocess.PIPE), stderr=subprocess.PIPE, **kw)

def _wait_for(lines, prefix:str, p, timeout:float=120):
    "Read `lines` until one starts with `prefix` (the process `p` is killed if that takes too long)"
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        for line in lines:
            if line.startswith(prefix): return line
    finally: timer.cancel()
    raise AssertionError(f'no line starting with {prefix!r}: {p.stderr.read()[-2000:]}')

def _metrics(root, name):
    from munchkin_nb.runs import read_metrics
    return read_metrics(root/'models'/name/'metrics.jsonl')

def _run_losses(root, name) -> dict:
    "Iteration -> loss of a run's metrics (the last line written wins, as after a resume)"
    return {r['iter']: r['loss'] for r in _metrics(root, name) if r['kind'] == 'log'}

SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
ENV1 = {'OMP_NUM_THREADS': '1'}

def test_signals_stop_with_last_pt_and_resume_exactly(root):
    """SIGINT, SIGTERM and SIGHUP in turn, mid-run: each stops the run with one line on stderr naming the command that
    continues it, exit 128+signal, a last.pt that loads, and the best checkpoint.pt untouched; resumed after each, the
    run ends with the losses of a run that never stopped, and metrics.jsonl tells the four processes apart"""
    mdir, M, E = root/'models'/'sig', 150, 25
    args = lambda name, *extra: _train_args(name, M, E, '--log_interval', '1', '--dropout', '0.1', *extra)
    cmd = args('sig')
    for i, (sig, code) in enumerate(SIGNALS):
        p = _start(root, *cmd)   # after a stop, the command its line named: it works as typed
        _wait_for(p.stdout, f'iter {26 + 50 * i}/', p)   # just after an eval: the next is 24 iterations away
        best = (mdir/'checkpoint.pt').read_bytes()
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == code and 'Traceback' not in err, (p.returncode, err[-2000:])
        assert lines[-1].startswith(f'{signal.Signals(sig).name}: stopped at iteration ') and 'last.pt holds it' in lines[-1]
        prog, *cmd = shlex.split(lines[-1].split('continue with: ')[1])
        assert prog == 'munchkin-nb-train' and cmd[-2:] == ['--init_from', 'resume'], lines[-1]
        last, kept = _load(mdir/'last.pt'), _load(mdir/'checkpoint.pt')
        assert last['iter_num'] > 26 + 50 * i and last['iter_num'] % E, last['iter_num']
        if last['iter_num'] < 50 * (i + 1): assert (mdir/'checkpoint.pt').read_bytes() == best
        assert kept['iter_num'] % E == 0 and kept['best_val_loss'] == last['best_val_loss']
    for c in (cmd, args('straight')):
        r = run_script('munchkin-nb-train', *c, root=root, env=ENV1)
        assert r.returncode == 0, r.stderr[-2000:]
    straight = _run_losses(root, 'straight')
    assert sorted(straight) == list(range(M)) and _run_losses(root, 'sig') == straight
    assert _load(mdir/'last.pt')['iter_num'] == M
    recs = _metrics(root, 'sig')
    starts = [r for r in recs if r['kind'] == 'start']
    assert len(starts) == 4 and len({s['run'] for s in starts}) == 4 and len({s['pid'] for s in starts}) == 4
    run = None
    for r in recs:
        run = r['run'] if r['kind'] == 'start' else run
        assert r['run'] == run
    assert [r['stopped_by'] for r in recs if r['kind'] == 'end'] == ['SIGINT', 'SIGTERM', 'SIGHUP', None]

def test_second_signal_quits_at_once(root):
    "A second signal does not wait: the process leaves at once, and whatever checkpoints are on disk still load"
    p = _start(root, *_train_args('twice', 100000, 20, '--log_interval', '1', '--n_embd', '256'))
    _wait_for(p.stdout, 'iter 30/', p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode in (130, 143) and 'Traceback' not in err, (p.returncode, err[-2000:])
    if p.returncode == 143: assert 'SIGTERM again: quitting now; the checkpoints on disk are intact' in err
    for f in ('checkpoint.pt', 'last.pt'):
        assert _load(root/'models'/'twice'/f)['iter_num'] >= 20
    r = subprocess.run([sys.executable, '-c', 'from munchkin_nb.runs import _quit_now; _quit_now(1)'], capture_output=True, text=True)
    assert r.returncode == 129 and r.stderr.strip() == 'SIGHUP again: quitting now; the checkpoints on disk are intact'

def test_ctrl_c_through_tee(root, tmp_path):
    """`munchkin-nb-train ... | tee log` and Ctrl-C in the terminal (SIGINT to the whole process group): tee dies first,
    the trainer still writes last.pt, says so on stderr, and exits 130, no traceback"""
    log = tmp_path/'log'
    p = _start(root, *_train_args('tee', 100000, 1000, '--log_interval', '1'), process_group=0)   # a job of the shell
    tee = subprocess.Popen(['tee', str(log)], stdin=p.stdout, stdout=subprocess.DEVNULL, process_group=p.pid)
    p.stdout.close()   # tee is the only reader
    p.stdout = None
    t0 = time.time()
    while 'iter 20/' not in (log.read_text() if log.exists() else '') and time.time() - t0 < 120: time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    tee.wait(timeout=10)
    assert tee.returncode == -signal.SIGINT
    assert p.returncode == 130 and 'Traceback' not in err and 'SIGINT: stopped at iteration ' in err, (p.returncode, err[-2000:])
    assert _load(root/'models'/'tee'/'last.pt')['iter_num'] >= 20

def test_head_closes_the_pipe(root):
    "`munchkin-nb-train ... | head -5`: the output is dropped once head has gone, and the run trains to the end"
    p = _start(root, *_train_args('head', 60, 30, '--log_interval', '1'))
    head = subprocess.Popen(['head', '-5'], stdin=p.stdout, stdout=subprocess.PIPE, text=True)
    p.stdout.close()
    p.stdout = None
    shown, _ = head.communicate(timeout=120)
    _, err = p.communicate(timeout=120)
    assert len(shown.splitlines()) == 5
    assert p.returncode == 0 and 'Traceback' not in err and 'Exception ignored' not in err, err[-2000:]
    assert _load(root/'models'/'head'/'last.pt')['iter_num'] == 60 and (root/'models'/'head'/'checkpoint.pt').exists()

def test_two_trainers_on_one_run(root, capsys):
    """A second trainer on a run in use exits 2 naming the first one's PID and writes nothing; after it, the run goes
    on (the second trainers run in this process: an flock held by another open file conflicts all the same)"""
    a = _start(root, *_train_args('shared', 100000, 100000, '--log_interval', '1'))   # no eval after 0
    _wait_for(a.stdout, 'iter 5/', a)
    threads = torch.get_num_threads()
    for extra in ([], ['--overwrite', 'True'], ['--seed', '7']):
        r = _in_process('munchkin-nb-train', _train_args('shared', 100, 50, *extra), capsys)
        _one_line_error(r, f'is in use by process {a.pid}', 'pick another --name')
        assert r.stdout == ''
    torch.set_num_threads(threads)
    a.send_signal(signal.SIGTERM)
    _, err = a.communicate(timeout=60)
    assert a.returncode == 143, err[-2000:]
    it = _load(root/'models'/'shared'/'last.pt')['iter_num']
    r = run_script('munchkin-nb-train', *_train_args('shared', it + 5, 50, '--init_from', 'resume'), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len({rec['run'] for rec in _metrics(root, 'shared')}) == 2   # one line of records per process, none from the refused

def test_sigkill_at_any_moment_then_resume(root):
    """SIGKILL six times, half of them while a checkpoint is being written: both files on disk always load with
    weights_only=True, --init_from resume goes on from last.pt and finishes, iterations never go back"""
    mdir = root/'models'/'killed'
    last, best = mdir/'last.pt', mdir/'checkpoint.pt'
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root)}
    during_write, iters = 0, []
    rng = np.random.default_rng(0)
    for i in range(6):
        args = _train_args('killed', 100000, 15, *(['--init_from', 'resume'] if last.exists() else []))
        p = subprocess.Popen([BIN/'munchkin-nb-train', *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0, mtime = time.time(), last.stat().st_mtime_ns if last.exists() else 0
        if i % 2 == 1:  # wait for this process to begin writing a checkpoint, and kill it in the middle of the write
            seen = False
            while not seen and p.poll() is None and time.time() - t0 < 60:
                seen = mdir.exists() and any(n.startswith(('.checkpoint.pt.', '.last.pt.')) and str(p.pid) in n
                                             for n in os.listdir(mdir))
            during_write += seen
        else:  # wait for this process to save once, then kill it at a random moment of training
            while p.poll() is None and time.time() - t0 < 60 and (not last.exists() or last.stat().st_mtime_ns == mtime):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5))
        assert p.poll() is None, f'the run ended before it was killed: {p.stderr.read().decode()[-2000:]}'
        p.send_signal(signal.SIGKILL); p.wait()
        c = _load(last)  # never half a file
        assert {'model', 'optimizer', 'rng', 'sampler', 'iter_num'} <= set(c)
        assert _load(best)['best_val_loss'] == c['best_val_loss'] or _load(best)['iter_num'] != c['iter_num']
        iters.append(c['iter_num'])
    assert during_write >= 2, f'only {during_write} kills landed during a checkpoint write'
    assert iters == sorted(iters) and iters[-1] > iters[0], f'no progress across resumes: {iters}'
    # resume once more and finish a few evals later
    target = iters[-1] + 30
    r = run_script('munchkin-nb-train', *_train_args('killed', target, 15, '--init_from', 'resume'), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _load(last)['iter_num'] == target
    assert not [n for n in os.listdir(mdir) if n.endswith('.tmp')], 'temporary files of killed writers were left behind'

def test_soak_six_random_signals(root):
    """6 signals of random kind (INT, TERM, HUP, KILL) at random moments, start-up included, each followed by a
    resume: the checkpoints always load, the iteration never goes back, the best val loss is never lost, and the run
    then finishes with a best checkpoint holding the lowest val loss any eval saw"""
    mdir = root/'models'/'soak'
    rng = np.random.default_rng(2024)
    kinds = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
    it, best, seen = 0, float('inf'), []
    for i in range(6):
        sig = kinds[rng.integers(len(kinds))]
        resume = ['--init_from', 'resume'] if (mdir/'last.pt').exists() or (mdir/'checkpoint.pt').exists() else []
        p = _start(root, *_train_args('soak', 100000, 10, '--log_interval', '5', *resume))
        if rng.random() < 0.3: time.sleep(rng.uniform(0.1, 3.0))   # any moment: in start-up, often
        else:   # a moment of training: an eval, a checkpoint write, a step
            _wait_for(p.stdout, 'iter ', p)
            time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode in (128 + sig, -sig), (signal.Signals(sig).name, p.returncode, err[-2000:])
        if 'stopped' in err: assert 'Traceback' not in err, err[-2000:]   # (a Ctrl-C while torch imports is Python's)
        seen.append((signal.Signals(sig).name, p.returncode))
        for f in ('checkpoint.pt', 'last.pt'):
            if (mdir/f).exists(): _load(mdir/f)   # never half a file
        if (mdir/'checkpoint.pt').exists():
            kept = _load(mdir/'checkpoint.pt')['best_val_loss']
            assert kept <= best, (kept, best)
            best = kept
        if (mdir/'last.pt').exists():
            now = _load(mdir/'last.pt')['iter_num']
            assert now >= it, (now, it)
            it = now
    assert it > 0, seen
    r = run_script('munchkin-nb-train', *_train_args('soak', it + 20, 10, '--init_from', 'resume'), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    final = _load(mdir/'checkpoint.pt')
    vals = [r['val'] for r in _metrics(root, 'soak') if r['kind'] == 'eval' and r['iter'] > 0]
    assert final['best_val_loss'] == min(vals) <= best and _load(mdir/'last.pt')['iter_num'] == it + 20
    assert not [n for n in os.listdir(mdir) if n.endswith('.tmp')]

class _Evil:
    "A pickle that runs code when loaded without weights_only"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))

@pytest.fixture
def trained(root):
    "A real tiny run 'victim': its best checkpoint (and its bytes); last.pt beside it"
    r = run_script('munchkin-nb-train', *_train_args('victim', 20, 10), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = root/'models'/'victim'/'checkpoint.pt'
    return ckpt, ckpt.read_bytes()

def _both(ckpt): return ckpt, ckpt.with_name('last.pt')   # generate and eval read the first, a resume the second

def _every_reader(root):
    "Each console script that reads run 'victim''s checkpoint"
    return [('munchkin-nb-generate', 'victim', '--max-tokens', '5'),
            ('munchkin-nb-eval', 'victim', '--eval_iters', '2', '--device', 'cpu', '--threads', '1'),
            ('munchkin-nb-train', *_train_args('victim', 40, 10, '--init_from', 'resume'))]

def test_hostile_checkpoint_runs_no_code(root, trained):
    import torch
    ckpt, _ = trained
    marker = root/'pwned'
    for f in _both(ckpt): torch.save({'model': _Evil(marker), 'model_args': {}}, f)
    evil = [f.read_bytes() for f in _both(ckpt)]
    for cmd in _every_reader(root):
        r = run_script(*cmd, root=root)
        _one_line_error(r, 'refusing to load it')
        assert not marker.exists(), f'{cmd[0]} ran code from a checkpoint'
        assert [f.read_bytes() for f in _both(ckpt)] == evil, f'{cmd[0]} overwrote a checkpoint'

def test_checkpoint_of_the_wrong_shape(root, trained):
    "A file of tensors and plain values that is not a checkpoint's structure: one line at load, from every reader"
    import torch
    ckpt, _ = trained
    for f in _both(ckpt): torch.save({'model': {'w': torch.zeros(2)}, 'model_args': {'n_layer': 'two'}}, f)
    for cmd in _every_reader(root):
        _one_line_error(run_script(*cmd, root=root), "model_args n_layer='two' is not a positive integer")

def test_truncated_checkpoint(root, trained):
    ckpt, good = trained
    for f in _both(ckpt): f.write_bytes(good[:len(good) // 2])
    for cmd in _every_reader(root):
        _one_line_error(run_script(*cmd, root=root), 'not a readable checkpoint')
        assert all(f.read_bytes() == good[:len(good) // 2] for f in _both(ckpt)), f'{cmd[0]} overwrote a checkpoint'

def test_divergence_leaves_best_checkpoint(root, trained):
    "Resuming with a learning rate that blows the loss up: stopped with a clear line, the checkpoint untouched"
    ckpt, good = trained
    last = ckpt.with_name('last.pt').read_bytes()
    r = run_script('munchkin-nb-train', *_train_args('victim', 300, 10, '--init_from', 'resume',
                                                       '--learning_rate', '1e5', '--min_lr', '1e4', '--grad_clip', '0'), root=root)
    _one_line_error(r, 'diverged', 'lower learning_rate')
    assert ckpt.read_bytes() == good and ckpt.with_name('last.pt').read_bytes() == last

def test_scratch_over_a_run_is_refused(root, trained):
    """Training from scratch on a name that holds a checkpoint: one line naming its iteration and val loss and the two
    ways on, nothing touched; --overwrite True starts again, and metrics.jsonl then holds only the new run"""
    ckpt, good = trained
    best = _load(ckpt)['best_val_loss']
    r = run_script('munchkin-nb-train', *_train_args('victim', 20, 10), root=root)
    _one_line_error(r, f"run 'victim' already has a checkpoint (iteration 20, best val loss {best:.4f})",
                    'continue it with --init_from resume: munchkin-nb-train shakespeare-char-cpu ',
                    'or start again with --overwrite True: munchkin-nb-train shakespeare-char-cpu ')
    go_on, anew = re.search(r'resume: (.*), or start again with --overwrite True: (.*) \(which', r.stderr).groups()
    opts = lambda cmd: sorted(zip(*[iter(shlex.split(cmd)[2:])] * 2))   # the commands repeat these settings
    assert opts(go_on) == sorted(opts(shlex.join(['x', *_train_args('victim', 20, 10)])) + [('--init_from', 'resume')])
    assert opts(anew) == sorted(opts(shlex.join(['x', *_train_args('victim', 20, 10)])) + [('--overwrite', 'True')])
    assert ckpt.read_bytes() == good and r.stdout == ''
    old = {rec['run'] for rec in _metrics(root, 'victim')}
    r = run_script('munchkin-nb-train', *_train_args('victim', 10, 10, '--overwrite', 'True', '--seed', '7'), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _load(ckpt)['iter_num'] == 10 and ckpt.read_bytes() != good
    assert not old & {rec['run'] for rec in _metrics(root, 'victim')}

def test_bad_env_file(root, tmp_path, capsys):
    for text, msg in (('N_LAYER=2\nN_LAYRE=3\n', "unknown setting 'n_layre'; valid settings: dataset"),
                      ('MAX_ITERS=many\n', "max_iters='many' is not an integer"),
                      ('COMPILE=sometimes\n', "compile='sometimes' is not True or False"),
                      ('just words\n', 'expected KEY=value')):
        env = tmp_path/'my.env'
        env.write_text(text)
        _one_line_error(_in_process('munchkin-nb-train', [env, '--device', 'cpu'], capsys), msg)
    assert not (root/'models').exists() or not any((root/'models').iterdir())

BAD_ARGS = [
    # (script, args, what the error line says)
    ('munchkin-nb-prepare', ['nowhere'], "unknown dataset 'nowhere'"),
    ('munchkin-nb-prepare', ['shakespeare_char', '--source', '/no/such/file.txt'], 'does not exist'),
    ('munchkin-nb-prepare', ['shakespeare_char', '--val_size', '0'], 'val_size=0.0 must be in (0, 1)'),
    ('munchkin-nb-train', ['no-such-config'], "unknown config 'no-such-config'; valid configs: openwebtext"),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--max_iter', '5'], "unknown option --max_iter (did you mean --max_iters?)"),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--batch_size', '0'], 'batch_size=0 must be a positive integer'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--n_layer', '-2'], 'n_layer=-2 must be a positive integer'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--learning_rate', 'fast'], "learning_rate='fast' is not a number"),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--n_head', '3'], 'not divisible by n_head=3'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--device', 'cuda'], 'no CUDA GPU'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--name', 'never-trained', '--init_from', 'resume'], 'no checkpoint for'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--name', '..'], "run name '..' must be"),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--threads', '-1'], 'threads=-1'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--seed', '-5'], 'seed=-5'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--seed', '5000000000'], 'seed=5000000000'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--dataset', 'nosuch'], "dataset 'nosuch'"),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--block_size', '9999999'], 'too few for block_size=9999999'),
    ('munchkin-nb-train', ['shakespeare-char-cpu', '--name', 'victim'], "run 'victim' already has a checkpoint"),
    ('munchkin-nb-eval', ['shakespeare-char-cpu', '--name', 'never-trained'], 'no checkpoint for'),
    ('munchkin-nb-eval', ['nope'], "no checkpoint for 'nope'"),
    ('munchkin-nb-eval', ['shakespeare-char-cpu', '--name', 'victim', '--dataset', 'nosuch'], "dataset 'nosuch'"),
    ('munchkin-nb-eval', ['shakespeare-char-cpu', '--name', 'victim', '--threads', '-2'], 'threads=-2'),
    ('munchkin-nb-generate', ['never-trained'], 'munchkin-nb-train'),
    ('munchkin-nb-generate', ['victim', '--max-tokens', '0'], 'max'),
    ('munchkin-nb-generate', ['victim', '--temperature', '-1'], 'temperature'),
    ('munchkin-nb-generate', ['victim', '--top-p', '1.5'], 'top-p'),
    ('munchkin-nb-generate', ['victim', '--top-p', '0'], 'top-p'),
    ('munchkin-nb-generate', ['victim', '--prompt', 'Ça ira'], "characters not in the vocabulary: 'Ç'"),
    ('munchkin-nb-generate', ['victim', '--prompt-file', '/no/such/prompt.txt'], 'prompt.txt'),
    ('munchkin-nb-bench', ['--config', 'no-such-config'], "unknown config 'no-such-config'"),
    ('munchkin-nb-prepare', ['shakespeare_char', '--threads', '100000'], 'threads 100000 is more than the'),
    ('munchkin-nb-generate', ['victim', '--threads', '100000'], 'threads=100000 is more than the'),
]

def _entry_points() -> dict:
    "Console script name -> its function, from settings.ini"
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent/'settings.ini')
    pairs = (line.split('=') for line in cfg['DEFAULT']['console_scripts'].split())
    return {name: target.split(':') for name, target in pairs}

def _in_process(script:str, args:list, capsys) -> SimpleNamespace:
    "Run console script `script` in this process (no interpreter start-up): its exit code and output"
    module, fn = _entry_points()[script]
    capsys.readouterr()
    try: code = getattr(importlib.import_module(module), fn)([str(a) for a in args]) and 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

def test_bad_arguments_every_script(root, trained, capsys):
    """One clear line, exit code 2, no traceback, nothing written, for each bad input of each console script
    (in this process: the scripts as subprocesses are tested above and in test_cli.py)"""
    before = sorted(str(p.relative_to(root)) for p in root.rglob('*'))
    threads = torch.get_num_threads()
    failures = []
    for script, args, msg in BAD_ARGS:
        r = _in_process(script, args, capsys)
        try: _one_line_error(r, msg)
        except AssertionError as e: failures.append(f'{script} {" ".join(args)}: {e}')
    torch.set_num_threads(threads)
    assert not failures, '\n'.join(failures)
    assert sorted(str(p.relative_to(root)) for p in root.rglob('*')) == before, 'a failed command wrote files'

# ---- faults that come from the machine: full disks, folders that refuse writes, long operations, leftovers ----

def _without_override() -> list:
    """The command prefix that takes away root's power to ignore file modes (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, dropped from the bounding set with setpriv): a read-only folder then refuses root too"""
    if os.geteuid() != 0: return []
    import shutil
    if not shutil.which('setpriv'): pytest.skip('setpriv (util-linux) is needed to drop root capabilities')
    return ['setpriv', '--inh-caps=-all', '--bounding-set=-dac_override,-dac_read_search', '--']

@pytest.fixture
def small_run(root, capsys):
    "Run 'small' trained in this process for 20 iterations (an eval every 10): checkpoint.pt and last.pt"
    threads = torch.get_num_threads()
    r = _in_process('munchkin-nb-train', _train_args('small', 20, 10), capsys)
    torch.set_num_threads(threads)
    assert not r.returncode, r.stderr[-2000:]
    return root/'models'/'small'

def _checkpoints(mdir): return {f: (mdir/f).read_bytes() for f in ('checkpoint.pt', 'last.pt') if (mdir/f).exists()}

def test_full_disk_at_a_checkpoint(small_run, capsys):
    """A resumed run reaches a file-size limit (ulimit -f: the write fails with EFBIG, as with a full disk) at its
    next checkpoint: one error line naming the file, the cause and the remedy, exit 1, the checkpoints byte for byte,
    no temporary file, and metrics.jsonl's end record says why the run stopped"""
    import resource
    before, png = _checkpoints(small_run), (small_run/'loss.png').read_bytes()
    limit = 16 << 10   # metrics.jsonl stays below it; loss.png, redrawn at the end, does not: a second failure
    assert (small_run/'metrics.jsonl').stat().st_size < limit // 2 and len(png) > limit
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    threads = torch.get_num_threads()
    try: r = _in_process('munchkin-nb-train', _train_args('small', 40, 10, '--init_from', 'resume'), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
        torch.set_num_threads(threads)
    assert_one_line_fault(r, "cannot write $MUNCHKIN_ROOT/models/small/", "file-size limit; raise the limit (ulimit -f",
                    "(the file there before is intact)")
    assert _checkpoints(small_run) == before and (small_run/'loss.png').read_bytes() == png
    assert not [p.name for p in small_run.iterdir() if p.name.endswith('.tmp')]
    end = [rec for rec in _metrics(small_run.parent.parent, 'small') if rec['kind'] == 'end'][-1]
    assert 'file-size limit' in end['error'] and end['iter'] == 30, end

def test_run_folder_that_refuses_writes(small_run, capsys):
    """A run folder that cannot be written (read-only, as a user without the power to ignore modes) or whose
    metrics.jsonl is a folder: refused at the start, before any training, exit 1, one line with the remedy,
    nothing changed"""
    root, before = small_run.parent.parent, _checkpoints(small_run)
    small_run.chmod(0o555)
    try:
        cmd = [*_without_override(), str(BIN/'munchkin-nb-train'), *_train_args('small', 40, 10, '--init_from', 'resume')]
        r = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=120)
    finally: small_run.chmod(0o755)
    assert_one_line_fault(r, 'cannot write $MUNCHKIN_ROOT/models/small/last.pt: permission denied; make it writable: '
                       'chmod u+w $MUNCHKIN_ROOT/models/small')
    assert 'iter ' not in r.stdout and _checkpoints(small_run) == before
    small_run.chmod(0o555)
    hint = r.stderr.split('make it writable: ')[1].split(',')[0]
    assert subprocess.run(hint, shell=True, env=_env(root)).returncode == 0   # the remedy, as typed
    assert small_run.stat().st_mode & 0o777 == 0o755
    (small_run/'metrics.jsonl').rename(small_run/'kept.jsonl')
    (small_run/'metrics.jsonl').mkdir()
    r = _in_process('munchkin-nb-train', _train_args('small', 40, 10, '--init_from', 'resume'), capsys)
    assert_one_line_fault(r, 'metrics.jsonl: it is a folder; move that folder away: mv ')
    assert r.stdout == '' and _checkpoints(small_run) == before
    hint = r.stderr.split('move that folder away: ')[1].strip()
    assert subprocess.run(hint, shell=True, env=_env(root)).returncode == 0   # the remedy, as typed
    threads = torch.get_num_threads()
    r = _in_process('munchkin-nb-train', _train_args('small', 30, 10, '--init_from', 'resume'), capsys)
    torch.set_num_threads(threads)
    assert not r.returncode and (small_run/'metrics.jsonl.old').is_dir(), r.stderr[-2000:]

def test_damaged_last_pt_resumes_from_checkpoint_pt(small_run, capsys):
    """last.pt cut in half beside a whole checkpoint.pt: --init_from resume continues from checkpoint.pt with a note
    naming the damage; a run holding only last.pt: generate's hint is a command that works as typed"""
    best = _load(small_run/'checkpoint.pt')['iter_num']
    last = (small_run/'last.pt').read_bytes()
    (small_run/'last.pt').write_bytes(last[:len(last) // 2])
    threads = torch.get_num_threads()
    r = _in_process('munchkin-nb-train', _train_args('small', 30, 10, '--init_from', 'resume'), capsys)
    torch.set_num_threads(threads)
    assert not r.returncode, r.stderr[-2000:]
    assert (f'last.pt is not a readable checkpoint (RuntimeError: truncated or corrupt); resuming from '
            f'$MUNCHKIN_ROOT/models/small/checkpoint.pt (iteration {best})') in r.stderr, r.stderr
    assert _load(small_run/'last.pt')['iter_num'] == 30
    (small_run/'checkpoint.pt').unlink()   # a run stopped before its first best-val save
    r = _in_process('munchkin-nb-generate', ['small', '--max-tokens', '5'], capsys)
    assert_one_line_error(r, 'no best-val checkpoint yet')
    hint = r.stderr.split('sample from that: ')[1].split(', or ')[0]
    prog, *args = [os.path.expandvars(a) for a in shlex.split(hint)]   # what a shell does with it
    assert prog == 'munchkin-nb-generate'
    r = _in_process(prog, [*args, '--max-tokens', '5', '--threads', '1'], capsys)
    torch.set_num_threads(threads)
    assert not r.returncode and len(r.stdout) > 0, r.stderr

def test_unreadable_prompt_file(tmp_path):
    "A --prompt-file that cannot be read (no permission): one error line naming it and the remedy, exit 1"
    p = tmp_path/'prompt.txt'
    p.write_text('ROMEO:')
    p.chmod(0)
    cmd = [*_without_override(), str(BIN/'munchkin-nb-generate'), 'any-run', '--prompt-file', str(p)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert_one_line_fault(r, f'cannot read {p}: permission denied; make it readable: chmod u+r {p}')

def test_huge_block_size_is_refused_at_once(root, capsys):
    "--block_size 100000 (with 64 rows a batch): refused before any allocation with the estimate and what to lower"
    t0 = time.time()
    r = _in_process('munchkin-nb-train', ['shakespeare-char-cpu', '--block_size', '100000', '--batch_size', '64',
                                          '--device', 'cpu', '--name', 'huge'], capsys)
    assert time.time() - t0 < 10
    assert_one_line_fault(r, 'would take about', 'of activations), but', 'lower batch_size',
                          'or block_size, n_layer or n_embd')
    assert not (root/'models'/'huge').exists()

def test_every_script_refuses_what_memory_cannot_hold(small_run, capsys, monkeypatch):
    """eval's --batch_size, generate's -n and bench's --sample_tokens that need over 10 TB: refused at once with the estimate, the free memory
    and what to lower, exit 1; with the free memory set low, the value the message names runs"""
    huge = [('munchkin-nb-eval', ['small', '--batch_size', '1000000000'], 'batch_size=1000000000 and block_size=32'),
            ('munchkin-nb-generate', ['small', '-n', '1000000000'], 'num_samples=1000000000 (with block_size=32'),
            ('munchkin-nb-bench', ['--sample_tokens', '10000000000000', '--no_out'], '--sample_tokens 10000000000000 on')]
    for script, args, says in huge:
        t0 = time.time()
        r = _in_process(script, [*args, '--threads', '1'], capsys)
        assert time.time() - t0 < 5
        assert_one_line_fault(r, says, 'would take about', 'is free on cpu; lower ')
    import munchkin_nb.config
    monkeypatch.setattr(munchkin_nb.config, 'free_memory', lambda device: 20e6)
    threads = torch.get_num_threads()
    for script, args, name in [('munchkin-nb-eval', ['small', '--eval_iters', '1'], 'batch_size'),
                               ('munchkin-nb-generate', ['small', '--max-tokens', '2'], 'num_samples')]:
        r = _in_process(script, [*args, f'--{name}', '100000', '--threads', '1'], capsys)
        assert_one_line_fault(r, 'but 20 MB is free on cpu; lower ' + name + ' to ')
        fits = int(r.stderr.split(' to ')[-1].split()[0])
        assert 10 < fits < 100000, fits
        r = _in_process(script, [*args, f'--{name}', str(fits), '--threads', '1'], capsys)
        assert r.returncode in (0, None) and 'error' not in r.stderr, r.stderr[-2000:]
    torch.set_num_threads(threads)

def test_free_memory_counts_ulimit_v():
    "Under `ulimit -v` (RLIMIT_AS) the free memory is at most the address space left, so refusals name values that run"
    import resource
    from munchkin_nb.config import free_memory
    size = int(re.search(r'^VmSize:\s+(\d+) kB', Path('/proc/self/status').read_text(), re.M)[1]) * 1024
    limits = resource.getrlimit(resource.RLIMIT_AS)
    soft = size + (1 << 30) if limits[1] == resource.RLIM_INFINITY else min(size + (1 << 30), limits[1])
    resource.setrlimit(resource.RLIMIT_AS, (soft, limits[1]))
    try: free = free_memory('cpu')
    finally: resource.setrlimit(resource.RLIMIT_AS, limits)
    assert 0 < free <= soft - size, free

def test_second_signal_inside_a_long_operation(root):
    """Two SIGTERMs while the process is inside one long torch call (a forward of 4 x 65,536 positions, over ten
    seconds on one thread): it is gone within a few seconds of the second, exit 143, without saving"""
    args = _train_args('long', 10, 5, '--n_layer', '1', '--n_head', '1', '--n_embd', '16', '--block_size', '65536',
                       '--batch_size', '4', '--eval_iters', '1')
    p = _start(root, *args)
    _wait_for(p.stdout, 'Training', p)   # the next thing is the eval at iteration 0: one long forward
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert time.time() - t0 < 3, time.time() - t0
    assert p.returncode == 143 and 'SIGTERM again: quitting now' in err and 'Traceback' not in err, (p.returncode, err)
    assert 'eval 0' not in out and not (root/'models'/'long'/'last.pt').exists()

def test_killed_prepare_leaves_nothing(root, shakespeare_path):
    """A prepare --force killed (SIGKILL) in the middle of its build leaves a build folder and a lock file; the
    next command that touches the dataset removes both, and the dataset is the one before, byte for byte"""
    ddir = root/'etc'/'dataset'
    big = root/'big.txt'
    big.write_text(shakespeare_path.read_text() * 30)   # about 33 MB: a build of a few seconds
    before = {f: (ddir/'shakespeare_char'/f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')}
    p = subprocess.Popen([BIN/'munchkin-nb-prepare', 'shakespeare_char', '--source', big, '--force'], env=_env(root),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    build, t0 = ddir/f'.shakespeare_char.{p.pid}.tmp', time.time()
    while not build.exists() and p.poll() is None and time.time() - t0 < 60: time.sleep(0.01)
    time.sleep(0.2)
    assert p.poll() is None, 'the prepare ended before it was killed'
    p.send_signal(signal.SIGKILL); p.wait()
    lock = ddir/'.locks'/'shakespeare_char'/'.lock'
    assert build.exists() and lock.exists()
    from munchkin_nb.prepare import ensure_prepared
    ensure_prepared('shakespeare_char')   # what training and evaluation call first
    assert not build.exists() and not lock.exists() and sorted(p.name for p in ddir.iterdir()) == ['.locks', 'shakespeare_char']
    assert {f: (ddir/'shakespeare_char'/f).read_bytes() for f in before} == before
    from munchkin_nb.prepare import prepare
    prepare('shakespeare_char', source=shakespeare_path, force=True)   # a prepare that ends well leaves no lock either
    assert not list((ddir/'.locks').iterdir())

"""Faults a long-running user meets: signals, kills, closed pipes, two trainers at once, hostile or damaged files,
bad arguments, diverging runs. Each drives the real console scripts as subprocesses (the table of bad arguments
calls them in this process) and checks what is left on disk."""
import importlib, json, os, shlex, signal, subprocess, sys, threading, time
from types import SimpleNamespace
from pathlib import Path
import numpy as np
import pytest
import torch
from functools import partial
from conftest import bpe_available, BIN, run_script, assert_one_line_error
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

def test_soak_twenty_random_signals(root):
    """20 signals of random kind (INT, TERM, HUP, KILL) at random moments, start-up included, each followed by a
    resume: the checkpoints always load, the iteration never goes back, the best val loss is never lost, and the run
    then finishes with a best checkpoint holding the lowest val loss any eval saw"""
    mdir = root/'models'/'soak'
    rng = np.random.default_rng(2024)
    kinds = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]
    it, best, seen = 0, float('inf'), []
    for i in range(20):
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
                    'continue it with --init_from resume', 'or start again with --overwrite True')
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

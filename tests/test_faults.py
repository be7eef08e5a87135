"""Faults a long-running user meets: kills, Ctrl-C, hostile or damaged files, bad arguments, diverging
runs. Each drives the real console scripts as subprocesses and checks what is left on disk."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
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

# ---- training: kills, hostile and damaged checkpoints, divergence ----

TINY = ['--n_layer', '2', '--n_head', '2', '--n_embd', '96', '--block_size', '32', '--batch_size', '4', '--device', 'cpu',
        '--eval_iters', '2', '--log_interval', '25', '--warmup_iters', '5', '--compile', 'False', '--dropout', '0.0']

def _train_args(name, max_iters, eval_interval, *extra):
    return ['shakespeare-char-cpu', *TINY, '--name', name, '--max_iters', str(max_iters), '--lr_decay_iters', '100000',
            '--eval_interval', str(eval_interval), *extra]

def _load(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)

def test_sigkill_at_any_moment_then_resume(root):
    """SIGKILL ten times, half of them while the checkpoint is being written: the checkpoint on disk always
    loads with weights_only=True, and --init_from resume goes on from it and finishes"""
    ckpt = root/'models'/'killed'/'checkpoint.pt'
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root)}
    during_write, iters = 0, []
    rng = np.random.default_rng(0)
    for i in range(10):
        args = _train_args('killed', 100000, 15, *(['--init_from', 'resume'] if ckpt.exists() else []))
        p = subprocess.Popen([BIN/'munchkin-nb-train', *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0, mtime = time.time(), ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        if i % 2 == 1:  # wait for this process to begin writing a checkpoint, and kill it in the middle of the write
            seen = False
            while not seen and p.poll() is None and time.time() - t0 < 60:
                seen = ckpt.parent.exists() and any(n.startswith('.checkpoint.pt.') and str(p.pid) in n for n in os.listdir(ckpt.parent))
            during_write += seen
        else:  # wait for this process to save once, then kill it at a random moment of training
            while p.poll() is None and time.time() - t0 < 60 and (not ckpt.exists() or ckpt.stat().st_mtime_ns == mtime):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.5))
        assert p.poll() is None, f'the run ended before it was killed: {p.stderr.read().decode()[-2000:]}'
        p.send_signal(signal.SIGKILL); p.wait()
        c = _load(ckpt)  # never half a file
        assert {'model', 'optimizer', 'rng', 'sampler', 'iter_num'} <= set(c)
        iters.append(c['iter_num'])
    assert during_write >= 4, f'only {during_write} kills landed during a checkpoint write'
    assert iters == sorted(iters) and iters[-1] > iters[0], f'no progress across resumes: {iters}'
    # resume once more and finish a few evals later
    target = iters[-1] + 30
    r = run_script('munchkin-nb-train', *_train_args('killed', target, 15, '--init_from', 'resume'), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _load(ckpt)['iter_num'] == target
    assert not [n for n in os.listdir(ckpt.parent) if n.endswith('.tmp')], 'temporary files of killed writers were left behind'

class _Evil:
    "A pickle that runs code when loaded without weights_only"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))

@pytest.fixture
def trained(root):
    "A real tiny checkpoint in run 'victim' (and its bytes)"
    r = run_script('munchkin-nb-train', *_train_args('victim', 20, 10), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = root/'models'/'victim'/'checkpoint.pt'
    return ckpt, ckpt.read_bytes()

def _every_reader(root):
    "Each console script that reads run 'victim''s checkpoint"
    return [('munchkin-nb-generate', 'victim', '--max-tokens', '5'),
            ('munchkin-nb-eval', 'shakespeare-char-cpu', '--name', 'victim', *TINY),
            ('munchkin-nb-train', *_train_args('victim', 40, 10, '--init_from', 'resume'))]

def test_hostile_checkpoint_runs_no_code(root, trained):
    import torch
    ckpt, _ = trained
    marker = root/'pwned'
    torch.save({'model': _Evil(marker), 'model_args': {}}, ckpt)
    evil = ckpt.read_bytes()
    for cmd in _every_reader(root):
        r = run_script(*cmd, root=root)
        _one_line_error(r, 'refusing to load it')
        assert not marker.exists(), f'{cmd[0]} ran code from a checkpoint'
        assert ckpt.read_bytes() == evil, f'{cmd[0]} overwrote the checkpoint'

def test_truncated_checkpoint(root, trained):
    ckpt, good = trained
    ckpt.write_bytes(good[:len(good) // 2])
    for cmd in _every_reader(root):
        _one_line_error(run_script(*cmd, root=root), 'not a readable checkpoint')
        assert ckpt.read_bytes() == good[:len(good) // 2], f'{cmd[0]} overwrote the checkpoint'

def test_divergence_leaves_best_checkpoint(root, trained):
    "Resuming with a learning rate that blows the loss up: stopped with a clear line, the checkpoint untouched"
    ckpt, good = trained
    r = run_script('munchkin-nb-train', *_train_args('victim', 300, 10, '--init_from', 'resume',
                                                       '--learning_rate', '1e5', '--min_lr', '1e4', '--grad_clip', '0'), root=root)
    _one_line_error(r, 'diverged', 'lower learning_rate')
    assert ckpt.read_bytes() == good

def test_bad_env_file(root, tmp_path):
    for text, msg in (('N_LAYER=2\nN_LAYRE=3\n', "unknown setting 'n_layre'; valid settings: dataset"),
                      ('MAX_ITERS=many\n', "max_iters='many' is not an integer"),
                      ('COMPILE=sometimes\n', "compile='sometimes' is not True or False"),
                      ('just words\n', 'expected KEY=value')):
        env = tmp_path/'my.env'
        env.write_text(text)
        _one_line_error(run_script('munchkin-nb-train', env, '--device', 'cpu', root=root), msg)
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
    ('munchkin-nb-eval', ['shakespeare-char-cpu', '--name', 'never-trained'], 'no checkpoint for'),
    ('munchkin-nb-eval', ['nope'], "unknown config 'nope'"),
    ('munchkin-nb-generate', ['never-trained'], 'munchkin-nb-train'),
    ('munchkin-nb-generate', ['victim', '--max-tokens', '0'], 'max'),
    ('munchkin-nb-generate', ['victim', '--temperature', '-1'], 'temperature'),
    ('munchkin-nb-generate', ['victim', '--top-p', '1.5'], 'top-p'),
    ('munchkin-nb-generate', ['victim', '--top-p', '0'], 'top-p'),
    ('munchkin-nb-generate', ['victim', '--prompt', 'Ça ira'], "characters not in the vocabulary: 'Ç'"),
    ('munchkin-nb-generate', ['victim', '--prompt-file', '/no/such/prompt.txt'], 'prompt.txt'),
    ('munchkin-nb-bench', ['--config', 'no-such-config'], "unknown config 'no-such-config'"),
]

def test_bad_arguments_every_script(root, trained):
    "One clear line, exit code 2, no traceback, nothing written, for each bad input of each console script"
    before = sorted(str(p.relative_to(root)) for p in root.rglob('*'))
    failures = []
    for script, args, msg in BAD_ARGS:
        r = run_script(script, *args, root=root)
        try: _one_line_error(r, msg)
        except AssertionError as e: failures.append(f'{script} {" ".join(args)}: {e}')
    assert not failures, '\n'.join(failures)
    assert sorted(str(p.relative_to(root)) for p in root.rglob('*')) == before, 'a failed command wrote files'

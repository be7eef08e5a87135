"""Faults a long-running user meets: kills, Ctrl-C, hostile or damaged files, bad arguments, diverging
runs. Each drives the real console scripts as subprocesses and checks what is left on disk."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import BIN, run_script

needs_bpe = pytest.mark.skipif(not os.environ.get('TIKTOKEN_CACHE_DIR') and not (Path.home()/'.cache').exists(), reason='no tiktoken cache')

def _one_line_error(r, *contains):
    "Exit code 2, a single `error:` line on stderr naming the problem, no traceback"
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr, r.stderr
    lines = [l for l in r.stderr.replace('\r', '\n').splitlines() if l.strip()]
    assert lines and lines[-1].startswith('error: ') and sum(l.startswith('error: ') for l in lines) == 1, r.stderr
    for c in contains: assert c in lines[-1], lines[-1]

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
            from munchkin_nb.data import load_meta, is_prepared
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

"End to end: munchkin-nb-configs and munchkin-nb-prepare as a user runs them, good and bad input"
import gzip, json, os
from pathlib import Path
import numpy as np
import pytest
from conftest import bpe_available, run_script, assert_one_line_error as _fails

def meta_of(root, ds): return json.loads((root/'etc'/'dataset'/ds/'meta.json').read_text())

def test_configs_lists_all_four():
    r = run_script('munchkin-nb-configs')
    assert r.returncode == 0, r.stderr
    names = [l.split()[0] for l in r.stdout.splitlines()]
    assert names == ['openwebtext', 'shakespeare', 'shakespeare-char', 'shakespeare-char-cpu']
    assert 'shakespeare_char  4x128' in r.stdout

def test_prepare_shakespeare_char(tmp_path, shakespeare_path):
    r = run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', shakespeare_path, root=tmp_path)
    assert r.returncode == 0, r.stderr
    m = meta_of(tmp_path, 'shakespeare_char')
    assert (m['vocab_size'], m['train_tokens'], m['val_tokens']) == (65, 1_003_854, 111_540)
    assert m['tokenizer']['kind'] == 'char' and len(m['tokenizer']['chars']) == 65
    assert 'tokens/s' in r.stdout
    train = np.fromfile(tmp_path/'etc/dataset/shakespeare_char/train.bin', dtype=np.uint16)
    assert len(train) == 1_003_854 and train.max() == 64
    # a second run leaves the data alone; --force prepares again
    mtime = (tmp_path/'etc/dataset/shakespeare_char/train.bin').stat().st_mtime_ns
    r = run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', shakespeare_path, root=tmp_path)
    assert 'already prepared' in r.stdout
    assert (tmp_path/'etc/dataset/shakespeare_char/train.bin').stat().st_mtime_ns == mtime
    r = run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', shakespeare_path, '--force', root=tmp_path)
    assert r.returncode == 0 and 'tokens/s' in r.stdout

def test_prepare_shakespeare_bpe(tmp_path, shakespeare_path):
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    r = run_script('munchkin-nb-prepare', 'shakespeare', '--source', shakespeare_path, root=tmp_path)
    assert r.returncode == 0, r.stderr
    m = meta_of(tmp_path, 'shakespeare')
    assert (m['vocab_size'], m['train_tokens'], m['val_tokens']) == (50257, 301_966, 36_059)

def _corpus(d:Path, paras):
    "A mixed local corpus: two .jsonl shards, a .jsonl.gz shard and a .txt document"
    d.mkdir()
    with open(d/'a.jsonl', 'w') as f:
        for p in paras[:400]: f.write(json.dumps({'text': p}) + '\n')
    with open(d/'b.jsonl', 'w') as f:
        for p in paras[400:800]: f.write(json.dumps({'text': p, 'url': 'x'}) + '\n')
    with gzip.open(d/'c.jsonl.gz', 'wt') as f:
        for p in paras[800:999]: f.write(json.dumps({'text': p}) + '\n')
    (d/'sub').mkdir()
    (d/'sub'/'d.txt').write_text('\n\n'.join(paras[999:1100]))
    return 1000

def test_prepare_openwebtext_from_local_corpus(tmp_path, shakespeare_path):
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    import tiktoken
    paras = [p for p in shakespeare_path.read_text().split('\n\n') if p.strip()]
    ndocs = _corpus(tmp_path/'corpus', paras)
    r = run_script('munchkin-nb-prepare', 'openwebtext', '--source', tmp_path/'corpus', '--val_size', '0.05', root=tmp_path/'r1')
    assert r.returncode == 0, r.stderr
    m = meta_of(tmp_path/'r1', 'openwebtext')
    assert m['documents'] == ndocs
    ddir = tmp_path/'r1/etc/dataset/openwebtext'
    train, val = (np.fromfile(ddir/f'{s}.bin', dtype=np.uint16) for s in ('train', 'val'))
    assert (val == 50256).sum() == 50 and (train == 50256).sum() == ndocs - 50
    assert train[-1] == 50256 and val[-1] == 50256  # every document ends with EOT
    enc = tiktoken.get_encoding('r50k_base')
    docs = paras[:999] + ['\n\n'.join(paras[999:1100])]
    assert len(train) + len(val) == sum(len(enc.encode_ordinary(d)) for d in docs) + ndocs
    # documents are shuffled: the first training document is not the corpus' first
    first = enc.decode(train[:np.argmax(train == 50256)].tolist())
    assert first in docs and first != docs[0]
    # the same corpus and seed give byte-identical bins
    r = run_script('munchkin-nb-prepare', 'openwebtext', '--source', tmp_path/'corpus', '--val_size', '0.05', root=tmp_path/'r2')
    for s in ('train', 'val'):
        assert (ddir/f'{s}.bin').read_bytes() == (tmp_path/f'r2/etc/dataset/openwebtext/{s}.bin').read_bytes()

def test_prepare_bad_input(tmp_path, shakespeare_path):
    _fails(run_script('munchkin-nb-prepare', 'tinystories', root=tmp_path), "unknown dataset 'tinystories'", 'shakespeare_char, shakespeare, openwebtext')
    _fails(run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', tmp_path/'missing.txt', root=tmp_path), 'does not exist')
    (tmp_path/'latin1.txt').write_bytes('Caf\xe9 society\n'.encode('latin-1'))
    _fails(run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', tmp_path/'latin1.txt', root=tmp_path), 'not UTF-8')
    (tmp_path/'empty.txt').write_text('  \n')
    _fails(run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', tmp_path/'empty.txt', root=tmp_path), 'is empty')
    # a URL that cannot be reached (a closed port on this machine) names the URL and the --source remedy
    _fails(run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', 'http://127.0.0.1:9/input.txt', root=tmp_path),
           'cannot download http://127.0.0.1:9/input.txt', '--source PATH')
    _fails(run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', shakespeare_path, '--val_size', '1.5', root=tmp_path), 'val_size=1.5')
    assert not (tmp_path/'etc'/'dataset'/'shakespeare_char'/'meta.json').exists()
    assert not list((tmp_path/'etc'/'dataset').rglob('*.bin')) if (tmp_path/'etc'/'dataset').exists() else True

def test_failed_corpus_leaves_nothing_that_looks_complete(tmp_path, shakespeare_path):
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    paras = [p for p in shakespeare_path.read_text().split('\n\n') if p.strip()]
    _corpus(tmp_path/'corpus', paras)
    with open(tmp_path/'corpus'/'z.jsonl', 'w') as f: f.write('{"text": "fine"}\n{"body": "no text field"}\n')
    r = run_script('munchkin-nb-prepare', 'openwebtext', '--source', tmp_path/'corpus', root=tmp_path)
    _fails(r, "z.jsonl:2: not a JSON object with a 'text' field", midway=True)
    ddir = tmp_path/'etc'/'dataset'/'openwebtext'
    assert not (ddir/'meta.json').exists() and not list(ddir.glob('*.bin')) and not list(ddir.glob('.*tmp'))

def test_settings_layers_and_bad_config(tmp_path):
    from munchkin_nb.config import load_settings, MunchkinError
    s = load_settings('shakespeare-char-cpu', ['--max-iters=300', '--device', 'cpu'], environ={'MUNCHKIN_BATCH_SIZE': '8', 'MUNCHKIN_MAX_ITERS': '100'})
    assert (s.batch_size, s.max_iters, s.device, s.n_layer) == (8, 300, 'cpu', 4)
    bad = tmp_path/'bad.env'
    bad.write_text('N_LAYER=2  # fine\nN_LAYERS=3\n')
    with pytest.raises(MunchkinError, match=r"bad.env:2: unknown setting 'n_layers'; valid settings: dataset, val_size"): load_settings(bad)
    bad.write_text('DROPOUT=lots\n')
    with pytest.raises(MunchkinError, match="dropout='lots' is not a number"): load_settings(bad)
    with pytest.raises(MunchkinError, match="bias='maybe' is not True or False"): load_settings('shakespeare-char', {'bias': 'maybe'})

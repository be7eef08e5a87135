"End to end: munchkin-nb-configs, and munchkin-nb-prepare on tiny Shakespeare and on a local corpus"
import gzip, json
from pathlib import Path
import numpy as np
import pytest
from conftest import bpe_available, run_script
from munchkin_nb.prepare import prepare, prepare_cli

def meta_of(root, ds): return json.loads((root/'etc'/'dataset'/ds/'meta.json').read_text())

def test_configs_lists_all_four():
    r = run_script('munchkin-nb-configs')
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ['CONFIG', 'DATASET', 'MODEL', '(PARAMS)', 'ITERS', 'DESCRIPTION']
    names = [l.split()[0] for l in rows if not l.startswith(' ')]
    assert names == ['openwebtext', 'shakespeare', 'shakespeare-char', 'shakespeare-char-cpu']
    assert 'shakespeare_char  4x128' in r.stdout

def test_prepare_shakespeare_char(tmp_path, shakespeare_path, monkeypatch, capsys):
    r = run_script('munchkin-nb-prepare', 'shakespeare_char', '--source', shakespeare_path, root=tmp_path)
    assert r.returncode == 0, r.stderr
    m = meta_of(tmp_path, 'shakespeare_char')
    assert (m['vocab_size'], m['train_tokens'], m['val_tokens']) == (65, 1_003_854, 111_540)
    assert m['tokenizer']['kind'] == 'char' and len(m['tokenizer']['chars']) == 65
    assert 'tokens/s' in r.stdout
    train = np.fromfile(tmp_path/'etc/dataset/shakespeare_char/train.bin', dtype=np.uint16)
    assert len(train) == 1_003_854 and train.max() == 64
    # a second run leaves the data alone; --force prepares again, to the same bytes
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    ddir = tmp_path/'etc/dataset/shakespeare_char'
    mtime, data = (ddir/'train.bin').stat().st_mtime_ns, (ddir/'train.bin').read_bytes()
    prepare_cli(['shakespeare_char', '--source', str(shakespeare_path)])
    assert 'already prepared' in capsys.readouterr().out
    assert (ddir/'train.bin').stat().st_mtime_ns == mtime
    prepare_cli(['shakespeare_char', '--source', str(shakespeare_path), '--force'])
    assert 'tokens/s' in capsys.readouterr().out
    assert (ddir/'train.bin').stat().st_mtime_ns != mtime and (ddir/'train.bin').read_bytes() == data

def test_prepare_shakespeare_bpe(tmp_path, shakespeare_path, monkeypatch):
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    prepare('shakespeare', source=shakespeare_path)
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

def test_prepare_openwebtext_from_local_corpus(tmp_path, shakespeare_path, monkeypatch):
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
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path/'r2'))
    prepare('openwebtext', source=tmp_path/'corpus', val_size=0.05)
    for s in ('train', 'val'):
        assert (ddir/f'{s}.bin').read_bytes() == (tmp_path/f'r2/etc/dataset/openwebtext/{s}.bin').read_bytes()

def test_failed_corpus_leaves_nothing(tmp_path, shakespeare_path, monkeypatch, capsys):
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    paras = [p for p in shakespeare_path.read_text().split('\n\n') if p.strip()]
    _corpus(tmp_path/'corpus', paras)
    with open(tmp_path/'corpus'/'z.jsonl', 'w') as f: f.write('{"text": "fine"}\n{"body": "no text field"}\n')
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    with pytest.raises(SystemExit) as e: prepare_cli(['openwebtext', '--source', str(tmp_path/'corpus')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "z.jsonl:2: not a JSON object with a 'text' field" in err
    assert sorted(p.name for p in (tmp_path/'etc'/'dataset').iterdir()) == ['.locks']  # no dataset, no build left

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

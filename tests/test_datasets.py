"""Datasets of any name: made from a folder, trained and sampled on; every bad input is one line with
nothing written; datasets swapped whole under failures, kills, a second prepare and a reading sampler;
damaged data named with the command that rebuilds it."""
import hashlib, json, os, re, signal, subprocess, time
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import BIN, run_script, assert_one_line_error, assert_one_line_fault

from munchkin_nb.config import MunchkinError, data_dir
from munchkin_nb.data import BatchSampler, load_meta, check_block_size, iter_split
from munchkin_nb.prepare import prepare, prepare_cli, ensure_prepared, list_datasets

LOWER = 'abcdefghijklmnopqrstuvwxyz \n'

def _lower(shakespeare_path) -> str:
    "Tiny Shakespeare in lower case without punctuation: a style that no Shakespeare model has"
    return re.sub(r"[^a-z \n]", "", shakespeare_path.read_text().lower())

def _sums(folder:Path) -> dict: return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

def _listing(root:Path) -> list: return sorted(p.name for p in (root/'etc'/'dataset').iterdir())

def test_named_dataset_trains_and_samples_in_its_style(root, shakespeare_path):
    "Issue 14's 'done when': a folder of two .txt files -> a dataset -> 200 iterations -> text in its style"
    books = root/'books'
    books.mkdir()
    text = _lower(shakespeare_path)
    (books/'first.txt').write_text(text[:60_000])
    (books/'last.txt').write_text(text[-60_000:])
    shakespeare_before = _sums(root/'etc'/'dataset'/'shakespeare_char')
    r = run_script('munchkin-nb-prepare', 'plays_lower', '--source', books, '--tokenizer', 'char', root=root)
    assert r.returncode == 0, r.stderr
    meta = load_meta('plays_lower')
    assert (meta['vocab_size'], meta['train_tokens'], meta['val_tokens']) == (28, 108_000, 12_000)
    assert (meta['split'], meta['documents'], meta['source']) == ('end', 2, str(books))
    r = run_script('munchkin-nb-train', 'shakespeare-char-cpu', '--dataset', 'plays_lower', '--max_iters', 200,
                   '--name', 'lower', '--device', 'cpu', root=root, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script('munchkin-nb-generate', 'lower', '--prompt', 'the ', '--max_tokens', 200, '--device', 'cpu', root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    sample = out[0 if out.startswith('the ') else out.index('\nthe ') + 1:].split('\n' + '-' * 20)[0]
    assert len(sample) >= 200, out
    assert set(sample) <= set(LOWER), sample  # the run's own vocabulary: no capital or colon of Shakespeare's
    assert 0.08 < sample.count(' ') / len(sample) < 0.35, sample  # words, not a random string of its 28 characters
    assert max(LOWER[:26], key=sample.count) in 'etaoinshr', sample
    assert _sums(root/'etc'/'dataset'/'shakespeare_char') == shakespeare_before

def test_list_and_block_size(root, capsys):
    (root/'poem.txt').write_text('Shall I compare thee to a summer\'s day?\n' * 20)
    prepare('poem', source=root/'poem.txt', tokenizer='gpt2')
    (root/'etc'/'dataset'/'broken').mkdir()
    (root/'etc'/'dataset'/'broken'/'train.bin').write_bytes(b'\0\0')
    capsys.readouterr()
    prepare_cli(['--list'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['name', 'tokenizer', 'vocab', 'bytes/token', 'train', 'tokens', 'val', 'tokens', 'source']
    assert lines[1].startswith("broken") and "dataset 'broken' is damaged" in lines[1]
    assert lines[2].split()[:6] == ['poem', 'gpt2', '50,257', '3.33', '216', '24']
    assert lines[3].split()[:6] == ['shakespeare_char', 'char', '65', '1.00', '1,003,854', '111,540']
    assert [r['name'] for r in list_datasets() if not r['problem']] == ['poem', 'shakespeare_char']
    # a dataset too small for the context: the split, its size and what to do
    with pytest.raises(MunchkinError, match=r"the val split of dataset 'poem' has 24 tokens, too few for "
                       r"block_size=64 \(a window needs 65\); use --block_size 23 or less, or prepare more text"):
        check_block_size('poem', 64)
    assert check_block_size('poem', 23)['val_tokens'] == 24
    with pytest.raises(MunchkinError, match="the val split of dataset 'poem' has 24 tokens"):
        BatchSampler('poem', 'val', 64, 2)

def _write_sources(d:Path, shakespeare_path:Path) -> dict:
    "Good and bad sources for a named dataset"
    d.mkdir()
    (d/'good.txt').write_text(shakespeare_path.read_text()[:5000])
    (d/'empty.txt').write_text('\n  \n')
    (d/'no_text_files').mkdir()
    (d/'no_text_files'/'notes.md').write_text('# not a corpus')
    (d/'many.txt').write_text(''.join(map(chr, range(0x20000, 0x20000 + 66_000))))
    (d/'tiny.txt').write_text('to be')
    (d/'bad.jsonl').write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n')
    (d/'latin1.txt').write_bytes('Caf\xe9 society\n'.encode('latin-1'))
    return {p.stem: str(p) for p in d.iterdir()}

BAD = [  # (arguments, what the one error line says)
    (['shakespeare', '--tokenizer', 'char', '--source', '{good}'],
     "dataset 'shakespeare' is built in with the gpt2 tokenizer; give char tokens a name of their own, "
     "e.g. munchkin-nb-prepare my_shakespeare --source PATH --tokenizer char"),
    (['mine', '--source', '{good}', '--tokenizer', 'wordpiece'], "invalid choice: 'wordpiece'"),
    (['mine', '--source', '{empty}'], "has no text"),
    (['mine', '--source', '{no_text_files}'], "has no .txt, .jsonl or .jsonl.gz files"),
    (['mine', '--source', '{many}'], "the text has 66,000 distinct characters, more than the 65,536 token ids"),
    (['mine', '--source', '{tiny}'], "is too small to split: its val split would hold 1 token (val_size=0.1)"),
    (['mine', '--source', '{bad}', '--tokenizer', 'gpt2'], "bad.jsonl:2: 'text' is list, not a string"),
    (['mine', '--source', '{latin1}'], "latin1.txt' is not UTF-8"),
    (['mine', '--source', '{good}', '--val_size', '0'], "val_size=0.0 must be in (0, 1)"),
    (['mine', '--source', '{good}x'], "good.txtx' does not exist; pass --source an existing file or folder"),
    (['mine', '--source', 'http://127.0.0.1:9/input.txt'], "cannot download http://127.0.0.1:9/input.txt ("),
    (['mine', '--source', '{good}', '--threads', '-1'], "--threads -1 must be 0 (all cores) or more"),
    (['..', '--source', '{good}'], "dataset name '..' must be 1 to 100 letters, digits"),
    (['mine'], "unknown dataset 'mine' (prepared: shakespeare_char; built in: shakespeare_char, shakespeare, "
               "openwebtext); make it from a text with munchkin-nb-prepare mine --source PATH --tokenizer char"),
    ([], "give a dataset NAME (or --list)"),
]

def test_bad_input_is_one_line_and_writes_nothing(root, shakespeare_path, capsys):
    src = _write_sources(root/'sources', shakespeare_path)
    before = _listing(root)
    for args, message in BAD:
        with pytest.raises(SystemExit) as e: prepare_cli([a.format(**src) for a in args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count('\n') == 0 and err.startswith('error: ') and message in err, (args, err)
        assert _listing(root) in (before, sorted(before + ['.locks'])), args
    # the console script itself gives the same line, and a folder that cannot be written is named
    (root/'a_file').write_text('')
    r = run_script('munchkin-nb-prepare', 'mine', '--source', src['good'], root=root/'a_file')
    assert_one_line_fault(r, f"cannot write to {root/'a_file'/'etc'/'dataset'} (Not a directory); set MUNCHKIN_ROOT")

def _snapshot(name:str) -> dict: return {p.name: p.read_bytes() for p in data_dir(name).iterdir()}

def test_failed_prepare_leaves_the_old_dataset(root, shakespeare_path, monkeypatch):
    import munchkin_nb.prepare as P
    text = shakespeare_path.read_text()
    (root/'a.txt').write_text(text[:40_000])
    (root/'b.txt').write_text(text[-30_000:])
    prepare('mine', source=root/'a.txt')
    old = _snapshot('mine')
    (root/'bad.txt').write_bytes(b'caf\xe9')
    with pytest.raises(MunchkinError, match='not UTF-8'): prepare('mine', source=root/'bad.txt', force=True)
    assert _snapshot('mine') == old
    for fault in (KeyboardInterrupt, OSError(28, 'No space left on device')):  # Ctrl-C or a full disk mid-build
        def fail(*a, **k): raise fault
        with monkeypatch.context() as m:
            m.setattr(P, '_sync', fail)
            with pytest.raises((KeyboardInterrupt, MunchkinError)): prepare('mine', source=root/'b.txt', force=True)
        assert _snapshot('mine') == old
        assert _listing(root) == ['.locks', 'mine', 'shakespeare_char']
    # --force with no source rebuilds from the source meta.json records, to the same bytes
    prepare('mine', force=True)
    assert _snapshot('mine') == old

def _big_corpus(d:Path, shakespeare_path:Path) -> Path:
    "A corpus whose preparation takes a few seconds: 30 documents of shuffled plays"
    paras = shakespeare_path.read_text().split('\n\n')
    rng = np.random.default_rng(0)
    d.mkdir()
    for i in range(30): (d/f'{i:02}.txt').write_text('\n\n'.join(rng.choice(paras, 1500)))
    return d

def _start_prepare(root:Path, *args) -> subprocess.Popen:
    "A prepare in another process, returned once it is building"
    p = subprocess.Popen([BIN/'munchkin-nb-prepare', *map(str, args)], env={**os.environ, 'MUNCHKIN_ROOT': str(root)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    build, t0 = root/'etc'/'dataset'/f'.{args[0]}.{p.pid}.tmp', time.time()
    while not (build/'train.bin').exists():
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read() if p.poll() is not None else 'slow'
        time.sleep(0.05)
    return p

def test_kill_and_second_prepare_leave_the_old_dataset(root, shakespeare_path):
    big = _big_corpus(root/'big', shakespeare_path)
    prepare('mine', source=root/'big'/'00.txt', tokenizer='gpt2')
    old = _snapshot('mine')
    p = _start_prepare(root, 'mine', '--source', big, '--force')
    # a second prepare of the same dataset is refused, naming the first
    with pytest.raises(MunchkinError, match=f"dataset .*mine is in use by process {p.pid}; wait for that prepare"):
        prepare('mine', source=big, force=True)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _snapshot('mine') == old and load_meta('mine')['documents'] == 1
    assert (root/'etc'/'dataset'/f'.mine.{p.pid}.tmp').is_dir()  # the killed build, until the next prepare
    meta = prepare('mine', source=big, force=True)
    assert meta['documents'] == 30 and meta['split'] == 'end'
    assert _listing(root) == ['.locks', 'mine', 'shakespeare_char']  # the killed build is gone

def test_sampler_keeps_reading_what_it_opened(root, shakespeare_path, capsys):
    text = shakespeare_path.read_text()
    (root/'a.txt').write_text(text[:50_000])
    (root/'b.txt').write_text(text[-20_000:].upper())
    prepare('mine', source=root/'a.txt')
    old = np.fromfile(data_dir('mine')/'train.bin', dtype=np.uint16)
    s = BatchSampler('mine', 'train', 32, 4, seed=0)
    s.get_batch()
    state = s.state_dict()
    # prepared again by another process, with another text and vocabulary
    r = run_script('munchkin-nb-prepare', 'mine', '--source', root/'b.txt', '--force', root=root)
    assert r.returncode == 0, r.stderr
    assert len(np.fromfile(data_dir('mine')/'train.bin', dtype=np.uint16)) == 18_000
    x, y = s.get_batch()  # from the old files, still open
    g = torch.Generator()
    g.set_state(state['generator'])
    ix = torch.randint(len(old) - 32, (4,), generator=g).numpy()
    assert (x.numpy() == old[ix[:, None] + np.arange(32)]).all() and (y.numpy() == old[ix[:, None] + np.arange(1, 33)]).all()
    # a new reader in this process reads the same version too, and says so once
    capsys.readouterr()
    ys = np.concatenate([y.flatten().numpy() for _, y in iter_split('mine', 'train', 256, 8)])
    assert (ys == old[1:]).all()
    assert "note: dataset 'mine' was prepared again since this process opened it" in capsys.readouterr().err
    # a prepare in this process moves its readers on to the new version
    prepare('mine', source=root/'b.txt', force=True)
    assert BatchSampler('mine', 'train', 32, 4).n == 18_000
    # a file changed in place under a reader stops it at the next batch with one line
    s2 = BatchSampler('mine', 'val', 32, 2)
    with open(data_dir('mine')/'val.bin', 'r+b') as f: f.truncate(1000)
    with pytest.raises(MunchkinError, match=r"dataset 'mine' is damaged: .*val.bin changed size while being read; "
                                            r"run munchkin-nb-prepare mine --force"):
        s2.get_batch()

def test_damaged_data_is_named_with_its_rebuild_command(root, shakespeare_path):
    ddir = root/'etc'/'dataset'/'shakespeare_char'
    fix = 'run munchkin-nb-prepare shakespeare_char --force'
    good = {p.name: p.read_bytes() for p in ddir.iterdir()}
    def damage(name, data):
        for n, b in good.items(): (ddir/n).write_bytes(b)
        if data is None: (ddir/name).unlink()
        else: (ddir/name).write_bytes(data)
    cases = [('train.bin', good['train.bin'][:-1], 'train.bin does not match meta.json (2007707 bytes, expected 1003854'),
             ('val.bin', good['val.bin'][:1000], 'val.bin does not match meta.json (1000 bytes, expected 111540'),
             ('meta.json', None, 'meta.json is missing'),
             ('meta.json', b'{"dataset": "shakespeare_char", ', 'meta.json is not valid JSON'),
             ('meta.json', b'[1, 2]', "meta.json has no valid 'tokenizer'"),
             ('meta.json', json.dumps({**json.loads(good['meta.json']), 'val_tokens': '111540'}).encode(),
              "meta.json has no valid 'val_tokens'")]
    for name, data, what in cases:
        damage(name, data)
        with pytest.raises(MunchkinError) as e: ensure_prepared('shakespeare_char')
        assert str(e.value).startswith("dataset 'shakespeare_char' is damaged: ") and what in str(e.value)
        assert str(e.value).endswith(fix) and 'download' not in str(e.value)
    # the trainer says the same in one line, and the command it names, as typed, rebuilds the data
    r = run_script('munchkin-nb-train', 'shakespeare-char-cpu', '--max_iters', 1, root=root)
    assert_one_line_error(r, "dataset 'shakespeare_char' is damaged: ", fix, midway=True)
    (ddir/'input.txt').write_bytes(shakespeare_path.read_bytes())  # the text kept beside the data
    r = run_script(*fix[4:].split(), root=root)
    assert r.returncode == 0, r.stderr
    assert {n: (ddir/n).read_bytes() for n in good if n != 'meta.json'} == {n: b for n, b in good.items() if n != 'meta.json'}
    assert load_meta('shakespeare_char')['val_tokens'] == 111_540

def test_offline_download_error_names_remedies_that_work(tmp_path, shakespeare_path, monkeypatch, capsys):
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    monkeypatch.delenv('MUNCHKIN_OFFLINE', raising=False)
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')  # no network, whatever this machine has
    for v in ('no_proxy', 'NO_PROXY'): monkeypatch.delenv(v, raising=False)
    with pytest.raises(SystemExit): prepare_cli(['shakespeare_char'])
    err = capsys.readouterr().err
    assert err.startswith('error: cannot download https://raw.githubusercontent.com/karpathy/char-rnn/')
    assert err.strip().endswith('offline, run munchkin-nb-prepare shakespeare_char --source PATH with a local copy, '
                                'or set MUNCHKIN_OFFLINE to a folder holding input.txt')
    assert not (tmp_path/'etc'/'dataset'/'shakespeare_char').exists()
    # both remedies, as typed (and as training calls them: ensure_prepared with the source setting)
    assert ensure_prepared('shakespeare_char', source=str(shakespeare_path))['train_tokens'] == 1_003_854
    monkeypatch.setenv('MUNCHKIN_OFFLINE', str(shakespeare_path.parent))
    assert prepare('shakespeare_char', force=True)['source'] == str(shakespeare_path)

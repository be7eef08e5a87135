"""A tokenizer trained on a dataset's own text, end to end: prepared from a folder of .txt (trained on the
training split only), trained on, sampled from without the dataset folder; every bad input one line with
nothing written and the old dataset kept whole."""
import hashlib, json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error

from munchkin_nb.config import MunchkinError, data_dir
from munchkin_nb.data import load_meta, load_tokenizer
from munchkin_nb.prepare import prepare, prepare_cli
from munchkin_nb.tokenizer import train_fast, load_bpe
from munchkin_nb.runs import train_main
from munchkin_nb.bench import bench_parser, bench_cli, _tokenizer_main

def _poems(root:Path, shakespeare_path:Path, n:int=4, size:int=60_000) -> Path:
    "A folder of `n` .txt files, slices of tiny Shakespeare"
    src, text = root/'poems_src', shakespeare_path.read_text()
    src.mkdir(exist_ok=True)
    for i in range(n): (src/f'p{i}.txt').write_text(text[i * size:(i + 1) * size])
    return src

def _sums(folder:Path) -> dict: return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

def test_prepare_train_generate_without_the_dataset(root, shakespeare_path, run_cli):
    src, shakes = _poems(root, shakespeare_path), _sums(root/'etc'/'dataset'/'shakespeare_char')
    shakes_text = hashlib.sha256(shakespeare_path.read_bytes()).hexdigest()
    r = run_cli('munchkin-nb-prepare', 'poems', '--source', src, '--tokenizer', 'bpe', '--vocab_size', 1024)
    assert r.returncode == 0, r.stderr
    ddir = data_dir('poems')
    raw = json.loads((ddir/'meta.json').read_text())
    assert raw['tokenizer'] == dict(kind='bpe-trained', file='tokenizer.json', vocab_size_asked=1024,
                                    sha256=hashlib.sha256((ddir/'tokenizer.json').read_bytes()).hexdigest())
    assert (raw['vocab_size'], raw['split']) == (1024, 'end')
    # trained on the training split only: the first 90% of each file, never the validation ends
    texts = [p.read_text() for p in sorted(src.iterdir())]
    alone = train_fast([t[:int(len(t) * 0.9)] for t in texts], 1024, special=['<|endoftext|>'])
    tok = load_bpe(ddir/'tokenizer.json')
    assert tok.ranks == alone.ranks and tok.special == {'<|endoftext|>': 1023}
    assert load_tokenizer('poems').ranks == tok.ranks
    assert load_meta('poems')['tokenizer'] == tok.to_dict()   # read whole, as training saves it
    r = run_cli('munchkin-nb-prepare', '--list')
    row = next(l for l in r.stdout.splitlines() if l.startswith('poems'))
    assert row.split()[1:3] == ['bpe', '1,024'] and 2.0 < float(row.split()[3]) < 4.0, row

    r = run_cli('munchkin-nb-train', 'shakespeare-char-cpu', '--dataset', 'poems', '--max_iters', 20, '--name', 'p',
                '--eval_iters', 5)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(root/'models'/'p'/'checkpoint.pt', weights_only=True)
    assert ckpt['tokenizer'] == tok.to_dict() and ckpt['model_args']['vocab_size'] == 1024
    r = run_cli('munchkin-nb-generate', 'p', '--max_tokens', 30, '--prompt', 'ROMEO:')
    assert r.returncode == 0 and r.stdout.startswith('ROMEO:') and len(r.stdout) > 40, r.stderr
    # the dataset folder moved away: the checkpoint's own tokenizer still samples, the same text
    shutil.move(ddir, root/'poems_away')
    again = run_cli('munchkin-nb-generate', 'p', '--max_tokens', 30, '--prompt', 'ROMEO:')
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    # a checkpoint without its tokenizer, its dataset gone: one line
    del ckpt['tokenizer']
    torch.save(ckpt, root/'models'/'p'/'checkpoint.pt')
    r = run_cli('munchkin-nb-generate', 'p', '--max_tokens', 5)
    assert_one_line_error(r, "the checkpoint carries no tokenizer, and its dataset's is not there: "
                             "dataset 'poems' is not prepared")
    assert _sums(root/'etc'/'dataset'/'shakespeare_char') == shakes
    assert hashlib.sha256(shakespeare_path.read_bytes()).hexdigest() == shakes_text

BAD = [  # (arguments after `poems`, what the one error line says)
    (['--tokenizer', 'bpe', '--vocab_size', '200'], "--vocab_size 200 is out of range: a byte-level BPE needs 257 to 65,536"),
    (['--tokenizer', 'bpe', '--vocab_size', '65537'], "--vocab_size 65537 is out of range"),
    (['--tokenizer', 'char', '--vocab_size', '300'], "--vocab_size is only for --tokenizer bpe; the char tokenizer's"),
    (['--tokenizer', 'gpt2', '--vocab_size', '300'], "--vocab_size is only for --tokenizer bpe; the gpt2 tokenizer's"),
    (['--source', '{tiny}', '--tokenizer', 'bpe', '--vocab_size', '300'], "is too small to split"),
]

def test_bad_input_keeps_the_dataset_whole(root, shakespeare_path, capsys):
    src = _poems(root, shakespeare_path, n=2, size=20_000)
    (root/'tiny.txt').write_text('to be')
    prepare('poems', source=src, tokenizer='bpe', vocab_size=300)
    ddir, listing = data_dir('poems'), sorted(p.name for p in data_dir('x').parent.iterdir())
    old = {p.name: p.read_bytes() for p in ddir.iterdir()}
    capsys.readouterr()
    for args, message in BAD:
        argv = ['poems', '--force', *(a.format(tiny=root/'tiny.txt') for a in args)]
        if '--source' not in argv: argv += ['--source', str(src)]
        with pytest.raises(SystemExit) as e: prepare_cli(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count('\n') == 0 and err.startswith('error: ') and message in err, (args, err)
        assert {p.name: p.read_bytes() for p in ddir.iterdir()} == old, args
        assert sorted(p.name for p in ddir.parent.iterdir()) == listing, args
    for argv, message in ((['shakespeare_char', '--vocab_size', '300'], "the char tokenizer's vocabulary is"),
                          (['other', '--source', str(src), '--tokenizer', 'bpe'], "--tokenizer bpe needs --vocab_size N")):
        with pytest.raises(SystemExit): prepare_cli(argv)
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in ddir.parent.iterdir()) == listing
    # --force without --vocab_size rebuilds as it was asked, to the same bytes
    prepare('poems', force=True)
    assert {p.name: p.read_bytes() for p in ddir.iterdir()} == old

def test_small_text_stops_at_the_merges_it_allows(root, run_cli):
    (root/'small.txt').write_text('to be or not to be, <|endoftext|> that is the question\n' * 40)
    r = run_cli('munchkin-nb-prepare', 'small', '--source', root/'small.txt', '--tokenizer', 'bpe', '--vocab_size', 1024)
    assert r.returncode == 0, r.stderr
    meta = load_meta('small')
    made = meta['vocab_size'] - 257
    assert 0 < made < 767 and f"note: the training text allows {made:,} merges, not the 767 asked" in r.stderr
    # the text's own "<|endoftext|>" is text: the special token only ends the one document
    tok, ids = load_tokenizer('small'), np.fromfile(data_dir('small')/'train.bin', dtype=np.uint16).tolist()
    assert ids.count(tok.eot_token) <= 1 and tok.decode(ids).count('<|endoftext|>') >= 30
    assert tok.encode('a<|endoftext|>b') == tok.encode_ordinary('a<|endoftext|>b') != \
           tok.encode('a<|endoftext|>b', allowed_special='all')
    assert tok.encode('a<|endoftext|>b', allowed_special={'<|endoftext|>'}).count(tok.eot_token) == 1

def test_damaged_tokenizer_is_named_with_its_rebuild_command(root, shakespeare_path, run_cli):
    prepare('poems', source=_poems(root, shakespeare_path, n=2, size=20_000), tokenizer='bpe', vocab_size=300)
    ddir = data_dir('poems')
    good, meta = (ddir/'tokenizer.json').read_text(), (ddir/'meta.json').read_text()
    fix = 'munchkin-nb-prepare poems --force'
    cases = [('tokenizer.json', good[:len(good) // 2], f"{ddir/'tokenizer.json'} does not match meta.json"),
             ('tokenizer.json', good.replace('"merges": [', '"merges": [\n[32, 32],', 1), "does not match meta.json (its SHA-256 differs)"),
             ('meta.json', meta.replace('"sha256": "', '"sha256": "0'), "does not match meta.json"),
             ('tokenizer.json', None, f"tokenizer file {ddir/'tokenizer.json'} is missing; rebuild it with {fix}")]
    for name, content, message in cases:
        (ddir/'tokenizer.json').write_text(good); (ddir/'meta.json').write_text(meta)
        if content is None: (ddir/name).unlink()
        else: (ddir/name).write_text(content)
        with pytest.raises(MunchkinError, match=fix) as e: load_meta('poems')
        assert message in str(e.value), str(e.value)
    r = run_cli('munchkin-nb-train', 'shakespeare-char-cpu', '--dataset', 'poems', '--max_iters', 1)
    assert_one_line_error(r, 'is missing; rebuild it with munchkin-nb-prepare poems --force')
    prepare('poems', force=True)   # the command the error names rebuilds it
    assert (ddir/'tokenizer.json').read_text() == good and load_meta('poems')['vocab_size'] == 300
    # GPT-2's weights need GPT-2's tokens: the error names this dataset's kind, and nothing is written
    with pytest.raises(MunchkinError, match=r"needs a GPT-2 BPE dataset, but poems is a trained BPE \(bpe-trained\)"):
        train_main(['shakespeare-char-cpu', '--dataset', 'poems', '--init_from', 'gpt2', '--name', 'g'])
    assert not (root/'models'/'g').exists()

def test_bench_tokenizer_prints_both_speeds(shakespeare_path, capsys):
    "`munchkin-nb-bench --tokenizer VOCAB`: the trained BPE and GPT-2's, side by side, and its JSON rows"
    from conftest import bpe_available
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    rep, text = _tokenizer_main(bench_parser().parse_args(
        ['--tokenizer', '512', '--tokenizer_chars', '60000', '--source', str(shakespeare_path)]))
    assert [(r['tokenizer'], r['vocab']) for r in rep['rows']] == [('trained BPE', 512), ("GPT-2's BPE", 50257)]
    assert rep['chars'] == 60_000 and rep['train_chars'] == 54_000 and rep['rows'][1]['train_s'] is None
    assert all(r['encode_mb_per_s'] > 0 and 2.0 < r['bytes_per_token'] < 5.0 for r in rep['rows']), rep
    assert json.loads(json.dumps(rep)) == rep
    head = text.splitlines()[2].split()
    assert head == ['tokenizer', 'vocab', 'train', 's', 'encode', 's', 'encode', 'MB/s', 'bytes/token'], text
    assert text.splitlines()[-1].startswith('the trained tokenizer encodes in ')
    with pytest.raises(SystemExit) as e: bench_cli(['--tokenizer', '100', '--no_out'])
    assert e.value.code == 2 and 'error: --tokenizer 100 is out of range' in capsys.readouterr().err

"Training: exact resume, NaN guard, bad input, bits per byte, the run's own report, DDP under torchrun, evaluation"
import os, sys, json, math, time, signal, shutil, subprocess, importlib.util
from pathlib import Path
import numpy as np
import pytest, torch
from conftest import BIN, bpe_available, run_script
from munchkin_nb.config import load_settings, MunchkinError, run_cli
from munchkin_nb.train import Callback, TrainingDiverged
from munchkin_nb.runs import Run, train_main, eval_main, read_metrics, full_loss
from munchkin_nb.checkpoint import load_checkpoint, checkpoint_path, last_path, save_checkpoint

CONFIG = 'shakespeare-char-cpu'
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.1, device='cpu', compile=False,
            max_iters=20, lr_decay_iters=20, warmup_iters=5, eval_interval=10, eval_iters=4, log_interval=1, threads=1)

ENV = {'OMP_NUM_THREADS': '1'}   # tiny models: one thread is faster, and steady on a busy machine

@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny(**kw) -> dict: return {**TINY, **kw}
def train(s, callbacks=None, quiet=False) -> Run:
    "A `Run` (lock, metrics.jsonl, report), as the console script trains"
    return Run(s, callbacks=callbacks, quiet=quiet).run()
def argv(**kw) -> list: return [a for k, v in tiny(**kw).items() for a in (f'--{k}', str(v))]
def run(**kw): return train(load_settings(CONFIG, tiny(**kw)), callbacks=[], quiet=True)
def losses(recs) -> dict:
    "Loss per iteration of metrics records (the last one written wins, as after a resume)"
    return {r['iter']: r['loss'] for r in recs if r['kind'] == 'log'}
def metrics(root, name) -> list: return read_metrics(root/'models'/name/'metrics.jsonl')

class Stop(Callback):
    "Ask the trainer to stop (as a signal does) after iteration `at`"
    def __init__(self, at): self.at = at
    def on_log(self, tr, rec):
        if rec['iter'] == self.at: tr.stop_signal = signal.SIGINT

def test_exact_resume(root):
    "k iterations, then resume to N: the same losses and weights as N iterations straight (dropout on)"
    run(name='straight')
    run(name='split', max_iters=10)
    ck = load_checkpoint(last_path('split'))
    assert ck['iter_num'] == 10 and set(ck) >= {'optimizer', 'scaler', 'rng', 'sampler', 'settings', 'tokenizer'}
    tr = run(name='split', init_from='resume')
    assert tr.iter_num == 20
    straight = losses(metrics(root, 'straight'))
    assert sorted(straight) == list(range(20)) and losses(metrics(root, 'split')) == straight
    a, b = load_checkpoint(last_path('straight')), load_checkpoint(last_path('split'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    # a stop between evals (what a signal does) writes last.pt there and also resumes exactly
    tr = train(load_settings(CONFIG, tiny(name='stop')), callbacks=[Stop(at=6)], quiet=True)
    assert tr.stopped_by == signal.SIGINT and load_checkpoint(last_path('stop'))['iter_num'] == 7
    assert not checkpoint_path('stop').exists()   # only eval 0 so far: no best model to keep
    run(name='stop', init_from='resume')
    assert losses(metrics(root, 'stop')) == straight
    # the history the resumed trainer plots is one line of records, none twice
    its = [r['iter'] for r in tr.history if r['kind'] == 'log']
    assert its == sorted(set(its))

class Poison(Callback):
    "Turn the weights into NaN at iteration `at`, after recording the checkpoints' bytes"
    def __init__(self, at): self.at, self.saved = at, None
    def on_log(self, tr, rec):
        if rec['iter'] == self.at:
            self.saved = checkpoint_path(tr.settings.name).read_bytes(), last_path(tr.settings.name).read_bytes()
            with torch.no_grad():
                for p in tr.raw_model.parameters(): p.fill_(float('nan'))

def test_nan_guard_keeps_best_checkpoint(root):
    s = load_settings(CONFIG, tiny(name='nan'))
    cb = Poison(at=12)
    with pytest.raises(TrainingDiverged, match='diverged at iteration 1[2-3].*not overwritten'):
        train(s, callbacks=[cb], quiet=True)
    assert cb.saved is not None and (checkpoint_path('nan').read_bytes(), last_path('nan').read_bytes()) == cb.saved
    assert load_checkpoint(checkpoint_path('nan'))['iter_num'] == 10

def test_nan_guard_cli(run_cli):
    "A huge learning rate: one line, exit 2, no checkpoint made from a broken model"
    r = run_cli('munchkin-nb-train', CONFIG, *argv(name='huge', learning_rate=1e9, min_lr=0, grad_clip=0, eval_interval=5,
                                                    max_iters=40, lr_decay_iters=40), env=ENV)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: training diverged'), r.stderr
    assert 'Traceback' not in r.stderr

def _bad(capsys, args) -> str:
    "Run `munchkin-nb-train args` in this process: exit code 2 and the one line on stderr"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: run_cli(train_main, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]

def test_bad_input(root, capsys):
    assert 'valid configs' in _bad(capsys, ['no-such-config'])
    assert 'unknown option --n_layers' in _bad(capsys, [CONFIG, '--n_layers', '2'])
    assert 'not an integer' in _bad(capsys, [CONFIG, '--max_iters', 'lots'])
    assert "no checkpoint for 'fresh'" in _bad(capsys, [CONFIG, *argv(name='fresh', init_from='resume')])
    assert 'too few for block_size=9999999' in _bad(capsys, [CONFIG, *argv(name='long', block_size=9999999)])
    assert 'threads=-1' in _bad(capsys, [CONFIG, *argv(name='t', threads=-1)])
    assert "unknown dataset 'nosuch'" in _bad(capsys, [CONFIG, *argv(name='nd', dataset='nosuch')])
    assert not (root/'models').exists()
    run(name='shape', max_iters=2, eval_interval=2)
    before = checkpoint_path('shape').read_bytes()
    assert 'n_layer=2 but the config asks for n_layer=3' in _bad(capsys, [CONFIG, *argv(name='shape', init_from='resume', n_layer=3)])
    ck = load_checkpoint(checkpoint_path('shape'))
    ck['tokenizer'] = {'kind': 'char', 'chars': ck['tokenizer']['chars'][::-1]}
    save_checkpoint(ck, root/'models'/'vocab'/'checkpoint.pt')
    assert 'different vocabulary' in _bad(capsys, [CONFIG, *argv(name='vocab', init_from='resume')])
    ck = load_checkpoint(checkpoint_path('shape'))
    save_checkpoint({'model': ck['model'], 'model_args': ck['model_args']}, root/'models'/'bare'/'checkpoint.pt')
    assert 'holds a model but no training state' in _bad(capsys, [CONFIG, *argv(name='bare', init_from='resume')])
    save_checkpoint({**ck, 'optimizer': {'state': {}, 'param_groups': [{'params': [0]}]}}, root/'models'/'opt'/'checkpoint.pt')
    assert "does not fit this run's optimizer" in _bad(capsys, [CONFIG, *argv(name='opt', init_from='resume')])
    save_checkpoint({**ck, 'iter_num': '7'}, root/'models'/'wrongtype'/'checkpoint.pt')
    assert "'iter_num' is not a count of iterations" in _bad(capsys, [CONFIG, *argv(name='wrongtype', init_from='resume')])
    (root/'models'/'cut').mkdir(); (root/'models'/'cut'/'checkpoint.pt').write_bytes(before[:1000])
    assert 'truncated or corrupt' in _bad(capsys, [CONFIG, *argv(name='cut', init_from='resume')])
    assert checkpoint_path('shape').read_bytes() == before
    assert [r['kind'] for r in metrics(root, 'shape')].count('start') == 1

@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_missing_cli(run_cli, root):
    r = run_cli('munchkin-nb-train', CONFIG, '--device', 'cuda', '--max_iters', '2', env=ENV)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'no CUDA GPU' in r.stderr, r.stderr
    assert r.stdout == '' and not (root/'models').exists()

@pytest.mark.skipif(importlib.util.find_spec('wandb') is not None, reason='wandb is installed')
def test_wandb_missing(root, capsys):
    assert "pip install -e '.[wandb]'" in _bad(capsys, [CONFIG, *argv(name='wb', wandb_log=True)])
    assert not (root/'models').exists()

def test_eval_reports_bits_per_byte(root, capsys):
    run(name='ev', max_iters=10)
    r = eval_main(['ev', '--eval_iters', '4', '--device', 'cpu', '--threads', '1', '--full'])   # the run's own batch size
    assert set(r) == {'train', 'val', 'train_bpb', 'val_bpb', 'val_full', 'val_full_bpb'}
    assert all(2.0 < r[k] < 4.5 for k in ('train', 'val', 'val_full'))
    for k in ('train', 'val', 'val_full'):   # characters of ASCII text: one byte a token
        assert r[f'{k}_bpb'] == r[k] / math.log(2)
    out = capsys.readouterr().out
    assert 'whole val split (111,539 tokens, 111,539 bytes)' in out and 'bits/byte' in out

def test_bits_per_byte_by_hand(root):
    """Bits per byte = total nats / (ln 2 x total bytes): for a character model on ASCII text exactly loss / ln 2;
    for a BPE model over a small known text, checked against a sum done here token by token"""
    from munchkin_nb.gpt import GPT, GPTConfig
    from munchkin_nb.data import token_bytes, load_tokenizer, BPETokenizer
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    f = full_loss(m, 'shakespeare_char', 'val', 32, 8, tbytes=token_bytes(load_tokenizer('shakespeare_char')), show=False)
    assert f['tokens'] == f['bytes'] == 111539 and f['bpb'] == f['loss'] / math.log(2)
    if not bpe_available(): pytest.skip("GPT-2's BPE is not available offline")
    text = "Ça ira: naïve café, déjà vu — and <|endoftext|> is just text here.\n" * 3
    tok = BPETokenizer()
    ids = tok.encode(text) + [tok.eot_token] + tok.encode("Fin.")
    ddir = root/'etc'/'dataset'/'tinybpe'
    ddir.mkdir(parents=True)
    for split in ('train', 'val'): np.array(ids, dtype=np.uint16).tofile(ddir/f'{split}.bin')
    (ddir/'meta.json').write_text(json.dumps(dict(dataset='tinybpe', tokenizer=tok.to_dict(), vocab_size=tok.vocab_size,
                                                  train_tokens=len(ids), val_tokens=len(ids))))
    m = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    f = full_loss(m.eval(), 'tinybpe', 'val', 16, 4, tbytes=token_bytes(tok), show=False)
    with torch.no_grad():
        x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        nats = sum(torch.nn.functional.cross_entropy(m(x[i:i + 16][None], y[i:i + 16][None])[0][0], y[i:i + 16],
                                                     reduction='sum').item() for i in range(0, len(y), 16))
    nbytes = len(text.encode('utf-8')) + len(b"Fin.") - len(tok.enc.decode_single_token_bytes(ids[0]))   # all but the first token's
    assert f['bytes'] == nbytes and f['tokens'] == len(y)
    assert math.isclose(f['bpb'], nats / (math.log(2) * nbytes), rel_tol=1e-5)

def test_log_file_reports_the_run(run_cli, root):
    """Written to a file, the log has no carriage returns or escape codes, shows the settings in effect, lines with
    N/max_iters and an ETA, bits per byte at each eval, and ends with the summary; metrics.jsonl names the run"""
    r = run_cli('munchkin-nb-train', CONFIG, *argv(name='rep', max_iters=30, eval_interval=15, log_interval=5, threads=1,
                                                   val_size=0.3), env={'FORCE_COLOR': ''})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert '\r' not in out and '\x1b' not in out and '\r' not in r.stderr and '\x1b' not in r.stderr
    lines = out.splitlines()
    setting = lambda k: next(l.split(':', 1)[1].split()[0] for l in lines if l.startswith(k + ' '))   # then its place
    assert setting('val_size') == '0.1' and setting('vocab_size') == '65' and setting('device') == 'cpu'
    assert setting('dtype') == 'float32' and setting('threads') == '1'
    assert any(l.startswith('iter 5/30: loss ') and 'ETA ' in l and 'ms/iter' in l for l in lines), out
    assert any(l.startswith('eval 15/30: ') and 'bits/byte' in l for l in lines), out
    assert 'max_iters                     : 30  (command line)' in lines, out
    assert out.endswith('Try it: munchkin-nb-generate rep\n\n')   # a blank line: what follows (a sample) stands apart
    lines = out.rstrip('\n').splitlines()
    assert lines[-7].startswith('Done: 30/30 iterations in ') and 'start-up' in lines[-7] and 'evals' in lines[-7]
    assert lines[-6].startswith('Best val loss ') and 'at iteration 30' in lines[-6]
    assert lines[-5].endswith('checkpoint.pt') and lines[-4].endswith('last.pt') and lines[-3].endswith('loss.png')
    assert lines[-2:] == ['Try it: munchkin-nb-eval rep', 'Try it: munchkin-nb-generate rep']
    recs = metrics(root, 'rep')
    run_id = recs[0]['run']
    assert recs[0]['kind'] == 'start' and all(r['run'] == run_id for r in recs) and recs[-1]['kind'] == 'end'
    assert all('val_bpb' in r for r in recs if r['kind'] == 'eval')
    p = recs[-1]['phases']
    assert p['steps'] > 0 and p['evals'] > 0 and p['checkpoints'] > 0 and p['start-up'] > 0

def test_mfu_never_above_100(root):
    "A peak measured far too low (as under load) is measured again, and MFU stays at most 100%"
    tr = Run(load_settings(CONFIG, tiny(name='mfu')), quiet=True)
    tr.setup()
    tr.iter_num, tr.start_iter, tr.mfu, tr.peak_flops = 10, 0, -1.0, 1.0   # 1 FLOP/s: any step beats it
    m = tr._mfu(per_iter=1e-3)
    assert 0 < m <= 1 and tr.peak_flops > 1e6
    tr.close()

def test_threads_setting(root):
    tr = run(name='th', threads=1, max_iters=2, eval_interval=2)
    assert tr.threads == 1 and tr.settings_in_effect()['threads'] == 1

def test_source_prepares_missing_dataset(tmp_path, shakespeare_path):
    "munchkin-nb-train CONFIG --source PATH prepares the missing dataset from PATH, then trains"
    r = run_script('munchkin-nb-train', CONFIG, *argv(name='src', max_iters=2, eval_interval=2),
                   '--source', shakespeare_path, root=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path/'etc'/'dataset'/'shakespeare_char'/'meta.json').read_text())
    assert meta['source'] == str(shakespeare_path) and (tmp_path/'models'/'src'/'checkpoint.pt').exists()

def test_torchrun_ddp(root):
    "Two CPU processes (gloo): the run finishes, saves one checkpoint, and both end with the same parameters"
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root), 'OMP_NUM_THREADS': '1'}
    cmd = [str(BIN/'torchrun'), '--standalone', '--nproc_per_node=2', str(BIN/'munchkin-nb-train'), CONFIG,
           *argv(name='ddp', gradient_accumulation_steps=2, max_iters=10, lr_decay_iters=10, eval_interval=10)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'DDP: parameters identical on 2 processes' in r.stdout
    assert r.stdout.count('new best, saved') == 1 and r.stdout.count('Training Setup') == 1
    assert r.stdout.count('Done: 10/10 iterations') == 1
    ck = load_checkpoint(checkpoint_path('ddp'))
    assert ck['iter_num'] == 10
    assert sorted(p.name for p in (root/'models'/'ddp').iterdir()) == ['.lock', 'checkpoint.pt', 'last.pt', 'loss.png', 'metrics.jsonl']

@pytest.mark.skipif(not bpe_available(), reason="GPT-2's BPE is not available offline")
def test_init_from_pretrained_folder(root, shakespeare_path):
    "init_from a local GPT-2 (Hugging Face) folder: BPE dataset, block size cropped, the config's dropout"
    from munchkin_nb.gpt import GPT, GPTConfig
    from munchkin_nb.hub import save_pretrained
    from munchkin_nb.prepare import prepare
    prepare('shakespeare', source=shakespeare_path)
    folder = root/'hf-tiny'
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32, bias=True, activation='gelu_new'))
    save_pretrained(model, folder)
    tr = train(load_settings('shakespeare', tiny(name='ft', init_from=str(folder), block_size=16, max_iters=2, eval_interval=2,
                                                 batch_size=2)), callbacks=[], quiet=True)
    ck = load_checkpoint(last_path('ft'))
    assert ck['model_args']['block_size'] == 16 and ck['model_args']['dropout'] == 0.1 and ck['model_args']['vocab_size'] == 50257
    assert ck['model']['transformer.wpe.weight'].shape == (16, 32) and tr.iter_num == 2
    with pytest.raises(MunchkinError, match='needs a GPT-2 BPE dataset'):
        train(load_settings(CONFIG, tiny(name='ft2', init_from=str(folder))), callbacks=[], quiet=True)
    assert not (root/'models'/'ft2').exists()

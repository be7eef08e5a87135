"Training: exact resume, Ctrl-C, NaN guard, bad input, DDP under torchrun, evaluation"
import os, sys, json, time, signal, shutil, subprocess, importlib.util
from pathlib import Path
import pytest, torch
from conftest import BIN, run_script
from munchkin_nb.config import load_settings, MunchkinError, run_cli
from munchkin_nb.train import train, train_main, eval_main, read_metrics, Callback, TrainingDiverged
from munchkin_nb.checkpoint import load_checkpoint, checkpoint_path, save_checkpoint

CONFIG = 'shakespeare-char-cpu'
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.1, device='cpu', compile=False,
            max_iters=20, lr_decay_iters=20, warmup_iters=5, eval_interval=10, eval_iters=4, log_interval=1)

ENV = {'OMP_NUM_THREADS': '1'}   # tiny models: one thread is faster, and steady on a busy machine

@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny(**kw) -> dict: return {**TINY, **kw}
def argv(**kw) -> list: return [a for k, v in tiny(**kw).items() for a in (f'--{k}', str(v))]
def run(**kw): return train(load_settings(CONFIG, tiny(**kw)), callbacks=[], quiet=True)
def losses(recs) -> dict:
    "Loss per iteration of metrics records (the last one written wins, as after a resume)"
    return {r['iter']: r['loss'] for r in recs if r['kind'] == 'log'}

def test_exact_resume(root):
    "k iterations, then resume to N: the same losses as N iterations straight (dropout on, so RNG state matters)"
    run(name='straight', always_save_checkpoint=True)
    run(name='split', max_iters=10, always_save_checkpoint=True)
    ck = load_checkpoint(checkpoint_path('split'))
    assert ck['iter_num'] == 10 and set(ck) >= {'optimizer', 'scaler', 'rng', 'sampler', 'settings', 'tokenizer'}
    tr = run(name='split', init_from='resume', always_save_checkpoint=True)
    assert tr.iter_num == 20
    straight = losses(read_metrics(root/'models'/'straight'/'metrics.jsonl'))
    split = losses(read_metrics(root/'models'/'split'/'metrics.jsonl'))
    assert sorted(straight) == list(range(20)) and split == straight
    a, b = load_checkpoint(checkpoint_path('straight')), load_checkpoint(checkpoint_path('split'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    # a stop between evals (what Ctrl-C does) also resumes exactly
    tr = train(load_settings(CONFIG, tiny(name='stop')), callbacks=[Stop(at=6)], quiet=True)
    assert tr.interrupted and load_checkpoint(checkpoint_path('stop'))['iter_num'] == 7
    run(name='stop', init_from='resume')
    assert losses(read_metrics(root/'models'/'stop'/'metrics.jsonl')) == straight

class Stop(Callback):
    "Ask the trainer to stop (as Ctrl-C does) after iteration `at`"
    def __init__(self, at): self.at = at
    def on_log(self, tr, rec):
        if rec['iter'] == self.at: tr.stop_requested = True

class Poison(Callback):
    "Turn the weights into NaN at iteration `at`, after recording the checkpoint's bytes"
    def __init__(self, at): self.at, self.saved = at, None
    def on_log(self, tr, rec):
        if rec['iter'] == self.at:
            self.saved = tr.ckpt_path.read_bytes()
            with torch.no_grad():
                for p in tr.raw_model.parameters(): p.fill_(float('nan'))

def test_nan_guard_keeps_best_checkpoint(root):
    s = load_settings(CONFIG, tiny(name='nan', always_save_checkpoint=True))
    cb = Poison(at=12)
    with pytest.raises(TrainingDiverged, match='diverged at iteration 1[2-3].*not overwritten'):
        train(s, callbacks=[cb], quiet=True)
    assert cb.saved is not None and checkpoint_path('nan').read_bytes() == cb.saved
    assert load_checkpoint(checkpoint_path('nan'))['iter_num'] == 10

def test_nan_guard_cli(run_cli):
    "A huge learning rate: one line, exit 2, no checkpoint made from a broken model"
    r = run_cli('munchkin-nb-train', CONFIG, *argv(name='huge', learning_rate=1e9, min_lr=0, grad_clip=0, eval_interval=5, max_iters=40, lr_decay_iters=40), env=ENV)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: training diverged'), r.stderr
    assert 'Traceback' not in r.stderr

def test_ctrl_c_saves_resumable_checkpoint(run_cli, root):
    env = {**os.environ, **ENV, 'MUNCHKIN_ROOT': str(root), 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen([str(BIN/'munchkin-nb-train'), CONFIG, *argv(name='cc', max_iters=100000, lr_decay_iters=100000, eval_interval=100000)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in p.stdout:
        if line.startswith('Iter '): seen += 1
        if seen == 15: break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert 'Traceback' not in err and 'resumable checkpoint' in out
    ck = load_checkpoint(checkpoint_path('cc'))
    assert ck['iter_num'] >= 14
    r = run_cli('munchkin-nb-train', CONFIG, *argv(name='cc', init_from='resume', max_iters=ck['iter_num'] + 3, lr_decay_iters=100000, eval_interval=100000), env=ENV)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(checkpoint_path('cc'))['iter_num'] == ck['iter_num'] + 3

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
    assert 'no checkpoint' in _bad(capsys, [CONFIG, *argv(name='fresh', init_from='resume')])
    assert not (root/'models').exists()
    run(name='shape', max_iters=2, eval_interval=2, always_save_checkpoint=True)
    before = checkpoint_path('shape').read_bytes()
    assert 'n_layer=2 but the config asks for n_layer=3' in _bad(capsys, [CONFIG, *argv(name='shape', init_from='resume', n_layer=3)])
    ck = load_checkpoint(checkpoint_path('shape'))
    ck['tokenizer'] = {'kind': 'char', 'chars': ck['tokenizer']['chars'][::-1]}
    save_checkpoint(ck, root/'models'/'vocab'/'checkpoint.pt')
    assert 'different vocabulary' in _bad(capsys, [CONFIG, *argv(name='vocab', init_from='resume')])
    (root/'models'/'cut').mkdir(); (root/'models'/'cut'/'checkpoint.pt').write_bytes(before[:1000])
    assert 'truncated or corrupt' in _bad(capsys, [CONFIG, *argv(name='cut', init_from='resume')])
    assert checkpoint_path('shape').read_bytes() == before
    assert [r['kind'] for r in read_metrics(root/'models'/'shape'/'metrics.jsonl')].count('start') == 1

@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_missing_cli(run_cli, root):
    r = run_cli('munchkin-nb-train', CONFIG, '--device', 'cuda', '--max_iters', '2', env=ENV)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'no CUDA GPU' in r.stderr, r.stderr
    assert r.stdout == '' and not (root/'models').exists()

@pytest.mark.skipif(importlib.util.find_spec('wandb') is not None, reason='wandb is installed')
def test_wandb_missing(root, capsys):
    assert "pip install -e '.[wandb]'" in _bad(capsys, [CONFIG, *argv(name='wb', wandb_log=True)])
    assert not (root/'models').exists()

def test_eval(root, capsys):
    run(name='ev', max_iters=10, always_save_checkpoint=True)
    r = eval_main([CONFIG, *argv(name='ev'), '--full'])
    assert set(r) == {'train', 'val', 'val_full'} and all(2.0 < v < 4.5 for v in r.values())
    assert 'Whole val split' in capsys.readouterr().out

def test_torchrun_ddp(root):
    "Two CPU processes (gloo): the run finishes, saves one checkpoint, and both end with the same parameters"
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root), 'OMP_NUM_THREADS': '1'}
    cmd = [str(BIN/'torchrun'), '--standalone', '--nproc_per_node=2', str(BIN/'munchkin-nb-train'), CONFIG,
           *argv(name='ddp', gradient_accumulation_steps=2, max_iters=10, lr_decay_iters=10, eval_interval=10)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'DDP: parameters identical on 2 processes' in r.stdout
    assert r.stdout.count('Saved checkpoint') == 1 and r.stdout.count('Training Setup') == 1
    ck = load_checkpoint(checkpoint_path('ddp'))
    assert ck['iter_num'] == 10
    assert sorted(p.name for p in (root/'models'/'ddp').iterdir()) == ['checkpoint.pt', 'loss.png', 'metrics.jsonl']

def test_init_from_pretrained_folder(root):
    "init_from a local GPT-2 (Hugging Face) folder: BPE dataset, block size cropped, the config's dropout"
    from munchkin_nb.gpt import GPT, GPTConfig
    from munchkin_nb.hub import save_pretrained
    src = Path(__file__).resolve().parent.parent/'etc'/'dataset'/'shakespeare'
    if not (src/'meta.json').exists(): pytest.skip('the BPE shakespeare dataset is not prepared in the repository')
    shutil.copytree(src, root/'etc'/'dataset'/'shakespeare', ignore=shutil.ignore_patterns('input.txt'))
    folder = root/'hf-tiny'
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32, bias=True, activation='gelu_new'))
    save_pretrained(model, folder)
    tr = train(load_settings('shakespeare', tiny(name='ft', init_from=str(folder), block_size=16, max_iters=2, eval_interval=2,
                                                 always_save_checkpoint=True, batch_size=2)), callbacks=[], quiet=True)
    ck = load_checkpoint(checkpoint_path('ft'))
    assert ck['model_args']['block_size'] == 16 and ck['model_args']['dropout'] == 0.1 and ck['model_args']['vocab_size'] == 50257
    assert ck['model']['transformer.wpe.weight'].shape == (16, 32) and tr.iter_num == 2
    with pytest.raises(MunchkinError, match='needs a GPT-2 BPE dataset'):
        train(load_settings(CONFIG, tiny(name='ft2', init_from=str(folder))), callbacks=[], quiet=True)

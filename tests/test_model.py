"""Model tests the chapters cannot show: the cached model against recomputation at a shape that takes
the measured decode routes, seeded dropout, Hugging Face weights both ways (against `transformers`
and `safetensors`), damaged folders, the offline hub, the bench CLI"""
import json, math, subprocess, sys
from pathlib import Path
import pytest, torch
from munchkin_nb.config import MunchkinError
from munchkin_nb.gpt import GPT, GPTConfig
from munchkin_nb.hub import load_safetensors, save_safetensors, from_pretrained, save_pretrained

BIN = Path(sys.executable).parent

def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()

@pytest.mark.parametrize('kw,msg', [(dict(n_embd=30, n_head=4), 'divisible by n_head'),
                                    (dict(n_layer=0), 'n_layer must be a positive'),
                                    (dict(vocab_size=-1), 'vocab_size must be a positive'),
                                    (dict(block_size=0), 'block_size'),
                                    (dict(n_head=True), 'n_head must be a positive'),
                                    (dict(activation='relu'), "activation must be 'gelu' or 'gelu_new'")])
def test_bad_config(kw, msg):
    with pytest.raises(MunchkinError, match=msg): GPTConfig(**kw)

def test_cached_forward_matches_full():
    "Every position fed through the caches gives the logits of the whole prefix recomputed"
    m = tiny()
    x = torch.randint(0, 50, (2, 16))
    caches = m.new_caches(2)
    with torch.no_grad():
        full = [m(x[:, :t + 1])[0] for t in range(16)]
        m(x[:, :4], caches=caches)
        for t in range(4, 16):
            step = m(x[:, t:t + 1], caches=caches, pos=t)[0]
            torch.testing.assert_close(step, full[t], atol=1e-5, rtol=1e-5)

def test_greedy_cache_equals_nocache_wide():
    "384 wide, decoding takes decode_linear's measured routes; greedy tokens still match past block_size"
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, vocab_size=65, n_layer=2, n_head=6, n_embd=384)).eval()
    p = torch.randint(0, 65, (1, 3))
    a = m.generate(p, 100, temperature=0)
    assert a.shape == (1, 103) and torch.equal(a, m.generate(p, 100, temperature=0, use_cache=False))

def test_seeded_dropout_is_reproducible():
    "Training with dropout draws the same masks from the same seed: the basis of exact resume"
    m = tiny(dropout=0.2).train()
    x = torch.randint(0, 50, (3, 16))
    def grads(seed):
        torch.manual_seed(seed)
        m.zero_grad()
        m(x, x)[1].backward()
        return [p.grad.clone() for p in m.parameters()]
    a, b, c = grads(1), grads(1), grads(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, w) for u, w in zip(a, c))

def test_safetensors_interop(tmp_path):
    st = pytest.importorskip('safetensors.torch')
    t = {'a': torch.randn(3, 4), 'b': torch.arange(6).view(2, 3), 'h': torch.randn(5).bfloat16()}
    save_safetensors(t, tmp_path/'ours.safetensors')
    for k, v in st.load_file(tmp_path/'ours.safetensors').items(): assert torch.equal(v, t[k])
    st.save_file(t, tmp_path/'theirs.safetensors')
    for k, v in load_safetensors(tmp_path/'theirs.safetensors').items(): assert torch.equal(v, t[k])

@pytest.fixture(scope='module')
def transformers():
    return pytest.importorskip('transformers')

def _perturb_1d(model):
    "Non-trivial biases and norms, so that a swapped or dropped vector shows"
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1: p.add_(torch.randn_like(p) * 0.1)

@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
def test_from_pretrained_hf(tmp_path, transformers, fmt):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    _perturb_1d(hf)
    hf.save_pretrained(tmp_path, safe_serialization=(fmt == 'safetensors'))
    ours = from_pretrained(tmp_path).eval()
    x = torch.randint(0, 99, (2, 32))
    with torch.no_grad(): a, b = ours(x, x)[0], hf(x).logits
    assert (a - b).abs().max().item() < 1e-5

def test_save_pretrained_loads_in_transformers(tmp_path, transformers):
    for bias, act in ((True, 'gelu_new'), (False, 'gelu')):
        m = tiny(bias=bias, activation=act)
        _perturb_1d(m)
        save_pretrained(m, tmp_path/str(bias))
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path/str(bias)).eval()
        x = torch.randint(0, 50, (2, 16))
        with torch.no_grad(): a, b = m(x, x)[0], hf(x).logits
        assert (a - b).abs().max().item() < 1e-5
        back = from_pretrained(tmp_path/str(bias)).eval()
        with torch.no_grad(): assert (back(x, x)[0] - a).abs().max().item() < 1e-5

def test_from_pretrained_bad_folders(tmp_path):
    with pytest.raises(MunchkinError, match='neither a folder nor one of'): from_pretrained('gpt5')
    with pytest.raises(MunchkinError, match='no config.json'): from_pretrained(tmp_path)
    save_pretrained(tiny(), tmp_path)
    cfg = json.loads((tmp_path/'config.json').read_text())
    bad = [({**cfg, 'n_embd': 64, 'n_head': 2}, 'shape mismatch for'),
           ({**cfg, 'activation_function': 'relu'}, "activation_function 'relu' is not supported"),
           ({**cfg, 'model_type': 'llama'}, "model_type 'llama' is not gpt2")]
    for c, msg in bad:
        (tmp_path/'config.json').write_text(json.dumps(c))
        with pytest.raises(MunchkinError, match=msg): from_pretrained(tmp_path)
    (tmp_path/'config.json').write_text('{"vocab_size": ')
    with pytest.raises(MunchkinError, match='config.json is not valid JSON'): from_pretrained(tmp_path)
    (tmp_path/'config.json').write_text(json.dumps(cfg))
    (tmp_path/'model.safetensors').write_bytes(b'garbage')
    with pytest.raises(MunchkinError, match='not a valid safetensors'): from_pretrained(tmp_path)
    (tmp_path/'model.safetensors').unlink()
    with pytest.raises(MunchkinError, match='neither model.safetensors nor'): from_pretrained(tmp_path)
    (tmp_path/'pytorch_model.bin').write_bytes(b'not a pickle')
    with pytest.raises(MunchkinError, match='pytorch_model.bin cannot be loaded'): from_pretrained(tmp_path)
    with pytest.raises(MunchkinError, match='only dropout'):
        from_pretrained(tmp_path, override_args=dict(n_layer=1))

def test_from_pretrained_offline(tmp_path, monkeypatch):
    "Offline without huggingface_hub, a hub name fails with one line naming the remedy, leaving nothing"
    import urllib.request, urllib.error
    def no_network(*args, **kw): raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlretrieve', no_network)
    monkeypatch.setenv('MUNCHKIN_HF_CACHE', str(tmp_path))
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)          # not installed: plain download
    with pytest.raises(MunchkinError) as e: from_pretrained('gpt2')
    assert 'could not download' in str(e.value) and 'pass a local folder' in str(e.value)
    assert '\n' not in str(e.value) and not [p for p in tmp_path.rglob('*') if p.is_file()]

def test_from_pretrained_offline_hub(monkeypatch):
    "Offline with huggingface_hub, the same: one line naming the remedy"
    hub = pytest.importorskip('huggingface_hub')
    def no_network(*args, **kw): raise OSError('no network')
    monkeypatch.setattr(hub, 'snapshot_download', no_network)
    with pytest.raises(MunchkinError) as e: from_pretrained('gpt2')
    assert 'could not get gpt2 from the Hugging Face hub' in str(e.value)
    assert 'pass a local folder' in str(e.value) and '\n' not in str(e.value)

def test_bench_cli(tmp_path):
    out = tmp_path/'b.json'
    r = subprocess.run([str(BIN/'munchkin-nb-bench'), '--config', 'shakespeare-char-cpu', '--iters', '1',
                        '--sample_tokens', '30', '--no_same_window', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'shakespeare-char-cpu' in r.stdout and 'GFLOP/s' in r.stdout
    rep = json.loads(out.read_text())
    res = rep['results'][0]
    assert rep['matmul_peak_flops'] > 0 and res['params'] > 0
    assert res['train']['tokens_per_s'] > 0 and 0 < res['train']['mfu'] < 1.5
    assert res['sample']['cached_tokens_per_s'] > 0 and res['sample']['nanogpt_tokens_per_s'] > 0
    bad = subprocess.run([str(BIN/'munchkin-nb-bench'), '--config', 'nope', '--out', ''],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith('error:')

def test_loss_on_sampler_batches(root):
    "The batch sampler's y is a view (not contiguous); forward takes it as it comes"
    from munchkin_nb.data import BatchSampler
    x, y = BatchSampler('shakespeare_char', 'train', block_size=16, batch_size=3).get_batch()
    assert not y.is_contiguous()
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 65) and abs(loss.item() - math.log(65)) < 0.5

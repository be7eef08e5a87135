"""Model tests the chapters cannot show: the cached model against recomputation at a shape that takes
the measured decode routes, seeded dropout, Hugging Face weights both ways (against `transformers`
and `safetensors`), damaged folders and lying headers, the offline hub, the peak memory of loading a
1.4 GB folder, the bench CLI"""
import json, math, os, re, subprocess, sys
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

def test_from_pretrained_without_hub_library(monkeypatch):
    "Without huggingface_hub, a hub name fails with one line naming the extra and the local folder"
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)          # not installed
    with pytest.raises(MunchkinError) as e: from_pretrained('gpt2')
    assert "pip install -e '.[hub]'" in str(e.value) and 'pass a local folder' in str(e.value)
    assert '\n' not in str(e.value)

def test_from_pretrained_hub_refuses(monkeypatch):
    "The hub refusing (or not having the model): one line naming the remedy"
    hub = pytest.importorskip('huggingface_hub')
    def refused(*args, **kw): raise OSError('refused')
    monkeypatch.setattr(hub, 'snapshot_download', refused)
    with pytest.raises(MunchkinError) as e: from_pretrained('gpt2')
    assert 'could not get gpt2 from the Hugging Face hub (OSError)' in str(e.value)
    assert 'pass a local folder' in str(e.value) and '\n' not in str(e.value)

def test_from_pretrained_offline_hub_cli(tmp_path):
    """HF_HUB_OFFLINE=1, the real library: a name in the hub's cache loads from it; one that is not fails
    through the CLI wrapper with one error line naming the remedy, exit 2, nothing written"""
    pytest.importorskip('huggingface_hub')
    snap = tmp_path/'hf'/'hub'/'models--gpt2'/'snapshots'/('0' * 40)     # the hub's cache layout
    save_pretrained(tiny(), snap)
    (snap.parents[1]/'refs').mkdir()
    (snap.parents[1]/'refs'/'main').write_text('0' * 40)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path/'hf')}
    code = ('import sys; from munchkin_nb.config import run_cli; from munchkin_nb.hub import from_pretrained; '
            'print(from_pretrained("gpt2").num_params(), flush=True); run_cli(from_pretrained, sys.argv[1])')
    before = sorted(tmp_path.rglob('*'))
    r = subprocess.run([sys.executable, '-c', code, 'gpt2-medium'], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout.strip() == str(tiny().num_params()), r.stdout + r.stderr
    assert r.stderr.startswith('error: gpt2-medium is not in the Hugging Face hub') and r.stderr.count('\n') == 1
    assert 'HF_HUB_OFFLINE' in r.stderr and 'pass a local folder' in r.stderr
    assert not [p for p in tmp_path.rglob('*') if p not in before and p.is_file()]

def _lie(path, name, **change):
    "Rewrite the header of safetensors file `path` so that tensor `name` has `change`"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    h = json.loads(raw[8:8 + n])
    h[name] = {**h[name], **change}
    hb = json.dumps(h).encode()
    hb += b' ' * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, 'little') + hb + raw[8 + n:])
    return h[name]

def test_from_pretrained_lying_header(tmp_path):
    "A header that lies about offsets or dtypes, a shape off the config: one line each, no model"
    save_pretrained(tiny(), tmp_path/'good')
    st = tmp_path/'good'/'model.safetensors'
    good = st.read_bytes()
    key = 'transformer.h.1.mlp.c_fc.weight'
    a, b = _lie(st, key)['data_offsets']
    cases = [(dict(data_offsets=[a, b + 64]), 'offset'),
             (dict(data_offsets=[a + 4, b + 4]), 'invalid offset'),
             (dict(dtype='F16'), 'invalid shape, data type, or offset'),
             (dict(dtype='Q4'), 'unknown variant'),
             (dict(dtype='I32'), f'{key.removeprefix("transformer.")} holds torch.int32'),
             (dict(shape=[128, 32]), f'shape mismatch for {key}')]
    for change, msg in cases:
        st.write_bytes(good)
        _lie(st, key, **change)
        with pytest.raises(MunchkinError, match=re.escape(msg)) as e: from_pretrained(tmp_path/'good')
        assert '\n' not in str(e.value), change

PEAK_CHILD = """
import resource, sys, torch
from munchkin_nb.hub import from_pretrained
m = from_pretrained(sys.argv[1])
h = m.transformer.h
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      sum(p.numel() * p.element_size() for p in m.parameters()),
      h[23].mlp.c_proj.weight[5, 9].item(), m.transformer.wte.weight[50256, 3].item(), m.lm_head.weight[50256, 3].item())
"""

def _filled(shape, seed):
    "A tensor of `shape` filled with a repeating block of random numbers (quick even at 1 GB)"
    t, block = torch.empty(shape), torch.rand(1009 * 61, generator=torch.Generator().manual_seed(seed))
    flat, m = t.view(-1), len(block)
    k = flat.numel() // m * m
    flat[:k].view(-1, m).copy_(block)
    flat[k:] = block[:flat.numel() - k]
    return t

def test_from_pretrained_peak_memory(tmp_path):
    "A 1.4 GB gpt2-medium-shaped folder loads in a child whose peak memory is about file + model"
    st = pytest.importorskip('safetensors.torch')
    V, T, C, L, H = 50257, 1024, 1024, 24, 16
    per_layer = {'ln_1.weight': (C,), 'ln_1.bias': (C,), 'attn.c_attn.weight': (C, 3 * C),
                 'attn.c_attn.bias': (3 * C,), 'attn.c_proj.weight': (C, C), 'attn.c_proj.bias': (C,),
                 'ln_2.weight': (C,), 'ln_2.bias': (C,), 'mlp.c_fc.weight': (C, 4 * C), 'mlp.c_fc.bias': (4 * C,),
                 'mlp.c_proj.weight': (4 * C, C), 'mlp.c_proj.bias': (C,)}
    shapes = {'transformer.wte.weight': (V, C), 'transformer.wpe.weight': (T, C),
              'transformer.ln_f.weight': (C,), 'transformer.ln_f.bias': (C,)}
    shapes.update({f'transformer.h.{i}.{k}': s for i in range(L) for k, s in per_layer.items()})
    sd = {k: _filled(s, i) for i, (k, s) in enumerate(shapes.items())}
    want = (sd['transformer.h.23.mlp.c_proj.weight'][9, 5].item(), sd['transformer.wte.weight'][50256, 3].item())
    st.save_file(sd, tmp_path/'model.safetensors', metadata={'format': 'pt'})
    del sd
    (tmp_path/'config.json').write_text(json.dumps(dict(
        architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=V, n_positions=T, n_ctx=T, n_embd=C,
        n_layer=L, n_head=H, n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True, torch_dtype='float32')))
    file_bytes = (tmp_path/'model.safetensors').stat().st_size
    assert file_bytes > 1e9
    r = subprocess.run([sys.executable, '-c', PEAK_CHILD, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, model_bytes, w, e, head = r.stdout.split()
    peak, model_bytes = int(peak), int(model_bytes)
    assert (float(w), float(e)) == want and float(head) == float(e)      # transposed, tied, the file's values
    ratio = peak / (file_bytes + model_bytes)
    print(f"peak {peak / 2**30:.2f} GiB for a {file_bytes / 2**30:.2f} GiB file and a "
          f"{model_bytes / 2**30:.2f} GiB model: {ratio:.2f}x the two")
    assert ratio <= 1.17

def test_bench_cli(tmp_path):
    out = tmp_path/'b.json'
    r = subprocess.run([str(BIN/'munchkin-nb-bench'), '--config', 'shakespeare-char-cpu', '--iters', '1',
                        '--sample_tokens', '30', '--no_same_window', '--decode', 'none',
                        '--out', str(out)],
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

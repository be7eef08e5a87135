"Model tests: GPT-2 shapes and parameter counts, optimizer groups, KV-cache generation, Hugging Face weights both ways, bench CLI"
import json, math, io, contextlib, subprocess, sys
from pathlib import Path
import pytest, torch
from munchkin_nb.config import MunchkinError
from munchkin_nb.attention import CausalSelfAttention, KVCache, explicit_self_attention
from munchkin_nb.gpt import GPT, GPTConfig
from munchkin_nb.hub import load_safetensors, save_safetensors, from_pretrained, save_pretrained
from munchkin_nb.kernels import measure_matmul_peak

CHAR = dict(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False)
BIN = Path(sys.executable).parent

def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32), **kw})).eval()

def test_shakespeare_char_params_and_groups():
    m = GPT(GPTConfig(**CHAR))
    assert m.num_params() == 10_646_784
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    assert 'num decayed parameter tensors: 26, with 10,740,096 parameters' in buf.getvalue()
    assert 'num non-decayed parameter tensors: 13, with 4,992 parameters' in buf.getvalue()

def test_init_loss_near_ln_vocab():
    "At initialisation the model spreads its bets: loss close to ln(65), averaged over 16 sequences"
    torch.manual_seed(0)
    m = GPT(GPTConfig(**CHAR)).eval()
    x, y = torch.randint(0, 65, (16, 64)), torch.randint(0, 65, (16, 64))
    with torch.no_grad(): _, loss = m(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1

@pytest.mark.parametrize('kw,msg', [(dict(n_embd=30, n_head=4), 'divisible by n_head'), (dict(n_layer=0), 'n_layer must be a positive'),
                                    (dict(vocab_size=-1), 'vocab_size must be a positive'), (dict(block_size=0), 'block_size'),
                                    (dict(activation='relu'), "activation must be 'gelu' or 'gelu_new'")])
def test_bad_config(kw, msg):
    with pytest.raises(MunchkinError, match=msg): GPTConfig(**kw)

def test_attention_matches_sdpa_and_cache():
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4).eval(); x = torch.randn(2, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), explicit_self_attention(attn, x), atol=1e-5, rtol=1e-5)
        c = KVCache(2, 4, 12, 16)
        inc = torch.cat([attn(x[:, :5], c)] + [attn(x[:, t:t+1], c) for t in range(5, 12)], 1)
        torch.testing.assert_close(inc, attn(x), atol=1e-5, rtol=1e-5)

def test_cached_forward_matches_full():
    m = tiny(); x = torch.randint(0, 50, (2, 16))
    caches = m.new_caches(2)
    with torch.no_grad():
        full = [m(x[:, :t+1])[0] for t in range(16)]
        m(x[:, :4], caches=caches)
        for t in range(4, 16): torch.testing.assert_close(m(x[:, t:t+1], caches=caches, pos=t)[0], full[t], atol=1e-5, rtol=1e-5)

def test_greedy_cache_equals_nocache_past_block_size():
    m = tiny(); p = torch.randint(0, 50, (3, 5))
    a = m.generate(p, 60, temperature=0); b = m.generate(p, 60, temperature=0, use_cache=False)
    assert a.shape == (3, 65) and torch.equal(a, b)
    for keep in (1, 15): assert torch.equal(m.generate(p, 40, temperature=0, keep=keep), m.generate(p, 40, temperature=0, keep=keep, use_cache=False))

def test_greedy_cache_equals_nocache_char_shape():
    "At the shakespeare-char shape decoding takes decode_linear's measured routes; greedy tokens still match, past block_size."
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**CHAR, 'dropout': 0.0})).eval(); p = torch.randint(0, 65, (1, 3))
    a = m.generate(p, 300, temperature=0); b = m.generate(p, 300, temperature=0, use_cache=False)
    assert a.shape == (1, 303) and torch.equal(a, b)

def test_long_prompt_and_sampling_reproducible():
    m = tiny(); p = torch.randint(0, 50, (1, 40))          # prompt longer than block_size
    g = lambda: torch.Generator().manual_seed(7)
    a = m.generate(p, 30, temperature=0.8, top_k=20, top_p=0.9, generator=g())
    assert torch.equal(a, m.generate(p, 30, temperature=0.8, top_k=20, top_p=0.9, generator=g()))
    assert torch.equal(torch.cat([p] + list(m.generate_stream(p, 30, temperature=0.8, top_k=20, top_p=0.9, generator=g())), 1), a)

def test_crop_block_size():
    m = tiny(); m.crop_block_size(8)
    assert m(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 50)
    with pytest.raises(MunchkinError, match='longer than block_size 8'): m(torch.zeros(1, 9, dtype=torch.long))

def test_load_weights_mismatch():
    m, other = tiny(), tiny(vocab_size=51)
    with pytest.raises(MunchkinError, match='vocabulary mismatch for'): m.load_weights(other.state_dict())
    with pytest.raises(MunchkinError, match='shape mismatch for transformer.wpe.weight'): m.load_weights(tiny(block_size=8).state_dict())
    m.load_weights({'_orig_mod.' + k: v for k, v in tiny().state_dict().items()})   # compiled prefixes are fine

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

@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
def test_from_pretrained_hf(tmp_path, transformers, fmt):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                                         # non-trivial biases and norms
        for n, p in hf.named_parameters():
            if p.dim() == 1: p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=(fmt == 'safetensors'))
    ours = from_pretrained(tmp_path).eval()
    x = torch.randint(0, 99, (2, 32))
    with torch.no_grad(): a, b = ours(x, x)[0], hf(x).logits
    assert (a - b).abs().max().item() < 1e-5

def test_save_pretrained_loads_in_transformers(tmp_path, transformers):
    for bias, act in ((True, 'gelu_new'), (False, 'gelu')):
        m = tiny(bias=bias, activation=act)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() == 1: p.add_(torch.randn_like(p) * 0.1)
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
    m = tiny(); save_pretrained(m, tmp_path)
    cfg = json.loads((tmp_path/'config.json').read_text())
    (tmp_path/'config.json').write_text(json.dumps({**cfg, 'n_embd': 64, 'n_head': 2}))
    with pytest.raises(MunchkinError, match='shape mismatch for'): from_pretrained(tmp_path)
    (tmp_path/'config.json').write_text(json.dumps({**cfg, 'activation_function': 'relu'}))
    with pytest.raises(MunchkinError, match="activation_function 'relu' is not supported"): from_pretrained(tmp_path)
    (tmp_path/'model.safetensors').write_bytes(b'garbage')
    (tmp_path/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(MunchkinError, match='not a valid safetensors'): from_pretrained(tmp_path)
    with pytest.raises(MunchkinError, match='only dropout'): from_pretrained(tmp_path, override_args=dict(n_layer=1))

def test_mfu_and_peak():
    m = tiny()
    assert m.estimate_mfu(4, 1.0, peak_flops=m.flops_per_token() * 16 * 4) == pytest.approx(1.0)
    assert measure_matmul_peak(n=256, reps=2) > 1e8

def test_bench_cli(tmp_path):
    out = tmp_path/'b.json'
    r = subprocess.run([str(BIN/'munchkin-nb-bench'), '--config', 'shakespeare-char-cpu', '--iters', '1', '--sample_tokens', '30', '--no_same_window', '--out', str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'shakespeare-char-cpu' in r.stdout and 'GFLOP/s' in r.stdout
    rep = json.loads(out.read_text())
    res = rep['results'][0]
    assert rep['matmul_peak_flops'] > 0 and res['params'] > 0
    assert res['train']['tokens_per_s'] > 0 and 0 < res['train']['mfu'] < 1.5
    assert res['sample']['cached_tokens_per_s'] > 0 and res['sample']['nanogpt_tokens_per_s'] > 0
    bad = subprocess.run([str(BIN/'munchkin-nb-bench'), '--config', 'nope', '--out', ''], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith('error:')

def test_loss_on_sampler_batches(root):
    "The batch sampler's y is a view (not contiguous); forward takes it as it comes"
    from munchkin_nb.data import BatchSampler
    x, y = BatchSampler('shakespeare_char', 'train', block_size=16, batch_size=3).get_batch()
    assert not y.is_contiguous()
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 65) and abs(loss.item() - math.log(65)) < 0.5

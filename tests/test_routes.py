"""Every fast path against the readable code it stands for, each route forced, whatever this machine's
timing would pick: decoding (fp32 through each matrix-vector route, bf16, int8) at batches of 1, 2 and 5
in the matrix shapes of every config (the compiled route: the smallest, one row), and the training-time paths (blocked attention, the dropout mask)
with dropout off and on. The models have one block (the blocks of a config are alike); their width,
heads, vocabulary and context are the config's."""
import functools, os
import pytest
import torch
import torch.nn.functional as F
from munchkin_nb import kernels
from munchkin_nb.config import load_settings, config_names
from munchkin_nb.gpt import GPT, GPTConfig
from munchkin_nb.attention import explicit_attention, dropout, CausalSelfAttention
from munchkin_nb.kernels import (decode_store, decode_step, decode_routes, use_fast, DecodeLinear,
                                 blocked_causal_attention, mask_dropout, DECODE_ROUTES,
                                 WEIGHT_FORMATS)

# what "close" means: fp32 routes differ from the readable product in the order of their sums; bf16 and
# int8 also in the rounding of their bfloat16 output (one unit in the last place, 2^-8 of a value)
TOL = {'fp32': 1e-4, 'bf16': 2e-2, 'int8': 2e-2}
ROUTES = [(w, how) for w in WEIGHT_FORMATS for how in DECODE_ROUTES[w]]

def _shape(name:str) -> tuple:
    "(n_embd, n_head, vocab_size, block_size) of config `name` (vocabulary: its tokenizer's, padded)"
    s = load_settings(name)
    vocab = s.vocab_size or (65 if s.dataset.endswith('_char') else 50304)
    return s.n_embd, s.n_head, vocab, s.block_size

SHAPES = sorted({_shape(n) for n in config_names()})

@functools.lru_cache(maxsize=1)
def _model(shape:tuple) -> GPT:
    "A one-block model of `shape`, its logits spread wide so that greedy choices are rarely near ties"
    n_embd, n_head, vocab, block = shape
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=1, n_head=n_head, n_embd=n_embd,
                      bias=True)).eval()
    with torch.no_grad(): m.lm_head.weight.mul_(8)
    return m

def _usable(how:str, weights:str='fp32'):
    if how not in decode_routes(weights): pytest.skip(f"route {how} is not usable on this machine")

def _teacher_forced(m, prompt, tokens, store) -> torch.Tensor:
    "Logits (B, n, vocab) before each of `tokens` (B, n): `decode_step` with `store`, or readable"
    caches = m.new_caches(prompt.size(0))
    with torch.inference_mode():
        out = [m(prompt, caches=caches)[0][:, -1]]
        for i in range(tokens.size(1) - 1):
            pos = prompt.size(1) + i
            if store is None: out.append(m(tokens[:, i:i + 1], caches=caches, pos=pos)[0][:, -1])
            else: out.append(decode_step(m, tokens[:, i], caches, pos, store))
    return torch.stack(out, 1)

def _check_greedy(fast, readable, ref_logits, tol):
    "Greedy tokens equal, except where the readable logits' two best are closer than `tol` (a tie)"
    for b in range(fast.size(0)):
        diff = (fast[b] != readable[b]).nonzero()
        if len(diff) == 0: continue
        i = int(diff[0])
        top2 = ref_logits[b, i].topk(2).values
        assert top2[0] - top2[1] < tol, f"row {b}: greedy tokens differ at {i}, not at a near tie"

# every route at every config's shape and batch, except the compiled route: one row takes its kernel
# (several take the readable product, checked below), so it runs at the smallest shape, one row
CASES = [(s, w, h, b) for s in SHAPES for w, h in ROUTES for b in (1, 2, 5)
         if h != 'compiled' or (s == SHAPES[0] and b == 1)]

@pytest.mark.parametrize('shape,weights,how,batch', CASES,
                         ids=[f'{s[0]}x{s[2]}-{w}-{h}-{b}' for s, w, h, b in CASES])
def test_decode_route_equals_readable(shape, weights, how, batch, monkeypatch):
    "Each decoding route, forced, gives the readable code's logits and greedy tokens"
    _usable(how, weights)
    m = _model(shape)
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, shape[2], (batch, 3), generator=g)
    n = 6
    with use_fast(False):       # the readable code: GPT.forward with a cache, plain products
        readable = m.generate(prompt, n, temperature=0, weights=weights)[:, 3:]
        ref = _teacher_forced(m, prompt, readable, None if weights == 'fp32' else
                              decode_store(m, weights))
    store = decode_store(m, weights, how)
    assert store.how == how and all(lin.how == how for lin in store.lins)
    got = _teacher_forced(m, prompt, readable, store)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= TOL[weights] * scale, (got - ref).abs().max() / scale
    monkeypatch.setenv('MUNCHKIN_DECODE_ROUTE', how)       # and through generate, as users call it
    fast = m.generate(prompt, n, temperature=0, weights=weights)[:, 3:]
    _check_greedy(fast, readable, ref, 2 * TOL[weights] * scale)

def test_issue_snippet_batched_sampling():
    "The shakespeare-char shape samples two sequences at once through every route"
    m = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, bias=False)).eval()
    outs = []
    for how in decode_routes():
        os.environ['MUNCHKIN_DECODE_ROUTE'] = how
        try: outs.append(m.generate(torch.zeros(2, 1, dtype=torch.long), 5, temperature=0))
        finally: del os.environ['MUNCHKIN_DECODE_ROUTE']
    assert all(o.shape == (2, 6) for o in outs)
    assert all(torch.equal(o, outs[0]) for o in outs)

@pytest.mark.parametrize('weights,how', ROUTES, ids=[f'{w}-{h}' for w, h in ROUTES])
def test_decode_linear_takes_any_input(weights, how):
    "One row, a batch, a strided batch, a 3-d input, a vector: every route computes its readable product"
    _usable(how, weights)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    lin = DecodeLinear(w, b, weights, how)
    tol = dict(rtol=1e-4, atol=1e-5) if weights == 'fp32' else dict(rtol=2e-2, atol=2e-2)
    for x in (torch.randn(1, 64), torch.randn(5, 64), torch.randn(4, 128)[:, ::2],
              torch.randn(2, 3, 64), torch.randn(64)):
        with torch.inference_mode():
            ref = lin.readable(x.reshape(-1, 64)).reshape(*x.shape[:-1], -1)
            torch.testing.assert_close(lin(x), ref, **tol)
            torch.testing.assert_close(lin(x, 'tanh'), F.gelu(ref, approximate='tanh'), **tol)

def test_forced_route_checked(monkeypatch):
    m = _model(SHAPES[0])
    monkeypatch.setenv('MUNCHKIN_DECODE_ROUTE', 'blas')
    with pytest.raises(Exception, match="decoding route 'blas' unknown for fp32 weights; use linear, onednn, bag"):
        m.generate(torch.zeros(1, 1, dtype=torch.long), 2)

# ---- training-time paths ---------------------------------------------------------------------------

@pytest.mark.parametrize('shape', SHAPES, ids=[f'{s[0]}x{s[2]}' for s in SHAPES])
def test_blocked_attention_without_dropout(shape):
    "Blocked attention equals the explicit one (values and gradients) at each config's width and context"
    n_embd, n_head, _, block = shape
    T = min(block, 256)
    q, k, v = (torch.randn(2, n_head, T, n_embd // n_head, requires_grad=True) for _ in range(3))
    fast = blocked_causal_attention(q, k, v)
    ref = explicit_attention(q, k, v)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    gf = torch.autograd.grad(fast.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(gf, gr): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

def test_blocked_attention_with_dropout_matches_readable_in_distribution():
    "With dropout, blocked attention and the readable attention average to the same and spread alike"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8).expand(6000, 2, 12, 8) for _ in range(3))
    exact = explicit_attention(q[:1], k[:1], v[:1])[0]
    fast = blocked_causal_attention(q, k, v, 0.2)
    with use_fast(False): readable = explicit_attention(q, k, v, 0.2, training=True)
    torch.testing.assert_close(fast.mean(0), exact, atol=0.05, rtol=0)
    torch.testing.assert_close(readable.mean(0), exact, atol=0.05, rtol=0)
    assert abs(fast.std(0).mean() / readable.std(0).mean() - 1) < 0.03

def test_dropout_mask_against_recipe():
    "The 16-bit mask drops the same share, scales alike and keeps its mask for backward"
    x = torch.ones(400, 500, requires_grad=True)
    for p in (0.1, 0.2, 0.5):
        fast = mask_dropout(x, p)
        with use_fast(False): readable = dropout(x, p)
        for y in (fast, readable):
            assert abs((y == 0).float().mean().item() - p) < 0.01
            torch.testing.assert_close(y.detach().unique(), torch.tensor([0.0, 1 / (1 - p)]),
                                       rtol=1e-4, atol=0)
        g, = torch.autograd.grad(fast.sum(), x)
        assert torch.equal(g, fast.detach())

@pytest.mark.parametrize('p', [0.0, 0.2])
def test_attention_layer_fast_and_readable(p):
    "The layer in training mode: equal without dropout, equal in expectation with it"
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4, dropout=p).train()
    x = torch.randn(1, 16, 64)
    if p == 0:
        with use_fast(False): ref = attn(x)
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)
        return
    xs = x.expand(4000, 16, 64)
    with torch.no_grad():
        fast = attn(xs)
        with use_fast(False): readable = attn(xs)
        exact = attn.eval()(x)[0]
    torch.testing.assert_close(fast.mean(0), exact, atol=0.03, rtol=0)
    torch.testing.assert_close(readable.mean(0), exact, atol=0.03, rtol=0)
    assert abs(fast.std(0).mean() / readable.std(0).mean() - 1) < 0.05

def _train(ids, steps:int, dropout:float) -> tuple:
    "A small char model trained `steps` steps from seed 0 on `ids`; (losses, model)"
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=int(ids.max()) + 1, n_layer=2, n_head=2, n_embd=64,
                      dropout=dropout, bias=False))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ix = torch.randint(0, len(ids) - 33, (8,), generator=g)
        x, y = torch.stack([ids[i:i + 32] for i in ix]), torch.stack([ids[i + 1:i + 33] for i in ix])
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, m.eval()

def test_short_training_and_sample_both_ways(shakespeare_path):
    "Training and sampling with the fast paths and with the readable code: the same losses and tokens"
    text = shakespeare_path.read_text()[:50_000]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    fast_losses, fast = _train(ids, 30, 0.0)
    with use_fast(False): readable_losses, readable = _train(ids, 30, 0.0)
    assert max(abs(a - b) for a, b in zip(fast_losses, readable_losses)) < 1e-3
    assert fast_losses[-1] < fast_losses[0] - 0.5            # it learned something
    prompt = torch.tensor([[chars.index(c) for c in 'ROMEO:']])
    a = fast.generate(prompt, 40, temperature=0)
    with use_fast(False): b = readable.generate(prompt, 40, temperature=0)
    assert torch.equal(a, b)
    with_dropout, _ = _train(ids, 30, 0.2)                      # dropout: the fast mask
    with use_fast(False): readable_dropout, _ = _train(ids, 30, 0.2)
    assert abs(sum(with_dropout[-10:]) - sum(readable_dropout[-10:])) / 10 < 0.1

# ---- how the route is chosen -------------------------------------------------------------------------

def _timed_choice(monkeypatch, weights:str, cost:dict, failing=()) -> str:
    "decode_route's choice when each route's product takes `cost[route]` seconds on a played clock"
    clock = [0.0]
    def product(self, x, act=None):
        if self.how in failing: raise kernels.MunchkinError(f"{self.how}: no kernel here")
        clock[0] += cost[self.how]
        return torch.zeros(x.size(0), self.shape[0])
    monkeypatch.setattr(kernels.DecodeLinear, '__call__', product)
    monkeypatch.setattr(kernels, 'time', type('Clock', (), {'perf_counter': lambda: clock[0]}))
    monkeypatch.setattr(kernels, '_DECODE_ROUTE', {})
    monkeypatch.delenv('MUNCHKIN_DECODE_ROUTE', raising=False)
    m = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=192))   # c_fc > 2^17
    return kernels.decode_route(m, weights)

@pytest.fixture
def compiled_timed(monkeypatch):
    "The compiled route timed for any model, however small (it is, from COMPILED_MIN weights up)"
    monkeypatch.setattr(kernels, 'COMPILED_MIN', 0)

@pytest.mark.parametrize('weights', WEIGHT_FORMATS)
def test_route_choice_follows_the_timing(weights, monkeypatch, compiled_timed):
    "Whichever route is fastest by 10% or more is taken, one that cannot build is passed over"
    routes = decode_routes(weights)
    for target in routes:
        cost = {h: 1e-3 for h in routes}
        cost[target] = 0.5e-3
        assert _timed_choice(monkeypatch, weights, cost) == target
    if len(routes) > 1:
        near = {h: 1e-3 for h in routes}
        near[routes[-1]] = 0.95e-3                   # 5% faster than the plain product: not worth it
        assert _timed_choice(monkeypatch, weights, near) == 'linear'
        fast = {h: 1e-3 for h in routes}
        fast[routes[-1]], fast[routes[-2]] = 0.1e-3, 0.5e-3   # the fastest fails to build: the next
        assert _timed_choice(monkeypatch, weights, fast, failing=(routes[-1],)) == routes[-2]

def test_compiled_route_timed_only_for_large_models(monkeypatch, capsys):
    "Below COMPILED_MIN weights the compiled route, however fast, is not timed: the next one wins"
    _usable('compiled')
    cost = {h: 1e-3 for h in decode_routes('bf16')}
    cost['compiled'], cost['linear'] = 0.1e-3, 0.5e-3
    assert _timed_choice(monkeypatch, 'bf16', cost) == 'linear'
    assert capsys.readouterr().err == ''                          # no building: no wait to explain
    monkeypatch.setattr(kernels, 'COMPILED_MIN', 192 * 192 * 12)   # this model's weights: timed
    assert _timed_choice(monkeypatch, 'bf16', cost) == 'compiled'
    note = capsys.readouterr().err                                # the wait, said before it
    assert note.startswith("note: timing bf16's decoding routes (") and note.count('\n') == 1
    assert 'compiled' in note and "the compiled route's kernels take seconds to build" in note
    kernels._DECODE_ROUTE.clear()
    monkeypatch.setenv('MUNCHKIN_DECODE_ROUTE', 'compiled')        # forced: no timing, no note
    m = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=192))
    assert kernels.decode_route(m, 'bf16') == 'compiled' and capsys.readouterr().err == ''

def test_compiled_route_without_a_compiler(monkeypatch):
    "Forced, the compiled route whose kernel cannot be built says so in one line with the way on"
    _usable('compiled')
    def no_compiler(*a, **k): raise RuntimeError("C++ compile error\nfatal: cc1plus not found")
    monkeypatch.setattr(torch._inductor, 'compile', no_compiler)
    monkeypatch.setattr(kernels, '_KERNELS', {})
    monkeypatch.setenv('MUNCHKIN_DECODE_ROUTE', 'compiled')
    m = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    with pytest.raises(kernels.MunchkinError) as e:
        m.generate(torch.zeros(1, 2, dtype=torch.long), 3)
    assert str(e.value) == ("the compiled decoding route could not build its kernel (C++ compile error); "
                            "use MUNCHKIN_DECODE_ROUTE=linear, or install a C++ compiler")
    monkeypatch.setenv('MUNCHKIN_DECODE_ROUTE', 'linear')          # the way on, as the line says
    assert m.generate(torch.zeros(1, 2, dtype=torch.long), 3).shape == (1, 5)

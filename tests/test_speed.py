"Speed: thread choice under a synthetic load, bf16/int8 decoding, the bench under load, GPU dry run"
import os, sys, json, time, subprocess
from pathlib import Path
import pytest
import torch
from munchkin_nb.kernels import (ThreadController, busy_elsewhere, choose_threads, set_threads,
                                 decode_store, decode_step, DecodeLinear, decode_routes)
from munchkin_nb import kernels
from munchkin_nb.gpt import GPT, GPTConfig
from munchkin_nb.bench import competitors, COMPETITOR
from conftest import REPO, run_script, assert_one_line_error

NANOGPT = Path(os.environ.get('MUNCHKIN_NANOGPT', '/nonexistent'))   # a nanoGPT checkout: its steps run too

class Clock:
    "A clock and a /proc reading played by the test: `busy` CPUs used by others, `ours` by us"
    def __init__(self): self.t, self.j, self.busy, self.ours = 0.0, (0.0, 0.0, 0.0), 0.0, 1.0
    def __call__(self): return self.t
    def read(self): return self.j
    def advance(self, dt):
        b, tot, own = self.j
        busy, ours = (self.busy + self.ours) * 100 * dt, self.ours * 100 * dt
        self.j = (b + busy, tot + 200 * dt, own + ours)
        self.t += dt

def run_units(ctl, clock, seconds, unit, kind='step'):
    "Tick `ctl` after units of `unit(threads)` seconds for `seconds`"
    end = clock.t + seconds
    while clock.t < end:
        clock.advance(unit(ctl.n))
        ctl.tick(kind)

def test_thread_choice_under_synthetic_load():
    assert busy_elsewhere((100, 1000, 40), (250, 1200, 90), ncpu=2) == pytest.approx(1.0)
    assert busy_elsewhere(None, (1, 2, 3)) == 0.0
    assert [choose_threads(4, b) for b in (0, 1.2, 2.6, 3.9, 9)] == [4, 3, 1, 1, 1]
    clock, changes = Clock(), []
    ctl = ThreadController(2, cores=2, read=clock.read, clock=clock, set_threads=changes.append,
                           ncpu=2)
    ctl.tick()
    run_units(ctl, clock, 3, lambda n: 0.01)
    assert ctl.n == 2 and changes == []                          # idle: stays at two, nothing set
    clock.busy = 1.6                                             # a neighbour arrives
    run_units(ctl, clock, 2, lambda n: 0.05 if n == 2 else 0.014)
    assert ctl.n == 1 and changes == [1]
    run_units(ctl, clock, 5, lambda n: 0.05 if n == 2 else 0.014)
    assert ctl.n == 1                                            # no trial while it stays
    clock.busy = 0.0                                  # it leaves: a trial of two threads, kept
    run_units(ctl, clock, 3, lambda n: 0.01 if n == 2 else 0.014)
    assert ctl.n == 2 and changes == [1, 2]
    whys = [why.split(':')[0] for *_, why in ctl.log]
    assert whys == ['1.60 CPUs busy elsewhere', '0.00 CPUs busy elsewhere']

def test_lost_trial_backs_off():
    clock, changes = Clock(), []
    ctl = ThreadController(1, cores=2, read=clock.read, clock=clock, set_threads=changes.append,
                           ncpu=2)
    ctl.tick()
    run_units(ctl, clock, 30, lambda n: 0.03 if n == 2 else 0.014)   # two threads always slower
    trials = [t for t, a, b, why in ctl.log if b == 2]
    assert len(trials) >= 2 and all(b == 1 for *_, b, why in ctl.log if why.startswith('trial'))
    assert trials[1] - trials[0] >= 10 and ctl.n == 1              # the second trial waited 10 s
    ctl.tick('token')                                            # other work: its own trials
    run_units(ctl, clock, 3, lambda n: 0.01 if n == 2 else 0.014, 'token')
    assert ctl.n == 2 and ctl.log[-1][3].endswith('trying 2')

def test_set_threads_respects_the_user():
    code = ('import os\nfrom munchkin_nb.kernels import set_threads, thread_controller\n'
            'n = set_threads(int(os.environ["N"]))\n'
            'print(os.environ.get("GOMP_SPINCOUNT"), n, thread_controller() is None)')
    mine = ('OMP_NUM_THREADS', 'GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')
    env = {k: v for k, v in os.environ.items() if k not in mine}
    def run(**kw):
        r = subprocess.run([sys.executable, '-c', code], env={**env, **kw}, capture_output=True,
                           text=True, timeout=120)
        return r.stdout.split()
    spin, n, fixed = run(N='0')
    assert spin == '30000' and 1 <= int(n) <= (os.cpu_count() or 1) and fixed == 'False'
    assert run(N='0', OMP_NUM_THREADS='1', GOMP_SPINCOUNT='5') == ['5', '1', 'True']
    assert run(N='2', OMP_NUM_THREADS='1') == ['30000', '2', 'True']

@pytest.fixture(scope='module')
def trained(tmp_path_factory, shakespeare_path):
    "A 2-layer model trained for seconds on tiny Shakespeare, so greedy choices are not coin flips"
    text = shakespeare_path.read_text()[:200_000]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=64,
                      bias=False))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    n = set_threads(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ix = torch.randint(0, len(ids) - 33, (32,), generator=g)
        x = torch.stack([ids[i:i + 32] for i in ix])
        _, loss = m(x, torch.stack([ids[i + 1:i + 33] for i in ix]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_threads(n)
    return m.eval(), chars

def test_reduced_precision_decoding_close_and_greedy_equal(trained):
    m, chars = trained
    prompt = torch.tensor([[chars.index(c) for c in 'ROMEO:']])
    ref = m.generate(prompt, 100, temperature=0)
    for w in ('bf16', 'int8'):
        assert torch.equal(m.generate(prompt, 100, temperature=0, weights=w), ref), w
        c1, c2 = m.new_caches(1), m.new_caches(1)
        with torch.no_grad():
            m(prompt, caches=c1)
            m(prompt, caches=c2)
            a = decode_step(m, prompt[:, -1], c1, 6, decode_store(m, w))
            b = decode_step(m, prompt[:, -1], c2, 6, decode_store(m, 'fp32'))
        assert (a - b).abs().max() < (0.05 if w == 'int8' else 0.03) * b.abs().max(), w
        assert (a - b).abs().max() > 0                     # it did compute in the other format
    with pytest.raises(Exception, match="weights 'fp4' unknown"):
        m.generate(prompt, 2, weights='fp4')
    assert DecodeLinear(m.lm_head.weight, None, 'int8').nbytes() == m.lm_head.weight.numel()

def test_competitors_run_as_others_do():
    "Competitors spin as libgomp does by default, and stop with the block or with the bench"
    with competitors(1) as (p,):
        environ = Path(f'/proc/{p.pid}/environ')
        env = environ.read_bytes().split(b'\0') if environ.exists() else []
        assert p.poll() is None and not any(e.startswith(b'GOMP_SPINCOUNT=') for e in env)
    assert p.poll() is not None
    orphan = ("import subprocess, sys, os\n"
              "p = subprocess.Popen([sys.executable, '-c', sys.argv[1], '1', str(os.getpid())],"
              " stdout=subprocess.PIPE, text=True)\n"
              "print(p.stdout.readline().strip(), p.pid, flush=True)\n"
              "os._exit(0)")                                   # a bench that dies, leaving it
    ready, pid = subprocess.run([sys.executable, '-c', orphan, COMPETITOR], capture_output=True,
                                text=True, timeout=120).stdout.split()
    time.sleep(1.5)
    stat = Path(f'/proc/{pid}/stat')
    assert ready == 'ready' and (not stat.exists() or stat.read_text().split()[2] == 'Z')

def test_bench_cli_under_load(tmp_path):
    out = tmp_path/'b.json'
    r = run_script('munchkin-nb-bench', '--config', 'shakespeare-char-cpu', '--iters', 1,
                   '--sample_tokens', 10, '--no_same_window', '--under_load', 1,
                   '--load_seconds', 0.3, '--load_warmup', 0.1, '--load_repeats', 2,
                   '--decode', 'shakespeare-char-cpu', '--decode_tokens', 4, '--decode_repeats', 1,
                   '--out', out,
                   env={'XDG_CACHE_HOME': str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert 'beside 1 competing process' in r.stdout and 'weight-read limit' in r.stdout
    rep = json.loads(out.read_text())
    res = rep['results'][0]
    assert 0 < res['train']['mfu'] <= 1
    for k in ('train', 'sample'):
        load = res['load'][k]
        assert len(load['runs_idle']) == len(load['runs_loaded']) == 2 and load['loaded'] > 0
        assert load['ratio'] == pytest.approx(load['loaded'] / load['idle'])
    assert set(rep['decode']['weights']) == {'fp32', 'bf16', 'int8'}
    assert (tmp_path/'munchkin_nb'/'matmul_peak.json').exists()
    bench = lambda *a: run_script('munchkin-nb-bench', *a, '--out', '')
    assert_one_line_error(bench('--under_load', -1), 'under_load')
    assert_one_line_error(bench('--decode_weights', 'fp8'), 'unknown fp8')

def test_bench_every_decode_route(tmp_path, monkeypatch, capsys):
    "--decode_routes: a row for each fp32 route, each forced, measured against the best of them"
    from munchkin_nb.bench import bench_cli      # in this process: its compiled kernels are built
    out = tmp_path/'b.json'
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(kernels, '_CONTROLLER', kernels._CONTROLLER)   # --threads: given back after
    threads = torch.get_num_threads()
    try:
        bench_cli(['--config', '', '--decode', 'shakespeare-char-cpu', '--decode_weights', 'fp32',
                   '--decode_routes', '--decode_tokens', '2', '--decode_repeats', '1', '--threads', '1',
                   '--out', str(out)])
    finally: torch.set_num_threads(threads)
    rows = json.loads(out.read_text())['decode']['weights']
    assert list(rows) == [f'fp32-{h}' for h in decode_routes('fp32')]
    assert all(row['route'] == name.split('-')[1] for name, row in rows.items())
    assert max(row['x_fp32'] for row in rows.values()) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert all(f'fp32-{h}' in printed for h in decode_routes('fp32'))

def test_gpu_check_dry_run(tmp_path, shakespeare_path):
    "Every step of the GPU check on tiny shapes on the CPU, through the script a GPU machine runs"
    nano = ['--nanogpt', str(NANOGPT)] if NANOGPT.exists() else []
    cmd = [REPO/'tools'/'gpu_check.sh', '--device', 'cpu', '--quick', '--source', shakespeare_path,
           '--workdir', tmp_path/'work', '--out', tmp_path/'g.json', *nano]
    r = subprocess.run(list(map(str, cmd)), env={**os.environ, 'PYTHON': sys.executable},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row['step']: row for row in json.loads((tmp_path/'g.json').read_text())['rows']}
    steps = ['bf16', 'fp16', 'resume', 'nocompile'] + ['nanogpt'] * bool(nano)
    assert all(rows[s]['rc'] == 0 and rows[s]['val'] < 5 for s in steps), rows
    assert rows['resume']['first_iter'] == rows['fp16']['last_iter'] == 6
    assert 'continued from iteration 6: yes' in r.stdout
    assert rows['sample']['cached_tokens_per_s'] > 0 and rows['decode']['int8_tokens_per_s'] > 0
    ckpt = tmp_path/'work'/'models'/'gc-bf16'/'checkpoint.pt'
    q = run_script('munchkin-nb-bench', '--quality', ckpt, '--quality_tokens', 20, '--out', '',
                   env={'MUNCHKIN_ROOT': str(tmp_path/'work')})
    assert q.returncode == 0 and 'int8' in q.stdout and 'forced' in q.stdout, q.stderr
    check = lambda *a: run_script('munchkin-nb-bench', '--gpu_check', *a, '--out', '')
    assert_one_line_error(check('--quick', '--device', 'cpu', '--nanogpt', tmp_path/'x'), 'nanogpt')
    no_gpu = 'no CUDA GPU' if not torch.cuda.is_available() else 'tiny Shakespeare'
    assert_one_line_error(check(), no_gpu)

"munchkin-nb-generate and munchkin_nb.generate: loading, seeded sampling, streaming, bad inputs, the widget"
import io, os, sys, time, subprocess
from dataclasses import asdict
import pytest
import torch
from conftest import run_script, BIN
from munchkin_nb.config import Settings, model_dir
from munchkin_nb.data import load_tokenizer, BPETokenizer
from munchkin_nb.gpt import GPT, GPTConfig
from munchkin_nb.generate import Sampler, StreamDecoder, print_stream, generate_cli, SamplerWidget, shape_probs

ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # tiny models: one thread is fastest, and the test machine is shared
RULE = '-' * 60

@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def make_checkpoint(name, tok, block_size=32, vocab_size=None, n_layer=1, n_embd=32, seed=0):
    "An untrained model saved in the checkpoint format of munchkin_nb.train"
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size or tok.vocab_size, n_layer=n_layer, n_head=2, n_embd=n_embd, bias=False)
    s = Settings(dataset='shakespeare_char' if tok.kind == 'char' else 'shakespeare', name=name, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd)
    path = model_dir(name)/'checkpoint.pt'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=GPT(cfg).state_dict(), model_args=asdict(cfg), settings=asdict(s), tokenizer=tok.to_dict(),
                    iter_num=0, best_val_loss=4.2), path)
    return path

@pytest.fixture
def char_model(root):
    make_checkpoint('tiny', load_tokenizer('shakespeare_char'))
    return 'tiny'

@pytest.fixture
def gen(run_cli, char_model):
    "Run munchkin-nb-generate on the tiny character model"
    return lambda *args, **kw: run_cli('munchkin-nb-generate', *args, env=ONE_THREAD, **kw)

def sample_of(stdout:str) -> str:
    "The samples part of the output (after the two setup sections)"
    section = stdout.split('\nModel configuration:\n', 1)[1]
    return section[section.index('\n\n') + 2:]

def check_error(cp, *fragments):
    "Exit code 2, one `error:` line on stderr naming the problem, no traceback"
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), cp.stderr
    assert 'Traceback' not in cp.stderr + cp.stdout
    for f in fragments: assert f in lines[0], lines[0]

def test_cli_seeded_runs_print_the_same_text(gen):
    a = gen('tiny', '--prompt', 'ROMEO:', '--max-tokens', '60', '--seed', '7', '--num-samples', '2')
    assert a.returncode == 0, a.stderr
    assert 'Generation Setup:' in a.stdout and 'Model configuration:' in a.stdout and 'block_size' in a.stdout
    assert a.stdout.count(RULE) == 2 and a.stdout.count('ROMEO:') == 2
    b = gen('tiny', '--prompt', 'ROMEO:', '--max-tokens', '60', '--random-seed', '7', '--iterations', '2')
    assert b.stdout == a.stdout
    c = gen('tiny', '--prompt', 'ROMEO:', '--max-tokens', '60', '--seed', '8', '--num-samples', '2')
    assert sample_of(c.stdout) != sample_of(a.stdout)
    assert '120 tokens in' in a.stderr

def test_cli_text_is_the_samplers_text(gen, char_model):
    out = gen('tiny', '--prompt', 'KING:', '--max-tokens', '50', '--seed', '3', '--temperature', '0.9', '--top-k', '10', '--top-p', '0.95').stdout
    s = Sampler.from_checkpoint(char_model, 'cpu')
    g = s.new_generator(3)
    expected = s.sample('KING:', 50, temperature=0.9, top_k=10, top_p=0.95, generator=g)
    assert sample_of(out) == expected + '\n' + RULE + '\n'

def test_cli_streams_tokens_as_they_are_made(run_cli, root):
    "The first tokens are on stdout while the process is still generating"
    make_checkpoint('slow', load_tokenizer('shakespeare_char'), block_size=256, n_layer=2, n_embd=64)
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root), **ONE_THREAD}
    p = subprocess.Popen([str(BIN/'munchkin-nb-generate'), 'slow', '--prompt', 'ROMEO:', '--max-tokens', '4000', '--no-cache'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        buf = b''
        while b'ROMEO:' not in buf or len(buf.split(b'ROMEO:', 1)[1]) < 5:
            chunk = os.read(p.stdout.fileno(), 100)
            assert chunk, p.stderr.read()
            buf += chunk
        assert p.poll() is None  # text is out, generation goes on
    finally:
        p.kill(); p.wait()

def test_cli_stops_quietly_when_the_reader_goes_away(run_cli, root, char_model):
    "`munchkin-nb-generate ... | head`: no BrokenPipeError traceback"
    env = {**os.environ, 'MUNCHKIN_ROOT': str(root), **ONE_THREAD}
    p = subprocess.Popen([str(BIN/'munchkin-nb-generate'), 'tiny', '--max-tokens', '20000'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(200); p.stdout.close()
    err = p.stderr.read().decode(); p.wait(60)
    assert p.returncode == 1 and 'Traceback' not in err and 'BrokenPipe' not in err, err

def test_print_stream_writes_each_token_in_order(char_model):
    s = Sampler.from_checkpoint(char_model, 'cpu')
    writes = []
    class F(io.StringIO):
        def write(self, x): writes.append(x); return super().write(x)
    text = print_stream(s, 'JULIET:', file=F(), max_new_tokens=40, seed=1)
    ids = list(s.stream_ids('JULIET:', 40, seed=1))
    writes = [x for x in writes if x]  # print also writes its (empty) `end`
    assert writes[0] == 'JULIET:' and writes[1:41] == [s.tok.decode([i]) for i in ids] and writes[41:] == ['\n']
    assert text == 'JULIET:' + s.tok.decode(ids)
    ctx = torch.tensor([s.context('JULIET:')])
    ref = s.model.generate(ctx, 40, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert ids == ref[0, ctx.size(1):].tolist()

def test_empty_prompt_starts_from_newline_or_eot(gen, root, char_model):
    s = Sampler.from_checkpoint(char_model, 'cpu')
    assert s.tokenize('') == [s.tok.stoi['\n']]
    make_checkpoint('tiny-bpe', BPETokenizer(), block_size=16, vocab_size=50304, n_embd=16)
    b = Sampler.from_checkpoint('tiny-bpe', 'cpu')
    assert b.tokenize('') == [50256] and b.tokenize('<|endoftext|>Hi') == [50256, 17250]
    cp = gen('tiny-bpe', '--max-tokens', '20')
    assert cp.returncode == 0 and cp.stdout.count(RULE) == 1, cp.stderr

def expected_sample(model, prompt, n, seed=1337, **kw):
    "What the CLI prints for one sample: the prompt, the seeded sample, a newline and the rule"
    s = Sampler.from_checkpoint(model, 'cpu')
    return s.sample(prompt, n, generator=s.new_generator(seed), **kw) + '\n' + RULE + '\n'

def test_top_k_above_vocabulary_is_clamped(gen, char_model):
    a = gen('tiny', '--top-k', '100000', '--max-tokens', '40')
    assert a.returncode == 0 and 'top-k 100000 is above the vocabulary; using 65' in a.stderr
    assert sample_of(a.stdout) == expected_sample(char_model, '', 40, temperature=0.8, top_k=65)

def test_long_prompt_keeps_its_last_block_size_tokens(gen, root, char_model):
    long = 'First Citizen:\nBefore we proceed any further, hear me speak.\n' * 3
    (root/'prompt.txt').write_text(long)
    a = gen('tiny', '--prompt-file', root/'prompt.txt', '--max-tokens', '30')
    assert a.returncode == 0 and f'the prompt is {len(long)} tokens, more than block_size=32' in a.stderr
    tail = expected_sample(char_model, long[-32:], 30, temperature=0.8)
    assert sample_of(a.stdout) == long[:-32] + tail
    s = Sampler.from_checkpoint(char_model)
    assert s.context(long) == s.tokenize(long[-32:])

def test_bad_inputs_are_one_line_and_exit_2(gen, root):
    check_error(gen('tiny', '--prompt', 'Ça va? ¿'), "characters not in the vocabulary: '¿Ç'")
    check_error(gen('nothing-here'), 'no checkpoint', 'munchkin-nb-train CONFIG --name nothing-here')
    check_error(gen('tiny', '--max-tokens', 'lots'), "invalid int value: 'lots'")

@pytest.mark.parametrize('args,msg', [
    (['--max-tokens', '0'], 'max tokens must be a positive integer, got 0'),
    (['--max-tokens', '-5'], 'max tokens must be a positive integer'),
    (['--temperature', '-0.5'], 'temperature must be a number >= 0 (0 is greedy), got -0.5'),
    (['--temperature', 'nan'], 'temperature must be a number >= 0'),
    (['--top-p', '0'], 'top-p must be in (0, 1]'),
    (['--top-p', '1.5'], 'top-p must be in (0, 1]'),
    (['--top-k', '0'], 'top-k must be a positive integer'),
    (['--num-samples', '0'], 'number of samples must be a positive integer'),
    (['--seed', '-1'], 'seed must be an integer'),
    (['--device', 'gpu'], "device 'gpu' is not one of"),
    (['--prompt-file', 'missing.txt'], "prompt file 'missing.txt' does not exist"),
    (['--prompt', 'a', '--prompt-file', 'x.txt'], 'give --prompt or --prompt-file, not both'),
    (['--frobnicate'], 'unknown option --frobnicate'),
])
def test_bad_arguments(char_model, capsys, args, msg):
    "Same code path as the console script (run_cli), in-process for speed"
    with pytest.raises(SystemExit) as e: generate_cli(['tiny', *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and msg in err[0], err

@pytest.mark.parametrize('argv,msg', [
    (['shakespeare-char-cpu'], 'train one first: munchkin-nb-train shakespeare-char-cpu'),
    (['missing/checkpoint.pt'], 'no checkpoint for'),
    ([], 'the following arguments are required: MODEL'),
])
def test_bad_model(root, capsys, argv, msg):
    with pytest.raises(SystemExit) as e: generate_cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and msg in err[0], err

def test_corrupt_checkpoint(char_model, capsys):
    p = model_dir('tiny')/'checkpoint.pt'
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(SystemExit) as e: generate_cli(['tiny'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ') and 'checkpoint.pt' in err[0]

def test_stream_decoder_holds_back_partial_utf8():
    tok = BPETokenizer()
    ids, dec = tok.encode('naïve 🙂🙂 café'), StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert ''.join(pieces) == 'naïve 🙂🙂 café' and '\ufffd' not in ''.join(pieces)
    assert dec.push(50300) == ''  # a padding id of the 50304-token model

def test_shape_probs_greedy_and_topk():
    l = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert shape_probs(l, 0).tolist() == [[1.0, 0, 0, 0]]
    assert (shape_probs(l, 1.0, top_k=2) > 0).tolist() == [[True, False, True, False]]

def test_widget_generate_and_stop(char_model):
    s = Sampler.from_checkpoint(char_model, 'cpu')
    w = SamplerWidget(s, prompt='ROMEO:', max_tokens=50, temperature=0.7, top_k=5, seed=11)
    w.generate_btn.click()
    assert w.wait(timeout=60)
    assert w.text == s.sample('ROMEO:', 50, temperature=0.7, top_k=5, top_p=1.0, seed=11)
    assert 'ROMEO:' in w.output.value and w.status.value.startswith('done: 50 tokens')
    w.max_tokens.value = 2000
    w.generate_btn.click()
    while w.n_tokens < 5 and w.running: time.sleep(0.001)
    w.stop_btn.click()
    assert w.wait(timeout=60) and w.status.value.startswith('stopped: ') and w.n_tokens < 2000
    w.temperature.value = 0
    w.generate_btn.click(); w.wait(timeout=60)
    assert w.text == s.sample('ROMEO:', 2000, temperature=0)

def test_samples_from_a_checkpoint_made_by_train(root, capsys):
    "munchkin_nb.train's own checkpoint (a few steps) loads, with its tokenizer, and samples"
    from munchkin_nb.config import load_settings
    from munchkin_nb.train import train
    s = load_settings('shakespeare-char-cpu', dict(name='from-train', n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                      max_iters=4, eval_interval=4, eval_iters=1, log_interval=2, warmup_iters=1, lr_decay_iters=4, device='cpu'))
    train(s, callbacks=[], quiet=True)
    generate_cli(['from-train', '--prompt', 'ROMEO:', '--max-tokens', '20'])
    out = capsys.readouterr().out
    assert 'Trained iterations            : 4' in out and out.count(RULE) == 1
    assert len(sample_of(out).split('\n' + RULE)[0]) == len('ROMEO:') + 20

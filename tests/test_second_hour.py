"""A user's second hour, end to end in a temporary root: a folder of their own text prepared (the hint for a folder of
files without extensions followed), a shorter run whose schedule follows --max_iters, then eval and generate by the
run's name, and the summary's "Try it:" commands run as printed. In this process: no interpreter start-ups."""
import re, shlex
import pytest
from test_cli import in_process
from munchkin_nb.checkpoint import load_checkpoint
from munchkin_nb.runs import read_metrics

TINY = ['--n_layer', 1, '--n_head', 2, '--n_embd', 32, '--block_size', 32, '--batch_size', 8, '--eval_interval', 100,
        '--eval_iters', 2, '--log_interval', 1, '--threads', 1, '--device', 'cpu', '--compile', 'False']

def test_the_second_hour(tmp_path, monkeypatch, shakespeare_path, capsys):
    monkeypatch.setenv('MUNCHKIN_ROOT', str(tmp_path))
    run = lambda *argv: in_process(list(argv), capsys)
    poems, text = tmp_path/'poems', shakespeare_path.read_text()[:60_000]
    poems.mkdir()
    for i in range(3): (poems/f'part{i}').write_text(text[i * 20_000:(i + 1) * 20_000])

    # a folder of text files without extensions: the error names them and says how to take them; that works
    code, out, err = run('munchkin-nb-prepare', 'lic', '--source', poems)
    assert code == 2 and '3 others (part0, part1, part2)' in err, err
    glob = shlex.split(re.search(r"take them all with --source ('[^']+')", err)[1])[0]
    code, out, err = run('munchkin-nb-prepare', 'lic', '--source', glob)
    assert code == 0 and 'lic: vocab' in out, err

    # a shorter run of a 2,000-iteration config: the decay follows max_iters, the last step trains at min_lr
    code, out, err = run('munchkin-nb-train', 'shakespeare-char-cpu', '--dataset', 'lic', '--name', 'lic-run',
                         '--max_iters', 300, *TINY)
    assert code == 0, err[-2000:]
    lines = out.splitlines()
    assert 'max_iters                     : 300  (command line)' in lines
    assert 'lr_decay_iters                : 299  (follows max_iters)' in lines
    assert 'warmup_iters                  : 100  (config shakespeare-char-cpu.env:26)' in lines
    logs = {r['iter']: r for r in read_metrics(tmp_path/'models'/'lic-run'/'metrics.jsonl') if r['kind'] == 'log'}
    assert logs[299]['lr'] == 1e-4 == load_checkpoint('lic-run')['settings']['min_lr']   # the last step: min_lr
    assert logs[100]['lr'] == pytest.approx(1e-3) and logs[290]['lr'] < 1.1e-4   # the peak, then down (not 9.78e-04)
    assert next(l for l in lines if l.startswith('iter 299/300:')).endswith('lr 1.00e-04')
    assert 'ETA ?' in next(l for l in lines if l.startswith('iter 0/300:'))   # not before the steps settle
    assert re.search(r'ETA \d+:\d\d', next(l for l in lines if l.startswith('iter 10/300:')))

    # the summary names eval and generate for this run, then a blank line; each runs as printed
    tries = [l.removeprefix('Try it: ') for l in lines if l.startswith('Try it: ')]
    assert tries == ['munchkin-nb-eval lic-run', 'munchkin-nb-generate lic-run'] and out.endswith('lic-run\n\n')
    code, out, err = run(*shlex.split(tries[0]))
    assert code == 0 and re.search(r'train loss [\d.]+ \([\d.]+ bits/byte\), val loss [\d.]+', out), err
    code, out, err = run(*shlex.split(tries[1]), '--max_tokens', 50)
    assert code == 0 and len(out.strip()) > 20, err

    # eval by the run's name uses the run's own settings: its help says which, and none of training's
    code, out, err = run('munchkin-nb-eval', 'lic-run', '--help')
    flat = ' '.join(out.split())
    assert code == 0 and "('lic': run lic-run)" in flat and '(8: run lic-run)' in flat and '--learning_rate' not in out
    code, out, err = run('munchkin-nb-generate', 'lic-run', '--help')   # generate's options are not the run's: it says so
    flat = ' '.join(out.split())
    assert code == 0 and 'from run lic-run: a 1x32 GPT, block 32' in flat and 'none comes from the run' in flat, out
    code, out, err = run('munchkin-nb-eval', 'shakespeare-char-cpu', '--name', 'lic-run')   # the old form: a note
    assert code == 0 and "note: munchkin-nb-eval takes the run's name: munchkin-nb-eval lic-run" in err

    # the same command again: the error's hint (continue with --init_from resume), added as typed, works
    again = ['munchkin-nb-train', 'shakespeare-char-cpu', '--dataset', 'lic', '--name', 'lic-run', '--max_iters', 300,
             *TINY]
    code, out, err = run(*again)
    assert code == 2 and 'continue it with --init_from resume' in err, err
    code, out, err = run(*again, '--init_from', 'resume')
    assert code == 0 and 'Done: 300/300' in out, err[-2000:]

"""One command-line style, checked over EVERY console script in settings.ini: each option takes dashes or
underscores, every mistake (missing argument, unknown option, wrong type) is one `error:` line with exit
code 2, help is HELP_WIDTH wide whatever the terminal, `--version` answers, and each script that computes
takes `--threads`."""
import configparser, importlib, os, re, shlex
from dataclasses import fields
from unittest import mock
import pytest, torch
from conftest import REPO, run_script, assert_one_line_error
from munchkin_nb import __version__
from munchkin_nb.config import Parser, MunchkinError, HELP_WIDTH, Settings
from munchkin_nb.runs import EVAL_SETTINGS, Run, train_main

def _console_scripts() -> dict:
    "{script name: 'module:function'} from settings.ini"
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(REPO/'settings.ini', encoding='utf-8')
    return dict(l.strip().split('=', 1) for l in cfg['DEFAULT']['console_scripts'].split('\n') if l.strip())

SCRIPTS = _console_scripts()
COMPUTES = ['munchkin-nb-prepare', 'munchkin-nb-bench', 'munchkin-nb-train', 'munchkin-nb-eval', 'munchkin-nb-generate']

def test_the_table_covers_every_script():
    "A new console script must be added here: does it compute (then it takes --threads)?"
    assert sorted(SCRIPTS) == sorted(COMPUTES + ['munchkin-nb-configs'])

class _Caught(Exception): pass

def parser_of(script:str) -> Parser:
    "The `Parser` console script `script` builds, caught as it starts parsing (nothing runs)"
    module, fn = SCRIPTS[script].split(':')
    entry = getattr(importlib.import_module(module), fn)
    def catch(self, args=None, namespace=None): raise _Caught(self)
    with mock.patch.object(Parser, 'parse_args', catch), pytest.raises(_Caught) as e: entry(['--help'])
    p = e.value.args[0]
    assert isinstance(p, Parser) and p.prog == script
    return p

def _positionals(p:Parser) -> list:
    "A value for each required positional argument"
    return [str((a.choices and list(a.choices)[0]) or 'x') for a in p._actions
            if not a.option_strings and a.nargs not in ('?', '*')]

def _value(action) -> list:
    "A value `action` accepts and that differs from its default ([] for a flag)"
    if action.nargs == 0: return []
    if action.choices: return [str(list(action.choices)[-1])]
    return ['7'] if action.type in (int, float) else ['some-value']

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_every_option_takes_dashes_and_underscores(script):
    p = parser_of(script)
    pos = _positionals(p)
    options = [a for a in p._actions if a.option_strings and a.dest not in ('help', 'version')]
    assert options or script == 'munchkin-nb-configs'
    for a in options:
        for opt in (o for o in a.option_strings if o.startswith('--')):
            assert '-' not in opt[2:], f'{script}: {opt} is registered with a dash; register it as {opt[:2] + opt[2:].replace("-", "_")}'
            dashed, underscored = Parser.parse_args(p, [*pos, opt.replace('_', '-'), *_value(a)]), Parser.parse_args(p, [*pos, opt, *_value(a)])
            assert vars(dashed) == vars(underscored), (script, opt)
            assert getattr(underscored, a.dest) != a.default, f'{script}: {opt} {_value(a)} did not set {a.dest}'

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_mistakes_are_one_line(script):
    p = parser_of(script)
    pos = _positionals(p)
    with pytest.raises(MunchkinError, match=rf'^unknown option --no-such-option; see {script} --help$'):
        Parser.parse_args(p, [*pos, '--no-such-option'])
    typed = [a for a in p._actions if a.type in (int, float)]
    for a in typed:
        with pytest.raises(MunchkinError, match=rf'^argument {a.option_strings[0]}.*: invalid .* value: .lots.; see'):
            Parser.parse_args(p, [*pos, a.option_strings[0], 'lots'])
    if pos:
        with pytest.raises(MunchkinError, match=r'^the following arguments are required: '):
            Parser.parse_args(p, [])
        with pytest.raises(MunchkinError, match=r"^unexpected argument 'extra'"):
            Parser.parse_args(p, [*pos, 'extra'])

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_version(script, capsys):
    with pytest.raises(SystemExit) as e: Parser.parse_args(parser_of(script), ['--version'])
    assert (e.value.code, capsys.readouterr().out) == (0, f'{script} {__version__}\n')

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_help_width_ignores_the_terminal(script):
    p = parser_of(script)
    with mock.patch.dict(os.environ, COLUMNS='40'): narrow = p.format_help()
    with mock.patch.dict(os.environ, COLUMNS='250'): wide = p.format_help()
    assert narrow == wide
    assert max(len(l) for l in narrow.splitlines()) <= HELP_WIDTH

@pytest.mark.parametrize('script', COMPUTES)
def test_scripts_that_compute_take_threads(script):
    p = parser_of(script)
    assert '--threads' in p._option_string_actions, f'{script} has no --threads option'
    ns = Parser.parse_args(p, [*_positionals(p), '--threads', '3'])
    assert str(ns.threads) == '3'

NOTHING_TO_DO = {'munchkin-nb-prepare': 'give a dataset NAME (or --list)'}

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_as_a_user_runs_them(script, tmp_path):
    "The installed console script itself: --help on a 40-column terminal, and a mistake"
    r = run_script(script, '--help', root=tmp_path, env={'COLUMNS': '40'})
    assert r.returncode == 0 and r.stderr == '', r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f'usage: {script} ') and 'Options take dashes or underscores' in r.stdout
    assert 40 < max(len(l) for l in lines) <= HELP_WIDTH, max(lines, key=len)
    needs_args = bool(_positionals(parser_of(script)))
    r = run_script(script, *([] if needs_args else ['--no-such-option']), root=tmp_path)
    assert_one_line_error(r, 'the following arguments are required' if needs_args else 'unknown option --no-such-option',
                          f'see {script} --help')
    if script in NOTHING_TO_DO:   # an optional positional, yet nothing given: the same one line
        assert_one_line_error(run_script(script, root=tmp_path), NOTHING_TO_DO[script], f'see {script} --help')
    assert not any(tmp_path.iterdir()), 'a mistake wrote files'

OWN_SETTINGS = {'munchkin-nb-train': [f.name for f in fields(Settings)], 'munchkin-nb-eval': list(EVAL_SETTINGS)}

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_help_lists_only_the_settings_it_uses(script):
    "train takes every setting, eval the few it uses (no learning_rate), the others none of them"
    p = parser_of(script)
    groups = {g.title: sorted(a.dest for a in g._group_actions) for g in p._action_groups}
    assert groups.get('settings', []) == sorted(OWN_SETTINGS.get(script, [])), script
    if script == 'munchkin-nb-eval':
        assert not {'--learning_rate', '--max_iters', '--n_layer', '--warmup_iters'} & set(p._option_string_actions)

def test_config_help_shows_the_values_it_would_use(capsys):
    "`munchkin-nb-train CONFIG [--key value] --help`: each setting's value and where it comes from"
    with pytest.raises(SystemExit) as e: train_main(['shakespeare-char-cpu', '--max_iters', '300', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert e.value.code == 0 and 'The values shakespeare-char-cpu uses, and where each is from.' in out
    for shown in ('(300: command line)', '(299: follows max_iters)', '(100: config shakespeare-char-cpu.env:',
                  "(4: config shakespeare-char-cpu.env:", '(False: base)'):
        assert shown in out, shown
    with pytest.raises(SystemExit): train_main(['--help'])   # no config: the base defaults, and how to see a config's
    assert 'with a CONFIG before --help, the values it would use' in ' '.join(capsys.readouterr().out.split())

def in_process(argv:list, capsys) -> tuple:
    "Console script `argv[0]` run in this process on `argv[1:]`: (exit code, stdout, stderr)"
    module, fn = SCRIPTS[argv[0]].split(':')
    capsys.readouterr()
    threads = torch.get_num_threads()
    try: code = getattr(importlib.import_module(module), fn)([str(a) for a in argv[1:]]) and 0
    except SystemExit as e: code = e.code
    finally: torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code or 0, out.out, out.err

def hinted(argv:list, error:str) -> list:
    "The commands an error line hints at, as argument lists: a whole command ending the line, or other --source values"
    whole = re.search(r'(munchkin-nb-[a-z]+ .*)$', error)
    cmds = [shlex.split(whole[1])] if whole else []
    if '--source' in argv:
        at = argv.index('--source') + 1
        cmds += [[*argv[:at], shlex.split(v)[0], *argv[at + 1:]] for v in re.findall(r"--source ('[^']*'|\S+)", error)]
    return cmds

HINTS = [  # (command, what its one error line says): the hints in each line are run as typed
    (['munchkin-nb-generate', 'nosuchrun'], "no checkpoint for 'nosuchrun'"),
    (['munchkin-nb-eval', 'nosuchrun'], "no checkpoint for 'nosuchrun'"),
    (['munchkin-nb-eval', 'x.pt'], "no checkpoint for 'x.pt'"),
    (['munchkin-nb-prepare', 'poems', '--source', '{poems}'], 'has no .txt, .jsonl or .jsonl.gz files, but 2 others'),
]

def test_every_hint_runs_as_typed(root, capsys):
    """Each hint, run as typed, does not fail with the same error (a training it starts is stubbed: its settings,
    dataset, run folder and model are all checked, then it stops)"""
    poems = root/'poems'
    poems.mkdir()
    for name in ('sonnet1', 'sonnet2'): (poems/name).write_text('Shall I compare thee to a summer day? ' * 400)
    ran = 0
    with mock.patch.object(Run, 'run', lambda self: (self.close(), self)[1]):
        for argv, message in HINTS:
            argv = [a.format(poems=poems) for a in argv]
            code, out, err = in_process(argv, capsys)
            assert code == 2 and message in err and err.count('\n') == 1, (argv, err)
            cmds = hinted(argv, err)
            assert cmds and not any('CONFIG' in c or 'PATH' in c for cmd in cmds for c in cmd), err   # no placeholders
            for cmd in cmds:
                code, out, err2 = in_process(cmd, capsys)
                assert code == 0, (cmd, err2)
                ran += 1
    assert ran == 5 and (root/'etc'/'dataset'/'poems'/'meta.json').is_file()
    assert not (root/'models').exists() or not any((root/'models').iterdir())   # the stubbed runs left nothing

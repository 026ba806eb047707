"""
Settings for every script, nanoGPT style, but strict.

A script keeps its settings as commented module globals and then calls

    config, explicit = configure(globals())

which applies, in order, the config files and the --key=value overrides on the command line:

    python train.py config/char_tiny.py --batch_size=32 --compile=False

Unlike nanoGPT's exec-based version, an unknown key (from a file or the command line) or a
value of the wrong type stops the script with one line naming the problem. `--help` prints
every setting with its default and its comment. Values are parsed with ast.literal_eval and
fall back to a plain string; an int is fine for a float setting; a setting whose default is
None takes any literal.
"""

import ast
import difflib
import math
import os
import re
import sys

from errors import die

SIMPLE_TYPES = (bool, int, float, str, tuple, list, type(None))
KINDS = dict(bool="True or False", int="an integer", float="a number", str="a string", tuple="a tuple", list="a list")
# nanoGPT's settings that have another name (or none) here, for the unknown-setting message
NANOGPT_NAMES = {"always_save_checkpoint": ("save_strategy", "use --save_strategy=latest (True) or best (False)"),
                 "start": ("prompt", "use --prompt (FILE:path works too)"),
                 "backend": ("device", "nothing is needed (DDP picks nccl on CUDA, gloo on CPU)")}


# rules for check(): (test, what the value must be)
POSITIVE = (lambda v: v >= 1, "a positive integer")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
ABOVE_ZERO = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT = (lambda v: 0 < v <= 1, "in (0, 1]")
SEED = (lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer in [0, 2**63)")  # what every RNG here takes


def check(settings, rules, source="--"):
    """Stop with one line at the first setting that breaks its rule ({name: (test, must)}): a number (finite) or a
    string; None passes."""
    for name, (ok, must) in rules.items():
        value = settings[name]
        number = isinstance(value, (int, float)) and math.isfinite(value)
        if value is not None and not (ok(value) if isinstance(value, str) else number and ok(value)):
            die(f"{source}{name}={value!r} must be {must}")


def _settings(scope):
    # settings are the script's lower-case module globals of simple types; CONSTANTS and _private are not
    return {k: v for k, v in scope.items() if not k.startswith("_") and not k.isupper() and isinstance(v, SIMPLE_TYPES)}


def _coerce(key, value, default, source):
    """Check `value` against the type of `default`; return it converted, or stop with one line."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = True
        value = value if isinstance(value, str) else str(value)
    else:  # tuple / list
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    if not ok:
        die(f"{source}: {key}={value!r} should be {KINDS[type(default).__name__]} (default {default!r})")
    return value


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _unknown(key, known, source):
    if key in NANOGPT_NAMES and NANOGPT_NAMES[key][0] in known:
        die(f"{source}: '{key}' is nanoGPT's setting; {NANOGPT_NAMES[key][1]} here")
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with --help to list the settings"
    die(f"{source}: unknown setting '{key}'{hint}")


def _comments(path):
    """Map each top-level `name = value  # comment` in the script to its comment, for --help (a long comment may
    stand on the lines just above the setting instead)."""
    comments, above = {}, []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^(\w+)\s*=.*?(?:#\s*(.*))?$", line)
                if m and (m.group(2) or above):
                    comments.setdefault(m.group(1), (m.group(2) or " ".join(above)).strip())
                above = above + [line[1:].strip()] if line.startswith("#") else []
    except OSError:
        pass
    return comments


def declare(scope, *blocks):
    """Add shared settings to a script's, as if written in it: each block maps a name to (default, rule for check()
    or None, comment for --help), e.g. inference.LOAD_SETTINGS. Returns their rules, for check()."""
    rules = {}
    for block in blocks:
        for name, (default, rule, comment) in block.items():
            scope[name] = default
            scope.setdefault("_shared_comments", {})[name] = comment
            if rule is not None:
                rules[name] = rule
    return rules


def print_help(scope, settings):
    doc = (scope.get("__doc__") or "").strip()
    if doc:
        print(doc, end="\n\n")
    comments = {**scope.get("_shared_comments", {}), **_comments(scope.get("__file__", ""))}
    width = min(40, max(len(f"{k}={v!r}") for k, v in settings.items()))
    print("settings (--key=value, after any config/*.py files), with the values in effect:")
    for k, v in settings.items():
        print(f"  --{k}={v!r}".ljust(width + 6) + ("  # " + comments[k] if k in comments else ""))


def configure(scope, argv=None):
    """Apply config files, then --key=value overrides from argv, to the settings in `scope` (a module's
    globals(), updated in place). Returns (settings dict, set of the names a file or flag set)."""
    argv = sys.argv[1:] if argv is None else argv
    settings = _settings(scope)
    known = list(settings)
    explicit = set()
    wants_help = any(a in ("-h", "--help") for a in argv)
    for arg in argv:
        if arg in ("-h", "--help"):
            continue
        if not arg.startswith("--"):
            # a config file: python code whose top-level names must all be known settings
            if not arg.endswith(".py"):
                die(f"'{arg}' is neither a config file (*.py) nor a --key=value setting")
            if not os.path.isfile(arg):
                die(f"config file '{arg}' not found")
            namespace = {}
            with open(arg, encoding="utf-8") as f:
                code = f.read()
            try:
                exec(compile(code, arg, "exec"), namespace)
            except Exception as e:  # a config file is user input: report it in one line
                die(f"{arg}: {type(e).__name__}: {e}")
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, SIMPLE_TYPES):
                    continue  # helpers (_tokens = ...), imported modules, functions
                if key not in settings:
                    _unknown(key, known, arg)
                settings[key] = _coerce(key, value, scope[key], arg)
                explicit.add(key)
        else:
            key, eq, text = arg[2:].partition("=")
            if key not in settings:
                _unknown(key, known, "command line")
            if not eq:
                if not isinstance(scope[key], bool):
                    die(f"--{key} needs a value: --{key}=VALUE")
                text = "True"  # a bare --flag switches a boolean on
            value = text if isinstance(scope[key], str) and text[:1] not in "'\"" else parse_value(text)
            settings[key] = _coerce(key, value, scope[key], "command line")
            explicit.add(key)
    if wants_help:  # after the files and flags: the values in effect
        print_help(scope, settings)
        sys.exit(0)
    scope.update(settings)
    return settings, explicit

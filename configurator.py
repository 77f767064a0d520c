"""
configurator.py: the one config parser every script uses, and the one error path.

Like nanoGPT's configurator.py, minus the exec. A script declares a dataclass of defaults, then

    python script.py [preset.py | preset.json ...] [--key=value ...]

applies preset files in order (`key = literal` lines read with `ast`, never executed; or a JSON
object) and then the flags. Values are Python literals checked against the field's type; string
fields take the text as typed. An unknown key is an error that lists the valid ones. If the
dataclass has a `validate()` method it runs last, so a bad value (a range, a relation between two
flags, an unwritable output folder) is reported before any work starts.

Errors: bad input from the user (a flag, a file, a line, a field) raises a `UserError` (or a
subclass: ConfigError here, DataError in data.py, CheckpointError in model.py). `run_main` prints
it as one line, `error: ...`, and exits with status 2. Any other exception is a bug and keeps its
traceback (exit status 1), so it can be reported.

Durable files: `atomic_write` is the one way a checkpoint file (weights, config.json, tokenizer,
trainer state, shard index) or a result reaches the disk: temporary file in the same folder, write,
flush, fsync, rename, fsync of the folder. A crash leaves the old file or the new one, never half
of one; `remove_tmp_files` clears the `.tmp-*` leftovers of a write that was killed.

This module imports nothing of the project, so every file (kernels.py, ranker_eval.py too) can use it.
"""
import ast
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import typing

EXIT_USER_ERROR = 2
TMP_PREFIX = ".tmp-"    # temporary files of atomic_write (and the writability probe)


class UserError(ValueError):
    """Bad input (flag, file, line, field): reported as one line, exit status 2."""


class ConfigError(UserError):
    """A flag or preset value that is invalid."""


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(typ):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return getattr(args[0] if args else typ, "__name__", str(typ))


def _coerce(name, raw, typ, where):
    """Turn `raw` (a literal already parsed, or a string) into a value of type `typ`."""
    args = typing.get_args(typ)
    if type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.lower() == "none"):
            return None
        typ = next(a for a in args if a is not type(None))
    origin = typing.get_origin(typ) or typ
    if isinstance(origin, type) and origin in (list, dict, tuple) and isinstance(raw, origin):
        return raw
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif typ is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            try:
                value = float(raw)
            except OverflowError:   # an int literal beyond float range (--lr=10**400)
                value = math.inf
            if not math.isfinite(value):   # 1e999 parses as inf: every float flag must be a finite number
                raise ConfigError(f"{where}: {name}={raw!r} is not a finite number")
            return value
    elif typ is str:
        return raw if isinstance(raw, str) else str(raw)
    raise ConfigError(f"{where}: {name}={raw!r} is not a valid {_type_name(typ)}")


def _literal(text, typ):
    """Flag text -> value. String fields take the text as typed (only matching outer quotes are
    removed), so --prompt=1.50 stays "1.50"; other fields read a Python literal."""
    if str in (typ, *typing.get_args(typ)) and text.lower() != "none":
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # not a literal: _coerce names the flag and the expected type


def read_preset(path):
    """A preset file -> dict. .json (an object), or .py with only `name = <literal>` statements."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist (arguments are preset files or --key=value)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".json"):
        return read_json_object(path, context="config file ", expected="a JSON object of key: value")
    try:
        body = ast.parse(text, path).body
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: not a preset of `name = literal` lines ({e.msg})") from None
    out = {}
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring / comment string
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `name = literal` lines are allowed in a preset")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal") from None
    return out


def usage(cls):
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    lines = [doc, ""] if doc else []
    lines.append(f"{cls.__name__}: preset files as bare paths, then --key=value overrides; defaults:")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name}={default!r}")
    return "\n".join(lines)


def parse_config(cls, argv=None):
    """Defaults of dataclass `cls` <- preset file(s) given as bare paths <- --key=value flags,
    then cls.validate() if it exists."""
    argv = sys.argv[1:] if argv is None else argv
    types_ = _field_types(cls)
    values = {}

    def put(key, raw, where):
        if key not in types_:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(types_))}")
        values[key] = _coerce(key, raw, types_[key], where)

    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(cls))
            sys.exit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"flag {arg!r}: use --key=value (valid keys: {', '.join(sorted(types_))})")
            key, text = arg[2:].split("=", 1)
            put(key, _literal(text, types_.get(key, str)), f"flag --{key}")
        else:
            for key, raw in read_preset(arg).items():
                put(key, raw, f"config file {arg}")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------
# Checks for validate() methods: each names the flag, its value and what is allowed.

def check(ok, flag, value, allowed):
    if not ok:
        raise ConfigError(f"--{flag}={value!r}: {allowed}")


def check_range(cfg, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """lo <= value <= hi (or strict with *_open); None = unbounded on that side."""
    v = getattr(cfg, name)
    ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        left = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        right = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ConfigError(f"--{name}={v!r}: must satisfy {left}{name}{right}")


def check_positive(cfg, *names):
    for name in names:
        check_range(cfg, name, 0, lo_open=True)


def check_choice(cfg, name, choices):
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(f"--{name}={v!r}: must be one of {', '.join(map(str, choices))}")


def check_writable_dir(path, flag):
    """The output folder can be created and written, checked before a long run rather than after:
    a probe file is created (and removed) in the nearest folder that exists, so a read-only file
    system or a folder root may not write to is caught too, not only the permission bits."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path}: exists and is not a folder")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"--{flag}={path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}={path}: {os.path.abspath(parent)} is not writable")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=TMP_PREFIX)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--{flag}={path}: {os.path.abspath(parent)} is not writable ({e.strerror})") from None


def _inside(child, parent):
    """child is parent or lies inside it (real paths: links and ./ resolved)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir, inputs, flag="out_dir", finished=("model.safetensors",), resume=False,
                  overwrite=False):
    """A stage never writes into its inputs, and never replaces a finished result silently.
    inputs: {flag: path} (or [(flag, path)]) of what the run reads (files or folders; "" / "scratch" / None skipped).
    --out_dir may not be an input, lie inside one, or contain one. A folder holding any of the
    `finished` files (a saved checkpoint) is refused unless --resume=True continues it or
    --overwrite=True replaces it; nothing in it is deleted before the new result is saved."""
    check_writable_dir(out_dir, flag)
    out = os.path.realpath(out_dir)
    for name, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if not path or path == "scratch":
            continue
        inp = os.path.realpath(path)
        if out == inp:
            raise ConfigError(f"--{flag}={out_dir}: is the same as --{name}={path}; the run would overwrite "
                              f"its own input (choose another --{flag})")
        if _inside(out, inp):
            raise ConfigError(f"--{flag}={out_dir}: lies inside --{name}={path}; the run would write into "
                              f"its own input (choose another --{flag})")
        if _inside(inp, out):
            raise ConfigError(f"--{flag}={out_dir}: contains --{name}={path}; the run would write over "
                              f"its own input (choose another --{flag})")
    if finished and not (resume or overwrite) and os.path.isdir(out_dir):
        held = [f for f in finished if os.path.exists(os.path.join(out_dir, f))]
        if held:
            raise ConfigError(f"--{flag}={out_dir}: already holds a saved checkpoint ({held[0]}); pass "
                              f"--resume=True to continue it or --overwrite=True to replace it, or choose "
                              f"another --{flag}")


def sniff_file(path):
    """What a file holds, from its first bytes: "a safetensors weights file", "a PyTorch pickle or
    zip archive (.pt / .bin)", "a JSON file" or "a text file", so that a file given where another
    kind was expected (weights for a tokenizer or a checkpoint folder) is named as what it is."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors weights file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "a PyTorch pickle or zip archive (.pt / .bin)"
    return "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"


def check_readable(path, flag, kind="file"):
    """An input file or folder exists (kind: "file", "dir" or "any")."""
    exists = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[kind](path)
    if not exists:
        if kind == "dir" and os.path.isfile(path):
            raise ConfigError(f"--{flag}={path}: is a file ({sniff_file(path)}), expected a folder")
        if kind == "file" and os.path.isdir(path):
            raise ConfigError(f"--{flag}={path}: is a folder, expected a file")
        what = {"file": "no such file", "dir": "no such folder", "any": "no such file or folder"}[kind]
        raise ConfigError(f"--{flag}={path}: {what}")


# ------------------------------------------------------------------------------------------------
# Durable writes: every checkpoint file goes through atomic_write.


def atomic_write(path, content):
    """Write `content` (bytes, str, or a function that writes a file at the path it is given) to
    `path` atomically: a temporary file in the same folder, written, flushed, fsynced and closed,
    then renamed over `path`, then the folder fsynced so the rename itself survives a power cut.
    On any error the temporary file is removed and `path` keeps its old content."""
    folder = os.path.dirname(path) or "."
    # .tmp-XXXX-name.ext: the extension stays (torch.save and matplotlib look at it)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        if callable(content):
            os.close(fd)
            fd = None
            content(tmp)
            fd = os.open(tmp, os.O_RDONLY)   # fsync what the writer wrote through its own handle
            os.fsync(fd)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as f:
                fd = None
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if fd is not None:
            os.close(fd)
            fd = None
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would make checkpoints unreadable to other users
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_dir(folder, write):
    """write(tmp_folder), then swap it in for `folder` with two renames (the old folder is removed
    only after the new one is in place): a write or a rename that fails leaves `folder` as it was."""
    folder = os.path.abspath(folder)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{os.path.basename(folder)}.tmp-")
    old = f"{tmp}.old"
    try:
        write(tmp)
        os.chmod(tmp, 0o755)   # mkdtemp's 0700 would make checkpoints unreadable to other users
        if os.path.exists(folder):
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except BaseException:
            if os.path.exists(old) and not os.path.exists(folder):
                os.rename(old, folder)   # the new one could not go in: the old one goes back
            raise
        fsync_dir(os.path.dirname(folder))
        if os.path.exists(old):
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def fsync_dir(folder):
    """fsync a folder (its entries: renames, new files) where the OS supports it (not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path, error=ConfigError, context="", expected="a JSON object", hint="", object_hook=None):
    """The JSON object in `path`, or one `error` line naming the file (and the line): `context`
    before the path (the flag that led here), `hint` after the reason (what to do about it)."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f, object_hook=object_hook)
    except json.JSONDecodeError as e:
        raise error(f"{context}{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}){hint}") from None
    except UnicodeDecodeError as e:
        raise error(f"{context}{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start}){hint}") from None
    if not isinstance(out, dict):
        raise error(f"{context}{path}: holds a JSON {type(out).__name__}, expected {expected}{hint}")
    return out


def append_line(path, text):
    """Append one whole line to a log (metrics.jsonl): one write(2) of the line on an O_APPEND
    descriptor, then fsync, so a kill leaves the file with or without the line; a torn last line
    (power cut mid-write) is skipped by its readers."""
    data = (text.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj, indent=1):
    """A JSON result file, atomically (atomic_write)."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def remove_tmp_files(folder):
    """Remove the `.tmp-*` leftovers of writes that were killed midway (called when a checkpoint
    is saved or resumed). Returns the names removed."""
    if not os.path.isdir(folder):
        return []
    gone = sorted(n for n in os.listdir(folder) if n.startswith(TMP_PREFIX))
    for name in gone:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return gone


# ------------------------------------------------------------------------------------------------
# The one error path of every script.

EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for Ctrl-C
PROGRESS = {}            # {"step": N} once a training loop has a resumable checkpoint at step N


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the training loop saved its last finished step (runtime.save_on_interrupt)."""

    def __init__(self, step):
        super().__init__(step)
        self.step = step


def run_main(main, cls, argv=None):
    """Parse the config and run main(cfg). Expected failures (UserError, a missing or unreadable
    file or folder) become one line on stderr and exit status 2; Ctrl-C is one line (`interrupted`,
    or `interrupted at step N; --resume=True continues` when a checkpoint of step N was saved) and
    exit status 130; anything else is a bug and keeps its traceback."""
    PROGRESS.clear()
    try:
        with user_errors():
            cfg = parse_config(cls, argv)
            return main(cfg)
    except KeyboardInterrupt as e:
        interrupted(getattr(e, "step", None))


def interrupted(step=None):
    """Print the one Ctrl-C line and exit with status 130 (a second Ctrl-C now changes nothing)."""
    with contextlib.suppress(ValueError):   # not the main thread: no signal handlers to change
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    step = PROGRESS.get("step") if step is None else step
    msg = "interrupted" if step is None else f"interrupted at step {step}; --resume=True continues"
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(msg, file=sys.stderr)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def user_errors():
    """The one error path, for code that is not run through run_main (python model.py PATH)."""
    try:
        yield
    except UserError as e:
        fail(e)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename else e)


def fail(message):
    """Print `error: message` on one line and exit with EXIT_USER_ERROR."""
    text = " ".join(str(message).split("\n")).strip() or "unknown error"
    print(f"error: {text}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)

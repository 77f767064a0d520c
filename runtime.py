"""
runtime.py: what every stage script shares and none of them is about: configuration, devices,
DDP, the learning-rate schedule, metrics logging and trainer checkpoints.

Configuration (nanoGPT's configurator, minus the exec): each script declares a dataclass of
defaults; `parse_config(Config, argv)` applies an optional preset file (`config/x.py` holding only
`key = literal` lines, read with `ast`, never executed; or a .json) and then `--key=value`
overrides. Values are Python literals checked against the field's type; an unknown key is an
error that lists the valid ones.
"""
import ast
import dataclasses
import json
import os
import sys
import typing


class ConfigError(ValueError):
    pass


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name, raw, typ, where):
    """Turn `raw` (a literal already parsed, or a string) into a value of type `typ`."""
    args = typing.get_args(typ)
    optional = type(None) in args
    if optional:
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
            return float(raw)
    elif typ is str:
        return raw if isinstance(raw, str) else str(raw)
    raise ConfigError(f"{where}: {name}={raw!r} is not a valid {getattr(typ, '__name__', typ)}")


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cpu is a string


def read_preset(path):
    """A preset file -> dict. .json, or .py with only `name = <literal>` statements."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    out = {}
    for node in ast.parse(text, path).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring / comment string
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `name = literal` lines are allowed in a preset")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal") from None
    return out


def parse_config(cls, argv=None):
    """Defaults of dataclass `cls` <- preset file(s) given as bare paths <- --key=value flags."""
    argv = sys.argv[1:] if argv is None else argv
    types_ = _field_types(cls)
    values = {}

    def put(key, raw, where):
        if key not in types_:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(types_))}")
        values[key] = _coerce(key, raw, types_[key], where)

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"flag {arg!r}: use --key=value")
            key, text = arg[2:].split("=", 1)
            put(key, _literal(text), f"flag --{key}")
        else:
            for key, raw in read_preset(arg).items():
                put(key, raw, f"config file {arg}")
    return cls(**values)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


def run_main(main, cls):
    """Entry point for a stage script: parse the config, turn expected user errors into one clear
    line on stderr and exit code 2 instead of a traceback."""
    try:
        cfg = parse_config(cls)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return main(cfg)

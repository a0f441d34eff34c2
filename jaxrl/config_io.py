"""RLConfig in and out of text: `--config FILE` (TOML) plus command-line overrides, and config.toml.

What the keys are and which values they allow is jaxrl/config.py; this module only reads and
writes them. Imports no jax (scripts load the config before importing it).
Test: `python -m pytest -q tests/test_config.py`.

    cfg = load_config(sys.argv[1:])       # file first, then every CLI override (CLI wins)
    print(format_config(cfg)); save_config(cfg, out / "config.toml")

nanochat-style `key = value` lines are valid TOML. Keys accept `-` and `_` alike
(`--device-batch-size 8` == `--device_batch_size=8`); a bare bool flag (`--resume`) means true;
`--key=none` unsets an Optional key on the command line (TOML has no null: leave the key out).
"""
import json
import os
import tomllib
from pathlib import Path

from jaxrl.config import (
    FIELDS, ConfigError, ConfigTypeError, ConfigValueError, RLConfig, check_keys_and_types, config_key,
    describe_fields, field_type, type_name,
)


def load_config(argv: list[str]) -> RLConfig:
    """`--config FILE` (optional) then `--key=value` / `--key value` overrides, in that order.

    Overrides always win over the file, wherever they appear in argv; a later override of the
    same key wins over an earlier one. Cross-field checks run once on the final values.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    config_file, overrides = _split_argv(argv)
    values = {} if config_file is None else check_keys_and_types(_read_toml(config_file), f"in {config_file}")
    for raw, text in overrides:
        key = config_key(raw, "on the command line")
        values[key] = _parse_cli_value(key, text)
    try:
        return RLConfig(**values)
    except ConfigValueError as e:  # say where the values came from
        where = [f"'{config_file}'"] if config_file else []
        where += ["the command line"] if overrides else []
        raise ConfigValueError(f"{e}\n(values from {' and '.join(where) or 'the defaults'})") from None


_BOOLS = dict.fromkeys(("true", "1", "yes", "on"), True) | dict.fromkeys(("false", "0", "no", "off"), False)


def _parse_cli_value(key: str, text: str):
    """Parse a command-line string by the field's type; 'none'/'null' unsets Optional keys."""
    base, opt = field_type(key)
    if opt and text.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return _BOOLS[text.strip().lower()]
        return base(text)  # int("1.5") and float("x") raise ValueError; str is as written
    except (KeyError, ValueError):
        expected = type_name(key) + (" (true/false)" if base is bool else "")
        unset = " or none" if opt else ""
        raise ConfigTypeError(f"config key '{key}' on the command line: expected {expected}"
                              f"{unset}, found {text!r}") from None


def _read_toml(path: str) -> dict:
    """The file's keys; a UTF-8 byte-order mark (as some Windows editors write) is skipped."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a .toml file, e.g. "
                          "--config scripts/configs/arith_tiny.toml")
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found (relative paths are resolved against "
                          f"the current directory, {os.getcwd()})")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}. Each line must be "
                          '`key = value` with strings quoted (run = "x"), true/false in lower case, '
                          "and None written by leaving the key out") from None


def _split_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """-> (config file or None, [(raw key, raw value)]); a bare bool flag (`--resume`) means true."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg == "--":  # as in `torchrun ... -m scripts.chat_rl -- --config FILE`
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected command-line argument {arg!r}: use --config FILE for a "
                              "config file and --key=value or --key value for overrides")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            key = name.replace("-", "_")
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif key in FIELDS and field_type(key) == (bool, False):
                value = "true"
            else:
                raise ConfigError(f"command-line option --{name} needs a value (--{name}=VALUE)")
        if name != "config":
            overrides.append((name, value))
        elif config_file is not None:
            raise ConfigError(f"--config given twice ({config_file!r} and {value!r}); "
                              "pass one file and put the rest in overrides")
        else:
            config_file = value
    return config_file, overrides


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are valid TOML basic-string escapes
    return repr(v)  # int, or float: repr gives the shortest round-tripping form (0.004, 1e-05)


def format_config(cfg: RLConfig) -> str:
    """The resolved config as TOML, one `key = value` line per field; None keys are comments."""
    lines = [(f"# {k} = None" if v is None else f"{k} = {_toml_value(v)}")
             for k, v in ((name, getattr(cfg, name)) for name in FIELDS)]
    return "\n".join(lines) + "\n"


def save_config(cfg: RLConfig, path: str | os.PathLike) -> None:
    """Write format_config(cfg) to path atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_config(cfg), encoding="utf-8")
    os.replace(tmp, path)


def usage() -> str:
    rows = [f"  --{n}={d!r}  ({t}) {h}" for n, d, t, h in describe_fields()]
    return ("usage: train_rl.py [--config FILE.toml] [--key=value | --key value ...]\n"
            "keys (- and _ are interchangeable; --key=none unsets an Optional key):\n"
            + "\n".join(rows))

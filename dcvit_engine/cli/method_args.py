"""Command-line options of the compression methods, made from the method registry only
(dcvit_engine.compress.api.METHODS): --method with each method's summary, and one flag per
option a method module lists in CLI_OPTIONS, with each method's default read off its
signature. `dcvit compress`, `plan` and `sweep` use it, so a new method needs no CLI code."""
from __future__ import annotations

from dcvit_engine.cli import CommandError
from dcvit_engine.compress.api import METHODS, method_cli_options, method_defaults, method_options


def add_method_argument(parser, methods=None, default: str = "dcvit") -> None:
    methods = tuple(METHODS) if methods is None else methods  # read when the parser is built
    parser.add_argument("--method", choices=list(methods), default=default,
                        help="; ".join(f"{m}: {METHODS[m].summary}" for m in methods))


def flag_of(name: str, option) -> str:
    return option.flag or "--" + name.replace("_", "-")


def method_flags(methods, names=None, defaults_of=method_defaults) -> dict[str, list[tuple]]:
    """option name -> [(method, CliOption, its default)] over `methods` (only `names` if given;
    the defaults from `defaults_of(method)`: the compress function's, or the plan function's).
    Two methods that give one option name different types fail here, naming both."""
    flags: dict[str, list] = {}
    for method in methods:
        defaults = defaults_of(method)
        for name, option in method_cli_options(method).items():
            if names is None or name in names:
                flags.setdefault(name, []).append((method, option, defaults[name]))
    for name, entries in flags.items():
        _check_one_type(name, entries)
    return flags


def _option_type(option, default):
    return option.type or (type(default) if default is not None else None)


def _check_one_type(name: str, entries) -> None:
    """One flag serves every method with an option of that name, so they must agree on its type."""
    typed = [(method, _option_type(option, default)) for method, option, default in entries]
    typed = [(m, t) for m, t in typed if t is not None]
    for method, kind in typed[1:]:
        first, first_kind = typed[0]
        if kind is not first_kind:
            raise TypeError(f"option {name!r} is {getattr(first_kind, '__name__', first_kind)} in "
                            f"dcvit_engine.compress.{first}.compress_{first} (or its CLI_OPTIONS) but "
                            f"{getattr(kind, '__name__', kind)} in dcvit_engine.compress.{method}."
                            f"compress_{method}; give one of them another name or the same type")


def add_method_options(parser, methods=None, names=None, defaults_of=method_defaults) -> list[str]:
    """One flag per CLI option of `methods` (default: every registered method; the flag's
    default None lets the method's own default apply); returns the option names added."""
    flags = method_flags(tuple(METHODS) if methods is None else methods, names, defaults_of)
    for name, entries in flags.items():
        _, first, _ = entries[0]
        given_type = next((o.type for _, o, _ in entries if o.type is not None), None)
        value_type = given_type or next((type(d) for _, _, d in entries if d is not None), str)
        text = "; ".join(f"{m} (default {d}): {o.help}" for m, o, d in entries)
        parser.add_argument(flag_of(name, first), dest=name, type=value_type, default=None,
                            choices=first.choices, metavar=first.metavar, help=text.replace("%", "%%"))
    return list(flags)


def given_options(args, method: str, names, accepted=None) -> dict:
    """The options among `names` that the user gave (not None), for `method`; a given option
    that `method` does not take (`accepted`; default: its compress function's options) is a
    one-line CommandError naming its flag."""
    accepted = method_options(method) if accepted is None else accepted
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    wrong = [name for name in given if name not in accepted]
    if wrong:
        options = {name: entries[0][1] for name, entries in method_flags(METHODS, wrong).items()}
        raise CommandError(f"{', '.join(flag_of(n, options[n]) for n in wrong)} do(es) not apply to "
                           f"--method {method}")
    return given

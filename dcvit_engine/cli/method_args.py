"""Command-line options of the compression methods, made from the method registry only
(dcvit_engine.compress.api.METHODS): --method with each method's summary, and one flag per
option a method module lists in CLI_OPTIONS, with each method's default read off its
signature. `dcvit compress`, `plan` and `sweep` use it, so a new method needs no CLI code."""
from __future__ import annotations

from dcvit_engine.cli import CommandError
from dcvit_engine.compress.api import METHODS, method_cli_options, method_defaults, method_options


def add_method_argument(parser, methods=tuple(METHODS), default: str = "dcvit") -> None:
    parser.add_argument("--method", choices=list(methods), default=default,
                        help="; ".join(f"{m}: {METHODS[m].summary}" for m in methods))


def flag_of(name: str, option) -> str:
    return option.flag or "--" + name.replace("_", "-")


def method_flags(methods, names=None) -> dict[str, list[tuple[str, object, object]]]:
    """option name -> [(method, CliOption, its default)] over `methods` (only `names` if given)."""
    flags: dict[str, list] = {}
    for method in methods:
        defaults = method_defaults(method)
        for name, option in method_cli_options(method).items():
            if names is None or name in names:
                flags.setdefault(name, []).append((method, option, defaults[name]))
    return flags


def add_method_options(parser, methods=tuple(METHODS), names=None) -> list[str]:
    """One flag per CLI option of `methods` (default None: the method's own default applies);
    returns the option names added."""
    flags = method_flags(methods, names)
    for name, entries in flags.items():
        _, first, _ = entries[0]
        given_type = next((o.type for _, o, _ in entries if o.type is not None), None)
        value_type = given_type or next((type(d) for _, _, d in entries if d is not None), str)
        text = "; ".join(f"{m} (default {d}): {o.help}" for m, o, d in entries)
        parser.add_argument(flag_of(name, first), dest=name, type=value_type, default=None,
                            choices=first.choices, metavar=first.metavar, help=text.replace("%", "%%"))
    return list(flags)


def given_options(args, method: str, names) -> dict:
    """The options among `names` that the user gave (not None), for `method`; a given option
    that `method` does not take is a one-line CommandError naming its flag."""
    accepted = method_options(method)
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    wrong = [name for name in given if name not in accepted]
    if wrong:
        options = {name: entries[0][1] for name, entries in method_flags(METHODS, wrong).items()}
        raise CommandError(f"{', '.join(flag_of(n, options[n]) for n in wrong)} do(es) not apply to "
                           f"--method {method}")
    return given

"""argparse types that check a value where it is parsed, so a bad one is refused naming its
option (`--batch-size 0` -> "--batch-size must be >= 1, got '0'")
instead of failing later inside the work with a message that names nothing."""
import argparse


def _whole_number(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


positive_int = _whole_number(1)
nonnegative_int = _whole_number(0)

"""The token-count rules of the two merges, in plain Python, written once: the spec's token
schedule, CAIT's plan, the merge ops and their kernels all use these (the C++ kernels have
their own `atme_layout`, the same rule)."""

# ATME's axes: "w" merges the column pairs of every row, "h" the row pairs
ATME_AXES = ("w", "h")


def atme_merged_grid(grid, axis):
    """The patch grid after ATME halves `axis` ("w": columns, "h": rows); an odd last column
    or row passes through, so the halved side is ceil(n / 2)."""
    rows, cols = grid
    return (rows, (cols + 1) // 2) if axis == "w" else ((rows + 1) // 2, cols)


def tome_protected(class_token, distill_token):
    """Tokens ToMe never merges: the class and distillation tokens."""
    return int(class_token) + int(distill_token)


def tome_mergeable(tokens, protected):
    """ToMe's clamp: at most half of the `tokens - protected` unprotected tokens can be merged
    away in one merge."""
    return (tokens - protected) // 2


def tome_effective_r(tokens, r, class_token, distill_token):
    """The r a ToMe merge of `tokens` tokens removes: r clamped by tome_mergeable."""
    return max(0, min(r, tome_mergeable(tokens, tome_protected(class_token, distill_token))))

"""The token-count rules of the two merges, in plain Python, written once: the spec's token
schedule, CAIT's plan, the merge ops and their kernels all use these (the C++ kernels have
their own `atme_layout`, the same rule)."""


def atme_merged_grid(grid, axis):
    """The patch grid after ATME halves `axis` ("w": columns, "h": rows); an odd last column
    or row passes through, so the halved side is ceil(n / 2)."""
    rows, cols = grid
    return (rows, (cols + 1) // 2) if axis == "w" else ((rows + 1) // 2, cols)


def tome_protected(class_token, distill_token):
    """Tokens ToMe never merges: the class and distillation tokens."""
    return int(class_token) + int(distill_token)


def tome_effective_r(tokens, r, class_token, distill_token):
    """ToMe's clamp: at most half of the unprotected tokens can be merged away."""
    return max(0, min(r, (tokens - tome_protected(class_token, distill_token)) // 2))

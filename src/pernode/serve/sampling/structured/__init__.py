"""Constrained decoding: what a request constrains its output to (spec), our vocabulary as the grammar engine sees
it (token_table), matchers (grammar) and each step's token masks (token_masks)."""

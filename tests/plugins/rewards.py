"""A `module:function` reward for training tests: it varies within every group even for a random
model (whose accuracy and format rewards are all 0), so the update has a gradient to follow."""


def letter_share(completions, samples, **_):
    """Share of a response's characters that are ASCII letters."""
    return [sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1) for text in completions]

"""A `module:function` reward for training tests: it varies within every group even for a random
model (whose accuracy and format rewards are all 0), so the update has a gradient to follow."""


def letter_share(completions, samples, **_):
    """Share of a response's characters that are ASCII letters."""
    return [sum(c.isascii() and c.isalpha() for c in text) / max(len(text), 1) for text in completions]


def half_the_samples(completions, samples, **_):
    """`letter_share` for the samples whose index is 0 or 1 modulo 4, 0.5 for the rest: the groups
    of the other half have equal rewards, which online filtering drops. Every rank of a 2-rank run
    (prompts dealt one at a time) meets both kinds."""
    shares = letter_share(completions, samples)
    return [
        share if int(s.id.rsplit("-", 1)[-1]) % 4 < 2 else 0.5
        for share, s in zip(shares, samples, strict=True)
    ]

"""The ladder builder (`observe-r1 ladder`): the NeuraLadder curriculum [OR1] and the difficulty-prior
data sets [DP] from a reference model's samples (docs/algorithms.md, "NeuraLadder", "Difficulty prior").

One job per module: `config` (the options, the presets), `inputs` (rows from files, gold checks),
`contamination` (overlap with evaluation sets), `samplers` (the reference model in-process through the
rollout engine, or behind an OpenAI-compatible server), `cache` (every sample on disk as it arrives),
`curriculum` (the pure math: levels, filters, order, smoothing, stages), `outputs` (rows, summary, PNG),
`build` (the pipeline) and `cli` (the subcommand).
"""

"""Evaluation: lmms-eval suites against the server, with accuracy and reasoning-chain length per benchmark."""

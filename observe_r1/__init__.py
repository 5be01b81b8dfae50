"""Observe-R1: the contract every stage shares.

The output format (`format`), the sample schema and loader (`data`), model and
processor loading (`modeling`), the tiny offline model (`tiny_model`), the
synthetic verifiable data (`synth`) and the command line (`cli`).
"""

__version__ = "0.1.0"

"""The functions of lmms-eval's rule-based MathVerse task, for our vision-only variant of it."""

from lmms_eval.tasks.mathverse.reasoning.utils import (  # noqa: F401
    mathverse_doc_to_messages,
    mathverse_doc_to_text,
    mathverse_doc_to_visual,
    mathverse_process_results,
)

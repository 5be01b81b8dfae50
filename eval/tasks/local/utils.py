"""Functions of the local lmms-eval tasks: prompt from a sample row, score by the project's answer check.

They run inside lmms-eval's own environment (.venv-eval, where the package is installed without its
dependencies), so they import only the pure parts of the core: the sample type and the answer check. lmms-eval has
already cut the `<observe>` and `<think>` blocks out of the response (`--reasoning_tags`), and
`observe_r1.answer.accuracy` reads the `<answer>` block of what is left, exactly as the training reward does.
"""

from PIL import Image

from observe_r1.answer import accuracy
from observe_r1.data import Sample


def _sample(doc: dict) -> Sample:
    return Sample(
        id=str(doc["id"]),
        images=list(doc["images"]),
        question=doc["question"],
        answer=str(doc["answer"]),
        choices=list(doc["choices"]) or None,
    )


def open_questions(dataset):
    """Rows without options: numeric or free-form answers."""
    return dataset.filter(lambda doc: not doc["choices"])


def choice_questions(dataset):
    """Multiple-choice rows: the gold answer is an option letter."""
    return dataset.filter(lambda doc: bool(doc["choices"]))


def doc_to_visual(doc: dict) -> list:
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs=None) -> list[dict]:
    """One user turn: the images, then the question. No system message: the model backend sets it."""
    content = [{"type": "image", "url": image} for image in doc_to_visual(doc)]
    content.append({"type": "text", "text": doc_to_text(doc)})
    return [{"role": "user", "content": content}]


def process_results(doc: dict, results: list[str]) -> dict:
    """`accuracy`: 1.0 when the answer is equivalent to the gold one (observe_r1/answer.py), else 0.0."""
    return {"accuracy": accuracy(results[0], _sample(doc))}

"""vLLM reasoning-parser plugin for the Observe-R1 output format.

Lets a plain vLLM server split our models' answers the way our own server does:

    vllm serve MODEL --reasoning-parser-plugin serve/reasoning_parser.py --reasoning-parser observe_r1

Plain vLLM has two fields per message, `reasoning` and `content`, where our server has three
(docs/architecture.md, "Contracts"). So here:
- `content` is the answer (text inside `<answer>`, plus any text outside every block, as in
  `observe_r1.format`);
- `reasoning` is the observation followed by the think block, separated by a blank line
  ("observation\\n\\nreasoning" for a well-formed answer), so a client that shows or hides the
  reasoning treats the observation the same way. Text goes to `reasoning` in the order the model
  wrote it, with a blank line wherever it moves between observe and think text, so a stream can
  be sent without reordering.

All tag handling is `observe_r1.format.StreamParser`, the single definition of the format; this
module only maps its three fields onto vLLM's two. Streaming and non-streaming run the same code,
so they give the same split, and a tag split across deltas never leaks into a field.

How it sits in vLLM (written against vLLM 0.32, the `ReasoningParser` interface that vLLM keeps
for out-of-tree plugins):
- vLLM builds one parser per choice of each request, so the streaming state lives on the instance.
- `is_reasoning_end` is always false. Our tags are ordinary text (several tokens each), answer
  text may come before or between the blocks of a malformed response, and once vLLM sees the
  reasoning end it stops calling the parser and passes raw text, tags included, into `content`.
  Keeping the parser in charge of the whole stream keeps the split exact. The price: vLLM's
  structured outputs never start constraining under this parser (they wait for the reasoning to
  end); use `--structured-outputs-config '{"enable_in_reasoning": true}'` to constrain from the
  first token.
- When the stream finishes, vLLM asks `get_streaming_fallback_content` for text still held back;
  that hook can only add `content`. The parser holds back at most a partial tag (e.g. `<thi`), so
  a stream that stops in the middle of a would-be tag inside an observe or think block (cut by
  `max_tokens`) drops those few characters from the streamed `reasoning` rather than put them
  in the answer; the non-streamed response keeps them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.reasoning import ReasoningParser, ReasoningParserManager

try:
    from observe_r1.format import SEGMENT_SEPARATOR, Delta, StreamParser
except ModuleNotFoundError:
    # vLLM loads the plugin by file path; without our package installed, import it from this
    # checkout (the repository root is this file's grandparent folder).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from observe_r1.format import SEGMENT_SEPARATOR, Delta, StreamParser

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.tokenizers import TokenizerLike

PARSER_NAME = "observe_r1"
REASONING_FIELDS = ("observation", "reasoning")
FIELD_SEPARATOR = "\n\n"


class _Splitter:
    """Feeds text to a `StreamParser` and maps its observation/reasoning/answer deltas onto
    vLLM's (reasoning, content)."""

    def __init__(self) -> None:
        self._parser = StreamParser()
        self._last_reasoning_field: str | None = None

    def feed(self, text: str) -> tuple[str, str]:
        return self._split(self._parser.feed(text))

    def finish(self) -> tuple[str, str]:
        return self._split(self._parser.finish())

    def _split(self, deltas: list[Delta]) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        for delta in deltas:
            if delta.field not in REASONING_FIELDS:
                content.append(delta.text)
                continue
            text = delta.text
            if self._last_reasoning_field not in (None, delta.field):
                # A switch always opens a segment; its own one-line separator gives way to ours.
                text = FIELD_SEPARATOR + text.removeprefix(SEGMENT_SEPARATOR)
            self._last_reasoning_field = delta.field
            reasoning.append(text)
        return "".join(reasoning), "".join(content)


def split_response(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a complete response; an empty field is None, as vLLM expects."""
    splitter = _Splitter()
    reasoning, content = splitter.feed(text)
    tail_reasoning, tail_content = splitter.finish()
    return (reasoning + tail_reasoning) or None, (content + tail_content) or None


@ReasoningParserManager.register_module(PARSER_NAME)
class ObserveR1ReasoningParser(ReasoningParser):
    """`<observe>…</observe><think>…</think><answer>…</answer>` → reasoning (observe + think) and
    content (answer)."""

    def __init__(self, tokenizer: TokenizerLike, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self._stream = _Splitter()

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        """Always false: the parser handles the whole output (see the module docstring)."""
        return False

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        """The ids of the tokens whose text lands in the answer."""
        return [
            tid
            for tid, fields in zip(input_ids, self._token_fields(input_ids), strict=True)
            if "answer" in fields
        ]

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens whose text lands in the observation or the think block (vLLM reports it as
        `usage.completion_tokens_details.reasoning_tokens`)."""
        return sum(1 for fields in self._token_fields(token_ids) if fields & set(REASONING_FIELDS))

    def extract_reasoning(
        self,
        model_output: str,
        request: ChatCompletionRequest | ResponsesRequest,
    ) -> tuple[str | None, str | None]:
        return split_response(model_output)

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> DeltaMessage | None:
        reasoning, content = self._stream.feed(delta_text)
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)

    def get_streaming_fallback_content(
        self,
        previous_text: str,
        request: ChatCompletionRequest | ResponsesRequest,
    ) -> str | None:
        """Called by vLLM once the stream ends: flush the text the parser held back."""
        _, content = self._stream.finish()
        return content or None

    def _token_fields(self, token_ids: Sequence[int]) -> list[set[str]]:
        """For each token, the fields its text is released into (held-back text counts for the
        token that releases it; the final flush counts for the last token)."""
        parser = StreamParser()
        fields = []
        for tid in token_ids:
            text = self.model_tokenizer.decode([tid], skip_special_tokens=True)
            fields.append({delta.field for delta in parser.feed(text)})
        tail = {delta.field for delta in parser.finish()}
        if fields:
            fields[-1] |= tail
        return fields

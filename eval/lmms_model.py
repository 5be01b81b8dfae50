"""lmms-eval model `observe_r1`: lmms-eval's OpenAI-compatible backend, reading the model's raw text.

Why a subclass: our server (and vLLM with a reasoning parser) puts only the answer in `message.content`,
but the report needs the whole `<observe>…<think>…<answer>…` text in lmms-eval's logged samples, and
lmms-eval must strip the blocks itself (`--reasoning_tags`) so that what it scores is the answer. So each
request asks for `return_raw_text` and the raw text replaces `content`; a server without that field
(plain vLLM without a reasoning parser) already sends the raw text as `content` and is left as it is.

The benchmark prompts of lmms-eval's reasoning tasks carry their own system message asking for
`<think>/<answer>`; a model trained on the Observe-R1 prompt is asked with that prompt instead
(`system_prompt=observe-r1`, the default: the built-in prompt of `format_variant`, observe or think, which
eval/run.py passes from its `--format-variant`), or with the task's (`system_prompt=task`).

The server's API key is read from OBSERVE_R1_API_KEY (as `observe-r1 serve` does). Registered with lmms-eval through the `lmms_eval.models` entry point (pyproject.toml); this module is
imported only inside lmms-eval's environment.
"""

import os
from types import SimpleNamespace

from lmms_eval.models.chat.openai import OpenAICompatible
from lmms_eval.models.registry_v2 import ModelManifest

from observe_r1.format import DEFAULT_VARIANT
from observe_r1.format import system_prompt as built_in_prompt

SYSTEM_PROMPTS = ("observe-r1", "task")


def manifest() -> ModelManifest:
    """The entry point lmms-eval reads to learn the model name and class."""
    return ModelManifest(model_id="observe_r1", chat_class_path="observe_r1_eval.lmms_model.ObserveR1OpenAI")


class ObserveR1OpenAI(OpenAICompatible):
    is_simple = False

    def __init__(
        self,
        *args,
        system_prompt: str = "observe-r1",
        format_variant: str = DEFAULT_VARIANT,
        raw_text: bool = True,
        **kwargs,
    ):
        if system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt={system_prompt!r}: expected one of {', '.join(SYSTEM_PROMPTS)}")
        prompt = built_in_prompt(format_variant)
        kwargs.setdefault("timeout", 600)  # lmms-eval's 10 s default is far below a long reasoning chain
        # The server's key comes from our variable, never the command line (lmms-eval prints model_args),
        # and not from OPENAI_API_KEY, which GPT-judged tasks read for the judge.
        kwargs.setdefault("api_key", os.environ.get("OBSERVE_R1_API_KEY") or "none")
        super().__init__(*args, **kwargs)
        create = self.client.chat.completions.create
        replace_system = system_prompt == "observe-r1"
        raw_text = str(raw_text).lower() == "true"

        def create_raw(**payload):
            if replace_system:
                rest = [m for m in payload["messages"] if m["role"] != "system"]
                payload["messages"] = [{"role": "system", "content": prompt}, *rest]
            if raw_text:
                payload["extra_body"] = {**payload.get("extra_body", {}), "return_raw_text": True}
            response = create(**payload)
            for choice in response.choices:
                raw = (choice.message.model_extra or {}).get("raw")
                if raw is not None:
                    choice.message.content = raw
            return response

        self.client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create_raw)))

"""Prompt templates of instruction tuning: how a problem is written before the model answers.

The formatted prompt is all the model sees at generation time, and its tokens are exactly those
that `fedsb.data.tokens.tokenize_instructions` masks out of the loss during training (the
response follows it directly), so training and evaluation condition on the same text.

- ``"plain"``: the prompt, then ``PLAIN_SEPARATOR`` (a line "Answer: ").
- ``"alpaca"``: Stanford Alpaca's format, word for word (the one MetaMathQA fine-tuning uses):
  "Below is an instruction ...", ``### Instruction:``, ``### Input:`` only when there is an
  input, and ``### Response:``.
- ``"chat"``: the tokenizer's own chat template with one user turn and the generation prompt
  (the assistant turn's header), for instruction-tuned models.
"""

from __future__ import annotations

from typing import Any

from fedsb.data.schema import DataError

TEMPLATES = ("plain", "alpaca", "chat")

PLAIN_SEPARATOR = "\nAnswer: "

# Stanford Alpaca's two prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def check_template(template: str) -> None:
    """A one-line DataError for an unknown template name."""
    if template not in TEMPLATES:
        raise DataError(f"unknown prompt template {template!r}; accepted: {', '.join(TEMPLATES)}")


def format_prompt(prompt: str, template: str, tokenizer: Any = None, input_text: str | None = None) -> str:
    """The text the model reads before its response, for one of `TEMPLATES`.

    `input_text` is an optional context for the instruction (Alpaca's "input"): a `### Input:`
    section for "alpaca", a paragraph after the prompt for "plain" and "chat"; None or an empty
    string adds nothing. "chat" needs `tokenizer` with a chat template.
    """
    check_template(template)
    has_input = bool(input_text and input_text.strip())
    if template == "alpaca":
        if has_input:
            return ALPACA_WITH_INPUT.format(instruction=prompt, input=input_text)
        return ALPACA_NO_INPUT.format(instruction=prompt)
    content = f"{prompt}\n\n{input_text}" if has_input else prompt
    if template == "plain":
        return content + PLAIN_SEPARATOR
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise DataError(f"prompt template 'chat' needs a tokenizer with a chat template; {name} has none "
                        f"(use 'plain' or 'alpaca')")
    # tokenize=False: the text, so that it is tokenised (and cached) like the other templates.
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)

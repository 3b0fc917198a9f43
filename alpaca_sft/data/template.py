"""The Stanford Alpaca prompt, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py).

The prompt ends in "### Response:\\n" and the response follows with no separator, so that the
prompt's tokens end on a newline: no Mistral sentencepiece piece spans a newline, which keeps the
prompt's tokens an exact prefix of prompt+response's tokens.
"""

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record; an empty (or whitespace-only) input picks the short variant."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)

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


# Text-to-SQL rows (b-mc2/sql-create-context: question, context = CREATE TABLE statements, answer = the
# query) in the showcase's layout: an Alpaca-style prompt whose "### Input:" is the question and whose
# "### Context:" is the schema. It ends in "### Response:\n", as the Alpaca prompt does, for the same reason.
SQL_INSTRUCTION = (
    "You are a powerful text-to-SQL model. Your job is to answer questions about a database. You are given a "
    "question and context regarding one or more tables.\n\nYou must output the SQL query that answers the question."
)
PROMPT_SQL = "### Instruction:\n{instruction}\n\n### Input:\n{question}\n\n### Context:\n{context}\n\n### Response:\n"


def render_sql_prompt(question: str, context: str) -> str:
    """The showcase's prompt for one text-to-SQL row."""
    return PROMPT_SQL.format(instruction=SQL_INSTRUCTION, question=question, context=context)

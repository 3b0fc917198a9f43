"""How each answer ended: stopped by EOS, ran on into new prompt blocks, looped, or cut at the length limit.

Pure functions of the answer's text, how generation stopped and the prompt. The classes, first match wins:

- `eos`: generation stopped at the model's EOS token, whatever the text holds.
- `ran_on`: a line of the answer opens a new prompt block: a line in the template's layout, a `###` heading that
  ends in ":" ("### Input:", "### Response:", and the "### Output:", "### Task:" or "### Explanation:" an untuned
  base invents), a header line of this prompt's own (a line of at most four words ending in ":", such as
  "Answer:"), or the prompt's opening line (its preamble) again.
- `looped`: the answer's tail is one span repeated back to back: its last max(3 x span, 32) characters are
  periodic with the span's length (the copy at the cut may be partial), numbers aside (every number of up to
  six digits counts as the same, so "44. Eat fruit" and "45. Eat fruit", "T23 ON T22.Id" and "T24 ON T23.Id"
  repeat one span; an answer that counts to the limit is one line repeated too).
- `cut`: the length limit ended an answer that is none of the above (a long answer cut short).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.template import PROMPT_SQL, PROMPT_WITH_INPUT

EOS, RAN_ON, LOOPED, CUT = "eos", "ran_on", "looped", "cut"
CLASSES = (EOS, RAN_ON, LOOPED, CUT)
LOOP_MIN_COPIES = 3
LOOP_MIN_CHARS = 32  # below this a repeat is a table rule or an ellipsis ("|---|---|", "......"), not a loop
TEMPLATE_MARKERS = tuple(sorted(set(re.findall(r"(?m)^### [A-Za-z]+:", PROMPT_WITH_INPUT + PROMPT_SQL))))
BLOCK_HEADING = re.compile(r"^#{1,6} [A-Z][A-Za-z ]{0,30}:$")  # the template's layout: "### Word:" alone on a line
NUMBER = re.compile(r"(?<!\d)\d{1,6}(?!\d)")  # longer runs are data: "0000000000" loops by itself, pi's digits do not
PREAMBLE_CHARS = 40  # a prompt's opening line is matched on its first 40 characters


@dataclass(frozen=True)
class Ending:
    answer_class: str  # one of CLASSES
    detail: str | None = None  # ran_on: the line that starts a new block; looped: the span and its copies


def classify(text: str, stop: str, prompt: str) -> Ending:
    if stop == EOS:
        return Ending(EOS)
    if (line := new_block_line(text, prompt)) is not None:
        return Ending(RAN_ON, line)
    if (loop := repeated_tail(text)) is not None:
        span, copies = loop
        return Ending(LOOPED, f"{span!r} x {copies}")
    return Ending(CUT)


def layout_markers(prompt: str) -> tuple[list[str], str | None]:
    """The header lines that open a block of this prompt (the template's and its own), and its preamble."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    headers = list(TEMPLATE_MARKERS) + [line for line in lines if line.endswith(":") and len(line.split()) <= 4]
    opening = lines[0] if lines and len(lines[0]) >= PREAMBLE_CHARS and not lines[0].endswith(":") else None
    return headers, opening[:PREAMBLE_CHARS] if opening else None


def new_block_line(text: str, prompt: str) -> str | None:
    """The first line of the answer that starts a new prompt block, or None."""
    headers, preamble = layout_markers(prompt)
    for line in text.splitlines():
        stripped = line.strip()
        if (BLOCK_HEADING.match(stripped) or any(stripped.startswith(h) for h in headers)
                or (preamble and stripped.startswith(preamble))):
            return stripped
    return None


def repeated_tail(text: str) -> tuple[str, int] | None:
    """(span, whole copies) when the text's tail is one span repeated back to back, the shortest such span; else None."""
    normalized = NUMBER.sub("#", text)
    size = len(normalized)
    for period in range(1, size // LOOP_MIN_COPIES + 1):
        needed = max(LOOP_MIN_COPIES * period, LOOP_MIN_CHARS)
        if needed > size:
            break
        tail = normalized[size - needed :]
        if tail[:-period] == tail[period:]:  # periodic: every character equals the one a span later
            start = size - needed
            while start > 0 and normalized[start - 1] == normalized[start - 1 + period]:
                start -= 1
            return normalized[start : start + period], (size - start) // period
    return None

"""Greedy answers to many prompts, batched, each recording whether it stopped by EOS.

Used after training (train/validation.py's samples), by eval_compare.py and bench/generation_speed.py. Three ways to
batch (`batching`), all through transformers' generate and with the same answers (in fp32, those of one prompt at a
time; tests/test_generation.py):

- "static" (generate()'s default; eval_compare.py's "auto" chooses with auto_batching()): batches of similar length,
  each generated until its longest answer ends.
- "refill": at most `batch_size` prompts generate together, in rounds. A round ends once an eighth of
  its rows are done (EOS, or their token limit); the done rows then leave the KV cache, and waiting prompts join it:
  they are run through the model into a cache of their own, laid beside the running one, both left-padded to one
  length. A few answers that loop to the token limit then hold a row each, not a whole batch each. Its decoding
  steps read each key/value head of the cache once, not once per query head (kernels/grouped_decode.py).
- "compiled": static batches as "static", each on a static cache, so that generate compiles its decoding step
  (transformers' automatic compile: torch.compile's "reduce-overhead" mode, CUDA graphs) and a step costs one graph
  launch instead of hundreds of kernel launches. Only on devices transformers compiles for (GPUs); elsewhere it
  decodes uncompiled on the static cache, said once. Its first batch also compiles the step (bench/generation_speed.py
  times that apart); _CompiledDecoding says what compiles again.

Measured on H100s (bench/RESULTS.md, 2026-12-06 and its third session; bench/generation_speed.py), 414 held-out
prompts, 512 new tokens, on the real Gemma-3-270m (every prompt in one batch of 512): refill ran at 0.37x static's
prompts per second for the tuned model and 0.92x for the base (its rounds cost more than the rows they drop, on a
model this small whose steps are host-bound); compiled at 3.03x for the tuned model (88.5 prompts/s against 29.2)
and 7.50x for the base (86.3 against 11.5), once compiled: the first run, compile included, took 14.4 s against
static's 14.2 and 30.0 s against 36.0. On the random-weight 7B shape, 128 prompts in one batch: compiled 5.91x
static (14.0 prompts/s against 2.37; first run with the compile 39.5 s against 54), refill 1.48x. So refill is kept
to measure on larger models, and auto_batching() chooses between static and compiled by what the compile costs.

Every way, the longest prompts go first (less padding) and the answers come back in the prompts' order; a batch
that runs out of GPU memory is split and goes on, said once.

transformers' own continuous batching (`generate_batch`) was the other candidate: without a flash-attention package
(the GPU image has none) it runs `paged|sdpa`, which packs the requests of a step into one row and masks attention
over all their caches at once, so a step's attention grows with the square of the requests in it (upstream measured
it 3-5x slower than with flash attention: transformers#42839).
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import (Cache, DynamicLayer, DynamicSlidingWindowLayer, StaticLayer,
                                      StaticSlidingWindowLayer)

from ..kernels.grouped_decode import grouped_decoding

BATCHINGS = ("compiled", "refill", "static")
# Compiling the decoding step costs tens of seconds once per process and shape (25-40 s measured on an H100) and then
# saves tens of milliseconds a step: it pays back past about this many decoding steps (batches x new tokens). On the
# real Gemma-3-270m (bench/RESULTS.md, 2026-12-06 third session), 414 prompts in one batch, base then tuned:
# 128 new tokens took 39.8 s compiled against 17.7 s static (eval_compare.py), 512 took 44.4 s against 50.2 s
# (generation_speed.py's first runs); the 7B shape gains
# more per step (54 s static against 39.5 s compiled for 512 steps, compile included).
COMPILE_PAYS_BACK_AFTER_STEPS = 512
# A round ends once this share of its rows is done: each round costs a generate() call, a prefill of the joining
# prompts and a copy of the cache (about one decoding step), and rows that finished early in it wait for its end.
ROUND_END_SHARE = 1 / 8


def auto_batching(prompts: int, batch_size: int, max_new_tokens: int, device: str) -> tuple[str, str]:
    """"compiled" where transformers compiles (a GPU) and the run is long enough for the compile to pay back,
    "static" otherwise; and why, in words."""
    steps = -(-prompts // batch_size) * max_new_tokens
    if not str(device).startswith("cuda"):
        return "static", f"static: on {device} the decoding step is not compiled"
    if steps < COMPILE_PAYS_BACK_AFTER_STEPS:
        return "static", (f"static: {steps} decoding steps, fewer than the {COMPILE_PAYS_BACK_AFTER_STEPS} after "
                          "which compiling the step pays back")
    return "compiled", f"compiled: {steps} decoding steps repay compiling the step (tens of seconds, once)"


@dataclass(frozen=True)
class Generation:
    text: str
    stop: str  # "eos" or "length"
    new_tokens: int
    # This prompt's share of the generation's wall time: each batch's (or round's) time split evenly among the
    # prompts in it, so that the shares of all prompts add up to the time spent generating.
    seconds: float


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             batching: str = "static") -> list[Generation]:
    """Greedy answers, in the order of `prompts`, at most `batch_size` generated at once. Rows are left-padded (a
    right-padded batch would generate after its pads); the tokenizer itself is left as it was."""
    if batching not in BATCHINGS:
        raise ValueError(f"batching={batching!r}: expected one of {', '.join(BATCHINGS)}")
    prompt_ids = tokenizer(prompts)["input_ids"]
    rows = [_Row(i, prompt_ids[i]) for i in sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))]
    note = _OutOfMemoryNote()
    with torch.no_grad():
        if batching == "refill" and _cache_can_be_refilled(model.config):
            with grouped_decoding(model):
                _refill(model, tokenizer, rows, max_new_tokens, batch_size, note)
        elif batching == "compiled":
            # grouped: under compile, transformers' sdpa copies each key/value head for every query head sharing it
            # (5.25 groups the heads only when not compiling; 5.17 never does)
            with grouped_decoding(model):
                _static(model, tokenizer, rows, max_new_tokens, batch_size, note, _CompiledDecoding(model, rows,
                                                                                                    max_new_tokens))
        else:
            _static(model, tokenizer, rows, max_new_tokens, batch_size, note)
    return [row.generation(tokenizer) for row in sorted(rows, key=lambda row: row.index)]


@dataclass
class _Row:
    index: int
    prompt: list[int]
    answer: list[int] = field(default_factory=list)  # EOS included when it stopped
    stopped: bool = False
    done: bool = False
    seconds: float = 0.0

    def take(self, tokens: list[int], eos: int, max_new_tokens: int) -> None:
        """Appends newly generated tokens, up to EOS or the token limit."""
        tokens = tokens[: max_new_tokens - len(self.answer)]
        if eos in tokens:
            tokens, self.stopped = tokens[: tokens.index(eos) + 1], True
        self.answer += tokens
        self.done = self.stopped or len(self.answer) >= max_new_tokens

    def generation(self, tokenizer) -> Generation:
        text = tokenizer.decode(self.answer[:-1] if self.stopped else self.answer, skip_special_tokens=True)
        return Generation(text, "eos" if self.stopped else "length", len(self.answer), self.seconds)


class _OutOfMemoryNote:
    """Says once per generate() call that prompts are going on in smaller batches after running out of memory."""

    def __init__(self):
        self.said = False

    def __call__(self, rows: int) -> None:
        if not self.said:
            print(f"generation ran out of GPU memory with {rows} prompts at once: going on with fewer at a time "
                  "(said once; a smaller batch_size avoids the retries)", flush=True)
            self.said = True


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_padded(sequences: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each row right-aligned to the longest."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(sequence)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _static(model, tokenizer, rows: list[_Row], max_new_tokens: int, batch_size: int, note: _OutOfMemoryNote,
            compiled: _CompiledDecoding | None = None) -> None:
    waiting, size, eos, pad = deque(rows), batch_size, tokenizer.eos_token_id, tokenizer.pad_token_id
    while waiting:
        batch = [waiting.popleft() for _ in range(min(size, len(waiting)))]
        ids, mask = _left_padded([row.prompt for row in batch], pad, _device(model))
        began = time.perf_counter()
        try:
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=pad, **(compiled.arguments() if compiled else {})
                                    )[:, ids.shape[1] :].tolist()
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            output = None
        for row in batch:
            row.seconds += (time.perf_counter() - began) / len(batch)
        if output is None:  # retried outside the except block, so that the failed attempt's tensors are freed first
            note(len(batch))
            waiting.extendleft(reversed(batch))
            size = len(batch) // 2
            continue
        for row, tokens in zip(batch, output):
            row.take(tokens, eos, max_new_tokens)
        if compiled:
            compiled.say_once_if_not_compiled()


class _CompiledDecoding:
    """What makes generate() compile its decoding step: a static cache for each batch, as long as the longest prompt
    of the whole call plus max_new_tokens, so that every batch of one call has the same shapes.

    The step compiles on the first batch and again (once each) for a batch of another size (the last one, or after
    running out of memory) and for another cache length (another generate() call with longer prompts or more new
    tokens); a batch of the same shapes replays the CUDA graph recorded for it.

    Sliding-window layers get a full static layer each, their window applied by the attention mask alone (the same
    keys attended, so the same answers). transformers' own static sliding-window layer counts the tokens it has seen
    in a Python int, which the compiled step then takes as an input, and torch records a CUDA graph for each value an
    int input takes (torch/_inductor/cudagraph_trees.py): a new graph every step, none replayed. The price, where the
    cache is longer than the window (Gemma 3's 512): those layers read the whole cache, not just their window."""

    def __init__(self, model, rows: list[_Row], max_new_tokens: int):
        self.model, self.length = model, max((len(row.prompt) for row in rows), default=0) + max_new_tokens
        self.keyword, self.checked = _cache_keyword(model), False

    def arguments(self) -> dict:
        layers = [StaticLayer(max_cache_len=self.length) if type(layer) is StaticSlidingWindowLayer else layer
                  for layer in StaticCache(config=self.model.config, max_cache_len=self.length).layers]
        # cache_implementation=None: a model whose generation config names one refuses a cache handed to it
        return {"cache_implementation": None, self.keyword: Cache(layers=layers)}

    def say_once_if_not_compiled(self) -> None:
        """transformers compiles only where its criteria allow (a GPU, not offloaded, not disabled in the generation
        config: GenerationMixin._valid_auto_compile_criteria), and keeps the compiled call on the model."""
        if self.checked:
            return
        self.checked = True
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if getattr(inner, "_compiled_call", None) is None:
            print(f"batching='compiled': transformers did not compile the decoding step on {_device(self.model)}: "
                  "the static cache decodes uncompiled, the same answers as 'static' and no faster (said once)",
                  flush=True)


def _cache_keyword(model) -> str:
    """transformers 5.25 renamed generate's and forward's past_key_values to cache (the old name still works, with a
    warning); 5.17 knows only past_key_values."""
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _refill(model, tokenizer, rows: list[_Row], max_new_tokens: int, batch_size: int, note: _OutOfMemoryNote) -> None:
    waiting, pool, capacity = deque(rows), _Pool(model, tokenizer), batch_size
    while waiting or pool.rows:
        joining = [waiting.popleft() for _ in range(min(capacity - len(pool.rows), len(waiting)))]
        in_round = pool.rows + joining
        began = time.perf_counter()
        try:
            pool.admit(joining)
            pool.generate_round(max_new_tokens)
            out_of_memory = False
        except torch.OutOfMemoryError:
            if len(in_round) == 1:
                raise
            out_of_memory = True
        for row in in_round:
            row.seconds += (time.perf_counter() - began) / len(in_round)
        if out_of_memory:  # the cache is lost; the rows start over from the answers they have
            note(len(in_round))
            pool.clear()
            waiting.extendleft(reversed([row for row in in_round if not row.done]))
            capacity = len(in_round) // 2


def _cache_can_be_refilled(config) -> bool:
    """Rows can join and leave a cache whose layers are plain or sliding-window ones: padding in front of a row
    changes nothing there. Chunked attention counts its chunks from the start of the cache, so it cannot."""
    text_config = config.get_text_config(decoder=True)
    chunked = getattr(text_config, "attention_chunk_size", None) or "chunked_attention" in (
        getattr(text_config, "layer_types", None) or ())
    layers = DynamicCache(config=config).layers
    return not chunked and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


class _Pool:
    """The rows generating together: token ids and attention mask, left-padded, and the KV cache of all but each
    row's last token (the one the next round starts from)."""

    def __init__(self, model, tokenizer):
        self.model, self.eos, self.pad = model, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.cache_keyword = _cache_keyword(model)
        self.clear()

    def clear(self) -> None:
        self.rows: list[_Row] = []
        self.ids = self.mask = self.cache = None

    def admit(self, rows: list[_Row]) -> None:
        """Runs the rows' tokens so far, all but the last, through the model and lays their cache beside the pool's."""
        if not rows:
            return
        ids, mask = _left_padded([row.prompt + row.answer for row in rows], self.pad, _device(self.model))
        cache = DynamicCache(config=self.model.config)
        if ids.shape[1] > 1:
            prefix = mask[:, :-1]
            positions = (prefix.cumsum(-1) - 1).masked_fill(prefix == 0, 0)  # as generate() numbers padded rows
            self.model(input_ids=ids[:, :-1], attention_mask=prefix, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{self.cache_keyword: cache})
            _zero_padding(cache, prefix)
        if not self.rows:
            self.rows, self.ids, self.mask, self.cache = list(rows), ids, mask, cache
            return
        width = max(self.ids.shape[1], ids.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            _resize(mine, width - 1, len(self.rows), like=theirs)
            _resize(theirs, width - 1, len(rows), like=mine)
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        self.ids = torch.cat([_pad_front(self.ids, width, self.pad), _pad_front(ids, width, self.pad)])
        self.mask = torch.cat([_pad_front(self.mask, width, 0), _pad_front(mask, width, 0)])
        self.rows += rows

    def generate_round(self, max_new_tokens: int) -> None:
        """Generates until enough rows are done, hands each row its tokens and lets the done ones go."""
        budgets = [max_new_tokens - len(row.answer) for row in self.rows]
        round_end = _RoundEnd(self.ids.shape[1], torch.tensor(budgets, device=self.ids.device), self.eos,
                              max(1, int(len(self.rows) * ROUND_END_SHARE)))
        # cache_implementation=None: a model whose generation config names one refuses a cache handed to it
        output = self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=max(budgets),
                                     do_sample=False, eos_token_id=self.eos, pad_token_id=self.pad,
                                     cache_implementation=None, stopping_criteria=StoppingCriteriaList([round_end]),
                                     **{self.cache_keyword: self.cache})
        new = output[:, self.ids.shape[1] :]
        for row, tokens in zip(self.rows, new.tolist()):
            row.take(tokens, self.eos, max_new_tokens)
        staying = [i for i, row in enumerate(self.rows) if not row.done]
        if not staying:
            self.clear()
            return
        self.rows = [self.rows[i] for i in staying]
        index = torch.tensor(staying, device=self.ids.device)
        self.ids, self.mask = torch.cat([self.ids, new], 1)[index], torch.cat([self.mask, torch.ones_like(new)], 1)[index]
        self.cache.batch_select_indices(index)
        self._drop_common_padding()

    def _drop_common_padding(self) -> None:
        """Leading positions that are padding in every row left are dropped (their owners left the pool)."""
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.ids, self.mask = self.ids[:, first:], self.mask[:, first:]
            for layer in self.cache.layers:
                _resize(layer, self.ids.shape[1] - 1, len(self.rows), like=layer)


class _RoundEnd(StoppingCriteria):
    """Marks rows done at EOS or at their own token limit (generate() then pads them), and ends the round once
    `enough` of them are: all on the device, no synchronization added to a step."""

    def __init__(self, start: int, budgets: torch.Tensor, eos: int, enough: int):
        self.start, self.budgets, self.eos, self.enough = start, budgets, eos, enough
        self.done = torch.zeros_like(budgets, dtype=torch.bool)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.done = self.done | (input_ids[:, -1] == self.eos) | (self.budgets <= input_ids.shape[1] - self.start)
        return self.done | (self.done.sum() >= self.enough)


def _pad_front(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


def _held(layer, positions: int) -> int:
    """How many of a cache's last positions the layer keeps: a sliding-window one keeps its window less one."""
    return min(positions, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else positions


def _resize(layer, positions: int, rows: int, like) -> None:
    """Makes a cache layer cover `positions` positions: leading ones dropped, or zeros (masked padding) put in front.
    An empty layer (no prompt tokens to prefill) takes its head count and width from `like`."""
    if not layer.is_initialized:
        if not like.is_initialized:
            return
        empty = like.keys.new_zeros((rows, like.keys.shape[1], 0, like.keys.shape[3]))
        layer.lazy_initialization(empty, empty)
        layer.keys, layer.values = empty, empty.clone()
    held = _held(layer, positions)
    for name in ("keys", "values"):
        states = getattr(layer, name)
        have = states.shape[-2]
        setattr(layer, name, torch.nn.functional.pad(states, (0, 0, held - have, 0)) if have < held
                else states[..., have - held :, :])
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = positions


def _zero_padding(cache, mask: torch.Tensor) -> None:
    """Zeroes the cached states of padding positions. Where a row has nothing to attend to, some SDPA kernels return
    NaN (the CPU's returns 0), and a NaN kept at a masked position still reaches every output: 0 x NaN is NaN."""
    for layer in cache.layers:
        keep = mask[:, None, mask.shape[1] - layer.keys.shape[-2] :, None].bool()
        layer.keys, layer.values = torch.where(keep, layer.keys, 0), torch.where(keep, layer.values, 0)

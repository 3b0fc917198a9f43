"""The project's own settings, parsed by TrlParser beside TRL's SFTConfig and ModelConfig.

Choices are declared as Literal types, so that argparse itself refuses a value outside them; ranges of
the project's own fields are checked in ScriptArguments.__post_init__; everything that needs the
library's fields, the files or the machine is in train/checks.py. Parsing also notes where each setting was
given (the recipe, the command line), so that the pipeline's own defaults never overrule one (train/checks.py)."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal

import torch
import yaml


# What a GPU recipe needs on a machine without a GPU: no bf16 mixed precision (transformers refuses it there),
# the CPU said out loud, and no Liger (its kernels are Triton, GPU-only). The one list: tests and benchmarks
# run the shipped recipes on a CPU with it, and the error a user gets names it.
CPU_OVERRIDES = ("--bf16", "false", "--use_cpu", "true", "--use_liger_kernel", "false")


def cpu_overrides() -> list[str]:
    """CPU_OVERRIDES where there is no GPU, nothing where there is one."""
    return [] if torch.cuda.is_available() else list(CPU_OVERRIDES)


class SettingsError(ValueError):
    """A setting that cannot work; the message says what to change."""


def settings_error(problems: list[str]) -> SettingsError:
    return SettingsError("bad settings:\n" + "\n".join(f"  - {p}" for p in problems))


# Where a setting was given, later ones overriding earlier ones: a setting no recipe key or flag names is a default.
GIVEN_IN = {"default": 0, "recipe": 1, "command line": 2}


@dataclass
class ScriptArguments:
    # Each setting the user gave (of all three dataclasses) and where: "recipe" or "command line" (parse_settings).
    # Not a field: neither a flag nor a recipe key, nor part of the run's saved config.
    given: ClassVar[dict[str, str]] = {}

    dataset_name: str = field(
        default="tatsu-lab/alpaca",
        metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv with instruction/input/output "
                          "(or question/context/answer: text-to-SQL rows, rendered in the showcase's layout)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    mix_dataset_name: str | None = field(
        default=None,
        metadata={"help": "A second data set mixed into training (same formats as dataset_name), e.g. text-to-SQL "
                          "rows for the showcase; its share of the training examples is mix_share."},
    )
    mix_share: float = field(
        default=0.0,
        metadata={"help": "Share of the training examples drawn from mix_dataset_name (0 < share < 1): all of "
                          "dataset_name is kept and enough mix rows drawn (by seed) to make up this share, or all "
                          "of them if there are fewer; the data report gives the share reached."},
    )
    drop_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Drop rows that cannot be trained on and count them, instead of failing on them."},
    )
    overlong_policy: Literal["drop", "error"] = field(
        default="drop",
        metadata={"help": "Examples longer than max_length: 'drop' (and count) or 'error'. Never cut."},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (smoke runs)."})
    preview: int = field(
        default=0,
        metadata={"help": "Print N examples with the trained span marked, write preview.jsonl, load no model, exit."},
    )
    validation_size: float = field(
        default=0.0,
        metadata={"help": "Examples held out of training for validation: a fraction below 1 (0.01), or a count (200); "
                          "0 holds none out and turns validation off. Copies of a held-out example go with it."},
    )
    validation_seed: int = field(default=42, metadata={"help": "Seed of the choice of held-out examples."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A separate .json/.jsonl/.parquet/.csv to validate on, instead of a held-out part."}
    )
    samples_at_end: int = field(
        default=0,
        metadata={"help": "After training, greedy answers to this many validation prompts: did each stop by EOS, "
                          "after how many tokens (printed and in run_summary.json); 0 = off."},
    )
    sample_max_new_tokens: int = field(default=128, metadata={"help": "Longest answer samples_at_end generates."})
    fused_lora: bool = field(
        default=True,
        metadata={"help": "LoRA's scale and add folded into its GEMMs (same math as PEFT's forward, fewer passes); "
                          "false runs PEFT's own forward."},
    )
    fp8_base: bool = field(
        default=False,
        metadata={"help": "The frozen base's adapted linear layers in FP8 (e4m3, per-channel scales; Hopper GPUs or newer); "
                          "LoRA, norms, embeddings, LM head stay bf16. Speed: bench/RESULTS.md."},
    )
    fp8_layers: list[str] | None = field(
        default=None,
        metadata={"help": "With fp8_base: the adapted layers that go to FP8, by name (q_proj k_proj v_proj o_proj "
                          "gate_proj up_proj down_proj); the others keep their bf16 weights and GEMMs: closer to bf16, "
                          "slower. Unset: every adapted layer. Each choice measured: bench/RESULTS.md."},
    )
    fp8_input_grad: Literal["fp8", "bf16"] = field(
        default="fp8",
        metadata={"help": "With fp8_base: the FP8 layers' input-gradient GEMM in e4m3 ('fp8'), or in bf16 against the "
                          "bf16 weight, kept for it beside the forward's e4m3 copy ('bf16': exact input gradients of the "
                          "FP8 forward, slower, 1.5x those layers' bf16 weight memory)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the run an output_dir holds: what earlier runs listed as written there "
                                         "(.run_files.json: adapter, record, checkpoints, logs) is removed before this "
                                         "run writes anything, and nothing else."}
    )
    allow_changed_settings: bool = field(
        default=False, metadata={"help": "Resume although settings that shape the result (model, data, LoRA, batch, "
                                         "schedule) differ from the checkpoint's, or its optimizer state is missing; "
                                         "the changes are recorded in run_summary.json."}
    )

    def __post_init__(self):
        problems = []
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # a recipe's value reaches here unchecked by argparse, which checks only flags
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name}={getattr(self, f.name)!r}: use one of {', '.join(map(repr, choices))}")
        size = self.validation_size
        if size < 0 or (size >= 1 and size != int(size)):
            problems.append(f"validation_size={size:g}: give a fraction below 1 (0.01) or a whole number of examples (200)")
        if size and self.validation_file:
            problems.append("validation_size and validation_file are both set: pick one")
        for name in ("preview", "samples_at_end"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0")
        if self.sample_max_new_tokens <= 0:
            problems.append(f"sample_max_new_tokens={self.sample_max_new_tokens}: must be >= 1")
        if self.max_train_rows is not None and self.max_train_rows <= 0:
            problems.append(f"max_train_rows={self.max_train_rows}: must be >= 1 (or left unset for every row)")
        if self.mix_dataset_name and not 0 < self.mix_share < 1:
            problems.append(f"mix_share={self.mix_share:g}: with mix_dataset_name, give the share of training examples "
                            "it makes up, between 0 and 1 (0.25)")
        if self.mix_share and not self.mix_dataset_name:
            problems.append(f"mix_share={self.mix_share:g} without mix_dataset_name: name the data set to mix in")
        if not self.fp8_base and (self.fp8_layers is not None or self.fp8_input_grad != "fp8"):
            problems.append("fp8_layers and fp8_input_grad choose how the base runs in FP8, and fp8_base is off: "
                            "set fp8_base: true, or leave them out")
        if self.fp8_layers is not None and not self.fp8_layers:
            problems.append("fp8_layers is empty: name the layers to put in FP8, or leave it unset for every adapted "
                            "layer (or set fp8_base: false for none)")
        if problems:
            raise settings_error(problems)

    @property
    def validates(self) -> bool:
        return bool(self.validation_size or self.validation_file)

    def given_in(self, name: str) -> str:
        """Where the setting `name` came from: "default", "recipe" or "command line"."""
        return self.given.get(name, "default")


def parse_settings(argv: list[str] | None = None):
    """(ScriptArguments, SFTConfig, ModelConfig) from --config YAML and the command line, which
    overrides it; an unknown key or flag, or a value of the wrong type, is a SettingsError."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))

    def refuse(message: str):  # argparse's own errors would print the usage of some 200 settings first
        raise SettingsError(f"{message} (train_sft.py --help lists every setting)")

    parser.error = refuse
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
        script_args.given = _where_given(parser, argv)
        return script_args, training_args, model_args
    except SettingsError:
        raise
    except yaml.YAMLError as err:  # a tab where YAML wants spaces, an unclosed quote
        raise SettingsError(f"the recipe is not valid YAML: {err}".replace("\n", " ")) from None
    except ValueError as err:
        if "bf16/gpu" in str(err) and not torch.cuda.is_available():  # transformers' TrainingArguments, said plainly
            raise SettingsError("the recipe trains in bf16 on a GPU, and this machine has none: to train on the CPU "
                                f"(slowly), add {' '.join(CPU_OVERRIDES)} (FP8 and 4-bit bases need a GPU)") from None
        raise SettingsError(str(err)) from None


def _where_given(parser, argv: list[str]) -> dict[str, str]:
    """Each setting a key of the --config recipe or a flag gives. The recipe's keys are read from it (TrlParser made
    them the parser's defaults, so the parsed values cannot tell); the flags by parsing argv again into a namespace
    that already holds a marker for every setting, which argparse then leaves wherever no flag sets a value."""
    given, argv = {}, list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        recipe = yaml.safe_load(Path(argv[at + 1]).read_text())  # read and checked by TrlParser already
        given = {key: "recipe" for key in recipe if key != "env"}
        del argv[at : at + 2]
    unset = object()
    names = [f.name for dtype in parser.dataclass_types for f in fields(dtype) if f.init]
    flags, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return given | {name: "command line" for name, value in vars(flags).items() if value is not unset}

"""A run's record read back: train_config.yaml (every setting of the run) and run_summary.json (what happened), as
train/run_record.py writes them, in the typed fields the release side reads. Either file may be missing (an adapter
train_sft.py did not make): the fields then say nothing was recorded (None)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .layout import CONFIG_FILE, SUMMARY_FILE


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen base was held while the adapter trained: in its dtype, in 4 or 8 bits (bitsandbytes, through
    TRL's get_quantization_config), or in FP8 (kernels/fp8_base.py). A setting the record lacks is read as the
    default the run had: TRL's ModelConfig's, and for fp8_input_grad, from before it existed, e4m3."""

    dtype: str = "float32"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None
    fp8_base: bool = False
    fp8_layers: tuple[str, ...] | None = None  # None: every adapted layer
    fp8_input_grad: str = "fp8"

    @property
    def kind(self) -> str:
        """"4-bit", "8-bit", "FP8", or the dtype the base trained in."""
        return "4-bit" if self.load_in_4bit else "8-bit" if self.load_in_8bit else "FP8" if self.fp8_base else self.dtype

    def quantization_settings(self) -> dict:
        """The ModelConfig fields TRL's get_quantization_config reads, to quantize a base as the run did."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("fp8_")}


@dataclass(frozen=True)
class LoraSettings:
    """The run's LoRA settings, named as adapter_config.json (PEFT's LoraConfig) names them; SETTINGS gives the
    name train_config.yaml (TRL's ModelConfig) records each under. One the record lacks is ModelConfig's default."""

    r: int = 16
    lora_alpha: int = 32
    target_modules: str | list[str] | None = None  # None: PEFT's default for the architecture
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None

    SETTINGS = {"r": "lora_r", "lora_alpha": "lora_alpha", "target_modules": "lora_target_modules",
                "use_rslora": "use_rslora", "use_dora": "use_dora", "modules_to_save": "lora_modules_to_save",
                "target_parameters": "lora_target_parameters"}


@dataclass(frozen=True)
class Evaluation:
    """One evaluation on the validation examples: the loss and the stop metric where their responses end."""

    step: int
    loss: float
    eos_top1: float | None = None
    eos_prob: float | None = None


@dataclass(frozen=True)
class Samples:
    """The greedy answers to a few validation prompts after training."""

    prompts: int
    stopped_by_eos: int
    mean_new_tokens: float


@dataclass(frozen=True)
class RunSummary:
    """run_summary.json's figures (the whole run, across resumes)."""

    status: str | None
    steps: int | None
    first_loss: float | None
    last_loss: float | None
    tokens_per_second: float | None  # over the whole run
    peak_gpu_memory_gib: float | None
    rows_read: int | None
    rows_kept: int | None
    trained_tokens: int | None
    total_tokens: int | None
    validation_examples: int | None
    validation_source: str  # where the validation examples came from, as the data report says it
    evaluations: tuple[Evaluation, ...]
    samples: Samples | None
    resumed_with_changes: tuple[str, ...] | None  # what --allow_changed_settings let a resume change

    @classmethod
    def from_dict(cls, summary: dict) -> RunSummary:
        data = summary.get("data") or {}
        held = data.get("validation") or {}
        samples = summary.get("samples_at_end")
        changes = summary.get("resumed_with_changes")
        return cls(
            status=summary.get("status"), steps=summary.get("global_step"), first_loss=summary.get("first_loss"),
            last_loss=summary.get("last_loss"), tokens_per_second=(summary.get("tokens_per_second") or {}).get("mean_over_run"),
            peak_gpu_memory_gib=summary.get("peak_gpu_memory_gib"), rows_read=data.get("rows_read"),
            rows_kept=data.get("rows_kept"), trained_tokens=data.get("trained_tokens"), total_tokens=data.get("total_tokens"),
            validation_examples=held.get("examples"), validation_source=held.get("source", ""),
            evaluations=tuple(Evaluation(e["step"], e["loss"], e.get("eos_top1"), e.get("eos_prob"))
                              for e in (summary.get("validation") or {}).get("evaluations") or []),
            samples=Samples(samples["prompts"], samples["stopped_by_eos"], samples["mean_new_tokens"]) if samples else None,
            resumed_with_changes=tuple(changes) if changes else None,
        )


@dataclass(frozen=True)
class RunRecord:
    """A run's folder as the release side reads it."""

    folder: Path
    settings: dict  # train_config.yaml as written, every setting ({} without one): for a table of them
    base_model: str | None
    base_fingerprint: str | None  # models/sources.py's fingerprint of the base's stored weights, taken in training
    precision: BasePrecision | None
    lora: LoraSettings | None
    dataset_name: str | None
    mix_dataset_name: str | None
    mix_share: float
    summary: RunSummary | None

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord:
        folder = Path(folder)
        settings = (yaml.safe_load((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else None) or {}
        summary = json.loads((folder / SUMMARY_FILE).read_text()) if (folder / SUMMARY_FILE).is_file() else {}
        return cls(
            folder=folder, settings=settings,
            base_model=summary.get("base_model") or settings.get("model_name_or_path"),
            base_fingerprint=summary.get("base_fingerprint"),
            precision=_precision(settings) if settings else None,
            lora=_lora(settings) if settings else None,
            dataset_name=settings.get("dataset_name"), mix_dataset_name=settings.get("mix_dataset_name"),
            mix_share=settings.get("mix_share", 0.0), summary=RunSummary.from_dict(summary) if summary else None,
        )


def _precision(settings: dict) -> BasePrecision:
    recorded = {f.name: settings[f.name] for f in fields(BasePrecision) if f.name in settings}
    if recorded.get("fp8_layers") is not None:
        recorded["fp8_layers"] = tuple(recorded["fp8_layers"])
    return BasePrecision(**recorded)


def _lora(settings: dict) -> LoraSettings:
    return LoraSettings(**{field: settings[setting] for field, setting in LoraSettings.SETTINGS.items() if setting in settings})

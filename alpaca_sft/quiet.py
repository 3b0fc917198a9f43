"""Library noise a user cannot act on, silenced by both scripts before the libraries load: bitsandbytes says on
every import without a GPU that an optional kernels package is missing; transformers 5.24 deprecates
gradient_checkpointing, the name TRL's SFTConfig still sets and the only one transformers 5.17 knows, and
is_gradient_checkpointing, which PEFT still reads; TRL 1.16 deprecates use_liger_kernel for Hub kernels, which need
the Hub and are ignored for a model handed to the trainer; Liger 0.8 reports each optional backend it cannot import
(CuTe DSL, Ascend), though its Triton kernels, the ones used, are there."""

import logging
import warnings


def quiet_libraries() -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`use_liger_kernel=True` is deprecated", category=FutureWarning)

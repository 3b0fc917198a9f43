"""The fast paths, each behind a public entry point that training (train/run.py) and release
(release/merge.py) call alike:

- fused_lora.fuse_lora: LoRA's scale and add folded into its GEMMs (PEFT still owns the adapter);
- fp8_base.quantize_frozen_base: the frozen base's linear layers in FP8 on Hopper (fp8_gemm_problem says where not);
- attention.resolve_attention: which attention "auto" picks for packed rows, and document_flex itself;
- grouped_decode.grouped_decoding: generation's decoding steps read each key/value head once, not once per query head;
- liger.pin_liger_rope_to_triton: Liger's RoPE kept on the Triton kernel the recipes were measured with.

shared_input.py is theirs, not an entry point: which layers read one input, and the one cache where a layer leaves
what it computed from it for the next (fused_lora's group outputs, fp8_base's quantized input).
"""

"""GPU check: the CUDA/bf16 path of the multi-LoRA layer and the engine, proven on one GPU machine in one run.

    python -m bench.gpu_check [--sizes 135m,1b] [--batch-sizes 16,64] [--steps 24] [--budget-s 300]
    python -m bench.gpu_check --dry-run          # tiny Llama, 3 steps: seconds, on a CPU too

Ship it: the GPU machine gets the working tree without .venv or model weights and has only torch,
transformers, peft and safetensors; from the repository root there (about 2-4 min on an H100, 5 at most):

    python -m bench.gpu_check --dry-run && python -m bench.gpu_check 2>&1 | tee "${OUT:-.}/gpu_check.log"

Nothing is loaded from disk: each backbone is built from its config with random weights (CUDA bf16, or CPU
fp32 without CUDA), and 32 random rank-8 LoRA experts cover q,k,v,o,gate,up,down with non-zero B. Per size:

1. correctness: the batched multi-LoRA layer (stacked, compact and gathered kernels) against peft's
   `adapter_names` mixed batch on the same device and dtype, rows with top-1, a top-2 mixture and no expert,
   full forward and a cached decode step (tolerances: correctness.TOLERANCES);
2. decode steps at each batch size, variants interleaved step by step as in bench.decode_steps (each holds
   its own model copy, batch and KV cache): bare, 4 experts mixed, 32 experts mixed, peft's mixed batch over
   the same 4 experts. Ratios are medians of per-step paired throughput ratios;
3. the continuous-batching engine (experts.engine) driven directly with the injected backbone: decode
   tokens/s bare vs 4 and 32 experts mixed.

Only torch/transformers/peft/safetensors and the project's import-light modules (experts.multi_lora,
experts.engine, experts.kv_cache) are imported. CUDA graphs are not used: a step's routing is prepared in
Python and the mask and KV views grow every step, so a captured graph would need static buffers throughout.
A global time guard (--budget-s) skips the measurements that no longer fit and names them in the JSON.
Last line: one JSON object; exit status 1 when a correctness check fails.
"""

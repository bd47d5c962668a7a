"""The base model: hardware and dtypes, loading (quantization, attention), GGUF bases, checkpoint files,
the weights fingerprint and the tiny random models tests build.

`bnb_cpu.py` (bitsandbytes' 4-bit matmul on CPU) and `attention.py` (per-example attention for
padding-free batches) live here rather than with training's memory savers: loading a base installs them,
and eval, generate and merge verification load bases too."""

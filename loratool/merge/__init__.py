"""`loratool merge`: fold one LoRA adapter into its base model (run.py), or combine several (combine.py).

record.py types merge.json (written here, read by export, generate and eval); qlora.py presents a 4-bit
base as training saw it; verify.py checks the merged model against base + adapter. Reading an adapter as
changes to named base tensors is loratool/adapter/files.py; reading and writing safetensors checkpoints
one tensor at a time is loratool/model/checkpoint.py; comparing two models' logits is
loratool/merge/compare.py (export uses it too); finding an adapter and its run is
loratool/rundir/records.py.
"""

from loratool.merge.record import MergeRecord
from loratool.merge.run import (
    MERGE_RECORD,
    check_base_identity,
    check_checkpoint,
    copy_tokenizer,
    output_location,
    quantized_base,
    refuse_quantized_checkpoint,
    resolve_base,
    run_merge,
    write_generation_config,
)
from loratool.rundir.records import TrainingRun, find_adapter, read_training_run

__all__ = [
    "MERGE_RECORD",
    "MergeRecord",
    "TrainingRun",
    "check_base_identity",
    "check_checkpoint",
    "copy_tokenizer",
    "find_adapter",
    "output_location",
    "quantized_base",
    "read_training_run",
    "refuse_quantized_checkpoint",
    "resolve_base",
    "run_merge",
    "write_generation_config",
]

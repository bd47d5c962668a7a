"""`loratool export`: put a model where it runs (run.py) — a GGUF file for llama.cpp / Ollama, or a
merged HF checkpoint.

gguf.py writes the GGUF tensors and architecture metadata, tokenizer.py the tokenizer metadata, ollama.py
an Ollama Modelfile, verify.py loads the file back and compares it with its source (the comparison
itself is loratool/merge/compare.py's), and record.py types export.json.
"""

from loratool.export.record import ExportRecord
from loratool.export.run import EXPORT_RECORD, FORMATS, gguf_name, run_export

__all__ = ["EXPORT_RECORD", "FORMATS", "ExportRecord", "gguf_name", "run_export"]

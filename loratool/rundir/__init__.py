"""What commands leave on disk: the run directory and its records (run.json, checkpoints' seals), the model
card, and the rules every output follows (ownership markers, locks, partial-then-rename, atomic JSON,
signals).

It sits before `train` in the flow, not after it: training writes the run directory, and merge, export,
eval and generate read it through the same typed records."""

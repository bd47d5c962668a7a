"""Text from a base, a run or a merged model: `loratool generate` and `chat`, and the target resolution
(run directory, adapter, merged checkpoint, base) that eval shares."""

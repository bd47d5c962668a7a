"""The validation loss: one token-weighted mean over the whole validation set, each row counted once,
whatever the evaluation batch size and the number of processes.

The trainer's own `eval_loss` is the mean of each evaluation batch's mean loss, so it moves with
`per_device_eval_batch_size` and with the number of processes (each process averages its own batch), and
under several processes accelerate repeats a few rows so that every process gets full batches. Here
every process adds up (batch loss x loss tokens) and loss tokens over its batches, the sums are added
across processes, and their ratio replaces `eval_loss`: the cross-entropy of every loss token of the
validation set divided by their number — the loss `loratool eval` reports too. Under several processes
the set is first padded with rows that carry no loss to a multiple of processes x batch, so that no row
is repeated.
"""

from __future__ import annotations

import math
from typing import Any

IGNORE = -100


def pad_for_processes(dataset: Any, processes: int, batch_size: int, pad_token_id: int) -> Any:
    """`dataset` plus one-token rows without loss, up to a multiple of processes x batch_size rows."""
    if dataset is None or processes <= 1:
        return dataset
    from datasets import Dataset, concatenate_datasets

    missing = -len(dataset) % (processes * batch_size)
    if not missing:
        return dataset
    filler = Dataset.from_dict({"input_ids": [[pad_token_id]] * missing, "labels": [[IGNORE]] * missing})
    return concatenate_datasets([dataset, filler.cast(dataset.features)])


def report_token_weighted_eval_loss(trainer: Any) -> None:
    """Make every evaluation of `trainer` report the token-weighted validation loss as `eval_loss`."""
    import torch

    sums = torch.zeros(2, dtype=torch.float64)  # loss nats, loss tokens on this process
    predict, loop = trainer.prediction_step, trainer.evaluation_loop

    def prediction_step(model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = predict(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if loss is not None:
            # The causal LM loss predicts token t+1 from position t: the first label of a row has no loss,
            # and padding-free batches mask each example's first label the same way.
            tokens = int((inputs["labels"][..., 1:] != IGNORE).sum())
            sums[0] += float(loss.detach()) * tokens
            sums[1] += tokens
        return loss, logits, labels

    def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
        sums.zero_()
        output = loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        total = trainer.accelerator.reduce(sums.to(trainer.accelerator.device), reduction="sum").tolist()
        if f"{prefix}_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = total[0] / total[1] if total[1] else math.nan
        return output

    trainer.prediction_step = prediction_step
    trainer.evaluation_loop = evaluation_loop

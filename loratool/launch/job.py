"""What every launch file shares: the job it describes (recipe, nodes, GPUs per node, where outputs go),
the torchrun command that each node runs, the comment that opens the file, and the GPU count chosen
from `loratool plan` when none is given."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.recipe import Recipe
from loratool.train.plan import GiB, gpu_named, plan_recipe

# torchrun's own default rendezvous port (its --master-port default).
MAIN_PORT = 29500
DEFAULT_GPU = "A100-80GB"
# Where the shared output storage (a bucket, a volume claim) is mounted on every node.
OUTPUTS_MOUNT = "/outputs"


@dataclass(frozen=True)
class Job:
    """One multi-node training of one recipe, as every target describes it."""

    recipe: str  # the path as the user gave it: the job resolves it where it runs, as `loratool train` would
    name: str  # the output directory's name: the job's name on the cluster
    output_dir: str  # training.output_dir as the recipe writes it
    nodes: int
    gpus_per_node: int
    gpus_chosen: str  # one sentence: how gpus_per_node was chosen, for the file's opening comment
    gpu: str  # a GPU name loratool plan knows (A100-80GB, H100, L4, ...)
    command: str  # the `loratool launch ...` command that wrote the file
    sets: tuple[str, ...] = ()  # the --set overrides given to launch: every node's train gets them too


@dataclass(frozen=True)
class Expand:
    """A shell word holding variables the shell expands at run time (`$SLURM_NNODES`): written inside
    double quotes and never escaped, where every other word is quoted as it is."""

    text: str


Word = str | Expand


def job_for(
    recipe_path: Path,
    recipe: Recipe,
    *,
    nodes: int,
    gpus_per_node: int | None,
    gpu: str | None,
    command: str,
    sets: list[str] | tuple[str, ...] = (),
) -> Job:
    """The job of `recipe` (read from `recipe_path`, with the overrides `sets` applied) on `nodes` nodes;
    with no gpus_per_node, sized by `loratool plan` on `gpu` (default A100-80GB)."""
    gpu_name = gpu_named(gpu or DEFAULT_GPU)
    if gpus_per_node is None:
        gpus_per_node, chosen = gpus_from_plan(recipe, str(recipe_path), gpu_name)
    else:
        chosen = f"GPUs per node: {gpus_per_node}, given with --gpus-per-node."
    output_dir = str(recipe.training.output_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(output_dir).name or recipe_path.stem).strip("-.")
    return Job(
        recipe=str(recipe_path),
        name=name or "loratool",
        output_dir=output_dir,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpus_chosen=chosen,
        gpu=gpu_name,
        command=command,
        sets=tuple(sets),
    )


def gpus_from_plan(recipe: Recipe, recipe_path: str, gpu: str) -> tuple[int, str]:
    """1 when `loratool plan` predicts that one `gpu` holds the run's peak, with the sentence that says so.
    Several data-parallel processes each hold the whole model and their own batch, so more GPUs per node
    go faster but never need less memory each: a run that does not fit one GPU does not fit several."""
    try:
        plan = plan_recipe(recipe, gpu=gpu, log=lambda _: None)
    except LoratoolError as exc:
        raise LoratoolError(
            f"--gpus-per-node not given, and `loratool plan` could not size the run: {exc.message}",
            hint=f"pass --gpus-per-node N (the GPUs each node trains on); {exc.hint or ''}".rstrip("; "),
        ) from None
    peak, budget = plan.peak_memory_bytes / GiB, (plan.budget_bytes or 0) / GiB
    if plan.budget_bytes is not None and plan.peak_memory_bytes > plan.budget_bytes:
        what_fits = "; ".join(plan.suggestions[:2])
        raise LoratoolError(
            f"the recipe does not fit one {gpu}: `loratool plan` predicts a peak of ~{peak:.1f} GiB per GPU, "
            f"over its {budget:.0f} GiB (each data-parallel process holds the whole model, so more GPUs "
            "per node do not help under DDP)",
            hint=f"`loratool plan {recipe_path} --gpu {gpu}` lists what would fit"
            + (f" ({what_fits})" if what_fits else "")
            + f"; `loratool plan {recipe_path} --gpu {gpu} --gpus-per-node N` says on how many GPUs FSDP or "
            "ZeRO-3 (which shard the model) fit it; or name a larger GPU with --gpu, or pass --gpus-per-node N "
            "to launch it as it is",
        )
    return 1, (
        f"GPUs per node: 1, from `loratool plan --gpu {gpu}`: a peak of ~{peak:.1f} GiB per GPU fits one "
        f"{gpu} ({budget:.0f} GiB). More GPUs per node train faster, not in less memory: --gpus-per-node N."
    )


def torchrun(nnodes: Word, nproc_per_node: Word, rendezvous: list[Word], train: list[Word]) -> list[Word]:
    """The torchrun command one node runs: an agent that starts `nproc_per_node` training processes and
    joins the others through `rendezvous` (torchrun's flags); each process runs `loratool train`."""
    return [
        "torchrun",
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        nproc_per_node,
        *rendezvous,
        "-m",
        "loratool",
        "train",
        *train,
    ]


def train_args(job: Job, output_dir: str | None = None) -> list[str]:
    """`loratool train`'s arguments: the recipe, launch's --set overrides, and the output directory when
    the job moves it onto shared storage (a mounted bucket or volume)."""
    sets = [*job.sets, *([] if output_dir is None else [f"training.output_dir={output_dir}"])]
    return [job.recipe, *(word for item in sets for word in ("--set", item))]


def shell_command(words: list[Word], indent: str = "    ") -> str:
    """`words` as one shell command, a flag and its value per line (continued with a backslash): the
    long torchrun lines stay readable. `-m` and what follows stay on the last line."""
    lines: list[list[str]] = [[]]
    after_module = False
    for word in words:
        text = f'"{word.text}"' if isinstance(word, Expand) else shlex.quote(word)
        if not after_module and isinstance(word, str) and word.startswith("-") and lines[-1]:
            lines.append([])
        after_module = after_module or word == "-m"
        lines[-1].append(text)
    return f" \\\n{indent}".join(" ".join(line) for line in lines)


def header(job: Job, *notes: str) -> str:
    """The comment a launch file opens with: what generated it from which recipe, how its GPU count was
    chosen, and what the user must know to run it (`notes`, one comment paragraph each)."""
    opening = (
        f"# Generated by loratool {__version__} from the recipe {job.recipe}, with:\n#   {job.command}\n"
    )
    return opening + "".join(_comment(line) for line in (job.gpus_chosen, *notes))


def _comment(text: str, width: int = 100) -> str:
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    lines.append(line)
    return "\n".join(lines) + "\n"


class _BlockStrings(yaml.SafeDumper):
    """YAML as people write it by hand: multi-line strings (a shell script) as literal blocks, and a
    value used twice (the same pod template) written out twice rather than as an anchor and alias."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _block_string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockStrings.add_representer(str, _block_string)


def yaml_text(value: dict) -> str:
    """A mapping as YAML, keys in the order given."""
    return yaml.dump(value, Dumper=_BlockStrings, sort_keys=False, default_flow_style=False, width=110)

"""The data pipeline: read -> format -> template -> tokenize/mask, with a summary of every row's fate.

sources.py reads rows with their file:line, formats.py turns them into conversations or completions,
templates.py sets the chat template, tokenize.py renders, tokenizes and masks one example, build.py runs it
all over the recipe's data section and summary.py reports what happened.
"""

from loratool.data.build import DataSummary, PreparedData, build_datasets

__all__ = ["DataSummary", "PreparedData", "build_datasets"]

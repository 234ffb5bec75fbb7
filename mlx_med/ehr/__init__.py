"""EHR data layer: MEDS reading, synthetic cohorts, timeline tokenization, pretraining examples.

The public entry points are re-exported here so the trainer and CLI need one import:

  from mlx_med import ehr
  source, tokenizer, summary = ehr.build_pretraining_data(meds_root, ...)
"""

from mlx_med.ehr.dataset import (
  DataSummary,
  PretrainingSource,
  TaskExamples,
  TokenStream,
  build_pretraining_data,
  build_task_examples,
  history_before,
  tokenize_split,
)
from mlx_med.ehr.labels import TASKS, binary_auroc, read_task_labels
from mlx_med.ehr.meds import EventBatch, MEDSFormatError, MEDSReader, MEDSSummary, SubjectEvents
from mlx_med.ehr.synth import generate_cohort
from mlx_med.ehr.tokenizer import TimelineTokenizer, TokenizerConfig, VocabFormatError

__all__ = [
  "DataSummary",
  "EventBatch",
  "MEDSFormatError",
  "MEDSReader",
  "MEDSSummary",
  "PretrainingSource",
  "SubjectEvents",
  "TASKS",
  "TaskExamples",
  "TimelineTokenizer",
  "TokenStream",
  "TokenizerConfig",
  "VocabFormatError",
  "binary_auroc",
  "build_pretraining_data",
  "build_task_examples",
  "generate_cohort",
  "history_before",
  "read_task_labels",
  "tokenize_split",
]

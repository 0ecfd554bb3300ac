"""`helip eval`: zero-shot classification, linear probe and retrieval.

- :mod:`.suite`: benchmark datasets on disk (image folders, CLIP_benchmark
  WebDataset shards, caption files) for several checkpoints, with
  :mod:`.datasets` (readers), :mod:`.prompts` (class names and templates),
  :mod:`.features` (cached frozen features), :mod:`.metrics` and
  :mod:`.linear_probe`.
"""
from .linear_probe import ProbeConfig, fit_linear_probe, sweep_c
from .metrics import classification_metrics, retrieval_metrics
from .suite import DatasetSpec, ModelSpec, SuiteConfig, run_suite

__all__ = ["ProbeConfig", "fit_linear_probe", "sweep_c", "classification_metrics", "retrieval_metrics",
           "DatasetSpec", "ModelSpec", "SuiteConfig", "run_suite"]

"""Offline monosemanticity analyses (l2e_spec.md §8; paper §3 and App. B).

Pipeline: a labelled feature dataset (``features``) -> one forward pass collecting
neuron values (``collect``) -> MS statistics (``ms``), probing (``probe``) and the
paper's studies (``studies``) -> figures (``plots``). ``thresholds`` reads training
logs for the τ curves of Fig. 12.

Reads checkpoints through megatron.checkpoint and data through megatron.data; it is used
by tools/analysis/ and never by training.
"""
from megatron.analysis.collect import Activations, collect_activations, open_activations
from megatron.analysis.features import FeatureSet, balance, gather_sources, read_features, write_features
from megatron.analysis.ms import (complement_means, false_killing_rate, ks_statistic, label_means, ms,
                                  relative_feature)
from megatron.analysis.probe import probe_f1
from megatron.analysis.studies import FKR_RATES, fkr, ks_scale, ms_layers, ms_validation, probe
from megatron.analysis.thresholds import read_threshold_series

__all__ = [
    "Activations", "collect_activations", "open_activations",
    "FeatureSet", "balance", "gather_sources", "read_features", "write_features",
    "complement_means", "false_killing_rate", "ks_statistic", "label_means", "ms", "relative_feature",
    "probe_f1", "FKR_RATES", "fkr", "ks_scale", "ms_layers", "ms_validation", "probe",
    "read_threshold_series",
]

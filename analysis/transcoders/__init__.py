"""Transcoders and paired transcoder circuits.

Public API
----------
Model (model.py)
    Transcoder, TranscoderSet, random_transcoders
Training (train.py)
    train_transcoders(model, texts, *, d_transcoder, layers=None, activation="relu"|"topk", l1_coeff, k, skip,
                      n_tokens, batch_size, lr, seed, progress) -> (TranscoderSet, TranscoderTrainingResult)
    evaluate_transcoders(model, tset, seqs) -> TranscoderTrainingResult; layer_metrics; spliced_loss
Files (formats.py)
    save_transcoders(tset, dir)                      circuit-tracer layout (config.yaml + layer_{i}.safetensors)
    load_transcoders(path, model=...)                circuit-tracer dir, SAELens dir(s), Dunefsky .pt (no code run)
    load_transcoders_for(pair, role, model=...)      models/<pair>/transcoders/<role>/
    default_transcoder_dir, circuit_tracer_config, TranscoderFormatError
Attribution graphs
    attribute(model, tset, prompt, *, target_tokens=None, logit_diff=None, ...) -> AttributionGraph  (attribution.py)
    AttributionGraph: .prune(), .scores(), .summary() -> GraphSummary, .top_paths(node, k), .save()/.load()  (graph.py)
    AttributionGraph.to_json() -> CTGraphJSON, .write_json(dir, slug): circuit-tracer's viewer files  (graph_json.py)
    FrozenPrompt, ReplacementModel: the local replacement model of one prompt  (replacement.py)
    LogitTarget, select_targets: the logits a graph explains  (targets.py)
Paired circuits
    match_features(tset_a, tset_b) -> FeatureMatching; hungarian  (matching.py)
    diff_graphs(...) -> CircuitDiff; paired_circuits(models, transcoders, prompt) -> (graphs, CircuitDiff)  (diff.py)
Feature pages (features.py)
    build_feature_index(model, tset, texts, top_k=20) -> FeatureIndex (.save(dir) / FeatureIndex.load(dir))
    feature_page(model, tset, index, layer, feature) -> FeaturePage
CLI (cli.py)
    register(subparsers): `lnscope train-transcoders PAIR --role ROLE`, `lnscope transcoder-graph PAIR --prompt ...`
"""

from lnscope.analysis.transcoders.attribution import attribute
from lnscope.analysis.transcoders.diff import CircuitDiff, diff_graphs, paired_circuits
from lnscope.analysis.transcoders.features import FeatureIndex, FeaturePage, build_feature_index, feature_page
from lnscope.analysis.transcoders.formats import (
    TranscoderFormatError,
    circuit_tracer_config,
    default_transcoder_dir,
    load_transcoders,
    load_transcoders_for,
    save_transcoders,
)
from lnscope.analysis.transcoders.graph import AttributionGraph, GraphSummary
from lnscope.analysis.transcoders.graph_json import CTGraphJSON
from lnscope.analysis.transcoders.matching import FeatureMatching, hungarian, match_features
from lnscope.analysis.transcoders.model import Transcoder, TranscoderSet, random_transcoders
from lnscope.analysis.transcoders.train import TranscoderTrainingResult, evaluate_transcoders, train_transcoders

__all__ = [
    "AttributionGraph", "CTGraphJSON", "CircuitDiff", "FeatureIndex", "FeatureMatching", "FeaturePage",
    "GraphSummary", "Transcoder", "TranscoderFormatError", "TranscoderSet", "TranscoderTrainingResult",
    "attribute", "build_feature_index", "circuit_tracer_config", "default_transcoder_dir", "diff_graphs",
    "evaluate_transcoders", "feature_page", "hungarian", "load_transcoders", "load_transcoders_for",
    "match_features", "paired_circuits", "random_transcoders", "save_transcoders", "train_transcoders",
]

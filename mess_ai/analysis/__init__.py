"""Analysis of stored embeddings: quality, dimension, clusters, diversity, label coverage, a comparison of
embedding methods against a hand-crafted baseline, similar-track search, reports.

Plain Python, no Prefect: ``run_analysis``, ``find_similar`` and ``find_similar_to_audio`` (a recording outside
the store) are what the CLI and the flows call; ``run_analysis`` returns an ``AnalysisReport``
(``mess_ai.analysis.results``), whose ``to_json()`` is the report file.
"""

from mess_ai.analysis.audio_search import find_similar_to_audio
from mess_ai.analysis.baseline import BaselineConfig, baseline_features, file_baseline_features
from mess_ai.analysis.dataset_analysis import AnalysisInputs, analyze_dataset, load_inputs
from mess_ai.analysis.embedding_analyzer import (
    EmbeddingAnalysis,
    EmbeddingAnalyzer,
    intrinsic_dimension,
    participation_ratio,
)
from mess_ai.analysis.embedding_diversity import DiversityAnalyzer, linear_cka, representations, vendi_score
from mess_ai.analysis.loading import DatasetFeatures, TrackInfo, load_dataset_features, resolve_dataset
from mess_ai.analysis.preprocessing import FittedTransform, PreprocessConfig, fit_transform, select_layer
from mess_ai.analysis.report import run_analysis, write_report
from mess_ai.analysis.results import AnalysisReport
from mess_ai.analysis.search import find_similar, mmr_select

__all__ = [
    "AnalysisInputs", "AnalysisReport", "BaselineConfig", "DatasetFeatures", "DiversityAnalyzer", "EmbeddingAnalysis",
    "EmbeddingAnalyzer", "FittedTransform", "PreprocessConfig", "TrackInfo", "analyze_dataset", "baseline_features",
    "file_baseline_features", "find_similar", "find_similar_to_audio", "fit_transform", "intrinsic_dimension",
    "linear_cka", "load_dataset_features", "load_inputs", "mmr_select", "participation_ratio", "representations",
    "resolve_dataset", "run_analysis", "select_layer", "vendi_score", "write_report",
]

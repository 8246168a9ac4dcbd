"""Meta-test: episode sampling, IoU accumulation, predictors and the `evaluate` stage."""

from umtfss.evaluation.evaluator import IoUAccumulator
from umtfss.evaluation.predictors import AllBackground, ModelPredictor, Predictor, PrototypeThreshold, build_predictor
from umtfss.evaluation.sampler import sample_episodes, sample_episodes_per_seed

__all__ = [
    "AllBackground",
    "IoUAccumulator",
    "ModelPredictor",
    "Predictor",
    "PrototypeThreshold",
    "build_predictor",
    "sample_episodes",
    "sample_episodes_per_seed",
]

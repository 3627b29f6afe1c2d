"""Torch-free inference per task: ``serving/predictors/<task>.py``, found by :func:`get_predictor`."""
from serving.predictors.base import Batch, Predictor, Record, Settings, get_predictor, list_predictors, \
    register_predictor

__all__ = ["Batch", "Predictor", "Record", "Settings", "get_predictor", "list_predictors", "register_predictor"]

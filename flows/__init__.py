"""Prefect 3 orchestration of the FREE pipeline: flows, deployments, MLflow tracking and promotion.

No algorithm code here: the flows run the stages of :mod:`free` through DVC and record the results.
"""

"""Prefect 3 orchestration of the pipeline's stages (orchestration only, no algorithm code).

Empty for now: the flow ``free`` with deployment ``full-pipeline``, the promotion flow and the
MLflow registry steps arrive with the orchestration work (see README, "Status").
"""

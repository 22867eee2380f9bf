"""Serve the deployments ``free/full-pipeline`` and ``promote/promote`` from this process.

``free stack up`` starts it (service ``worker``) in the project directory with the stack's settings
in its environment; ``python -m flows.serve`` runs it by hand (set PREFECT_API_URL first). Flow
runs execute in subprocesses of this one, in the project directory.
"""

from prefect import serve

from flows.pipeline import full_pipeline
from flows.promotion import promote_flow


def main() -> None:
    serve(
        full_pipeline.to_deployment(
            name="full-pipeline",
            description="FREE end to end through DVC, tracked in MLflow; registers the meta-learner (challenger).",
            parameters={"experiment": "tiny", "overrides": []},
        ),
        promote_flow.to_deployment(
            name="promote", description="Move alias champion to the challenger if it is not worse beyond the CI."
        ),
        limit=1,  # one pipeline at a time: they share the working tree and dvc.lock
    )


if __name__ == "__main__":
    main()

"""Promotion: move the registry alias ``champion`` to the ``challenger`` only if it is not worse.

The gate, per shot setting (5-way 1-shot and 5-shot): the challenger fails if its meta-test
accuracy is below the champion's by more than the 95% CI of the difference,
``sqrt(ci_champion**2 + ci_challenger**2)`` (two independent 600-episode estimates). Models are
comparable only when they were meta-tested on the same class split (same ``splits.json`` hash).
The first model becomes champion. ``force`` promotes anyway and says so. Every decision is
written to the challenger version's tags; no version is ever deleted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, task

CHAMPION, CHALLENGER = "champion", "challenger"
SETTINGS = ("5way_1shot", "5way_5shot")


class PromotionError(RuntimeError):
    """Nothing to promote (no challenger), or a version lacks the metrics the gate needs."""


@dataclass
class Decision:
    promote: bool
    reason: str


def gate(challenger: dict[str, str], champion: dict[str, str] | None, force: bool = False) -> Decision:
    """Decide from two versions' tags (``metatest.<setting>.acc`` / ``.ci95``, ``dataset.splits_sha256``)."""
    if champion is None:
        return Decision(True, "first model: no champion yet")
    notes, worse = [], []
    if challenger.get("dataset.splits_sha256") != champion.get("dataset.splits_sha256"):
        worse.append("meta-tested on a different class split (dataset.splits_sha256 differs): not comparable")
    for setting in SETTINGS:
        a_new, ci_new = _metric(challenger, setting, "challenger")
        a_old, ci_old = _metric(champion, setting, "champion")
        margin = math.sqrt(ci_new**2 + ci_old**2)
        line = f"{setting}: {a_new:.4f} vs {a_old:.4f} (difference {a_new - a_old:+.4f}, CI {margin:.4f})"
        (worse if a_old - a_new > margin else notes).append(line)
    if worse and force:
        return Decision(True, "forced despite: " + "; ".join(worse))
    if worse:
        return Decision(False, "worse beyond the CI: " + "; ".join(worse))
    return Decision(True, "not worse beyond the CI: " + "; ".join(notes))


def _metric(tags: dict[str, str], setting: str, who: str) -> tuple[float, float]:
    try:
        return float(tags[f"metatest.{setting}.acc"]), float(tags[f"metatest.{setting}.ci95"])
    except KeyError as err:
        raise PromotionError(f"the {who} lacks tag {err.args[0]}; was it registered by the pipeline?") from None


def promote(client: MlflowClient, name: str, force: bool = False, actor: str = "free promote") -> dict:
    """Apply the gate to ``name@challenger`` vs ``name@champion``; returns what was decided."""
    try:
        challenger = client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException as err:
        raise PromotionError(f"registered model {name!r} has no alias {CHALLENGER!r}: run the pipeline first") from err
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == challenger.version:
        return {"promoted": False, "version": challenger.version, "reason": "the challenger is already champion"}
    decision = gate(challenger.tags, champion.tags if champion else None, force)
    record = {
        "promotion.decision": "promoted" if decision.promote else "rejected",
        "promotion.reason": decision.reason,
        "promotion.forced": str(force).lower(),
        "promotion.compared_to": champion.version if champion else "none",
        "promotion.by": actor,
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for key, value in record.items():
        client.set_model_version_tag(name, challenger.version, key, value[:5000])
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return {"promoted": decision.promote, "version": challenger.version, "reason": decision.reason, **record}


@task(retries=3, retry_delay_seconds=5)  # the registry is a network service: a retry can help
def promote_task(model_name: str, force: bool) -> dict:
    return promote(MlflowClient(), model_name, force, actor="prefect flow promote")


@flow(name="promote", log_prints=True)
def promote_flow(model_name: str = "free-meta-learner", force: bool = False) -> dict:
    """Move alias champion to the challenger if it is not worse beyond the CI (or if forced)."""
    result = promote_task(model_name, force)
    get_run_logger().info("version %s: %s (%s)", result["version"], result.get("promotion.decision"), result["reason"])
    return result

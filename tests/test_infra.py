"""Static checks of infra/ and the Prefect deployment files: no Docker engine or Kubernetes cluster
runs on the project's machines, so each file is validated against what would read it.

* ``infra/docker-compose.yml``: the Compose specification's JSON schema (as vendored by
  check-jsonschema), the services the team setup needs, secrets only from ``infra/.env``;
* ``infra/k8s/*.yaml`` manifests: ``kubernetes-validate`` against Kubernetes ``K8S_VERSION``, strict;
* ``infra/k8s/work-pool-template.json``: every ``{{ placeholder }}`` declared, every variable of
  prefect-kubernetes's default template kept, and rendered by prefect-kubernetes's own job
  configuration into a Job that Kubernetes accepts (GPU limit, environment from the Secret);
* the deployment files: Prefect's own ``prefect.yaml`` model, job variables the pool declares;
* ``infra/Dockerfile``: FROM a build-arg base, installs from constraints.txt, runs as a non-root user.

Each check returns its problems; each is also run on a broken copy, which must fail.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S_VERSION = "1.31"
PLACEHOLDER = re.compile(r"{{\s*([\w.\-$]+)\s*}}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|BACKEND_STORE_URI")
ONLY_INTERPOLATION = re.compile(r"^(?:[^$]*\$\{[A-Z0-9_]+(?::?[-?][^}]*)?\}[^$]*)+$")


# --- compose -----------------------------------------------------------------------------------


def compose_problems(compose: dict) -> list[str]:
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"schema: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    services = compose.get("services", {})
    for name in ("postgres", "s3", "prefect-server", "mlflow", "worker"):
        if name not in services:
            problems.append(f"service {name} missing")
    for name in ("dask-scheduler", "dask-worker"):
        if services.get(name, {}).get("profiles") != ["dask"]:
            problems.append(f"service {name} must exist under profiles: [dask]")
    for name, service in services.items():
        environment = service.get("environment", {})
        for key, value in (environment.items() if isinstance(environment, dict) else []):
            if SECRET_KEY.search(key) and not ONLY_INTERPOLATION.match(str(value)):
                problems.append(f"{name}: {key} is written in the file; read it from infra/.env with ${{...}}")
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port} is published beyond the host's loopback")
    return problems


def test_compose_file_is_valid_and_keeps_secrets_out() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert compose_problems(compose) == []
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line)
    assert {v for k, v in example.items() if SECRET_KEY.search(k)} == {"change-me"}


def test_a_broken_compose_file_fails() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = "postgresql://free:hunter2@postgres/mlflow"
    broken["services"]["worker"]["enviroment"] = {"X": "1"}  # a typo: not a service key of the specification
    broken["services"]["prefect-server"]["ports"] = ["4200:4200"]
    del broken["services"]["dask-worker"]["profiles"]
    problems = "\n".join(compose_problems(broken))
    for culprit in ("MLFLOW_BACKEND_STORE_URI", "schema: services/worker", "port 4200:4200", "dask-worker"):
        assert culprit in problems, problems


# --- Kubernetes manifests ---------------------------------------------------------------------


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        if path.name.endswith("-values.yaml"):
            continue  # Helm values, checked below
        found += [(f"{path.name}#{i}", doc) for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]
    return found


def manifest_problems(doc: dict, strict: bool = True) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=strict)
    except kubernetes_validate.ValidationError as err:
        return [f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {err.message}"]
    return []


def test_kubernetes_manifests_are_valid() -> None:
    docs = manifests()
    assert {doc["kind"] for _, doc in docs} >= {"Namespace", "StatefulSet", "Service", "Deployment", "ConfigMap"}
    assert [(name, problem) for name, doc in docs for problem in manifest_problems(doc)] == []
    assert all(doc["metadata"].get("namespace") == "free" for _, doc in docs if doc["kind"] != "Namespace")


def test_a_broken_manifest_fails() -> None:
    deployment = next(doc for _, doc in manifests() if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "five thousand"}]
    assert manifest_problems(broken)
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = 1  # unknown field: only strict validation sees it
    assert manifest_problems(typo) and not manifest_problems(typo, strict=False)


# --- the kubernetes work pool's base job template ------------------------------------------------


def template_problems(template: dict, default: dict) -> list[str]:
    declared = set(template["variables"]["properties"])
    used = {name for name in PLACEHOLDER.findall(json.dumps(template["job_configuration"]))}
    problems = [f"placeholder {{{{ {name} }}}} is not a declared variable" for name in sorted(used - declared)]
    for name in sorted(set(default["variables"]["properties"]) - declared):
        problems.append(f"variable {name} of the default template is missing")
    for name in sorted(set(default["variables"].get("required", [])) - set(template["variables"].get("required", []))):
        problems.append(f"variable {name} is required by the default template but not by ours")
    for key in sorted(set(default["job_configuration"]) - set(template["job_configuration"])):
        problems.append(f"job_configuration.{key} of the default template is missing")
    return problems


def render_job(template: dict, values: dict) -> dict:
    """The Job that prefect-kubernetes's worker would submit for a flow run with these job variables:
    its own configuration class fills the template (as ``from_template_and_values`` does, minus block
    and Prefect-variable lookups, which need a server and which this template does not use)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Config

    assert "prefect.blocks" not in json.dumps(template) and "prefect.variables" not in json.dumps(template)
    variables = Config._get_base_config_defaults(template["variables"]["properties"]) | values
    config = Config(**apply_values(copy.deepcopy(template["job_configuration"]), variables))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="smoke-run", flow_id=uuid.uuid4()))
    return config.job_manifest


@pytest.fixture(scope="module")
def default_template() -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads((INFRA / "k8s" / "work-pool-template.json").read_text())


def test_work_pool_template_covers_the_default_one(template: dict, default_template: dict) -> None:
    assert template_problems(template, default_template) == []
    assert template_problems(default_template, default_template) == []  # the check itself accepts the default


def test_work_pool_template_renders_a_valid_gpu_job(template: dict) -> None:
    job = render_job(template, {"image": "registry.example.com/free-pipeline:cuda", "gpu_limit": 2})
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["envFrom"] == [{"secretRef": {"name": "free-secrets"}}]
    assert container["workingDir"] == "/opt/free" and container["image"].endswith(":cuda")
    # Non-strict: prefect-kubernetes insists on parallelism/completions in the pod spec, where
    # Kubernetes ignores them (its own default template does the same).
    assert manifest_problems(job, strict=False) == []


def test_a_broken_work_pool_template_fails(template: dict, default_template: dict) -> None:
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["env_secret_name"]  # still used by envFrom
    del broken["variables"]["properties"]["cluster_config"]  # a variable the default declares
    problems = "\n".join(template_problems(broken, default_template))
    assert "{{ env_secret_name }}" in problems and "variable cluster_config" in problems
    invalid = copy.deepcopy(template)  # renders, but into a Job that Kubernetes refuses (a port is an integer)
    invalid["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": "{{ cpu_request }}"}
    ]
    assert manifest_problems(render_job(invalid, {"cpu_request": "two"}), strict=False)


# --- the deployment files -----------------------------------------------------------------------


def deployment_problems(prefect_file: dict, pool_variables: set[str]) -> list[str]:
    from prefect.cli.deploy._models import PrefectYamlModel

    try:
        PrefectYamlModel.model_validate(prefect_file)
    except ValueError as err:
        return [f"not a prefect.yaml: {err}"]
    problems = []
    for deployment in prefect_file.get("deployments", []):
        entrypoint = deployment.get("entrypoint", "")
        path, _, function = entrypoint.partition(":")
        if not (REPO / path).is_file() or f"def {function}(" not in (REPO / path).read_text():
            problems.append(f"{deployment.get('name')}: entrypoint {entrypoint} does not exist")
        for variable in sorted(set(deployment.get("work_pool", {}).get("job_variables", {})) - pool_variables):
            problems.append(f"{deployment.get('name')}: job variable {variable} is not declared by the work pool")
    return problems


def test_deployment_files_match_their_work_pools(template: dict) -> None:
    from prefect.workers.process import ProcessWorker

    process_vars = set(ProcessWorker.get_default_base_job_template()["variables"]["properties"])
    local = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert deployment_problems(local, process_vars) == []
    kubernetes = yaml.safe_load((INFRA / "prefect-kubernetes.yaml").read_text())
    assert deployment_problems(kubernetes, set(template["variables"]["properties"])) == []
    docker = yaml.safe_load((INFRA / "prefect-docker.yaml").read_text())
    docker_vars = {"image", "image_pull_policy", "mem_limit", "auto_remove", "networks", "volumes", "env"}
    docker_vars.add("container_create_kwargs")  # prefect-docker >= 0.7 (not installed here: listed by hand)
    assert deployment_problems(docker, docker_vars) == []
    names = {d["name"] for d in local["deployments"]}
    assert names == {"full-pipeline", "promote", "smoke"}
    assert {d["name"] for d in kubernetes["deployments"]} == {f"{name}-k8s" for name in names}  # beside, not over


def test_a_broken_deployment_file_fails(template: dict) -> None:
    kubernetes = yaml.safe_load((INFRA / "prefect-kubernetes.yaml").read_text())
    broken = copy.deepcopy(kubernetes)
    broken["deployments"][0]["entrypoint"] = "flows/pipeline.py:no_such_flow"
    broken["deployments"][1]["work_pool"]["job_variables"]["gpus"] = 1
    problems = "\n".join(deployment_problems(broken, set(template["variables"]["properties"])))
    assert "no_such_flow" in problems and "job variable gpus" in problems
    assert deployment_problems({"deployments": "not a list"}, set())


# --- Helm values and the Dockerfile --------------------------------------------------------------


def test_worker_helm_values_point_at_the_kubernetes_pool() -> None:
    values = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())["worker"]
    deployments = yaml.safe_load((INFRA / "prefect-kubernetes.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert values["config"]["workPool"] in pools and values["config"]["type"] == "kubernetes"
    assert values["apiConfig"] == "server" and values["serverApiConfig"]["apiUrl"].endswith("/api")
    assert values["config"]["baseJobTemplate"]["existingConfigMapName"]


def dockerfile_problems(text: str) -> list[str]:
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    instructions = [(line.split()[0].upper(), line) for line in lines if line and not line.startswith("#")]
    words = [word for word, _ in instructions]
    problems = []
    first_from = instructions[words.index("FROM")][1] if "FROM" in words else ""
    base_args = [line for word, line in instructions[: words.index("FROM")] if word == "ARG"] if first_from else []
    if "${BASE}" not in first_from or not any(line.startswith("ARG BASE=python:3.11") for line in base_args):
        problems.append("the base must be a build argument: ARG BASE=python:3.11-slim, then FROM ${BASE}")
    if not any(word == "RUN" and "pip install" in line and "-c constraints.txt" in line for word, line in instructions):
        problems.append("no `pip install ... -c constraints.txt`: the image must install the locked versions")
    users = [line.split()[1] for word, line in instructions if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end with USER <non-root user>")
    return problems


def test_dockerfile_structure() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    assert "nvidia/cuda" in text  # the CUDA base is documented next to the build argument
    assert (INFRA / "Dockerfile.dockerignore").is_file() and "state" in (INFRA / "Dockerfile.dockerignore").read_text()


def test_a_broken_dockerfile_fails() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert dockerfile_problems(text.replace("FROM ${BASE}", "FROM python:3.11-slim"))
    assert dockerfile_problems(text.replace("-c constraints.txt", ""))
    assert dockerfile_problems(text + "\nUSER root\n")

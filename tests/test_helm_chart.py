"""The Helm chart (k8s/stagecoach), linted and rendered by the real Helm engine (helm-python-sdk), its objects validated."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import helm_python as helm  # the real Helm v4 engine (helm-python-sdk)
import kubernetes_validate
import pytest
import yaml
from helpers import SHARED

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "k8s" / "stagecoach"
CRDS = SHARED / "data" / "kuberay-crds"
KUBE_VERSIONS = ["1.30.0", "1.33.0"]
CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
PROFILES = ["defaults", *CI_FILES]


def profile_values(profile: str) -> dict:
    return {} if profile == "defaults" else helm.values_from_yaml((CHART / "ci" / profile).read_text())


def render(values: dict | None = None, name: str = "sc") -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values or {}, name=name, namespace="llm")
    return [
        doc for path, text in manifests.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    ]


def notes(values: dict | None = None) -> str:
    return next(
        t
        for p, t in helm.Chart.load(CHART).render(values or {}, name="sc", namespace="llm").items()
        if p.endswith("NOTES.txt")
    )


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def merged(profile: str) -> dict:
    return helm.Chart.load(CHART).merge_values(profile_values(profile))


def serve_command(raycluster: dict) -> list[str]:
    (submitter,) = [
        c for c in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "submitter"
    ]
    command = submitter["command"]
    assert command[:2] == ["stagecoach", "submit"]
    return command[command.index("--") + 1 :]


# ---- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_lint_strict_finds_nothing(profile, kube_version):
    report = helm.lint(CHART, profile_values(profile), strict=True, kube_version=f"v{kube_version}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_does_report_a_broken_chart(tmp_path):
    """The lint above can fail: a template with a bad expression is an error."""
    broken = Path(helm.Chart.load(CHART).save_dir(tmp_path))
    (broken / "templates" / "service.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {{ .Values.nope.deeper }}\n"
    )
    report = helm.lint(broken, strict=True, kube_version="v1.33.0")
    assert report["errors"], report


# ---- the schema -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stages": 0}, "at '/stages': minimum: got 0, want 1"),
        ({"gpusPerStage": "two"}, "at '/gpusPerStage': got string, want integer"),
        ({"gpusPerStage": 2}, "at '/gpusPerStage'"),
        ({"replicas": 4}, "additional properties 'replicas' not allowed"),
        ({"worker": {"antiAffinity": "sometimes"}}, "at '/worker/antiAffinity'"),
        ({"pipeline": {"rebalance": "always"}}, "at '/pipeline/rebalance'"),
        ({"worker": {"affinity": {"podAntiAffinity": {}}}}, "additional properties 'podAntiAffinity' not allowed"),
    ],
)
def test_schema_rejects_with_helms_message(values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert message in str(err.value) and "values don't meet the specifications of the schema" in str(err.value)


def test_schema_says_a_stage_has_one_gpu():
    schema = helm.Chart.load(CHART).schema
    assert schema["properties"]["gpusPerStage"]["const"] == 1
    assert "does not split across GPUs" in schema["properties"]["gpusPerStage"]["description"]


def test_layers_must_match_stages():
    with pytest.raises(helm.HelmRenderError, match="layers has 2 entries but stages is 4"):
        render({"layers": [30, 34]})


def test_every_value_has_a_doc_comment():
    """KubeRay style: a `# --` comment above every value; only sections (schema objects with properties) may go without."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    schema = helm.Chart.load(CHART).schema
    stack: list[tuple[int, str]] = []
    inside_value = None  # the indent of a documented value whose nested lines are its content
    checked = 0
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w./-]*):(.*)$", line)
        if not m:
            continue
        indent, key = len(m[1]), m[2]
        if inside_value is not None and indent > inside_value:
            continue
        inside_value = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        node = schema
        for k in path:
            node = node["properties"][k]  # every value is in the schema
        block = []  # the comment lines right above; a comment may run over several, the first starting `# --`
        for j in range(i - 1, -1, -1):
            if not lines[j].strip().startswith("#"):
                break
            block.append(lines[j].strip())
        if any(t.startswith("# --") for t in block):
            inside_value, checked = indent, checked + 1
        else:
            assert node.get("type") == "object" and "properties" in node, (
                f"values.yaml: {'.'.join(path)} has no '# --' comment"
            )
    assert checked > 50


# ---- rendered objects ---------------------------------------------------------------------------


def _strict(schema):
    """A CRD schema as `kubectl --validate=strict` reads it: objects with declared properties take no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent (the KubeRay CRD schemas live in ../shared/data/kuberay-crds)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def pod_of(template: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", **template.get("metadata", {})},
        "spec": template["spec"],
    }


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_objects_validate(profile):
    import jsonschema

    objects = render(profile_values(profile))
    kinds = sorted(o["kind"] for o in objects)
    assert {"RayCluster", "Service", "Secret", "ConfigMap", "NetworkPolicy"} <= set(kinds)
    for kube_version in KUBE_VERSIONS:
        for obj in objects:
            if obj["apiVersion"] in ("v1", "networking.k8s.io/v1"):
                try:
                    kubernetes_validate.validate(obj, kube_version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(
                        f"{obj['kind']} {obj['metadata']['name']} for {kube_version}: {e.message} at {list(e.path)}"
                    )
        cluster = one(objects, "RayCluster")
        templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["spec"]["workerGroupSpecs"]
        ]
        for template in templates:  # the pods KubeRay will create, as strict core objects
            try:
                kubernetes_validate.validate(pod_of(template), kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"a RayCluster pod template for {kube_version}: {e.message} at {list(e.path)}")
    for obj in objects:
        if obj["apiVersion"] == "ray.io/v1":
            errors = sorted(jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj), key=str)
            assert not errors, [f"{e.message} at {list(e.path)}" for e in errors]


def test_crd_validation_can_fail():
    import jsonschema

    cluster = copy.deepcopy(one(render(), "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 4  # a typo
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "4"
    messages = [e.message for e in jsonschema.Draft7Validator(crd_schema("RayCluster")).iter_errors(cluster)]
    assert any("'replica' was unexpected" in m for m in messages) and any(
        "'4' is not of type 'integer'" in m for m in messages
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_workers_gpus_and_anti_affinity_follow_values(profile):
    values = merged(profile)
    cluster = one(render(profile_values(profile)), "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == values["stages"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is False
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    limits = worker["resources"]["limits"]
    if values["device"] == "cuda":
        assert limits["nvidia.com/gpu"] == values["gpusPerStage"] == 1
    else:
        assert not any("gpu" in k for k in limits) and not any(
            "gpu" in k for k in worker["resources"].get("requests", {})
        )
    assert pod.get("nodeSelector", {}) == values["worker"]["nodeSelector"]
    assert pod.get("tolerations", []) == values["worker"]["tolerations"]
    anti = pod["affinity"]["podAntiAffinity"]
    term = {
        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "sc", "app.kubernetes.io/component": "stage"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    if values["worker"]["antiAffinity"] == "required":
        assert anti == {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
    else:
        assert anti == {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}
    # The anti-affinity's selector picks exactly the stage pods.
    labels = group["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in term["labelSelector"]["matchLabels"].items())
    head_labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not all(head_labels.get(k) == v for k, v in term["labelSelector"]["matchLabels"].items())
    # The head never holds a stage.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # /dev/shm as a sized memory volume, on every pod.
    for spec, size in (
        (pod, values["worker"]["shmSize"]),
        (cluster["spec"]["headGroupSpec"]["template"]["spec"], values["head"]["shmSize"]),
    ):
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": size}
        assert all(
            {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
            for c in spec["containers"]
            if c["name"].startswith("ray-")
        )


def test_eight_smaller_gpus_are_picked_by_node_selector():
    cluster = one(render(profile_values("gpu-8x1-small-values.yaml")), "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 8
    assert group["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_command_and_config_match_values(profile):
    from stagecoach.cluster.config import ClusterConfig
    from stagecoach.coordinator.cli import build_parser

    values = merged(profile)
    objects = render(profile_values(profile))
    cluster = one(objects, "RayCluster")
    command = serve_command(cluster)
    args = build_parser().parse_args(command[1:])  # the real CLI accepts every flag
    assert args.command == "serve" and args.host == "0.0.0.0" and args.port == values["serve"]["port"]
    assert args.api_key_env == "STAGECOACH_API_KEY" and args.request_timeout == values["serve"]["requestTimeoutSeconds"]
    assert args.drain_timeout == values["serve"]["drainTimeoutSeconds"]
    assert args.max_running == (values["serve"]["maxRunning"] or None)
    assert args.max_queue == (None if values["serve"]["maxQueue"] < 0 else values["serve"]["maxQueue"])
    assert args.max_model_len == (values["serve"]["maxModelLen"] or None)
    assert args.served_model_name == (values["model"]["servedModelName"] or values["model"]["folder"])

    # --config is the chart's ConfigMap, mounted on the head, and our config loader accepts it.
    configmap = one(objects, "ConfigMap")
    mount = next(
        m
        for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        if c["name"] == "ray-head"
        for m in c["volumeMounts"]
        if m["name"] == "config"
    )
    assert args.config == f"{mount['mountPath']}/stagecoach.yaml"
    config = ClusterConfig.from_dict(yaml.safe_load(configmap["data"]["stagecoach.yaml"]))
    assert config.pipeline.num_stages == values["stages"]
    assert config.pipeline.layers == (values["layers"] or None)
    assert config.pipeline.gpus_per_stage == (1 if values["device"] == "cuda" else 0)
    assert config.pipeline.device == values["device"] and config.pipeline.placement == "strict_spread"
    assert (
        config.model.path == f"{values['model']['mountPath']}/{values['model']['folder']}"
        and config.model.dtype == values["model"]["dtype"]
    )
    assert (
        config.transport.port == values["transport"]["port"] and config.transport.token_env == "STAGECOACH_LINK_TOKEN"
    )
    assert config.pipeline.ready_timeout_s == values["pipeline"]["readyTimeoutSeconds"]
    assert config.pipeline.compile == values["pipeline"]["compile"]
    assert config.pipeline.compile_batch_sizes == values["pipeline"]["compileBatchSizes"]

    # The model volume is mounted where the config says, on the head and on every stage.
    for template in [cluster["spec"]["headGroupSpec"]["template"], cluster["spec"]["workerGroupSpecs"][0]["template"]]:
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
        if values["model"]["existingClaim"]:
            assert volume["persistentVolumeClaim"] == {"claimName": values["model"]["existingClaim"], "readOnly": True}
        else:
            assert volume["hostPath"] == {"path": values["model"]["hostPath"], "type": "Directory"}
        ray_container = template["spec"]["containers"][0]
        assert {"name": "model", "mountPath": values["model"]["mountPath"], "readOnly": True} in ray_container[
            "volumeMounts"
        ]


@pytest.mark.parametrize(
    "rebalance",
    [{}, {"rebalance": "auto", "rebalanceMinGain": 0.25, "rebalanceCooldownSeconds": 60}, {"rebalance": "off"}],
)
def test_rebalance_values_reach_the_config(rebalance):
    from stagecoach.cluster.config import ClusterConfig

    config = ClusterConfig.from_dict(
        yaml.safe_load(one(render({"pipeline": rebalance}), "ConfigMap")["data"]["stagecoach.yaml"])
    )
    p = config.pipeline
    assert (p.rebalance, p.rebalance_min_gain, p.rebalance_cooldown_s) == (
        rebalance.get("rebalance", "suggest"),
        rebalance.get("rebalanceMinGain", 0.1),
        rebalance.get("rebalanceCooldownSeconds", 300),
    )


@pytest.mark.parametrize("on", [True, False])
def test_prefix_caching_value_reaches_the_config(on):
    from stagecoach.cluster.config import ClusterConfig

    configmap = one(render({"cache": {"prefixCaching": on}}), "ConfigMap")
    assert ClusterConfig.from_dict(yaml.safe_load(configmap["data"]["stagecoach.yaml"])).cache.prefix_caching is on


def test_extra_serve_args_are_passed_through():
    command = serve_command(one(render({"serve": {"extraArgs": ["--max-batch-tokens", "1024"]}}), "RayCluster"))
    assert command[-2:] == ["--max-batch-tokens", "1024"]


@pytest.mark.parametrize("profile", PROFILES)
def test_image_probes_and_service(profile):
    values = merged(profile)
    chart = helm.Chart.load(CHART)
    objects = render(profile_values(profile))
    cluster = one(objects, "RayCluster")
    tag = values["image"]["tag"] or chart.metadata["appVersion"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    workers = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {c["image"] for c in head["containers"] + workers["containers"]} == {
        f"{values['image']['repository']}:{tag}"
    }
    assert cluster["spec"]["rayVersion"] == values["rayVersion"]

    (submitter,) = [c for c in head["containers"] if c["name"] == "submitter"]
    assert submitter["ports"] == [{"name": "http", "containerPort": values["serve"]["port"]}]
    assert submitter["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert submitter["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert submitter["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    startup = submitter["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room for a stage to load

    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "sc-stagecoach")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": values["service"]["port"], "targetPort": "http", "protocol": "TCP"}
    ]
    head_labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    worker_labels = cluster["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert all(head_labels.get(k) == v for k, v in selector.items()) and not all(
        worker_labels.get(k) == v for k, v in selector.items()
    )
    dashboards = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == (1 if values["service"]["dashboard"]["enabled"] else 0)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == (1 if values["serviceMonitor"]["enabled"] else 0)
    for monitor in monitors:
        assert all(
            service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
        )
        assert (
            monitor["spec"]["endpoints"][0]["port"] == "http" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        )


@pytest.mark.parametrize("profile", PROFILES)
def test_secret_and_network_policy(profile):
    values = merged(profile)
    objects = render(profile_values(profile))
    secret = one(objects, "Secret")
    assert set(secret["data"]) == {"api-key", "link-token"} and all(len(v) >= 40 for v in secret["data"].values())
    cluster = one(objects, "RayCluster")
    for container in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]:
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert refs == {
            "STAGECOACH_API_KEY": {"name": secret["metadata"]["name"], "key": "api-key"},
            "STAGECOACH_LINK_TOKEN": {"name": secret["metadata"]["name"], "key": "link-token"},
        }

    policy = one(objects, "NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    templates = [cluster["spec"]["headGroupSpec"]["template"], cluster["spec"]["workerGroupSpecs"][0]["template"]]
    assert all(
        all(t["metadata"]["labels"].get(k) == v for k, v in selected.items()) for t in templates
    )  # every pod of the release
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    # Any port (stage links, Ray's ports) only from the release's own pods; the API port from apiFrom (or anyone).
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": selected}}]}
    api = rules[1]
    assert api["ports"] == [{"protocol": "TCP", "port": values["serve"]["port"]}]
    assert api.get("from", []) == values["networkPolicy"]["apiFrom"]
    assert all("ports" in r for r in rules[1:])  # nothing else is open to other sources
    assert len(rules) == 2 + bool(values["networkPolicy"]["dashboardFrom"])


def test_existing_secret_replaces_the_generated_one():
    objects = render({"auth": {"existingSecret": "my-keys"}})
    assert [o for o in objects if o["kind"] == "Secret"] == []
    head = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for c in head["containers"] for e in c["env"]} == {"my-keys"}


def test_given_keys_are_used_and_network_policy_can_be_off():
    import base64

    objects = render({"auth": {"apiKey": "k" * 12, "linkToken": "t" * 12}, "networkPolicy": {"enabled": False}})
    data = one(objects, "Secret")["data"]
    assert (
        base64.b64decode(data["api-key"]).decode() == "k" * 12
        and base64.b64decode(data["link-token"]).decode() == "t" * 12
    )
    assert [o for o in objects if o["kind"] == "NetworkPolicy"] == []


def test_names_stay_within_kubernetes_limits():
    objects = render(name="a-very-long-release-name-for-a-platform-team-with-naming-rules")
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 40, obj["metadata"]["name"]
    # KubeRay's longest derived name, <cluster>-stage-worker-<5 chars>, still fits a DNS label.
    assert len(one(objects, "RayCluster")["metadata"]["name"] + "-stage-worker-abcde") <= 63


def test_notes_tell_how_to_reach_the_api_and_open_top():
    text = notes()
    assert "kubectl port-forward --namespace llm svc/sc-stagecoach 8000:8000" in text
    assert "stagecoach top --url" in text and "jsonpath='{.data.api-key}'" in text


def test_dockerfile_matches_the_chart_and_the_tested_ray():
    import ray

    dockerfile = (REPO / "Dockerfile").read_text()
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu", dockerfile, re.M)
    assert "pip install" in dockerfile
    values = helm.Chart.load(CHART).values
    assert ray_version == values["rayVersion"] == ray.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{helm.Chart.load(CHART).metadata["appVersion"]}"' in pyproject

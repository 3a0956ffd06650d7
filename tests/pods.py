"""Run rendered Kubernetes pods as Docker containers, from the pod spec itself.

Nothing about a pod is written by hand here: :func:`docker_run_args` reads the rendered
pod spec (command, args, env with ``$(VAR)`` expansion and field/secret references,
``envFrom``, the pod and container ``securityContext``, ``emptyDir`` and ``secret``
volumes, resource limits, ``imagePullPolicy``) and turns each field into the Docker flag
that enforces the same thing on one machine. A field it does not know how to honour is an
error, never ignored, so a chart change that adds one fails the tests until the emulation
honours it too.

What stands in for the cluster (:class:`FakeCluster`): each pod gets its own loopback
address (127.0.0.X) as its pod IP, every container shares the host's network namespace
(``--network host``: loopback only, no bridge), Services resolve through ``--add-host``
to the IP of the pod their selector picks, Secrets are dicts the test provides.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_BINARY = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

#: Pod spec fields that only matter to a real cluster's scheduler, kubelet or API server and
#: have no effect on what the process inside the container does.
SCHEDULING_ONLY = {
    "affinity", "nodeSelector", "tolerations", "serviceAccountName", "automountServiceAccountToken",
    "terminationGracePeriodSeconds", "restartPolicy", "imagePullSecrets", "priorityClassName",
    "topologySpreadConstraints",
}  # fmt: skip
#: Container fields a kubelet uses around the process (checked by the tests through
#: :func:`probe_url`, or meaningless on one machine).
AROUND_PROCESS = {"name", "image", "ports", "readinessProbe", "livenessProbe", "startupProbe"}


class Unsupported(AssertionError):
    """The rendered pod uses a field this emulation cannot honour."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, text)


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (``"500m"`` -> 0.5, ``"2Gi"`` -> 2147483648)."""
    text = str(value)
    if text.endswith("m") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) / 1000
    m = _QUANTITY.match(text)
    if not m or m.group(2) not in _BINARY:
        raise Unsupported(f"quantity {value!r}")
    return float(m.group(1)) * _BINARY[m.group(2)]


@dataclass
class Pod:
    """One pod to start: its name, its spec, and the loopback address standing for its IP."""

    name: str
    spec: dict[str, Any]
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))  # metadata.uid, as the API server sets it
    init_done: bool = False  # every init container exited 0 (see docker_run_args)


@dataclass
class FakeCluster:
    """What a pod's spec refers to outside itself: Services, Secrets, other pods' IPs."""

    namespace: str
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fruitdask-pods-")))
    _next_ip: int = 10

    def add_pod(self, name: str, template: dict[str, Any]) -> Pod:
        """A pod from a pod template (``{metadata, spec}``) or a Pod object."""
        pod = Pod(
            name=name,
            spec=template["spec"],
            ip=f"127.0.0.{self._next_ip}",
            labels=dict(template.get("metadata", {}).get("labels", {})),
            namespace=self.namespace,
        )
        self._next_ip += 1
        self.pods.append(pod)
        return pod

    def hosts(self) -> dict[str, str]:
        """Service DNS names -> the IP of the first pod their selector matches."""
        out: dict[str, str] = {}
        for name, svc in self.services.items():
            selector = svc["spec"].get("selector", {})
            matched = [p for p in self.pods if selector and all(p.labels.get(k) == v for k, v in selector.items())]
            if not matched:
                continue
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if isinstance(target, int) and target != port["port"]:
                    raise Unsupported(f"Service {name}: port {port['port']} -> {target} (one network namespace)")
            for dns in (name, f"{name}.{self.namespace}", f"{name}.{self.namespace}.svc", f"{name}.{self.namespace}.svc.cluster.local"):
                out[dns] = matched[0].ip
        return out


def _env(container: dict[str, Any], pod: Pod, cluster: FakeCluster) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if set(source) - {"secretRef", "prefix"}:
            raise Unsupported(f"envFrom {source}")
        secret = cluster.secrets[source["secretRef"]["name"]]
        env.update({source.get("prefix", "") + k: v.decode() for k, v in secret.items()})
    fields = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "status.podIP": pod.ip,
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
    }
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = cluster.secrets[ref["name"]][ref["key"]].decode()
        else:
            raise Unsupported(f"env {item}")
    return env


def container_env(container: dict[str, Any], pod: Pod, cluster: FakeCluster) -> dict[str, str]:
    """The environment the kubelet gives ``container`` of ``pod`` (field and secret references
    resolved, ``$(VAR)`` expanded)."""
    return _env(container, pod, cluster)


def _security(pod_sc: dict[str, Any], sc: dict[str, Any]) -> list[str]:
    merged = {**pod_sc, **sc}
    uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
    if merged.get("runAsNonRoot") and (uid is None or int(uid) == 0):
        raise Unsupported("runAsNonRoot without a non-zero runAsUser: the kubelet would refuse to start it")
    args: list[str] = []
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if pod_sc.get("fsGroup") is not None:
        args += ["--group-add", str(pod_sc["fsGroup"])]
    for g in pod_sc.get("supplementalGroups", []):
        args += ["--group-add", str(g)]
    if merged.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if merged.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if merged.get("privileged"):
        args.append("--privileged")
    caps = merged.get("capabilities", {})
    args += [a for c in caps.get("drop", []) for a in ("--cap-drop", c)]
    args += [a for c in caps.get("add", []) for a in ("--cap-add", c)]
    seccomp = merged.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":  # Docker's default profile is the runtime default
        raise Unsupported(f"seccompProfile {seccomp}")
    known = {
        "runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "supplementalGroups", "readOnlyRootFilesystem",
        "allowPrivilegeEscalation", "privileged", "capabilities", "seccompProfile",
    }  # fmt: skip
    if set(merged) - known:
        raise Unsupported(f"securityContext fields {sorted(set(merged) - known)}")
    return args


def _volumes(pod: Pod, container: dict[str, Any], cluster: FakeCluster) -> list[str]:
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
    args: list[str] = []
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        path = mount["mountPath"]
        if "emptyDir" in vol:
            # An emptyDir: writable, group-owned by fsGroup (setgid), sized by sizeLimit.
            opts = ["rw", "exec", "mode=2777" if fs_group is None else "mode=2775"]
            if fs_group is not None:
                opts.append(f"gid={fs_group}")
            if "sizeLimit" in vol["emptyDir"]:
                opts.append(f"size={int(quantity(vol['emptyDir']['sizeLimit']))}")
            args += ["--tmpfs", f"{path}:{','.join(opts)}"]
        elif "secret" in vol:
            data = cluster.secrets[vol["secret"]["secretName"]]
            folder = cluster.workdir / f"{pod.name}-{mount['name']}"
            folder.mkdir(parents=True, exist_ok=True)
            mode = vol["secret"].get("defaultMode", 0o644)
            for key, value in data.items():
                f = folder / key
                f.write_bytes(value)
                f.chmod(mode)
                if fs_group is not None:
                    import os

                    os.chown(f, 0, int(fs_group))
            args += ["-v", f"{folder}:{path}:ro"]
        else:
            raise Unsupported(f"volume {vol}")
        if set(mount) - {"name", "mountPath", "readOnly"}:
            raise Unsupported(f"volumeMount {mount}")
    return args


def docker_run_args(pod: Pod, cluster: FakeCluster, container_index: int = 0, init: bool = False) -> list[str]:
    """The ``docker run`` arguments (after ``run``) that start one container of ``pod``.

    With ``init``, ``container_index`` picks one of the pod's ``initContainers`` (named
    ``<pod>-<container>``). A pod with init containers starts its containers only once the
    caller ran each of them to a zero exit, in order, and set ``pod.init_done`` (as a
    kubelet does), never by skipping them.
    """
    spec = pod.spec
    fields = {"containers", "initContainers", "volumes", "securityContext"}
    if set(spec) - SCHEDULING_ONLY - fields:
        raise Unsupported(f"pod fields {sorted(set(spec) - SCHEDULING_ONLY - fields)}")
    if spec.get("initContainers") and not (init or pod.init_done):
        raise Unsupported("initContainers not run: start each with init=True, wait for exit 0, set pod.init_done")
    container = spec["initContainers" if init else "containers"][container_index]
    known = AROUND_PROCESS | {"imagePullPolicy", "command", "args", "env", "envFrom", "resources", "securityContext", "volumeMounts", "workingDir"}
    if set(container) - known:
        raise Unsupported(f"container fields {sorted(set(container) - known)}")
    env = _env(container, pod, cluster)
    name = f"{pod.name}-{container['name']}" if init else pod.name
    args = ["--detach", "--name", name, "--network", "host", "--label", "io.fruitdask.test=1"]
    for host, ip in sorted(cluster.hosts().items()):
        args += ["--add-host", f"{host}:{ip}"]
    if container.get("imagePullPolicy") == "Never":
        args += ["--pull", "never"]
    args += _security(spec.get("securityContext", {}), container.get("securityContext", {}))
    args += _volumes(pod, container, cluster)
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        args += ["--cpus", f"{quantity(limits['cpu']):g}"]
    if set(limits) - {"memory", "cpu"}:
        raise Unsupported(f"resource limits {sorted(set(limits) - {'memory', 'cpu'})}")
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    if "workingDir" in container:
        args += ["--workdir", container["workingDir"]]
    command = [expand(c, env) for c in container.get("command", [])]
    rest = [expand(a, env) for a in container.get("args", [])]
    if command:
        args += ["--entrypoint", command[0], container["image"], *command[1:], *rest]
    else:
        args += [container["image"], *rest]
    return args


def probe_url(pod: Pod, probe: str = "readinessProbe", container_index: int = 0) -> str:
    """The URL a kubelet's ``httpGet`` probe of this container would request."""
    container = pod.spec["containers"][container_index]
    get = container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return f"http://{pod.ip}:{port}{get.get('path', '/')}"

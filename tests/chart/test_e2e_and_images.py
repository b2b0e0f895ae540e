"""What can be checked of the e2e script and the Dockerfiles without a cluster or a Docker engine: the
manifests the script applies, the `lipsync` commands it runs in the cluster, and what the images contain."""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.metadata
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from lipsync_operator import children
from lipsync_operator.spec import normalize

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("run_e2e", ROOT / "e2e" / "run_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_e2e"] = module
    spec.loader.exec_module(module)
    return module


def lipsync_commands(script: str) -> list[list[str]]:
    """The `lipsync ...` invocations in a shell snippet."""
    out = []
    for part in re.split(r";|&&|\|\||\(|\)|\bdo\b|\bthen\b", script):
        words = shlex.split(part.strip().removeprefix("exec ").strip()) if part.strip() else []
        if words and words[0] == "lipsync":
            out.append([w for w in words if not w.startswith((">", "2>"))])
    return out


def test_the_e2e_manifests_are_valid(e2e):
    manifests = e2e.registry_manifests("lipsync-e2e", "lipsync-inference:0.1.0")
    manifests += [e2e.client_pod("p", "lipsync-e2e", "lipsync-inference:0.1.0", e2e.GRPC_SCRIPT)]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.29", strict=True)
    crd = yaml.safe_load((ROOT / "crds" / "lipsyncmodels.synctalk.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for gpu in (False, True):
        model = e2e.model_manifest("lipsync-e2e", gpu)
        jsonschema.Draft7Validator(schema).validate(model)
        normalize(model["spec"])


def test_the_e2e_runs_lipsync_commands_the_cli_accepts(e2e):
    from inference_pod.cli import build_parser

    parser = build_parser()
    registry = e2e.registry_manifests("ns", "img")[0]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    commands = lipsync_commands(registry) + lipsync_commands(e2e.GRPC_SCRIPT) + \
        lipsync_commands(e2e.load_script(2, 10))
    assert {tuple(c[1:3]) for c in commands} >= {("package", "demo"), ("package", "publish"), ("client", "health"),
                                                  ("client", "frame"), ("client", "stream")}
    for command in commands:
        parser.parse_args(command[1:])   # exits (SystemExit) on an unknown command or flag


def test_the_e2e_script_reports_missing_tools_and_stops(tmp_path):
    """Without kubectl and helm: preflight fails with the reason, no cluster step runs, cleanup says why it
    could not run, the report lists both and the exit status is 1; no traceback."""
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "e2e" / "run_e2e.py"), "--namespace", "e2e-test"],
                          env={"PATH": str(empty), "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = proc.stdout.split("=" * 78)[-2]
    assert re.search(r"^FAIL .* preflight .*kubectl is not on PATH", report, re.M), report
    assert re.search(r"^FAIL .* cleanup .*helm is not on PATH", report, re.M), report
    assert len([line for line in report.splitlines() if line.strip()]) == 2, report
    assert "FAILED: 0 of 2 steps without failure" in proc.stdout
    assert "== helm install" not in proc.stdout


def test_the_e2e_options(e2e):
    args = e2e.parse_args(["--kind", "k", "--gpu", "--keep", "--delete-timeout", "30"])
    assert (args.kind, args.gpu, args.keep, args.namespace, args.delete_timeout) == \
        ("k", True, True, "lipsync-e2e", 30)


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: the last matching pattern wins, ! re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").replace("**", "*")
        if fnmatch.fnmatch(path, glob) or any(fnmatch.fnmatch(part, glob) for part in path.split("/")):
            ignored = not negate
    return ignored


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["operator.Dockerfile", "inference.Dockerfile"])
def test_images_copy_what_exists_and_run_as_the_uid_the_pods_require(name):
    instructions = dockerfile(name)
    for instruction, args in instructions:
        if instruction == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] == f"{children.RUN_AS}:{children.RUN_AS}"
    # The image's own .dockerignore (BuildKit reads <Dockerfile>.dockerignore) keeps those sources.
    patterns = [p for p in (DOCKER / f"{name}.dockerignore").read_text().splitlines() if p and p[0] != "#"]
    for instruction, args in instructions:
        if instruction == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                path = ROOT / source
                sample = path if path.is_file() else next(f for f in sorted(path.rglob("*.py")))
                assert not docker_ignored(sample.relative_to(ROOT).as_posix(), patterns), sample


def test_the_operator_image_entrypoint_matches_the_chart():
    instructions = dict(dockerfile("operator.Dockerfile"))
    assert ast.literal_eval(instructions["ENTRYPOINT"]) == ["kopf"]
    assert ast.literal_eval(instructions["CMD"])[:2] == ["run", "--module=lipsync_operator.handlers"]
    inference = dict(dockerfile("inference.Dockerfile"))
    assert ast.literal_eval(inference["ENTRYPOINT"]) == ["lipsync"]


def test_the_operator_image_has_every_module_the_operator_imports():
    pins = [Requirement(line) for line in (DOCKER / "operator-requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    for pin in pins:   # the pinned versions satisfy the project's own requirements
        project = [Requirement(r) for r in importlib.metadata.requires("lipsync-serving")]
        for req in project:
            if req.name.lower() == pin.name.lower() and (not req.marker or req.marker.evaluate({"extra": "operator"})):
                assert req.specifier.contains(next(iter(pin.specifier)).version), (req, pin)
    # Everything the pins pull in, transitively.
    installed, todo = set(), [p.name for p in pins]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in installed:
            continue
        installed.add(dist.metadata["Name"].lower())
        for req in map(Requirement, dist.requires or []):
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    providers = importlib.metadata.packages_distributions()
    # inference_pod modules the operator imports must be copied into the image, and are checked in turn.
    copied = {source for instruction, args in dockerfile("operator.Dockerfile")
              if instruction == "COPY" and "--from=" not in args for source in args.split()[:-1]}
    todo_paths = sorted((ROOT / "operator" / "lipsync_operator").glob("*.py")) + [ROOT / "inference_pod/__init__.py"]
    seen: set[Path] = set()
    while todo_paths:
        path = todo_paths.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "lipsync_operator":
                    continue
                if top == "inference_pod":
                    source = module.replace(".", "/") + ".py"
                    assert source in copied and "inference_pod/__init__.py" in copied, \
                        f"{path.name} imports {module}, which operator.Dockerfile does not copy"
                    todo_paths.append(ROOT / source)
                    continue
                if top == "lipsync":   # the gRPC stubs: the image generates them from proto/ (stubs stage)
                    assert "COPY --from=stubs /out/lipsync /app/lipsync" in (DOCKER / "operator.Dockerfile").read_text()
                    continue
                assert {d.lower() for d in providers.get(top, [])} & installed, f"{path.name} imports {top}"
    assert ROOT / "inference_pod" / "registry_index.py" in seen  # the shared index reader was followed


REQUIREMENTS = "docker/operator-requirements.txt"


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, one list per FROM."""
    out: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile(name):
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, args))
    return out


def test_the_image_pins_are_exact_and_include_grpcio():
    pins = [Requirement(line) for line in (ROOT / REQUIREMENTS).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(len(p.specifier) == 1 and next(iter(p.specifier)).operator == "==" for p in pins), pins
    assert {p.name for p in pins} >= {"grpcio", "protobuf", "kopf", "kubernetes"}


@pytest.mark.parametrize("name", ["operator.Dockerfile", "inference.Dockerfile"])
def test_the_images_generate_their_stubs_with_the_grpcio_they_install(name):
    """Generated stubs refuse a grpcio older than the grpcio-tools that wrote them: the tools' version is read
    from the grpcio pin of the images' one requirements file, never written in a Dockerfile."""
    text = (DOCKER / name).read_text()
    assert not re.search(r"grpcio-tools\s*(==|>=|~=)\s*[0-9]", text), f"{name} pins grpcio-tools itself"
    (stage,) = [s for s in stages(name) if any("grpcio-tools" in args for _, args in s)]
    copied = {args.split()[-1]: args.split()[0] for instruction, args in stage
              if instruction == "COPY" and "--from=" not in args}
    (run,) = [args for instruction, args in stage if instruction == "RUN" and "grpcio-tools" in args]
    found = re.search(r"(\w+)=\$\(sed -n 's/\^grpcio==//p' (\S+)\)", run)
    assert found, f"{name}: the grpcio-tools version is not read from the grpcio pin: {run}"
    variable, path = found.groups()
    assert copied.get(path) == REQUIREMENTS, f"{name}: {path} is not {REQUIREMENTS}"
    assert f'"grpcio-tools==${variable}"' in run and "--constraint" in run, run
    # What that sed reads: the pinned grpcio, which the image then installs (requirements or constraints).
    versions = [line.removeprefix("grpcio==") for line in (ROOT / REQUIREMENTS).read_text().splitlines()
                if line.startswith("grpcio==")]
    assert len(versions) == 1 and re.fullmatch(r"[0-9][0-9.]*", versions[0]), versions
    installs = [args for instruction, args in stages(name)[-1] if instruction == "RUN" and "pip install" in args]
    assert any("--requirement" in args or "--constraint" in args for args in installs), installs


def test_the_kube_play_adaptation_changes_only_the_four_documented_things():
    """e2e/kubelet_standin.py plays the operator's pod template with podman: host network without ports, the
    namespace written in, a Pod restarted only on failure, no annotation over 63 characters. Undoing exactly
    those gives the template back."""
    sys.path.insert(0, str(ROOT / "e2e"))
    try:
        from kubelet_standin import PODMAN_ANNOTATION_MAX, pod_for_kube_play
    finally:
        sys.path.remove(str(ROOT / "e2e"))
    from lipsync_operator.config import OperatorConfig
    from lipsync_operator.registry import PackageCheck

    owner = {"metadata": {"name": "demo", "namespace": "studio", "uid": "0b7d1d7e-5f0e-4a8e-9a53-0c2f1e0c1a11"}}
    package = PackageCheck(True, "Verified", "", name="demo", version="1", sha256="ab" * 32, size=1,
                           url="http://127.0.0.1:1/demo/1/demo-1.zip", registry="http://127.0.0.1:1/")
    config = OperatorConfig(registry_url="http://127.0.0.1:1/", inference_image="lipsync-inference:0.1.0")
    spec = normalize(yaml.safe_load((ROOT / "crds" / "examples" / "cpu-demo.yaml").read_text())["spec"])
    deployment = children.deployment(owner, spec, package, config)
    template = deployment["spec"]["template"]
    pod = pod_for_kube_play(deployment)

    assert (pod["kind"], pod["metadata"]["name"], pod["metadata"]["namespace"]) == ("Pod", "demo", "studio")
    assert pod["metadata"]["labels"] == template["metadata"]["labels"]
    assert pod["metadata"]["annotations"] == {k: v for k, v in template["metadata"]["annotations"].items()
                                              if len(v) <= PODMAN_ANNOTATION_MAX}
    assert len(pod["metadata"]["annotations"]) == len(template["metadata"]["annotations"]) - 1   # the sha256
    restored = copy.deepcopy(pod["spec"])
    assert restored.pop("hostNetwork") is True and restored.pop("restartPolicy") == "OnFailure"
    for played, written in zip(restored["initContainers"] + restored["containers"],
                               template["spec"]["initContainers"] + template["spec"]["containers"], strict=True):
        assert "ports" not in played
        if "ports" in written:
            played["ports"] = written["ports"]
        for var in played.get("env", []):
            if var["name"] == "POD_NAMESPACE":
                assert var.pop("value") == "studio"
                var["valueFrom"] = {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert restored == template["spec"]
    assert "restartPolicy" not in template["spec"] and not template["spec"].get("hostNetwork")

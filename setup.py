"""Build hook: generate the gRPC stubs from proto/ before packaging.

The stubs are never committed; every build or install (editable included) regenerates them
from proto/lipsync/v1/*.proto, so the .proto files stay the single source of truth.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement (pyproject [build-system])

    proto_root = ROOT / "proto"
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.glob("lipsync/**/*.proto"))
    if not sources:
        return
    include = Path(protoc.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={proto_root}",
            f"--pyi_out={proto_root}", f"--grpc_python_out={proto_root}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(sources))


class BuildWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


packages = find_packages(include=["inference_pod", "inference_pod.*"])
packages += find_packages("proto", include=["lipsync", "lipsync.*"])
packages += find_packages("operator", include=["lipsync_operator", "lipsync_operator.*"])
package_dir = {"lipsync": "proto/lipsync", "lipsync_operator": "operator/lipsync_operator"}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"lipsync": ["**/*.proto", "**/*.pyi"], "inference_pod": ["assets/*", "web/*"]},
    cmdclass={"build_py": BuildWithStubs},
)

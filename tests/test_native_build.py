"""The CMake native build (CMakeLists.txt): configure, build the kernels library for sm_90 with
the CI subset of configurations, build the C example that includes the header and links it.
No GPU and no libcuda here: the example runs but can only list the kernels."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _have_toolchain():
    return shutil.which("cmake") and shutil.which("nvcc") and (shutil.which("cc") or
                                                                shutil.which("gcc"))


@pytest.mark.skipif(not _have_toolchain(), reason="needs cmake, nvcc (CUDA headers) and a C compiler")
def test_cmake_builds_library_and_c_example(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)     # the generator sets it where it needs it
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                    "-DGIFT_FAST_CUDA_ARCHS=90", "-DGIFT_FAST_KERNEL_SET=fast"],
                   check=True, env=env, capture_output=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lib = next(build.glob("libgift_fast_kernels.so*"))
    headers = "".join(p.read_text() for p in (build / "generated").rglob("*.h"))
    for kernel in ("logprob_forward", "combine", "dlogits", "gift_epilogue"):
        assert f" {kernel}_sm90(TT_StreamTy stream" in headers, kernel
    # The driver API is resolved at load time: nothing links against libcuda.
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "libcuda" not in needed
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                               text=True).stdout.split()
    assert not [s for s in undefined if s.startswith("cu")]
    run = subprocess.run([str(build / "gift_fast_example")], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert "combine" in run.stdout and "nothing launched" in run.stdout
    # Generated files stay under the build directory.
    assert not (ROOT / "generated").exists() and not list(ROOT.glob("*.cubin"))

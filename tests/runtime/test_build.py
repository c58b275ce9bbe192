"""The op library's build: a machine without a C++ compiler gets a message saying what is missing."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_build_without_a_compiler_says_what_is_missing(tmp_path):
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])   # the venv's first
    cmake, ninja = shutil.which("cmake", path=search), shutil.which("ninja", path=search)
    assert cmake and ninja, "cmake and ninja come with the test extra (pip install -e .[test])"
    tools = tmp_path / "bin"        # a PATH holding the build tools but no compiler at all
    tools.mkdir()
    for tool in (cmake, ninja):
        (tools / Path(tool).name).symlink_to(tool)
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    done = subprocess.run([cmake, "-G", "Ninja", "-S", str(ROOT), "-B", str(tmp_path / "build")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    message = " ".join((done.stdout + done.stderr).split())
    assert "needs a C++17 compiler (g++ or clang++), and none was found" in message, message
    assert not (tmp_path / "build" / "libfptq_ops.so").exists()

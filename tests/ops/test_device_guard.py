"""The CUDA launchers' device guard (csrc/fastst/cuda/device_guard.h) without a GPU: the header
is compiled with the host C++ compiler against a stand-in cuda_runtime.h that records every
cudaGetDevice/cudaSetDevice call, and a driver checks that the guard switches only when the
input's device is not current, switches back at the end of the scope on every path (an exception
included), and that a failing runtime call raises naming the launcher and the call."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILER = shutil.which("c++") or shutil.which("g++")

# Device 0 is current; device 7 does not exist (cudaSetDevice fails); fail_get makes
# cudaGetDevice fail. Every call is appended to `calls`.
STAND_IN = r"""
#pragma once
#include <string>
#include <vector>
typedef int cudaError_t;
static const cudaError_t cudaSuccess = 0;
static const cudaError_t cudaErrorInvalidDevice = 101;
inline std::vector<std::string> calls;
inline int current = 0;
inline bool fail_get = false;
inline cudaError_t cudaGetDevice(int* device) {
  calls.push_back("get");
  if (fail_get) return cudaErrorInvalidDevice;
  *device = current;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  calls.push_back("set " + std::to_string(device));
  if (device == 7) return cudaErrorInvalidDevice;
  current = device;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "invalid device ordinal"; }
"""

DRIVER = r"""
#include <cstdio>
#include <stdexcept>
#include "fastst/cuda/device_guard.h"

static void show(const char* what) {
  std::printf("%s:", what);
  for (const auto& call : calls) std::printf(" [%s]", call.c_str());
  std::printf(" current=%d\n", current);
  calls.clear();
}

int main() {
  { fastst::DeviceGuard guard(0, "same_cuda"); }
  show("same");
  { fastst::DeviceGuard guard(1, "other_cuda"); std::printf("inside=%d\n", current); }
  show("other");
  try {
    fastst::DeviceGuard guard(1, "throwing_cuda");
    throw std::runtime_error("kernel failed");
  } catch (const std::exception& e) { std::printf("caught: %s\n", e.what()); }
  show("exception");
  try { fastst::DeviceGuard guard(7, "missing_cuda"); } catch (const std::exception& e) {
    std::printf("caught: %s\n", e.what());
  }
  show("bad device");
  fail_get = true;
  try { fastst::DeviceGuard guard(1, "get_cuda"); } catch (const std::exception& e) {
    std::printf("caught: %s\n", e.what());
  }
  show("get fails");
  return 0;
}
"""


@pytest.fixture(scope="module")
def guard_output(tmp_path_factory):
    if COMPILER is None:
        pytest.fail("no C++ compiler on PATH: the extension's build needs one too")
    work = tmp_path_factory.mktemp("guard")
    (work / "cuda_runtime.h").write_text(STAND_IN)
    (work / "driver.cpp").write_text(DRIVER)
    binary = work / "driver"
    subprocess.run([COMPILER, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{work}",
                    f"-I{ROOT / 'csrc'}", str(work / "driver.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=120)
    return subprocess.run([str(binary)], check=True, capture_output=True, text=True,
                          timeout=60).stdout.splitlines()


def test_no_switch_when_the_device_is_current(guard_output):
    assert "same: [get] current=0" in guard_output


def test_switches_for_the_scope_and_back(guard_output):
    assert "inside=1" in guard_output
    assert "other: [get] [set 1] [set 0] current=0" in guard_output


def test_switches_back_when_the_scope_is_left_by_an_exception(guard_output):
    assert "caught: kernel failed" in guard_output
    assert "exception: [get] [set 1] [set 0] current=0" in guard_output


def test_a_failed_switch_names_the_launcher_and_changes_nothing(guard_output):
    assert ("caught: fastst missing_cuda: cudaSetDevice: invalid device ordinal"
            in guard_output)
    assert "bad device: [get] [set 7] current=0" in guard_output  # no restore of a non-switch


def test_a_failed_device_query_names_the_launcher(guard_output):
    assert "caught: fastst get_cuda: cudaGetDevice: invalid device ordinal" in guard_output
    assert "get fails: [get] current=0" in guard_output

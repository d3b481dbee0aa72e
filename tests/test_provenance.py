"""Pinned numerics: the same seeds give the same floats on CPUs with and without AVX-512, and the record says so."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from vitprune.study.provenance import PINNED_NUMERICS, cpu_vendor, environment, numerics, pin_numerics

# A few training steps of the default architecture (patch-embedding convolution, attention, MLP, AdamW) on
# fixed random data; prints the ATen kernels in use and a hash of the trained weights.
TRAIN_STEPS = """
import hashlib, json, sys
from vitprune.study.provenance import pin_numerics
pin_numerics()
import torch
from vitprune import build_model, load_params
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(load_params("params/default.yaml").model, 10, 1, 28)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
for _ in range(5):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())).hexdigest()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "weights": digest}))
"""


def _train_in_subprocess(env_overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS and k != "MKL_ENABLE_INSTRUCTIONS"}
    env.update(env_overrides)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", TRAIN_STEPS], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pin_numerics_sets_what_is_unset_and_keeps_what_the_user_chose():
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    in_force = pin_numerics(env)
    assert in_force["ATEN_CPU_CAPABILITY"] == "avx512"  # the user's choice wins
    assert in_force["MKL_CBWR"] == PINNED_NUMERICS["MKL_CBWR"] == env["MKL_CBWR"]
    assert set(in_force) == set(PINNED_NUMERICS) and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_the_environment_record_names_the_kernels_and_the_pins(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # nothing asked: nothing to warn about
    params = tmp_path / "p.yaml"
    params.write_text("name: x\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        env = environment(params)
    assert env["cpu_capability"] == numerics()["cpu_capability"] and env["ATEN_CPU_CAPABILITY"] == "unset"
    assert set(PINNED_NUMERICS) <= set(env) and len(env["params_sha256"]) == 64


def test_a_pin_that_came_too_late_is_reported(monkeypatch):
    """This pytest process ran tensor operations long ago: asking for AVX2 now cannot change ATen's kernels."""
    import torch

    torch.ones(2).sum()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        with pytest.warns(RuntimeWarning, match="ran before vitprune pinned the numerics"):
            numerics()
    else:  # a CPU without AVX-512 runs AVX2 (or narrower) kernels anyway
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            numerics()


def test_pinned_training_computes_what_an_avx2_only_machine_computes():
    """The guarantee on either vendor: with the pins, this machine trains bit for bit what a machine of the same vendor
    without AVX-512 trains with the same pins (emulated here: ATen's dispatch, MKL's instruction set and oneDNN's ISA
    limited to AVX2). On Intel, MKL_CBWR=AVX2,STRICT selects MKL's AVX2 branch on both; on AMD, MKL keeps its AUTO
    branch on both (`test_mkl_takes_the_branch_its_vendor_promises`). Between an Intel and an AMD CPU no bit-identity
    is promised: the findings carry that (seeds, intervals, verdicts that say whether they can move)."""
    pinned = _train_in_subprocess({})
    avx2_machine = _train_in_subprocess({"MKL_ENABLE_INSTRUCTIONS": "AVX2", **PINNED_NUMERICS})
    assert pinned["capability"] in ("AVX2", "DEFAULT")
    assert pinned["weights"] == avx2_machine["weights"]


def test_mkl_takes_the_branch_its_vendor_promises():
    """What the pins guarantee differs by vendor, and the environment record says which held: MKL honours
    MKL_CBWR=AVX2,STRICT on Intel CPUs; on AMD it takes its AUTO branch (still strict: independent of threads)."""
    env = {k: v for k, v in os.environ.items() if k not in PINNED_NUMERICS}
    pin_numerics(env)
    code = "from vitprune.study.provenance import mkl_branch; import json; print(json.dumps(mkl_branch()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    branch = json.loads(out.stdout.strip().splitlines()[-1])["mkl_cnr_branch"]
    vendor = cpu_vendor()
    if vendor == "GenuineIntel":
        assert branch == "AVX2,STRICT"
    elif vendor == "AuthenticAMD":
        assert branch == "AUTO,STRICT"
    else:
        assert branch.endswith("STRICT") or branch == "not used", branch


def test_the_pins_decide_the_numbers_on_a_cpu_with_avx512():
    """The test above can fail: on a CPU whose native kernels are wider than AVX2, training without the pins computes
    other weights (where the CPU has no AVX-512, native and pinned kernels are the same and so are the weights)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # this pytest process was never pinned: the native kernels
    native = _train_in_subprocess({"ATEN_CPU_CAPABILITY": capability.lower(), "ONEDNN_MAX_CPU_ISA": "ALL",
                                   "MKL_CBWR": "AUTO"})
    pinned = _train_in_subprocess({})
    assert native["capability"] == capability
    assert (native["weights"] != pinned["weights"]) == capability.upper().startswith("AVX512")

"""Test harness.

--backend={cpu,cuda,rocm,ascend}: which vendor's levels to run. On a machine without that backend's
  device, the Triton interpreter is switched on (before any kernel module is imported) and tests run
  CPU numerics plus that backend's codegen; device tests skip with the reason. With the device present
  the interpreter stays off and kernels run on the device.
--impl NAME (repeatable): only these implementations in `impl`-parametrised tests.
--seed N: mixed into every test's seed, which is otherwise derived from the test id.

Tests that take `device` run once per device: "cpu" (always) and the --backend device. Tests that take
`impl` run once per implementation of the op named by `@pytest.mark.op(...)`; a (impl, device) pair the
implementation cannot run skips with the dispatcher's reason. torch.empty / empty_like return
NaN-poisoned memory, so outputs a kernel never wrote show. A run in which every test skipped fails.
"""
from __future__ import annotations

import os

# The Triton interpreter's matmuls go through numpy's BLAS; with OpenBLAS's default one thread per core on
# top of pytest and the compiler subprocesses, the 2-core CI machine oversubscribes (sparse MQA's kernel
# tests ran 4-5x slower). Set before numpy is imported; an explicit setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses  # noqa: E402
import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

pytest_plugins = ["pytester"]

# The autouse fixtures below (seed, poisoned torch.empty) are function-scoped; sharing them across the
# examples of one @given test is intended, hence function_scoped_fixture is suppressed.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True, suppress_health_check=_QUIET)
settings.register_profile("nightly", max_examples=400, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ("cpu", "cuda", "rocm", "ascend")
TORCH_DEVICE = {"cpu": "cpu", "cuda": "cuda", "rocm": "cuda", "ascend": "npu"}


def pytest_addoption(parser):
    parser.addoption("--backend", choices=BACKENDS, default="cpu", help="vendor backend under test")
    parser.addoption("--impl", action="append", default=None, help="only these implementations")
    parser.addoption("--seed", type=int, default=0, help="mixed into the per-test seed")
    parser.addoption("--all-targets", action="store_true",
                     help="codegen for every target of each implementation (default: the first target of each "
                          "backend, sm_90a, gfx942 and ascend950, as dsv4k check)")


def _device_absent(backend: str) -> str | None:
    from dsv4_kernels.platform import device_present  # imports no kernel module
    return device_present(backend)


def pytest_configure(config):
    config.addinivalue_line("markers", "op(name): the op whose implementations parametrise `impl`")
    config.addinivalue_line("markers", "guard_bands: torch.empty/empty_like buffers get canary bands, checked "
                                       "when the test body returns (dsv4_kernels.testing.guard_bands)")
    backend = config.getoption("--backend")
    absent = _device_absent(backend) if backend != "cpu" else "cpu run"
    config.dsv4_device_absent = absent
    if absent:
        os.environ["TRITON_INTERPRET"] = "1"
        import triton.runtime.interpreter as ti  # tl.device_assert is ignored unless debug is on
        ti.interpreter_builder.options = dataclasses.replace(ti.interpreter_builder.options, debug=True)
    else:
        os.environ.pop("TRITON_INTERPRET", None)


def pytest_report_header(config):
    backend = config.getoption("--backend")
    mode = "Triton interpreter on" if os.environ.get("TRITON_INTERPRET") == "1" else "kernels on the device"
    absent = config.dsv4_device_absent if backend != "cpu" else None
    return [f"dsv4-kernels: --backend={backend} ({mode})" + (f"; device tests skip: {absent}" if absent else "")]


def _torch_device(backend: str, absent: str | None):
    """The backend's torch device; without torch_npu, torch does not know "npu", so an absent Ascend
    device is named by its string (its tests are skipped with the reason and never touch it)."""
    try:
        return torch.device(TORCH_DEVICE[backend])
    except RuntimeError:
        if not absent:
            raise
        return TORCH_DEVICE[backend]


def _device_params(config) -> list:
    backend = config.getoption("--backend")
    params = [pytest.param(torch.device("cpu"), "cpu", id="cpu")]
    if backend != "cpu":
        absent = config.dsv4_device_absent
        marks = [pytest.mark.device] + ([pytest.mark.skip(reason=absent)] if absent else [])
        params.append(pytest.param(_torch_device(backend, absent), backend, id=backend, marks=marks))
    return params


def _impls(metafunc) -> list:
    marker = metafunc.definition.get_closest_marker("op")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: takes `impl` but has no @pytest.mark.op(...)")
    import dsv4_kernels  # noqa: F401  (registers the ops; no kernel module is imported)
    from dsv4_kernels import dispatch
    impls = dispatch.implementations(marker.args[0])
    wanted = metafunc.config.getoption("--impl")
    return [i for i in impls if not wanted or i.name in wanted]


def pytest_generate_tests(metafunc):
    """`device` and `impl` are parametrised jointly: only pairs whose backend the implementation serves
    exist (tilelang on a CPU tensor is not a test); pairs it serves but cannot run here skip with why."""
    names = metafunc.fixturenames
    if "codegen_job" in names:
        jobs = codegen_jobs(metafunc.config)
        metafunc.parametrize("codegen_job", jobs, ids=["/".join(j) for j in jobs])
    if "device" in names and "impl" in names:
        params = [pytest.param(impl.name, dev.values[0], id=f"{impl.name}-{dev.id}", marks=dev.marks)
                  for impl in _impls(metafunc) for dev in _device_params(metafunc.config)
                  if impl.serves(dev.values[1])]
        metafunc.parametrize("impl,device", params)
    elif "device" in names:
        metafunc.parametrize("device", [pytest.param(p.values[0], id=p.id, marks=p.marks)
                                        for p in _device_params(metafunc.config)])
    elif "impl" in names:
        metafunc.parametrize("impl", [i.name for i in _impls(metafunc)])


def backend_of_device(device: torch.device, config) -> str:
    return "cpu" if device.type == "cpu" else config.getoption("--backend")


@pytest.fixture(autouse=True)
def _skip_unrunnable(request):
    """Skip an (impl, device) pair the implementation cannot run, with the dispatcher's reason."""
    params = getattr(request.node, "callspec", None)
    if params is None or "impl" not in params.params or "device" not in params.params:
        return
    from dsv4_kernels import dispatch
    op = request.node.get_closest_marker("op").args[0]
    impl = dispatch.get(op, params.params["impl"])
    backend = backend_of_device(params.params["device"], request.config)
    reason = impl.available(backend)
    if reason:
        pytest.skip(f"{op}/{impl.name} on {backend}: {reason}")


@pytest.fixture
def require_supported():
    """require_supported(op, impl, *args, **kwargs): skip this test, with the implementation's reason,
    when its supports() refuses these arguments (a kernel built for dim % 256 == 0 given dim 100). Inside
    a hypothesis test use `hypothesis.assume(impl.supports(...) is None)` instead."""
    from dsv4_kernels import dispatch

    def check(op: str, impl: str, *args, **kwargs) -> None:
        reason = dispatch.get(op, impl).supports(*args, **kwargs)
        if reason:
            pytest.skip(f"{op}/{impl} does not support these arguments: {reason}")
    return check


@pytest.fixture(autouse=True)
def _fresh_dispatch_cache():
    """Every test starts and ends with an empty selection and config cache: a test that patches an
    implementation's defaults (monkeypatch.setitem(impl.defaults, ...)) must get a config built from them,
    not one cached by an earlier test, and must not leave its own behind."""
    from dsv4_kernels import dispatch
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch, random and numpy from the test id (and --seed): reproducible and distinct per test."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ request.config.getoption("--seed")
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    return seed


@pytest.fixture(autouse=True)
def _nan_poisoned_empty(monkeypatch):
    """torch.empty and torch.empty_like hand out poisoned memory (NaN for floats, 0xA5.. for ints)."""
    from dsv4_kernels.testing import poison_
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return poison_(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison_(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """@pytest.mark.guard_bands: the test body runs inside testing.guard_bands(); an overwritten band fails
    the test (not its teardown) once the body has passed, naming the buffer and the offset."""
    if item.get_closest_marker("guard_bands") is None:
        return (yield)
    from dsv4_kernels.testing import guard_bands
    with guard_bands():
        return (yield)


def codegen_backends(config) -> tuple[str, ...]:
    """--backend=cpu compiles for every vendor's targets (codegen needs no device); else that vendor's."""
    backend = config.getoption("--backend")
    return ("cuda", "rocm", "ascend") if backend == "cpu" else (backend,)


# Implementations whose code differs on a later target of a backend (a chip-specific path): that target is
# compiled in the default run too. The Triton grouped GEMM's MXFP4 scaled-dot path (sm_100a, gfx950).
CHIP_PATHS = {("mxfp4_grouped_gemm", "triton"): ("sm_100a", "gfx950")}


def codegen_jobs(config) -> list[tuple[str, str, str]]:
    import dsv4_kernels  # noqa: F401
    from dsv4_kernels import dispatch
    from dsv4_kernels.codegen import targets_for
    wanted = config.getoption("--impl")
    first_only = not config.getoption("--all-targets")  # TileLang lowering costs 3-40 s a job, Triton ~2
    jobs = []
    for op in dispatch.ops():
        for impl in dispatch.implementations(op):
            if wanted and impl.name not in wanted:
                continue
            seen: set[str] = set()
            for t in targets_for(impl):
                always = t.name in CHIP_PATHS.get((op, impl.name), ())
                if t.backend in codegen_backends(config) and (always or not (first_only and t.backend in seen)):
                    jobs.append((op, impl.name, t.name))
                seen.add(t.backend)
    return jobs


@pytest.fixture(scope="session")
def codegen_results(request) -> dict:
    """Every codegen job of this run compiled once, in one clean subprocess: {(op, impl, target): result}."""
    from dsv4_kernels.codegen import compile_many
    jobs = codegen_jobs(request.config)
    results = compile_many([{"op": op, "impl": impl, "target": t} for op, impl, t in jobs])
    return {(r["op"], r["impl"], r["target"]): r for r in results}


@pytest.fixture
def codegen_artifacts(codegen_results, request):
    """artifacts(op, impl, target): the Artifacts of one job of this session's codegen, after checking that
    the implementation is registered for the target and compiled; skips when --backend names another
    vendor (only that vendor's targets are compiled then)."""
    from dsv4_kernels import dispatch
    from dsv4_kernels.backends import find_target
    from dsv4_kernels.codegen import Artifact, targets_for
    chosen = request.config.getoption("--backend")

    def artifacts(op: str, impl: str, target: str) -> list:
        if chosen not in ("cpu", find_target(target).backend):
            pytest.skip(f"--backend={chosen} compiles only that vendor's targets")
        registered = target in [t.name for t in targets_for(dispatch.get(op, impl))]
        assert registered, f"{op}/{impl} is not registered for {target}"
        if (op, impl, target) not in codegen_results:
            pytest.skip(f"the default run compiles the first target of each backend (and CHIP_PATHS), not "
                        f"{target} (--all-targets compiles every target)")
        result = codegen_results[(op, impl, target)]
        assert result["ok"], result.get("error")
        return [Artifact.from_json(a) for a in result["artifacts"]]
    return artifacts


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0:
        return
    passed = len(reporter.stats.get("passed", []))
    skipped = len(reporter.stats.get("skipped", []))
    if passed == 0 and skipped > 0:
        reporter.write_line(f"dsv4-kernels: all {skipped} tests were skipped; a run that tests nothing fails",
                            red=True)
        session.exitstatus = 1

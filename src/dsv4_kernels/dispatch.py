"""Registry of implementations per op, run-time selection, `explain()`, and strict mode.

Selection order for one call:
  1. the `impl=` argument of the op;
  2. the `DSV4K_IMPL` environment variable, e.g. `sparse_mqa=triton,mhc_pre=tilelang`;
  3. the tuned table of the device's arch (`backends/<name>/tuned/<arch>.json`, key "dispatch");
  4. priority (highest first).
A choice by name (1 or 2) that cannot run raises `ImplementationUnavailable` with the reason. Automatic
selection (3, 4) takes the first candidate that serves the device's backend, is available and supports
the arguments. It is a fallback when a better-ranked candidate that could run on this backend declined
the arguments, or when the reference is chosen for a GPU/NPU tensor: a fallback is logged once per
reason, and `DSV4K_STRICT=1` turns it into `FallbackError`.

Launch path. `call()` caches the Decision per (op, impl=, DSV4K_IMPL, DSV4K_STRICT, shape class), the
shape class being the shapes, strides, dtypes, devices and 16-byte alignment of the tensor arguments and
the values of the others; `config()` caches per (implementation, device). register() and clear_cache()
empty both caches; a changed DSV4K_IMPL or DSV4K_STRICT is part of the key. A repeated call of the same
shapes then costs a dictionary lookup instead of the selection (device detection, the candidates'
available() and supports()). A first-time selection inside CUDA-graph capture raises CaptureError: the
selection and the JIT compile it leads to must happen before the capture (`precompile`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsv4_kernels import platform

log = logging.getLogger("dsv4_kernels")

LANGUAGES = ("reference", "triton", "tilelang")


class ImplementationUnavailable(RuntimeError):
    """An implementation asked for by name cannot run, or no implementation can run these arguments."""


class FallbackError(RuntimeError):
    """Strict mode (DSV4K_STRICT=1): automatic selection would have fallen back."""


class CaptureError(RuntimeError):
    """An op met new shapes for the first time inside CUDA-graph capture: selection (and the JIT compile
    that follows) cannot happen there. Call precompile(op, *args) or the op once before capturing."""


def _resolve(entry: str) -> Callable:
    """The function `entry` ("module:function") names, looked up on each call (a patched module attribute
    is seen at once); an imported module is read from sys.modules (importlib's lookup costs ~1 us)."""
    module, _, attr = entry.partition(":")
    return getattr(sys.modules.get(module) or importlib.import_module(module), attr)


def _always(*_args, **_kwargs) -> None:
    return None


@dataclass(frozen=True)
class Implementation:
    """One implementation of one op.

    entry / codegen: "module:function" strings, imported on first use so that registering an op never
    imports triton or tilelang. `available(backend)` returns None or the reason the implementation
    cannot run on that backend here (toolchain missing, interpreter off); `supports(*args, **kwargs)`
    returns None or the reason it refuses these arguments (shape, dtype, head count). `codegen(target)`
    returns the kernel specs to compile for a `dsv4_kernels.backends.Target` (see codegen.py).
    """

    op: str
    name: str
    language: str
    backends: tuple[str, ...]
    entry: str
    priority: int = 0
    available: Callable[[str], str | None] = _always
    supports: Callable[..., str | None] = _always
    codegen: str | None = None
    defaults: dict = field(default_factory=dict)

    def serves(self, backend: str) -> bool:
        return backend in self.backends

    def why_not(self, backend: str, args: tuple, kwargs: dict) -> tuple[str, str | None]:
        """(stage, reason): stage is "backend", "available", "supports" or "ok" (reason None)."""
        if not self.serves(backend):
            return "backend", f"does not serve {backend} (serves {', '.join(self.backends)})"
        reason = self.available(backend)
        if reason:
            return "available", reason
        reason = self.supports(*args, **kwargs)
        if reason:
            return "supports", reason
        return "ok", None

    def __call__(self, *args, **kwargs):
        return _resolve(self.entry)(*args, **kwargs)

    def codegen_specs(self, target) -> list:
        if self.codegen is None:
            return []
        return _resolve(self.codegen)(target)


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def register(impl: Implementation) -> Implementation:
    if impl.language not in LANGUAGES:
        raise ValueError(f"{impl.op}/{impl.name}: language {impl.language!r} is not one of {LANGUAGES}")
    bad = set(impl.backends) - set(platform.BACKENDS)
    if bad:
        raise ValueError(f"{impl.op}/{impl.name}: unknown backends {sorted(bad)}; expected {platform.BACKENDS}")
    impls = _REGISTRY.setdefault(impl.op, {})
    if impl.name in impls:
        raise ValueError(f"{impl.op}: implementation {impl.name!r} is registered twice")
    impls[impl.name] = impl
    _parse_env.cache_clear()
    clear_cache()
    return impl


def imported_on_use(entry: str) -> Callable[..., str | None]:
    """A supports() hook that imports its "module:function" on the first call: registering an op must not
    import triton or tilelang."""
    def supports(*args, **kwargs):
        return _resolve(entry)(*args, **kwargs)
    return supports


ALL_BACKENDS = ("cpu", "cuda", "rocm", "ascend")


def register_family_op(op: str, family: str, triton: dict | None = None, tilelang: dict | None = None) -> None:
    """The usual implementations of one op of a family, at the project's layout:
    reference (reference/<family>.py:<op>, every backend, priority 0); with `triton` defaults, Triton
    (kernels/<family>/triton.py:<op>, supports_<op> of kernels/<family>, codegen_<op>; CPU through the
    interpreter, CUDA, ROCm; priority 20); with `tilelang` defaults, TileLang (kernels/<family>/tilelang.py,
    its own supports_<op>; CUDA and ROCm; priority 10, below Triton: it runs nowhere on a build machine)."""
    from dsv4_kernels import toolchains
    register(Implementation(op, "reference", "reference", ALL_BACKENDS, entry=f"dsv4_kernels.reference.{family}:{op}",
                            priority=0))
    kernels = f"dsv4_kernels.kernels.{family}"
    if triton is not None:
        register(Implementation(op, "triton", "triton", ("cpu", "cuda", "rocm"), entry=f"{kernels}.triton:{op}",
                                priority=20, available=toolchains.triton_available,
                                supports=imported_on_use(f"{kernels}:supports_{op}"),
                                codegen=f"{kernels}.triton:codegen_{op}", defaults=dict(triton)))
    if tilelang is not None:
        register(Implementation(op, "tilelang", "tilelang", ("cuda", "rocm"), entry=f"{kernels}.tilelang:{op}",
                                priority=10, available=toolchains.tilelang_available,
                                supports=imported_on_use(f"{kernels}.tilelang:supports_{op}"),
                                codegen=f"{kernels}.tilelang:codegen_{op}", defaults=dict(tilelang)))


def ops() -> list[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> list[Implementation]:
    """The implementations of `op`, highest priority first."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(ops())}")
    return sorted(_REGISTRY[op].values(), key=lambda i: -i.priority)


def get(op: str, name: str) -> Implementation:
    impl = _REGISTRY.get(op, {}).get(name)
    if impl is None:
        names = ", ".join(i.name for i in implementations(op))  # raises for an unknown op
        raise ValueError(f"op {op!r} has no implementation {name!r}; expected one of {names}")
    return impl


def env_choices() -> dict[str, str]:
    """Parse DSV4K_IMPL ("op=impl,op=impl"); a malformed entry, unknown op or unknown impl raises ValueError."""
    return dict(_parse_env(os.environ.get("DSV4K_IMPL", "").strip()))


@functools.lru_cache(maxsize=16)
def _parse_env(raw: str) -> tuple[tuple[str, str], ...]:
    """Cached by the raw value (register() clears it): every call reads the variable, one parses it."""
    choices: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, name = (s.strip() for s in item.partition("="))
        if not sep or not op or not name:
            raise ValueError(f"DSV4K_IMPL entry {item!r} is malformed; expected OP=IMPL, e.g. sparse_mqa=triton")
        try:
            get(op, name)
        except ValueError as err:  # name the variable: the caller may not know it is set
            raise ValueError(f"DSV4K_IMPL entry {item!r}: {err}") from None
        choices[op] = name
    return tuple(choices.items())


def strict() -> bool:
    return os.environ.get("DSV4K_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Candidate:
    impl: Implementation
    stage: str          # "ok", "backend", "available", "supports", or "not evaluated"
    reason: str | None


@dataclass(frozen=True)
class Decision:
    """The outcome of one selection: which implementation runs, why, and why the others do not."""

    op: str
    device: platform.DeviceInfo
    chosen: Implementation
    source: str                      # "argument", "DSV4K_IMPL", "tuned", "priority"
    candidates: tuple[Candidate, ...]
    fallback_reason: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.op} on {self.device.backend} ({self.device.arch}): {self.chosen.name} "
                 f"[{self.chosen.language}] chosen by {self.source}"]
        if self.fallback_reason:
            lines.append(f"  fallback: {self.fallback_reason}")
        for c in self.candidates:
            mark = "*" if c.impl is self.chosen else " "
            lines.append(f" {mark} {c.impl.name:<18} {c.impl.language:<9} "
                         f"{'ok' if c.stage == 'ok' else c.stage + ': ' + str(c.reason)}")
        return "\n".join(lines)


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("cannot dispatch: no tensor argument to take the device from")


def _ranked(op: str, device: platform.DeviceInfo) -> tuple[list[Implementation], str]:
    impls = implementations(op)
    if device.backend != "cpu":
        from dsv4_kernels.backends import get_backend
        preferred = get_backend(device.backend).tuned(device.arch).get("dispatch", {}).get(op)
        if preferred is not None:
            first = get(op, preferred)
            return [first] + [i for i in impls if i is not first], "tuned"
    return impls, "priority"


_warned: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def select(op: str, args: tuple, kwargs: dict | None = None, impl: str | None = None,
           evaluate_all: bool = False, report_fallback: bool = True) -> Decision:
    """Choose the implementation of `op` for these arguments (the order is in the module docstring).

    evaluate_all: also ask every candidate after the chosen one why it would not run (for explain()).
    report_fallback: log a fallback (once) or, under DSV4K_STRICT=1, raise FallbackError; explain() only
        describes it in the Decision.
    """
    kwargs = kwargs or {}
    device = platform.device_info(_device_of(args, kwargs))
    named, source = (impl, "argument") if impl else (env_choices().get(op), "DSV4K_IMPL")
    if named:
        chosen = get(op, named)
        stage, reason = chosen.why_not(device.backend, args, kwargs)
        if reason:
            raise ImplementationUnavailable(
                f"{op}: implementation {named!r} was requested by {source} but cannot run on "
                f"{device.backend} ({device.arch}): {reason}")
        return Decision(op, device, chosen, source, (Candidate(chosen, "ok", None),))

    ranked, source = _ranked(op, device)
    candidates: list[Candidate] = []
    chosen = None
    declined_ahead: list[Candidate] = []
    for cand in ranked:
        if chosen is not None and not evaluate_all:
            break
        stage, reason = cand.why_not(device.backend, args, kwargs)
        candidates.append(Candidate(cand, stage, reason))
        if chosen is None:
            if stage == "ok":
                chosen = cand
            elif stage == "supports":
                declined_ahead.append(candidates[-1])
    if chosen is None:
        detail = "; ".join(f"{c.impl.name}: {c.reason}" for c in candidates)
        raise ImplementationUnavailable(f"{op}: no implementation can run on {device.backend} "
                                        f"({device.arch}) with these arguments: {detail}")
    fallback = None
    if declined_ahead:
        fallback = "; ".join(f"{c.impl.name} declined: {c.reason}" for c in declined_ahead)
    if chosen.language == "reference" and device.backend != "cpu":
        fallback = (fallback + "; " if fallback else "") + f"the PyTorch reference runs on a {device.backend} device"
    if fallback and report_fallback:
        message = f"{op}: falling back to {chosen.name!r} on {device.backend} ({device.arch}): {fallback}"
        if strict():
            raise FallbackError(message + " (DSV4K_STRICT=1)")
        # Keyed without the reason text, which holds shapes: one line per kind of fallback, not per shape.
        _warn_once((op, chosen.name, device.arch, tuple(c.impl.name for c in declined_ahead)), message)
    return Decision(op, device, chosen, source, tuple(candidates), fallback)


_recorders: list[Counter] = []


@contextlib.contextmanager
def recording():
    """Count which implementation ran for each op inside the block: {(op, impl): calls}."""
    counts: Counter = Counter()
    _recorders.append(counts)
    try:
        yield counts
    finally:
        _recorders.remove(counts)


_SELECTIONS: dict[tuple, Decision] = {}
_CONFIGS: dict[tuple, dict] = {}
MAX_CACHED = 4096  # shape classes kept; past it the cache starts over (prefill sees a new T per call)


def clear_cache() -> None:
    """Forget every cached selection, config and checked call class (register() calls it; call it after
    editing a tuned table in a running process)."""
    _SELECTIONS.clear()
    _CONFIGS.clear()
    _CHECKED.clear()


class _Uncacheable(Exception):
    pass


_SCALARS = (bool, int, float, str, type(None))


def _arg_key(a):
    if isinstance(a, torch.Tensor):  # the alignment matters: TileLang kernels refuse unaligned pointers;
        #                              the device: a public op's checks compare every tensor's (see checked)
        return (a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15)
    if a.__class__ in _SCALARS:
        return (a.__class__, a)  # the type too: True == 1
    if isinstance(a, (tuple, list)):
        return (a.__class__, tuple(_arg_key(v) for v in a))
    raise _Uncacheable


# os.environ.get costs about 0.7 us per variable (it encodes the key each time); the mapping under it
# is a plain dict with the encoded keys, read here in 20 ns. Both see every os.environ assignment.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(os.environ.encodekey(k) if _ENV_DATA is not None else k for k in ("DSV4K_IMPL", "DSV4K_STRICT"))


def _env_key() -> tuple:
    source = _ENV_DATA if _ENV_DATA is not None else os.environ
    return (source.get(_ENV_KEYS[0]), source.get(_ENV_KEYS[1]))


def _selection_key(op: str, impl: str | None, args: tuple, kwargs: dict) -> tuple | None:
    """The cache key of one call: op, impl=, DSV4K_IMPL and DSV4K_STRICT, the registry, the device of the
    first tensor argument (the one selection uses) and the shape class of every argument; None when an
    argument is of a kind without a key (a dict, an object): such calls are selected every time."""
    device = None
    try:
        shapes = []
        for a in args:
            if device is None and isinstance(a, torch.Tensor):
                device = a.device
            shapes.append(_arg_key(a))
        for name, a in kwargs.items():
            if device is None and isinstance(a, torch.Tensor):
                device = a.device
            shapes.append((name, _arg_key(a)))
    except _Uncacheable:
        return None
    return (op, impl, _env_key(), id(_REGISTRY), device, tuple(shapes))


def _capturing(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return False


def selection(op: str, args: tuple, kwargs: dict | None = None, impl: str | None = None) -> Decision:
    """select() through the cache: the Decision of the first call with this shape class is reused.
    Raises CaptureError instead of selecting inside CUDA-graph capture."""
    kwargs = kwargs or {}
    key = _selection_key(op, impl, args, kwargs)
    decision = _SELECTIONS.get(key) if key is not None else None
    if decision is None:
        if _capturing(args, kwargs):
            raise CaptureError(
                f"{op}: first call with these argument shapes inside CUDA-graph capture; selecting an "
                f"implementation and compiling its kernel cannot be captured. Run "
                f"dsv4_kernels.precompile({op!r}, *args) (or the op once) with the same shapes before capturing.")
        decision = select(op, args, kwargs, impl=impl)
        if key is not None:
            if len(_SELECTIONS) >= MAX_CACHED:
                _SELECTIONS.clear()
            _SELECTIONS[key] = decision
    return decision


def call(op: str, *args, impl: str | None = None, **kwargs):
    """Select (cached, see `selection`) and run: the body every public op's torch.library implementation calls."""
    chosen = selection(op, args, kwargs, impl=impl).chosen
    for counts in _recorders:
        counts[(op, chosen.name)] += 1
    return chosen(*args, **kwargs)


# Public calls whose arguments passed their op's checks, by call class (the selection key of the public
# arguments): the implementation chosen for them. A public op asks `checked` first and,
# on a hit, skips its checks and the custom-op layer (ops/_library.py EagerFastOp.known and .run).
_CHECKED: dict[tuple, Implementation] = {}


def checked(op: str, args: tuple, impl: str | None) -> Implementation | None:
    """The implementation for a public call of `op` whose call class (op, impl=, DSV4K_IMPL,
    DSV4K_STRICT, the registry, and per argument: shape, strides, dtype, device, alignment, or scalar
    type and value) passed the op's checks before (`remember_checked`), else None. The checks of every
    op read only that metadata (never tensor values), so a call of the same class passes them too."""
    if impl is not None and impl.__class__ is not str:
        return None                    # the op's check of impl= raises
    key = _selection_key(op, impl, args, {})
    chosen = _CHECKED.get(key) if key is not None else None
    if chosen is not None:
        for counts in _recorders:
            counts[(op, chosen.name)] += 1
    return chosen


def remember_checked(op: str, args: tuple, impl: str | None, op_args: tuple) -> None:
    """Record that public arguments `args` of `op` passed its checks and ran as `op_args` (the arguments
    its custom op passed to `call`); later calls of the class go straight to the chosen implementation."""
    key = _selection_key(op, impl, args, {})
    decision = _SELECTIONS.get(_selection_key(op, impl, op_args, {}))
    if key is None or decision is None:
        return
    if len(_CHECKED) >= MAX_CACHED:
        _CHECKED.clear()
    _CHECKED[key] = decision.chosen


def precompile(op: str, *args, impl: str | None = None, **kwargs) -> Decision:
    """Run the public op `op` once on these example arguments (same shapes, dtypes and devices as the
    calls to come), so that its implementation is selected, its kernels are JIT-compiled and both are
    cached before a CUDA-graph capture or a latency-critical loop; returns the Decision that later calls
    with these shapes reuse. The op really runs: for ops that update arguments in place
    (compressor_decode's state) pass scratch copies. On a CUDA device it synchronises afterwards."""
    import dsv4_kernels
    implementations(op)  # raises for an unknown op
    public = getattr(dsv4_kernels, op, None)
    if public is not None:
        public(*args, impl=impl, **kwargs)
    else:
        call(op, *args, impl=impl, **kwargs)
    if any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in (*args, *kwargs.values())):
        torch.cuda.synchronize()
    return selection(op, args, kwargs, impl=impl)


def explain(op: str, *args, impl: str | None = None, **kwargs) -> Decision:
    """The decision for `op` on these arguments with every candidate's reason; nothing is run.

    Strict mode does not raise here: explain() reports what a call would do, including a fallback.
    """
    return select(op, args, kwargs, impl=impl, evaluate_all=True, report_fallback=False)


def config(impl: Implementation, device: platform.DeviceInfo) -> dict[str, Any]:
    """Compile-time parameters for `impl` on `device`: its registered defaults, overridden by the tuned
    table of the device's arch (`configs["op/impl"]`). Cached per (implementation, device); a new dict
    each call."""
    key = (impl.op, impl.name, device)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        cfg = dict(impl.defaults)
        if device.backend != "cpu":
            from dsv4_kernels.backends import get_backend
            tuned = get_backend(device.backend).tuned(device.arch).get("configs", {})
            cfg.update(tuned.get(f"{impl.op}/{impl.name}", {}))
        _CONFIGS[key] = cfg
    return dict(cfg)

"""Backends, the per-op registry, and the one-flag backend choice.

Every op (`masked_cross_attention`, `fpn_upsample_add`, ...) is an `Op`: a pure-PyTorch reference plus
`Implementation`s registered per backend. An implementation declares what it supports (devices, dtypes,
an environment check such as "triton importable" or "extension built", and an input check such as
"head dim 32") and answers `not_supported_reasons(inputs)` with every reason it refuses.

Backends:
  reference  the op's PyTorch reference (the single source of truth; always available)
  triton     Triton kernels: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)
  cpp        the C++ (OpenMP) CPU kernels of the extension `mf_kernels._C`
  cuda       the CUDA kernels of the extension `mf_kernels._C`
  sdpa       pure-PyTorch fused attention (`scaled_dot_product_attention`), CPU and CUDA; it is not C++,
             so it gets its own honest name instead of posing as `cpp`

The choice, innermost first: a model's own `kernels` (`fai_mf.load_model(..., kernels=)`,
`FAIMFModel.set_kernels`, which run its forward inside `use()`), the context manager `use(backend)`,
the environment variable `MF_KERNELS`, else "auto".

- "auto" walks `AUTO_ORDER[device type]` (CUDA: triton > cuda > sdpa > reference; CPU: cpp > sdpa >
  reference; the Triton interpreter is a test vehicle, never picked by auto), or an op's own
  `AutoPreference` where one applies (the FPN lateral op prefers cuda on sm_75 for fp16), and takes the
  first implementation that accepts the inputs. Its choice is logged once (INFO); a fall back to the
  reference is logged once (WARNING) with every refusal. `python -m mf_kernels.info` prints both orders.
- A named backend is strict: if the op implements it but it refuses these inputs, `NotSupportedError`
  lists the reasons. If the op has no implementation for it at all (e.g. `cpp` for masked attention),
  the op runs its reference and says so once in the log, so that one model-wide flag can name a
  backend that covers only some of the ops.

Under torch.compile / torch.export (`torch.compiler.is_compiling()`), a call goes to the op's
torch.library custom op (`Op.traced`, see `mf_kernels.custom_ops`), whose kernel runs `Op.eager` (the
selection above) when the graph runs; traced code reads the choice set by `tracing(backend)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger("mf_kernels")

BACKENDS = ("reference", "triton", "cpp", "cuda", "sdpa")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MF_KERNELS"
DEVICE_TYPES = ("cpu", "cuda")
# Fastest first. Triton on CPU runs in the interpreter (a test vehicle), so auto never takes it there.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "sdpa", "reference"),
    "cpu": ("cpp", "sdpa", "reference"),
}
NOT_IMPLEMENTED = "not implemented for this op"
NO_CUDA = "no CUDA device is available"
INT32_LIMIT = 2**31 - 1  # the fused kernels index elements with int32
INT32_REASON = "more than 2**31 - 1 elements: the kernels index with int32"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_reason(dtype: torch.dtype, supported: tuple[torch.dtype, ...]) -> str:
    """The one wording of a dtype refusal (the dispatcher's and the launchers' errors)."""
    return f"dtype {dtype_name(dtype)} not supported (supports {', '.join(map(dtype_name, supported))})"


def exceeds_int32(*numels: int) -> bool:
    """Whether any count breaks int32 indexing: a bool, so the selection cache keeps one key per class of
    size instead of one per image size."""
    return max(numels) > INT32_LIMIT


class NotSupportedError(RuntimeError):
    """A named backend cannot run the given inputs; the message lists every reason."""


def validate_choice(choice: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"unknown kernels choice {choice!r}; expected one of {', '.join(CHOICES)}")
    return choice


# ----------------------------------------------------------------------------------------------------
# Inputs and implementations


@dataclass(frozen=True)
class Inputs:
    """What implementations need to know about a call: device, dtype, and op-specific sizes (`extra`)."""

    device: torch.device
    dtype: torch.dtype
    extra: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        for key, value in self.extra:
            if key == name:
                return value
        raise AttributeError(name)

    def describe(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.extra)
        return f"{self.device.type}, {dtype_name(self.dtype)}" + (f", {sizes}" if sizes else "")


def make_inputs(device: torch.device, dtype: torch.dtype, **extra: Any) -> Inputs:
    return Inputs(torch.device(device), dtype, tuple(sorted(extra.items())))


@dataclass
class Implementation:
    """One backend's implementation of one op.

    devices / dtypes: what it runs on. environment(device) -> reasons the machine cannot run it on that
    device type (library missing, interpreter off, extension not built); called lazily, must not import
    heavy modules at registration. check(inputs) -> op-specific refusals (head dim, sizes).
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    environment: Callable[[str], list[str]] = lambda device_type: []
    check: Callable[[Inputs], list[str]] = lambda inputs: []
    description: str = ""

    def availability_reasons(self, device_type: str) -> list[str]:
        """Reasons this implementation cannot run on `device_type` at all (ignoring input shapes)."""
        if device_type not in self.devices:
            return [f"runs on {'/'.join(self.devices)} tensors, not {device_type}"]
        reasons = [NO_CUDA] if device_type == "cuda" and not torch.cuda.is_available() else []
        return list(dict.fromkeys(reasons + list(self.environment(device_type))))  # drop repeats, keep order

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Every reason this implementation refuses `inputs`; [] when it accepts them."""
        reasons = self.availability_reasons(inputs.device.type)
        if inputs.dtype not in self.dtypes:
            reasons.append(dtype_reason(inputs.dtype, self.dtypes))
        if inputs.device.type in self.devices:  # size limits matter only where it could run at all
            reasons += self.check(inputs)
        return reasons


# ----------------------------------------------------------------------------------------------------
# The current choice: model hooks > use() > MF_KERNELS > "auto"

_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("mf_kernels_choice", default=None)


# The choice that code traced by torch.compile / torch.export reads (Dynamo cannot trace a ContextVar, and
# guards on this global, so another choice is another graph); set by `tracing`.
_traced_choice: str | None = None


def current_choice() -> str:
    """The backend choice in force here: `use()`/model setting, else $MF_KERNELS, else "auto" (while
    torch.compile / torch.export trace inside `tracing(backend)`: that backend)."""
    if _traced_choice is not None and torch.compiler.is_compiling():
        return _traced_choice
    choice = _choice.get()
    if choice is not None:
        return choice
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in CHOICES:
            raise ValueError(f"${ENV_VAR}={env!r} is not a kernels choice; expected one of {', '.join(CHOICES)}")
        return env
    return "auto"


@contextlib.contextmanager
def use(backend: str) -> Iterator[str]:
    """Run the ops inside the block with `backend` ("auto", "reference", "triton", "cpp", "cuda", "sdpa")."""
    token = _choice.set(validate_choice(backend))
    try:
        yield backend
    finally:
        _choice.reset(token)


@contextlib.contextmanager
def tracing(backend: str) -> Iterator[str]:
    """Trace (torch.compile, torch.export) and run with `backend`: what `fai_mf.runtime` wraps around a
    compiled call, since traced code cannot read `use()`'s context variable (the model's hooks skip it)."""
    global _traced_choice
    previous, _traced_choice = _traced_choice, validate_choice(backend)
    try:
        with use(backend):
            yield backend
    finally:
        _traced_choice = previous


_HOOKS_ATTR = "_mf_kernels_hooks"
_CHOICE_ATTR = "_mf_kernels_choice"
_ATTACH_DEPTH = 2  # the model, its children and grandchildren: every entry point a caller uses


def attach(module: torch.nn.Module, backend: str | None) -> None:
    """Pin `module`'s ops to `backend` (None: follow `use()` / $MF_KERNELS / auto again).

    Forward hooks on the module and its sub-modules two levels down (for FAI-MF: `pixel_decoder`,
    `head.predictor`, ...) run each forward inside the choice, so calling the model, `forward_raw` or the
    pixel decoder alone all see it. Two levels keep the per-forward cost to a dozen hooks instead of one
    per module; the hook restores the previous choice even when forward raises. The hooks hold only
    the backend name, so the module still pickles.
    """
    for handle in module.__dict__.get(_HOOKS_ATTR, []):
        handle.remove()
    module.__dict__[_HOOKS_ATTR] = []
    module.__dict__[_CHOICE_ATTR] = None if backend is None else validate_choice(backend)
    if backend is None:
        return
    hook = _ChoiceHook(backend)
    for sub in _modules_to_depth(module, _ATTACH_DEPTH):
        module.__dict__[_HOOKS_ATTR] += [sub.register_forward_pre_hook(hook.enter),
                                          sub.register_forward_hook(hook.leave, always_call=True)]


_hook_stacks = threading.local()  # per thread: the choices the hooks replaced, innermost last


class _ChoiceHook:
    def __init__(self, backend: str):
        self.backend = backend

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # traced code takes the choice from `tracing`
            return
        stack = _hook_stacks.__dict__.setdefault("stack", [])
        stack.append(_choice.get())
        _choice.set(self.backend)

    def leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        stack = _hook_stacks.__dict__.get("stack")
        if stack:
            _choice.set(stack.pop())


def attached(module: torch.nn.Module) -> str | None:
    """The backend pinned to `module` by `attach`, or None."""
    return module.__dict__.get(_CHOICE_ATTR)


def _modules_to_depth(module: torch.nn.Module, depth: int) -> Iterator[torch.nn.Module]:
    yield module
    if depth > 0:
        for child in module.children():
            yield from _modules_to_depth(child, depth - 1)


# ----------------------------------------------------------------------------------------------------
# Ops


@dataclass(frozen=True)
class AutoPreference:
    """An op's own auto order where the device-wide `AUTO_ORDER` is not the fastest: on `device` tensors of
    `dtypes` (all when empty) on GPUs below compute capability `below` (any when None), auto walks `order`.
    `why` says what it rests on; `python -m mf_kernels.info` prints it."""

    device: str
    order: tuple[str, ...]
    why: str
    dtypes: tuple[torch.dtype, ...] = ()
    below: tuple[int, int] | None = None

    def applies(self, inputs: Inputs) -> bool:
        if inputs.device.type != self.device or (self.dtypes and inputs.dtype not in self.dtypes):
            return False
        # only CUDA inputs reach the capability query, so CPU calls never touch CUDA
        return self.below is None or torch.cuda.get_device_capability(inputs.device) < self.below

    def describe(self) -> str:
        when = [self.device] + ([", ".join(map(dtype_name, self.dtypes))] if self.dtypes else [])
        if self.below is not None:
            when.append(f"below sm_{self.below[0]}{self.below[1]}")
        return f"{' '.join(when)}: {' > '.join(self.order)} ({self.why})"


@dataclass
class Op:
    """An op: its reference, how to read `Inputs` off a call, and its implementations per backend."""

    name: str
    reference: Callable[..., Any]
    inputs_of: Callable[..., Inputs]
    implementations: dict[str, Implementation] = field(default_factory=dict)
    auto_preferences: list[AutoPreference] = field(default_factory=list)
    last_backend: str | None = None  # the backend of the latest call (profiling reports)
    # what a call runs while torch.compile / torch.export trace: its torch.library custom op (`custom_ops`)
    traced: Callable[..., Any] | None = None
    _selected: dict[tuple[str, Inputs], Implementation] = field(default_factory=dict, repr=False)
    _logged: set[tuple] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.register("reference", self.reference, devices=DEVICE_TYPES,
                      dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                      description="PyTorch reference")

    def register(self, backend: str, fn: Callable[..., Any], *, devices: tuple[str, ...],
                 dtypes: tuple[torch.dtype, ...], environment: Callable[[str], list[str]] | None = None,
                 check: Callable[[Inputs], list[str]] | None = None, description: str = "") -> Implementation:
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        impl = Implementation(self.name, backend, fn, tuple(devices), tuple(dtypes),
                              environment or (lambda device_type: []), check or (lambda inputs: []), description)
        self.implementations[backend] = impl
        self._selected.clear()
        return impl

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.traced is not None and torch.compiler.is_compiling() and current_choice() != "reference":
            return self.traced(*args, **kwargs)  # one opaque graph node; its kernel calls `eager` at run time
        return self.eager(*args, **kwargs)

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """Run the implementation the current choice selects (the custom ops' kernels call this)."""
        choice = current_choice()
        if choice == "reference":  # the exact reference model: no inspection, no logging
            self.last_backend = "reference"
            return self.reference(*args, **kwargs)
        impl = self.select(self.inputs_of(*args, **kwargs), choice)
        self.last_backend = impl.backend
        return impl.fn(*args, **kwargs)

    def reasons(self, backend: str, inputs: Inputs) -> list[str]:
        impl = self.implementations.get(backend)
        return [NOT_IMPLEMENTED] if impl is None else impl.not_supported_reasons(inputs)

    def select(self, inputs: Inputs, choice: str | None = None) -> Implementation:
        """The implementation that runs `inputs` under `choice` (default: the current choice)."""
        choice = validate_choice(choice or current_choice())
        key = (choice, inputs)
        impl = self._selected.get(key)
        if impl is None:
            impl = self._select_auto(inputs) if choice == "auto" else self._select_named(choice, inputs)
            self._selected[key] = impl
        return impl

    def _select_named(self, backend: str, inputs: Inputs) -> Implementation:
        impl = self.implementations.get(backend)
        if impl is None:
            self._log_once(logging.INFO, ("absent", backend),
                           f"mf_kernels: {self.name} has no {backend!r} implementation; it runs its reference")
            return self.implementations["reference"]
        reasons = impl.not_supported_reasons(inputs)
        if reasons:
            raise NotSupportedError(f"{self.name}: backend {backend!r} cannot run these inputs "
                                    f"({inputs.describe()}):\n" + "\n".join(f"  - {r}" for r in reasons))
        return impl

    def prefer(self, preference: AutoPreference) -> None:
        """Add an op-specific auto order (see `AutoPreference`); the first that applies wins."""
        self.auto_preferences.append(preference)
        self._selected.clear()

    def auto_order(self, inputs: Inputs) -> tuple[str, ...]:
        """The backends auto tries for `inputs`, fastest first."""
        for preference in self.auto_preferences:
            if preference.applies(inputs):
                return preference.order
        return AUTO_ORDER.get(inputs.device.type, ("reference",))

    def _select_auto(self, inputs: Inputs) -> Implementation:
        order = self.auto_order(inputs)
        refusals = []
        for backend in order:
            reasons = self.reasons(backend, inputs)
            if not reasons:
                impl = self.implementations[backend]
                if backend == "reference":
                    why = "; ".join(f"{b}: {', '.join(r)}" for b, r in refusals) or "no fused backend for this device"
                    self._log_once(logging.WARNING, ("fallback", inputs.device.type, tuple(map(str, refusals))),
                                   f"mf_kernels: auto runs the reference {self.name} on {inputs.describe()} "
                                   f"because {why}")
                else:
                    self._log_once(logging.INFO, ("auto", inputs.device.type, inputs.dtype, backend),
                                   f"mf_kernels: auto picked {backend!r} for {self.name} on {inputs.describe()}")
                return impl
            refusals.append((backend, reasons))
        raise NotSupportedError(f"{self.name}: no backend can run {inputs.describe()}:\n"
                                + "\n".join(f"  - {b}: {'; '.join(r)}" for b, r in refusals))

    def _log_once(self, level: int, key: tuple, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.log(level, message)

    def clear_cache(self) -> None:
        """Forget selections and log-once keys (tests; after the environment changed)."""
        self._selected.clear()
        self._logged.clear()


OPS: dict[str, Op] = {}


def define_op(name: str, reference: Callable[..., Any], inputs_of: Callable[..., Inputs]) -> Op:
    """Create and register an op; its reference is registered as the `reference` backend."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already defined")
    op = Op(name, reference, inputs_of)
    OPS[name] = op
    return op


AOT_PROVIDERS: dict[str, str] = {}


def register_aot_provider(op: str, provider: str) -> None:
    """Declare an op's Triton launches for `python -m mf_kernels.aot`: `provider` = "package.module:function",
    with function(arch: int) -> list[mf_kernels.aot.AotSpec]; imported only when the check runs."""
    AOT_PROVIDERS[op] = provider


def last_choices() -> dict[str, str]:
    """op name -> backend of its latest call, for the ops called so far (e.g. after a profiled forward)."""
    return {name: op.last_backend for name, op in sorted(OPS.items()) if op.last_backend is not None}


@dataclass(frozen=True)
class RooflineProvider:
    """Where an op family declares its roofline (bytes, FLOPs) once, as "package.module:function" names
    imported only when a report runs: `rows()` -> the rows at the SPEC §5 shapes (`python -m
    mf_kernels.roofline`); `call_rows(op, args, kwargs, dtype)` -> the rows of one recorded call as the T4
    would run it in `dtype` (`fai-mf bench roofline`)."""

    ops: tuple[str, ...]
    rows: str
    call_rows: str


ROOFLINE_PROVIDERS: dict[str, RooflineProvider] = {}  # by op name; the ops of one family share a provider


def register_roofline_provider(ops: tuple[str, ...], rows: str, call_rows: str) -> None:
    """Declare the roofline of `ops` (see `RooflineProvider`)."""
    provider = RooflineProvider(tuple(ops), rows, call_rows)
    for op in provider.ops:
        ROOFLINE_PROVIDERS[op] = provider


def clear_caches() -> None:
    for op in OPS.values():
        op.clear_cache()


# ----------------------------------------------------------------------------------------------------
# Environment checks shared by implementations (lazy: nothing is imported or compiled at registration)


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether Triton kernels defined from now on run in the interpreter (read at `@triton.jit` time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_environment(kernels_module: str) -> Callable[[str], list[str]]:
    """Environment check for a Triton implementation whose kernels live in `kernels_module`.

    The interpreter flag is read when the kernels are decorated, i.e. when `kernels_module` is first
    imported; once it is imported, its own mode (module attribute INTERPRETED) is what counts.
    """

    def environment(device_type: str) -> list[str]:
        if not triton_importable():
            return ["triton is not installed (pip install triton)"]
        module = sys.modules.get(kernels_module)
        interpreted = module.INTERPRETED if module is not None else interpreter_requested()
        if device_type == "cpu":
            if not interpreted:
                return ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before the kernels are imported)"]
            return interpreter_version_reasons()
        if interpreted:
            return ["the Triton kernels were imported in interpreter mode (TRITON_INTERPRET=1), which runs CPU tensors only"]
        return cuda_capability_reasons(min_capability=(7, 5), who="Triton")

    return environment


def _release(distribution: str) -> tuple[int, ...] | None:
    """The (major, minor, ...) release of an installed distribution, or None."""
    import re
    from importlib import metadata

    try:
        match = re.match(r"\d+(\.\d+)*", metadata.version(distribution))
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(n) for n in match.group(0).split(".")) if match else None


@functools.lru_cache(maxsize=None)
def interpreter_version_reasons() -> list[str]:
    """Known-broken (triton, numpy) pairs for the Triton interpreter; [] when the pair here is fine.

    Triton before 3.7 converts a one-element array with `int()` when an interpreted `range` loop has a
    run-time bound; numpy 2.4 made that a TypeError (triton-lang/triton#9171). Checked here: triton 3.6.0
    with numpy 2.4.x fails, with numpy 2.3.5 passes; triton 3.7.0 and 3.8.0 have the fix."""
    triton_release, numpy_release = _release("triton"), _release("numpy")
    if triton_release and numpy_release and triton_release[:2] < (3, 7) and numpy_release[:2] >= (2, 4):
        versions = f"triton {'.'.join(map(str, triton_release))} with numpy {'.'.join(map(str, numpy_release))}"
        return [f"the Triton interpreter of {versions} fails on loops with a run-time bound (int() of a one-element "
                "array, an error since numpy 2.4): install numpy<2.4 or triton>=3.7"]
    return []


def cuda_capability_reasons(min_capability: tuple[int, int], who: str) -> list[str]:
    """Called only for CUDA tensors, so touching CUDA here is fine."""
    if not torch.cuda.is_available():
        return [NO_CUDA]
    capability = torch.cuda.get_device_capability()
    if capability < min_capability:
        return [f"{who} needs sm_{min_capability[0]}{min_capability[1]}+, this GPU is sm_{capability[0]}{capability[1]}"]
    return []


def extension_environment(device_type: str) -> list[str]:
    """Environment check of every `cpp` / `cuda` implementation: `mf_kernels._cpp_lib` says whether the
    extension loads (and, for CUDA tensors, has its CUDA kernels); then the GPU must be sm_75+."""
    from . import _cpp_lib

    reasons = _cpp_lib.unavailable_reasons(device_type)
    if not reasons and device_type == "cuda":
        reasons = cuda_capability_reasons(min_capability=(7, 5), who="the CUDA extension")
    return reasons

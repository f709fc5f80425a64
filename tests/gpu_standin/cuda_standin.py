"""A CUDA device stand-in for CPU-only machines: the engine's GPU code path, run for real.

`with cuda_standin() as sim:` makes `torch.device("cuda")` usable without a GPU. A tensor "on
cuda" is a `StandinTensor`: a wrapper subclass that reports `device == cuda:0` (so every
`x.device.type == "cuda"` branch of the engine takes its GPU path) and holds a CPU tensor with the
real values (so control flow and results are those of a real run, and can be compared with the
CPU run). Every ATen op on such tensors goes through `_dispatch`, which enforces what CUDA does and
the CPU does not:
  * device mixing: an op that takes a "cuda" tensor and a CPU tensor of one element or more fails
    with CUDA's own message (CPU 0-dim scalars, CPU index tensors and cross-device copies are
    allowed, as on CUDA); `torch.Generator("cuda")` works, but which device a factory's generator
    is on is not checked (the dispatcher hands over a plain Generator);
  * the mplus_fast ops run their registered fake kernel first, i.e. their Python argument checks
    see the "cuda" tensors (a CPU `inv_freq` next to "cuda" queries is reported there);
  * CUDA graphs: `torch.cuda.graph(g)` records the ops of its body instead of executing them
    (their effects on existing tensors are undone at the end of the capture, as a real capture
    executes nothing), `g.replay()` re-executes the recorded ops on the same tensors (a captured
    step's Python side effects do not replay, as on a GPU); inside a capture a host sync
    (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero`, `torch.equal`, ...) or any op on CPU
    tensors raises `CaptureError`;
  * pinned memory is emulated (`pin_memory()`, `pin_memory=True`, `is_pinned()`), and `torch.cuda`
    streams, events, synchronize and memory statistics are inert stand-ins.
Numerics are the CPU's (the stand-in checks placement and synchronisation, not CUDA kernels).
`sim.captures` counts the graphs captured and `sim.replays` their replays.
"""
from __future__ import annotations

import contextlib
import threading
import types
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten


class CaptureError(RuntimeError):
    """An operation that a CUDA graph capture cannot contain (a host sync, a CPU op)."""


# Ops that read a device tensor back to the host: forbidden while capturing.
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.is_nonzero.default,
                 aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                 aten.unique_consecutive.default, aten.unique_dim.default}
# Ops that CUDA allows with CPU tensors among "cuda" ones (copies; CPU index tensors).
MIXED_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
            aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default,
            aten.record_stream.default, aten.set_.source_Tensor}
FACTORY_KWARG = "device"


def _is_standin(t) -> bool:
    return isinstance(t, StandinTensor)


def _inner(t):
    return t.elem if isinstance(t, StandinTensor) else t


class StandinTensor(torch.Tensor):
    """A "cuda:0" tensor whose values live in the CPU tensor `elem`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=CUDA, requires_grad=False)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"StandinTensor(cuda:0, {self.elem!r})"

    # Python indexing and Tensor.copy_ reach for CUDA's device guard before they dispatch (a CPU
    # build has none): index and copy the values directly, through the same rules.
    def __getitem__(self, idx):
        inner = tree_map(_inner, idx)
        return StandinTensor(_SIM.run_inner(aten.index.Tensor, lambda: self.elem[inner]))

    def __setitem__(self, idx, value):
        if isinstance(value, torch.Tensor) and not _is_standin(value) and value.dim() > 0:
            raise RuntimeError(_mix_message("__setitem__ (index_put_)"))
        inner, val = tree_map(_inner, idx), _inner(value)
        _SIM.run_inner(aten.index_put_.default, lambda: self.elem.__setitem__(inner, val), mutated=[self.elem])

    def copy_(self, src, non_blocking=False):
        return aten.copy_.default(self, src, non_blocking)

    # Host reads whose Python bindings guard the device too: through the ops that sync.
    def _scalar(self):
        return aten._local_scalar_dense.default(self)

    def __int__(self):
        return int(self._scalar())

    def __index__(self):
        return int(self._scalar())

    def __float__(self):
        return float(self._scalar())

    def tolist(self):
        return aten._to_copy.default(self, device=CPU).tolist()

    def numpy(self, *_, **__):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first. [cuda stand-in]")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        """Other Python bindings that guard the device first (`contiguous`, `index_copy_` outside
        inference mode, ...): on that failure, call the ATen op of the same name instead."""
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            try:
                return func(*args, **kwargs)
            except RuntimeError as e:
                if "not linked with support for cuda" not in str(e):
                    raise
                op = getattr(aten, getattr(func, "__name__", ""), None)
                if op is None:
                    raise
        return op(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        return _SIM.dispatch(func, args, kwargs or {})


def _mix_message(name: str) -> str:
    return ("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
            f"(when checking argument for {name}) [cuda stand-in]")


class StandinGenerator(torch.Generator):
    """`torch.Generator(device="cuda")` on a CPU build: a CPU generator that reports its device."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls, "cpu")
        g._standin_device = torch.device(device)
        return g

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self):
        return torch.device("cuda", 0) if self._standin_device.type == "cuda" else self._standin_device

    def manual_seed(self, seed):
        super().manual_seed(seed)
        return self            # (the binding returns a plain Generator)


class _Capture:
    def __init__(self, graph):
        self.graph = graph
        self.undo: list[tuple[torch.Tensor, torch.Tensor]] = []   # (tensor, its values before)


class _Sim:
    """The stand-in's state: capture in progress, pinned tensors, counters."""

    def __init__(self):
        self.capture: _Capture | None = None
        self.capture_thread = None
        self._pinned: dict[int, weakref.ref] = {}
        self.captures = 0
        self.replays = 0
        self.syncs_outside_capture = 0
        self.capture_errors: list[BaseException] = []   # what made a capture fail (the engine falls back)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        self._pinned[id(t)] = weakref.ref(t)
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        ref = self._pinned.get(id(t))
        return ref is not None and ref() is t

    def capturing(self) -> bool:
        return self.capture is not None and threading.current_thread() is self.capture_thread

    def run_inner(self, func, thunk, mutated=()):
        """Run `thunk` on the unwrapped values; inside a capture, remember what it overwrites so
        the capture leaves no effect (and record it for replay)."""
        capturing = self.capturing()
        if capturing:
            for t in mutated:
                self.capture.undo.append((t, t.detach().clone()))
        with _disable_current_modes():
            out = thunk()
        if capturing:
            # Replay rewrites a functional op's output in place (a graph's fixed addresses); an
            # in-place op mutates its operands again; a view aliases memory that replay rewrites.
            functional = not mutated and not getattr(func, "is_view", False)
            self.capture.graph._record(thunk, out if functional else None)
        return out

    # ---------------------------------------------------------------- the dispatch rule
    def dispatch(self, func, args, kwargs):
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_device = any(_is_standin(t) for t in tensors)
        name = str(func)
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func in (aten._pin_memory.default, aten.pin_memory.default):
            return self.pin(args[0].clone())
        if func is aten.record_stream.default:
            return None
        if func.overloadpacket is aten.to:      # not decomposed in inference mode: as Tensor.to
            return _to_overload(args, kwargs)
        factory_device = kwargs.get(FACTORY_KWARG)
        to_device = factory_device is not None and torch.device(factory_device).type == "cuda"
        if func is aten._to_copy.default and factory_device is not None and torch.device(factory_device).type == "cpu":
            to_device = False
            if self.capturing() and on_device:
                raise CaptureError(f"{name}: a copy to the host inside a CUDA graph capture (a host sync)")
            wrap = False
        else:
            wrap = on_device or to_device
        if self.capturing():
            if func in HOST_SYNC_OPS and on_device:
                raise CaptureError(f"{name} reads a device tensor back to the host inside a CUDA graph capture "
                                   "(.item(), bool(t), .tolist(), int(t), nonzero, torch.equal, ...)")
            if not wrap:
                raise CaptureError(f"{name} runs on CPU tensors inside a CUDA graph capture: it would run once, "
                                   "at capture time, and never replay")
        if func.namespace == "mplus_fast" and on_device:   # the op's own checks first, as its CUDA kernel
            self._check_custom_op(func, args, kwargs)
        if on_device and func not in MIXED_OK:
            for t in tensors:
                if not _is_standin(t) and t.dim() > 0:
                    raise RuntimeError(_mix_message(name))
        if func in (aten.copy_.default,) and _is_standin(args[1]) and not _is_standin(args[0]) and self.capturing():
            raise CaptureError(f"{name}: a copy to the host inside a CUDA graph capture (a host sync)")
        if on_device and func in HOST_SYNC_OPS:
            self.syncs_outside_capture += 1
        inner_kwargs = dict(kwargs)
        if to_device:
            inner_kwargs[FACTORY_KWARG] = CPU
        pin = bool(inner_kwargs.pop("pin_memory", False)) if "pin_memory" in inner_kwargs else False
        if func is aten._fused_sdp_choice.default:   # the CUDA SDPA kernels do not exist here: the math one
            return 0
        inner_args = tree_map(_inner, args)
        inner_kwargs = tree_map(_inner, inner_kwargs)
        mutated = self._mutated(func, inner_args, inner_kwargs)
        out = self.run_inner(func, lambda: func(*inner_args, **inner_kwargs), mutated)
        if pin:
            self.pin(out)
        if not wrap:
            return out
        return self._rewrap(out, args, kwargs)

    @staticmethod
    def _rewrap(out, args, kwargs):
        """Wrap outputs; an output that IS an input's values (in-place ops) returns that input."""
        by_elem = {}
        for t in tree_flatten((args, kwargs))[0]:
            if _is_standin(t):
                by_elem[id(t.elem)] = t

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = by_elem.get(id(t))
            return same if same is not None else StandinTensor(t)
        return tree_map(wrap, out)

    @staticmethod
    def _mutated(func, args, kwargs) -> list[torch.Tensor]:
        out = []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
                if isinstance(v, torch.Tensor):
                    out.append(v)
                elif isinstance(v, (list, tuple)):
                    out.extend(t for t in v if isinstance(t, torch.Tensor))
        return out

    @staticmethod
    def _check_custom_op(func, args, kwargs):
        """The op's fake kernel on the "cuda" tensors: its argument checks (devices included)."""
        import torch._library.simple_registry as registry
        entry = registry.singleton.find(func._schema.name)
        fake = getattr(entry, "fake_impl", None)
        kernel = getattr(fake, "kernel", None)
        if kernel is None:
            return
        schema_args = func._schema.arguments
        call_kwargs = {a.name: kwargs[a.name] for a in schema_args if a.name in kwargs}
        kernel(*args, **call_kwargs)


_SIM = _Sim()


class _FactoryMode(TorchDispatchMode):
    """Routes factories with device="cuda" (which have no tensor argument) to the stand-in."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get(FACTORY_KWARG)
        leaves = tree_flatten((args, kwargs))[0]
        if any(_is_standin(t) for t in leaves) or (dev is not None and torch.device(dev).type == "cuda") \
                or func in (aten._pin_memory.default, aten.pin_memory.default, aten.is_pinned.default) \
                or kwargs.get("pin_memory") or _SIM.capturing():
            return _SIM.dispatch(func, args, kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------- torch.cuda stand-ins
class StandinStream:
    def __init__(self, device=None, priority=0, **_):
        self.device = CUDA

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or StandinEvent()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True


_CURRENT = StandinStream()


class StandinEvent:
    def __init__(self, enable_timing=False, **_):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class StandinGraph:
    """A CUDA graph: the ops recorded by a capture, re-executed by `replay`."""

    def __init__(self, *_, **__):
        self.thunks: list = []

    def _record(self, thunk, functional_out):
        self.thunks.append((thunk, functional_out))

    def replay(self):
        _SIM.replays += 1
        with _disable_current_modes():
            for thunk, out in self.thunks:
                new = thunk()
                if out is not None:
                    for dst, src in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                        if isinstance(dst, torch.Tensor):
                            dst.copy_(src)

    def reset(self):
        self.thunks = []


@contextlib.contextmanager
def _graph(graph, pool=None, stream=None, **_):
    if _SIM.capture is not None:
        raise RuntimeError("a CUDA graph capture is already under way [cuda stand-in]")
    _SIM.capture, _SIM.capture_thread = _Capture(graph), threading.current_thread()
    try:
        yield
    except BaseException as e:
        _SIM.capture_errors.append(e)
        raise
    finally:
        cap = _SIM.capture
        _SIM.capture, _SIM.capture_thread = None, None
        with _disable_current_modes():
            for t, before in reversed(cap.undo):     # a capture executes nothing: undo its effects
                t.copy_(before)
    _SIM.captures += 1


@contextlib.contextmanager
def _null_context(*_, **__):
    yield


def _tensor(data, *args, device=None, **kwargs):
    t = _ORIGINAL["tensor"](data, *args, **kwargs)
    return t.to(device) if device is not None and torch.device(device).type == "cuda" else t


def _as_tensor(data, dtype=None, device=None):
    if isinstance(data, torch.Tensor):
        return data.to(dtype=dtype or data.dtype, device=device or data.device)
    return _tensor(data, dtype=dtype, device=device)


def _to(self, *args, **kwargs):
    """Tensor.to: its Python binding initialises CUDA for a move to it, so moves to or from the
    stand-in call the copy op itself."""
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    to_cuda = device is not None and device.type == "cuda"
    if not _is_standin(self) and not to_cuda:
        return _ORIGINAL["to"](self, *args, **kwargs)
    target = CUDA if to_cuda else (device or self.device)
    dtype = dtype or self.dtype
    if target == self.device and dtype == self.dtype and not copy:
        return self
    return aten._to_copy.default(self, dtype=dtype, device=target, non_blocking=non_blocking)


def _to_overload(args, kwargs):
    """aten.to.{device,dtype,dtype_layout,other}, as Tensor.to."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
    given = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return _to(args[0], copy=bool(kwargs.get("copy", False)), **given)


def _cuda(self, device=None, non_blocking=False, **_):
    return _to(self, CUDA, non_blocking=non_blocking)


def _record_stream(self, stream):
    if not isinstance(stream, StandinStream) or not _is_standin(self):
        raise RuntimeError(f"record_stream: a cuda tensor and a stream, got {type(self).__name__} and {stream!r}")


def _pin_memory(self, *_, **__):
    return _SIM.pin(self.clone())


def _is_pinned(self, *_, **__):
    return _SIM.is_pinned(self)


_ORIGINAL: dict = {}


def _thread_run(self):
    """Threads started under the stand-in (the prefetch worker) see it too: dispatch modes are
    per thread."""
    with _FactoryMode():
        _ORIGINAL["run"](self)

CUDA_PATCHES = {
    "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
    "get_device_name": lambda *_: "cuda stand-in (CPU)", "synchronize": lambda *_: None,
    "empty_cache": lambda: None, "reset_peak_memory_stats": lambda *_: None,
    "memory_allocated": lambda *_: 0, "max_memory_allocated": lambda *_: 0, "max_memory_reserved": lambda *_: 0,
    "memory_reserved": lambda *_: 0, "set_device": lambda *_: None, "is_current_stream_capturing": lambda: _SIM.capturing(),
    "get_device_properties": lambda *_: types.SimpleNamespace(name="cuda stand-in (CPU)", major=9, minor=0,
                                                              total_memory=80 << 30, multi_processor_count=132),
    "get_device_capability": lambda *_: (9, 0),
    "Stream": StandinStream, "Event": StandinEvent, "CUDAGraph": StandinGraph, "graph": _graph,
    "current_stream": lambda *_: _CURRENT, "default_stream": lambda *_: _CURRENT,
    "stream": _null_context, "device": _null_context, "_lazy_init": lambda: None,
}


@contextlib.contextmanager
def cuda_standin():
    """Make "cuda" tensors usable on the CPU for the duration of the block (see the module doc)."""
    global _SIM
    _SIM = _Sim()
    patched = [(torch.cuda, k, v) for k, v in CUDA_PATCHES.items()]
    patched += [(torch.cuda.nvtx, "range_push", lambda *_: None), (torch.cuda.nvtx, "range_pop", lambda: None),
                (torch, "Generator", StandinGenerator), (torch, "tensor", _tensor), (torch, "as_tensor", _as_tensor),
                (torch.Tensor, "pin_memory", _pin_memory), (torch.Tensor, "is_pinned", _is_pinned),
                (torch.Tensor, "to", _to), (torch.Tensor, "cuda", _cuda),
                (torch.Tensor, "record_stream", _record_stream), (threading.Thread, "run", _thread_run)]
    _ORIGINAL["tensor"], _ORIGINAL["to"], _ORIGINAL["run"] = torch.tensor, torch.Tensor.to, threading.Thread.run
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patched]
    for obj, name, value in patched:
        setattr(obj, name, value)
    try:
        with _FactoryMode():
            yield _SIM
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def to_host(t):
    """The values of a stand-in tensor (or a structure of them) as CPU tensors."""
    return tree_map(lambda x: x.elem.clone() if _is_standin(x) else x, t)

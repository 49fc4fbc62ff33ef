"""A fake CUDA runtime for the tests: CUDA's stream semantics simulated on the CPU (a test helper, not product code).

No GPU has been lent to this project, so the GPU paths (the extract feed, localize, the multi-device child, training's
RNG save/restore) run here on CPU tensors that *pretend* to live on ``cuda:N``, under rules that make the classic
stream bugs visible instead of hiding them as the synchronous CPU path does:

* **Devices and streams.** ``N`` devices, each with a default stream; ``torch.cuda.Stream`` makes more. The current
  device is 0 until ``set_device`` / ``torch.cuda.device(...)`` / ``torch.cuda.stream(...)`` changes it, as in torch;
  every stream has its own queue of copies that runs **only when something waits on it**.
* **Copies are deferred.** A non-blocking host→device copy from pinned memory reads its source *when its stream runs*
  (refill the buffer too early and the device gets the new values). A non-blocking device→host copy into pinned
  memory writes the host tensor *when its stream runs*: until then the host holds stale values. Copies from or to
  pageable memory, and blocking copies, synchronise the stream first (as ``cudaMemcpy`` does) and are counted.
* **Kernels run in stream order.** An operation on device tensors runs eagerly on the CPU, after the queued copies of
  its device's *current* stream that write one of its inputs; copies queued on another stream are not waited for
  (a missing ``wait_stream`` reads unwritten memory). Operands on two devices, or a device tensor with a CPU tensor of
  more than one element, raise as CUDA does.
* **Events** mark a stream's queue where ``record`` is called (the current stream of the *current device* when no
  stream is named, as in torch); ``synchronize`` runs that stream up to the mark, nothing more.
* **Pinned allocations** (``pin_memory=True``, ``Tensor.pin_memory()``) hold stale values (a sentinel: NaN, or 0xA5 for
  integers) until written.
* **Host syncs are counted** (``FakeCuda.syncs``): reading device values on the host (``.cpu()``, ``.item()``,
  ``float()``, ``.tolist()``, blocking copies) and pageable/blocking uploads, each with its kind.
* **TF32**: on a device with compute capability >= 8.0, convolutions (and matmuls) round their float32 operands to
  TF32's 10-bit mantissa when torch's TF32 switches allow it (``torch.backends.cudnn.conv.fp32_precision`` /
  ``torch.backends.cuda.matmul.fp32_precision``), as cuDNN and cuBLAS do.
* **RNG**: per-device generator states (``get_rng_state_all``/``set_rng_state_all``; a state for a device that does
  not exist raises ``IndexError`` as torch does).
* **Contexts**: every device that anything touched (an allocation, a kernel, an event) is in ``FakeCuda.contexts`` —
  a stray context on ``cuda:0`` shows there.

Use as a context manager (``with FakeCuda(devices=2) as cuda: ...``); it patches ``torch.cuda`` and installs a
``TorchFunctionMode`` for the duration, in the current thread and the threads it starts.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, deque
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

STALE_FLOAT = float("nan")
STALE_INT = 0xA5

_CONV = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_MATMUL = {torch.matmul, torch.mm, torch.bmm, torch.addmm, F.linear, torch.Tensor.matmul, torch.Tensor.__matmul__,
           torch.Tensor.mm, torch.Tensor.bmm}


_BOOKKEEPING = {torch._has_compatible_shallow_copy_type, torch.Tensor.data.__set__, torch.Tensor.grad.__set__,
                torch.Tensor.requires_grad_, torch.Tensor.requires_grad.__set__}


# CUDA tensors may be indexed with CPU index tensors (and assigned CPU values); packed sequences take CPU lengths
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch._pack_padded_sequence,
             torch._pad_packed_sequence, torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu}
# outputs that stay on the host (packed sequences' batch sizes and lengths)
_HOST_OUTPUTS = {torch._pack_padded_sequence: {1}, torch._pad_packed_sequence: {1}}


def _caller() -> str:
    """Where avepipe asked for the sync: its innermost frame (else the test's)."""
    import traceback

    frames = traceback.extract_stack()[:-3]
    for wanted in ("/avepipe/", "/tests/"):
        for frame in reversed(frames):
            if wanted in frame.filename and not frame.filename.endswith("fake_cuda.py"):
                return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (1 sign, 8 exponent, 10 mantissa bits; round to nearest)."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32).reshape(t.shape)


class FakeStream:
    """One stream of a fake device: a queue of operations that run in order when something waits on them."""

    def __init__(self, runtime: FakeCuda, index: int):
        self.runtime, self.device_index = runtime, index
        self.device = torch.device("cuda", index)
        self.ops: deque[tuple[int, Any, Callable[[], None]]] = deque()  # (sequence number, storage written, run)
        self.issued = 0  # operations queued so far
        self.done = 0  # operations run so far

    def enqueue(self, writes: Any, run: Callable[[], None]) -> int:
        self.issued += 1
        self.ops.append((self.issued, writes, run))
        return self.issued

    def run_until(self, mark: int) -> None:
        with self.runtime.lock:
            while self.ops and self.ops[0][0] <= mark:
                _, _, run = self.ops.popleft()
                with torch.inference_mode():  # a copy into an inference tensor, run after its block has ended
                    run()
                self.done += 1
            self.done = max(self.done, min(mark, self.issued))

    def run_writes(self, keys: set[int]) -> None:
        """Run the queue up to its last operation that writes one of ``keys`` (or waits on another stream)."""
        last = 0
        for seq, writes, _ in self.ops:
            if writes == "*" or writes in keys:
                last = seq
        if last:
            self.run_until(last)

    def synchronize(self) -> None:
        self.run_until(self.issued)

    def query(self) -> bool:
        return not self.ops

    def is_capturing(self) -> bool:  # CUDA graphs: never
        return False

    def wait_event(self, event: FakeEvent) -> None:
        if event.stream is not None:
            stream, mark = event.stream, event.mark
            self.enqueue("*", lambda: stream.run_until(mark))

    def wait_stream(self, other: FakeStream) -> None:
        event = FakeEvent()
        event.record(other)
        self.wait_event(event)

    def __enter__(self):  # `with stream:` is not torch API; torch.cuda.stream(s) is
        raise TypeError("use torch.cuda.stream(s)")

    def __repr__(self) -> str:
        return f"<FakeStream cuda:{self.device_index} #{id(self) % 1000}>"


class FakeEvent:
    """``torch.cuda.Event``: a mark in one stream's queue."""

    runtime: FakeCuda | None = None

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.stream: FakeStream | None = None
        self.mark = 0

    def record(self, stream: FakeStream | None = None) -> None:
        runtime = FakeEvent.runtime
        stream = stream or runtime.current_stream()
        runtime.contexts.add(stream.device_index)
        self.stream, self.mark = stream, stream.issued

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.mark)

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.mark

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream or FakeEvent.runtime.current_stream()).wait_event(self)


class _Mode(TorchFunctionMode):
    def __init__(self, runtime: FakeCuda):
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.runtime.dispatch(func, args, kwargs or {})


class FakeCuda:
    """The runtime (see the module's docstring). ``devices``: how many; ``capability``: (major, minor) of each."""

    def __init__(self, devices: int = 1, capability: tuple[int, int] = (9, 0)):
        self.count = devices
        self.capability = capability
        self.lock = threading.RLock()
        self.tags: dict[int, tuple[str, Any]] = {}  # storage key -> ("cuda", index) or ("pinned", None)
        self.keep: list[Any] = []  # storages of tagged tensors: their addresses are never reused while tagged
        self.streams = {i: FakeStream(self, i) for i in range(devices)}
        self.current: dict[int, FakeStream] = dict(self.streams)  # current stream of each device
        self._local = threading.local()
        self.syncs: Counter = Counter()  # kind -> host waits ("d2h", "h2d-pageable", "h2d-blocking", "explicit")
        self.sync_log: list[tuple[str, str]] = []  # (kind, thread name)
        self.sync_places: Counter = Counter()  # (kind, "file:line" of the innermost avepipe frame) -> count
        self.contexts: set[int] = set()
        self.rng = {i: torch.Generator().manual_seed(1000 + i).get_state() for i in range(devices)}
        self._stack = contextlib.ExitStack()

    # -- the current device (per thread, as in CUDA) ------------------------------------------------------------------
    @property
    def device_index(self) -> int:
        return getattr(self._local, "device", 0)

    def set_device(self, device: Any) -> None:
        index = self._index(device)
        self._local.device = index

    def _index(self, device: Any) -> int:
        if isinstance(device, int):
            index = device
        elif isinstance(device, FakeStream):
            index = device.device_index
        else:
            device = torch.device(device)
            if device.type != "cuda":
                raise ValueError(f"expected a cuda device, got {device}")
            index = self.device_index if device.index is None else device.index
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal (cuda:{index} of {self.count})")
        return index

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.current[self.device_index if device is None else self._index(device)]

    def sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        self.sync_log.append((kind, threading.current_thread().name))
        self.sync_places[kind, _caller()] += 1

    # -- tags ----------------------------------------------------------------------------------------------------------
    def tag(self, t: torch.Tensor, kind: str, index: Any = None) -> torch.Tensor:
        storage = t.untyped_storage()
        self.tags[storage._cdata] = (kind, index)
        self.keep.append(storage)
        return t

    def where(self, t: torch.Tensor) -> tuple[str, Any]:
        return self.tags.get(_key(t), ("cpu", None))

    def device_of(self, t: torch.Tensor) -> int | None:
        kind, index = self.where(t)
        return index if kind == "cuda" else None

    def stale(self, t: torch.Tensor) -> torch.Tensor:
        t.fill_(STALE_FLOAT if t.is_floating_point() else STALE_INT)
        return t

    # -- copies --------------------------------------------------------------------------------------------------------
    def _ready(self, t: torch.Tensor) -> None:
        """Run the copies of ``t``'s device's current stream that write ``t`` (a kernel reading it is after them)."""
        index = self.device_of(t)
        if index is not None:
            self.current[index].run_writes({_key(t)})

    def upload(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        """host ``src`` -> device ``dst``, on the current stream of ``dst``'s device."""
        stream = self.current[self.device_of(dst)]
        pinned = self.where(src)[0] == "pinned"
        if non_blocking and pinned:
            stream.enqueue(_key(dst), lambda: dst.copy_(src))  # reads src when the stream runs
            return
        self.sync("h2d-pageable" if not pinned else "h2d-blocking")
        stream.synchronize()
        dst.copy_(src)

    def download(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        """device ``src`` -> host ``dst``."""
        index = self.device_of(src)
        stream = self.current[index]
        self._ready(src)
        if non_blocking and self.where(dst)[0] == "pinned":
            snapshot = src.detach().clone()  # the device value at this point of the stream
            stream.enqueue(_key(dst), lambda: dst.copy_(snapshot))  # the host sees it when the stream runs
            return
        self.sync("d2h")
        stream.synchronize()
        dst.copy_(src)

    def read(self, t: torch.Tensor) -> None:
        """The host reads a device value (``.cpu()``, ``.item()``, ...): a sync of its stream."""
        index = self.device_of(t)
        if index is not None:
            self.sync("d2h")
            self.current[index].synchronize()

    # -- dispatch ------------------------------------------------------------------------------------------------------
    def dispatch(self, func, args, kwargs):
        special = self._special.get(func)
        if special is not None:
            return special(self, *args, **kwargs)
        if func in _BOOKKEEPING:  # no kernel: module bookkeeping that compares or swaps tensors
            return func(*args, **kwargs)
        device = kwargs.get("device")
        pinned = kwargs.pop("pin_memory", False) if "pin_memory" in kwargs else False
        if device is not None and torch.device(device).type == "cuda":
            index = self._index(device)
            self.contexts.add(index)
            out = func(*args, **{**kwargs, "device": "cpu"})
            return tree_map(lambda t: self.tag(t, "cuda", index) if isinstance(t, torch.Tensor) else t, out)
        if pinned:
            self.contexts.add(self.device_index)
            out = func(*args, **kwargs)
            return self.tag(self.stale(out) if func in (torch.empty, torch.empty_like) else out, "pinned")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {self.device_of(t) for t in tensors} - {None}
        if not devices:
            return func(*args, **kwargs)
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:{min(devices)} and cuda:{max(devices)}! ({getattr(func, '__name__', func)})")
        index = devices.pop()
        for t in tensors:
            if self.device_of(t) is None and t.dim() > 0 and func not in _INDEXING:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"cuda:{index} and cpu! ({getattr(func, '__name__', func)})")
        self.contexts.add(index)
        self.current[index].run_writes({_key(t) for t in tensors})
        if self.capability >= (8, 0) and self._tf32(func):
            args, kwargs = tree_map(lambda t: to_tf32(t) if isinstance(t, torch.Tensor) else t, (args, kwargs))
        out = func(*args, **kwargs)
        host = _HOST_OUTPUTS.get(func, ())
        if host:
            return type(out)(t if i in host else self._tag_new(t, index) for i, t in enumerate(out))
        return tree_map(lambda t: self._tag_new(t, index) if isinstance(t, torch.Tensor) else t, out)

    def _on_device(self, index: int, t: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A kernel on device ``index`` that reads ``t``."""
        self.current[index].run_writes({_key(t)})
        return self._tag_new(compute(), index)

    def _tag_new(self, t: torch.Tensor, index: int) -> torch.Tensor:
        if self.device_of(t) is None:
            self.tag(t, "cuda", index)
        return t

    @staticmethod
    def _tf32(func) -> bool:
        if func in _CONV:
            return torch.backends.cudnn.conv.fp32_precision == "tf32"
        if func in _MATMUL:
            return torch.backends.cuda.matmul.fp32_precision == "tf32"
        return False

    # Tensor methods that move data or read it on the host
    def _to(self, t, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        copy = kwargs.get("copy", False)
        here = self.device_of(t)
        if device is None or (device.type == "cuda" and here is not None and self._index(device) == here):
            if here is None:
                return t.to(dtype=dtype, memory_format=memory_format, copy=copy) if (dtype or memory_format or copy) \
                    else t
            return self._on_device(here, t, lambda: t.to(dtype=dtype or t.dtype, copy=copy,
                                                         memory_format=memory_format or torch.preserve_format))
        if device.type == "cuda":
            index = self._index(device)
            self.contexts.add(index)
            if here is not None:  # device to device: ordered after both streams
                self.read(t)
                return self.tag(t.to(dtype=dtype or t.dtype, copy=True), "cuda", index)
            out = self.stale(torch.empty_like(t, dtype=dtype or t.dtype,
                                              memory_format=memory_format or torch.preserve_format))
            self.tag(out, "cuda", index)
            self.upload(out, t if dtype is None else t.to(dtype), non_blocking)
            return out
        if here is None:  # cpu to cpu
            return t.to(dtype=dtype, copy=copy) if dtype or copy else t
        out = torch.empty_like(t, dtype=dtype or t.dtype)
        if non_blocking:  # torch gives pinned memory and does not wait
            self.stale(self.tag(out, "pinned"))
        self.download(out, t if dtype is None else self._on_device(here, t, lambda: t.to(dtype)), non_blocking)
        return out

    def _copy(self, dst, src, non_blocking=False):
        d, s = self.device_of(dst), self.device_of(src)
        if d is None and s is None:
            return dst.copy_(src, non_blocking)
        if d is not None and s is None:
            self.upload(dst, src, non_blocking)
        elif d is None:
            self.download(dst, src, non_blocking)
        else:
            self.read(src)
            dst.copy_(src)
        return dst

    def _cpu(self, t, *args, **kwargs):
        return self._to(t, "cpu")

    def _cuda(self, t, device=None, non_blocking=False, **kwargs):
        return self._to(t, torch.device("cuda", self.device_index if device is None else self._index(device)),
                        non_blocking=non_blocking)

    def _pin(self, t, *args):
        if self.device_of(t) is not None:
            raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned")
        self.contexts.add(self.device_index)
        return self.tag(t.clone(), "pinned")

    def _is_pinned(self, t, *args):
        return self.where(t)[0] == "pinned"

    def _numpy(self, t, *args, **kwargs):
        if self.device_of(t) is not None:
            raise TypeError("can't convert cuda:N device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first.")
        return t.numpy(*args, **kwargs)

    def _host_read(name):  # noqa: N805 - a factory used in the class body
        def read(self, t, *args, **kwargs):
            self.read(t)
            return getattr(torch.Tensor, name)(t, *args, **kwargs)
        return read

    def _device(self, t):
        index = self.device_of(t)
        return torch.device("cuda", index) if index is not None else torch.Tensor.device.__get__(t)

    def _is_cuda(self, t):
        return self.device_of(t) is not None

    def _get_device(self, t):
        index = self.device_of(t)
        return -1 if index is None else index

    _special = {
        torch.Tensor.to: _to, torch.Tensor.copy_: _copy, torch.Tensor.cpu: _cpu, torch.Tensor.cuda: _cuda,
        torch.Tensor.pin_memory: _pin, torch.Tensor.is_pinned: _is_pinned, torch.Tensor.numpy: _numpy,
        torch.Tensor.item: _host_read("item"), torch.Tensor.tolist: _host_read("tolist"),
        torch.Tensor.__float__: _host_read("__float__"), torch.Tensor.__int__: _host_read("__int__"),
        torch.Tensor.__bool__: _host_read("__bool__"), torch.Tensor.__index__: _host_read("__index__"),
        torch.Tensor.__repr__: _host_read("__repr__"), torch.Tensor.__format__: _host_read("__format__"),
        torch.Tensor.device.__get__: _device, torch.Tensor.is_cuda.__get__: _is_cuda,
        torch.Tensor.get_device: _get_device,
    }

    # -- torch.cuda ----------------------------------------------------------------------------------------------------
    def _cuda_api(self) -> dict[str, Any]:
        runtime = self

        class device:  # noqa: N801 - torch.cuda.device
            def __init__(self, d):
                self.index = runtime._index(d) if d is not None and not (isinstance(d, int) and d < 0) else None

            def __enter__(self):
                self.previous = runtime.device_index
                if self.index is not None:
                    runtime.set_device(self.index)

            def __exit__(self, *exc):
                runtime.set_device(self.previous)

        @contextlib.contextmanager
        def stream(s):
            if s is None:
                yield
                return
            previous_device, previous = runtime.device_index, runtime.current[s.device_index]
            runtime.set_device(s.device_index)  # as torch.cuda.set_stream: the stream's device becomes current
            runtime.current[s.device_index] = s
            try:
                yield
            finally:
                runtime.current[s.device_index] = previous
                runtime.set_device(previous_device)

        def synchronize(device=None):
            runtime.sync("explicit")
            index = runtime.device_index if device is None else runtime._index(device)
            for s in {runtime.streams[index], runtime.current[index]}:
                s.synchronize()

        def set_rng_state(state, device="cuda"):
            index = device if isinstance(device, int) else runtime._index(device) if device != "cuda" else \
                runtime.device_index
            if index >= runtime.count:
                raise IndexError("tuple index out of range")
            runtime.rng[index] = state.clone()

        def set_rng_state_all(states):
            for i, state in enumerate(states):
                set_rng_state(state, i)

        def get_rng_state(device="cuda"):
            index = device if isinstance(device, int) else runtime._index(device) if device != "cuda" else \
                runtime.device_index
            return runtime.rng[index].clone()

        def make_stream(device=None, priority=0, **kwargs):
            return FakeStream(runtime, runtime.device_index if device is None else runtime._index(device))

        def capability(device=None):
            return runtime.capability

        def exchange(index):
            previous = runtime.device_index
            if index >= 0:
                runtime.set_device(index)
            return previous

        return {
            "device_of": lambda t: device(runtime.device_of(t)), "_exchange_device": exchange,
            "_maybe_exchange_device": exchange,
            "is_current_stream_capturing": lambda: False, "is_available": lambda: True,
            "device_count": lambda: runtime.count, "is_initialized": lambda: True,
            "current_device": lambda: runtime.device_index, "set_device": runtime.set_device, "device": device,
            "Event": FakeEvent, "Stream": make_stream, "current_stream": runtime.current_stream,
            "default_stream": lambda device=None: runtime.streams[
                runtime.device_index if device is None else runtime._index(device)],
            "stream": stream, "synchronize": synchronize,
            "get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
            "get_rng_state_all": lambda: [runtime.rng[i].clone() for i in range(runtime.count)],
            "set_rng_state_all": set_rng_state_all, "manual_seed_all": lambda seed: None,
            "get_device_capability": capability, "get_device_name": lambda device=None: "Fake CUDA device",
            "is_bf16_supported": lambda *a, **k: runtime.capability >= (8, 0),
        }

    def __enter__(self) -> FakeCuda:
        FakeEvent.runtime = self
        self._stack.enter_context(_patched(torch.cuda, self._cuda_api()))
        self._stack.enter_context(_patched(torch.accelerator, {
            "is_available": lambda: True, "device_count": lambda: self.count,
            "current_device_index": lambda: self.device_index, "current_stream": self.current_stream,
            "current_accelerator": lambda check_available=False: torch.device("cuda")}))
        # no cuDNN here: RNNs take torch's own kernels (flatten_parameters would call into cuDNN)
        self._stack.enter_context(_patched(torch.backends.cudnn, {"is_acceptable": lambda t: False}))
        self._stack.enter_context(_Mode(self))
        self._stack.enter_context(_mode_in_threads(self))
        self._stack.callback(self._drain)
        return self

    def _drain(self) -> None:
        for stream in list(self.streams.values()):
            stream.synchronize()

    def __exit__(self, *exc) -> None:
        self._stack.close()
        FakeEvent.runtime = None
        self.keep.clear()
        self.tags.clear()

    # what an operation shows about the runtime, for tests
    def pending(self) -> int:
        return sum(len(s.ops) for s in self.streams.values())


@contextlib.contextmanager
def _patched(module, names: dict[str, Any]):
    saved = {name: getattr(module, name) for name in names if hasattr(module, name)}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(module, name, saved[name])
            else:
                delattr(module, name)


@contextlib.contextmanager
def _mode_in_threads(runtime: FakeCuda):
    """Threads started while the fake is installed run under it too (torch function modes are per thread)."""
    original = threading.Thread.run

    def run(self, *args, **kwargs):
        if FakeEvent.runtime is runtime:
            with _Mode(runtime):
                return original(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    threading.Thread.run = run
    try:
        yield
    finally:
        threading.Thread.run = original

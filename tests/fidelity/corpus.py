"""The corpus: named targets a user may hand to a writer, each built fresh by a function.

Every builder is deterministic (seeded, and module initialisation runs under a forked
RNG) so two builds of one entry are bit-identical, except ``rng_states``, which records
the live generators; the differential tests therefore save *one* build with both
``torch.save`` and the writer. Classes are module-level so they pickle (and unpickle in
a spawned child).

An :class:`Entry` with ``torch_save_fails=True`` is one plain :func:`torch.save` refuses;
the writer must then refuse it too, with a clear error.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

#: pytest ``filterwarnings`` entries for the warnings torch itself gives while building or
#: loading this corpus (deprecations and beta notices); each matches one precise message.
TORCH_WARNING_FILTERS = (
    "ignore:torch.ao.quantization is deprecated:DeprecationWarning",
    "ignore:torch.quantize_per_tensor, torch.quantize_per_channel and other quantized:UserWarning",
    "ignore:TypedStorage is deprecated:UserWarning",
    "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning",
    "ignore:Sparse CSR tensor support is in beta state:UserWarning",
    "ignore:Sparse invariant checks are implicitly disabled:UserWarning",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One corpus target.

    Attributes:
        name: the entry's name (also the file name stem).
        build: returns a fresh target.
        torch_save_fails: plain ``torch.save`` raises on it.
        special: holds tensors torch treats specially (subclasses, attributes, conj/neg
            bits, sparse, quantized, nested, raw storages).
    """

    name: str
    build: Callable[[], Any]
    torch_save_fails: bool = False
    special: bool = False


CORPUS: dict[str, Entry] = {}


def _entry(
    name: str, *, torch_save_fails: bool = False, special: bool = False
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(build: Callable[[], Any]) -> Callable[[], Any]:
        assert name not in CORPUS, name
        CORPUS[name] = Entry(name, build, torch_save_fails, special)
        return build

    return register


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic module initialisation without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- module-level classes (picklable) ---------------------------------------------------


class TinyNet(nn.Module):
    """Conv + BatchNorm + Linear: parameters, buffers (running stats, num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's (weight tying)."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight


class QuantNet(nn.Module):
    """A tiny eager-mode statically quantizable model (conv, relu, linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(2, 3, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(12, 4)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.flatten(1)))


class MyParameter(nn.Parameter):
    """A Parameter subclass (what e.g. sharded or quantized parameter wrappers are)."""


class MyTensor(torch.Tensor):
    """A plain Tensor subclass."""


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class TrainState:
    step: int
    lr: float
    weights: torch.Tensor
    history: list[float]


class PlainObject:
    """A plain object with a tensor and a container attribute."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.tags = {"kind": "plain", "ids": [1, 2, 3]}


def quantized_engine() -> str:
    """The quantized engine this build supports (qnnpack runs on any CPU)."""
    engines = torch.backends.quantized.supported_engines
    return "qnnpack" if "qnnpack" in engines else "fbgemm"


@contextlib.contextmanager
def quantized_engine_set() -> Iterator[str]:
    """Set the quantized engine for the block, restoring the previous one after."""
    engine = quantized_engine()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = previous


def build_quantized_model(seed: int = 0) -> nn.Module:
    """Prepare, calibrate and convert :class:`QuantNet` (call under quantized_engine_set)."""
    tq = torch.ao.quantization
    with _seeded(seed):
        model = QuantNet().eval()
        model.qconfig = tq.get_default_qconfig(torch.backends.quantized.engine)
        prepared = tq.prepare(model)
        prepared(torch.randn(8, 2, 4, 4))
        return tq.convert(prepared)


# -- modules and optimizers ---------------------------------------------------------------


def _stepped(optim_cls: type[torch.optim.Optimizer], **kw: Any) -> tuple[nn.Module, Any]:
    with _seeded(1):
        model = TinyNet()
        optim = optim_cls(model.parameters(), **kw)
        loss = model(torch.randn(2, 3, 6, 6)).square().sum()
        loss.backward()
        optim.step()
    return model, optim


@_entry("module_state_dict")
def _module_state_dict() -> Any:
    model, _ = _stepped(torch.optim.SGD, lr=0.1)
    return model.state_dict()  # an OrderedDict carrying _metadata


@_entry("adam_state_dict")
def _adam_state_dict() -> Any:
    return _stepped(torch.optim.Adam, lr=1e-3)[1].state_dict()


@_entry("sgd_momentum_state_dict")
def _sgd_state_dict() -> Any:
    return _stepped(torch.optim.SGD, lr=0.1, momentum=0.9)[1].state_dict()


@_entry("checkpoint")
def _checkpoint() -> Any:
    model, optim = _stepped(torch.optim.Adam, lr=1e-3)
    return {"model": model.state_dict(), "optimizer": optim.state_dict(), "epoch": 3}


@_entry("module_state_dict_keep_vars")
def _keep_vars() -> Any:
    model, _ = _stepped(torch.optim.SGD, lr=0.1)
    return model.state_dict(keep_vars=True)  # the Parameters themselves


# -- dtypes -------------------------------------------------------------------------------

_FLOATS = ["float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
_OTHERS = ["complex64", "complex128", "bool", "int8", "int16", "int32", "int64", "uint8"]


def _dtype_target(dtype: torch.dtype) -> Any:
    g = _gen(2)
    if dtype.is_complex:
        t = torch.randn(5, 3, dtype=dtype, generator=g)
    elif dtype == torch.bool:
        t = torch.rand(5, 3, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(5, 3, generator=g) * 4).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), (5, 3), generator=g)
        t = t.to(dtype)
    return {"t": t, "scalar": t[0, 0].clone(), "row": t[1]}


def _dtype_builder(dtype: torch.dtype) -> Callable[[], Any]:
    return lambda: _dtype_target(dtype)


for _name in _FLOATS + _OTHERS:
    if hasattr(torch, _name):  # float8 only where this build has it
        _entry(f"dtype_{_name}")(_dtype_builder(getattr(torch, _name)))


@_entry("special_floats")
def _special_floats() -> Any:
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
    nan_payload = torch.tensor([0x7FC00001, 0x7FA00000], dtype=torch.int32).view(torch.float32)
    return {"x": x, "nan_payload": nan_payload, "half": x.half(), "bf16": x.bfloat16()}


# -- shapes and views ----------------------------------------------------------------------


@_entry("zero_dim")
def _zero_dim() -> Any:
    return {"f": torch.tensor(3.5), "i": torch.tensor(7), "b": torch.tensor(True)}


@_entry("empty")
def _empty() -> Any:
    return {"a": torch.empty(0), "b": torch.zeros(3, 0, 2), "c": torch.empty(0, dtype=torch.int64)}


@_entry("transposed")
def _transposed() -> Any:
    return {"t": torch.randn(4, 6, generator=_gen(3)).t()}


@_entry("sliced_with_step")
def _sliced() -> Any:
    base = torch.randn(10, 8, generator=_gen(4))
    return {"s": base[1::3, ::2]}  # keeps base's whole storage, as torch.save does


@_entry("slice_of_big_storage")
def _slice_of_big() -> Any:
    return {"s": torch.arange(1000.0)[100:104]}


@_entry("channels_last")
def _channels_last() -> Any:
    return {"x": torch.randn(2, 3, 4, 5, generator=_gen(5)).to(memory_format=torch.channels_last)}


@_entry("expanded")
def _expanded() -> Any:
    return {"e": torch.randn(10, generator=_gen(6)).expand(20, 10)}


@_entry("view_and_base")
def _view_and_base() -> Any:
    base = torch.randn(6, 4, generator=_gen(7))
    return {"base": base, "view": base[2:].view(2, 8), "row": base[1]}


@_entry("two_offsets_one_storage")
def _two_offsets() -> Any:
    flat = torch.arange(20.0)
    return [flat[0:5], flat[10:20].view(2, 5)]


@_entry("dtype_views_one_storage", torch_save_fails=True)
def _dtype_views() -> Any:
    # torch.save refuses views of one storage with different dtypes.
    x = torch.randn(8, generator=_gen(8))
    return {"f32": x, "i32": x.view(torch.int32)}


@_entry("conj_bit", special=True)
def _conj_bit() -> Any:
    return {"conj": torch.randn(4, dtype=torch.complex64, generator=_gen(9)).conj()}


@_entry("neg_bit", special=True)
def _neg_bit() -> Any:
    # a float32 view over a complex storage with the negative bit set
    return {"neg_imag": torch.randn(4, dtype=torch.complex64, generator=_gen(9)).conj().imag}


# -- identity and sharing -----------------------------------------------------------------


@_entry("tied_parameter_twice")
def _tied_parameter() -> Any:
    with _seeded(10):
        p = nn.Parameter(torch.randn(3, 3))
    return {"encoder.weight": p, "decoder.weight": p, "params": [p, p]}


@_entry("tied_embedding_state_dict")
def _tied_embedding() -> Any:
    with _seeded(11):
        return TiedLM().state_dict()


@_entry("big_state_dict_runs")
def _big_state_dict() -> Any:
    """A module's state_dict of more than 256 entries (OrderedDict with ``_metadata``),
    staged in runs of whole-list operations: runs of plain tensors (float, int64,
    bfloat16 buffers), and runs holding what sends a run item by item (a tied weight, a
    view of another entry's storage, a transposed view)."""
    with _seeded(15):
        layers: list[nn.Module] = []
        for i in range(300):
            layers.append(nn.Linear(3, 2))
            if i % 40 == 0:
                layers.append(nn.BatchNorm1d(2))
        model = nn.Sequential(*layers)
        model.register_buffer("codes", torch.arange(6, dtype=torch.int64))
        model.register_buffer("brain", torch.ones(3, dtype=torch.bfloat16))
        model[50].weight = model[10].weight  # tied: one storage, two entries
    state = model.state_dict()
    state["view_of_codes"] = state["codes"][2:]
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()
    return {"model": state, "epoch": 3}


@_entry("same_tensor_twice")
def _same_tensor() -> Any:
    t = torch.randn(5, generator=_gen(12))
    return {"a": t, "b": t, "c": (t, t)}


# -- Parameters, grad and subclasses -------------------------------------------------------


@_entry("parameters_grad")
def _parameters_grad() -> Any:
    g = _gen(13)
    return {
        "trainable": nn.Parameter(torch.randn(3, generator=g)),
        "frozen": nn.Parameter(torch.randn(3, generator=g), requires_grad=False),
        "int_frozen": nn.Parameter(torch.arange(3), requires_grad=False),
    }


@_entry("plain_requires_grad")
def _plain_requires_grad() -> Any:
    return {"t": torch.randn(4, generator=_gen(14)).requires_grad_()}


@_entry("non_leaf_requires_grad")
def _non_leaf() -> Any:
    leaf = torch.randn(4, generator=_gen(15)).requires_grad_()
    return {"y": leaf * 2}


@_entry("parameter_subclass", special=True)
def _parameter_subclass() -> Any:
    g = _gen(16)
    return {
        "p": MyParameter(torch.randn(3, generator=g)),
        "frozen": MyParameter(torch.randn(2, generator=g), requires_grad=False),
    }


@_entry("tensor_subclass", special=True)
def _tensor_subclass() -> Any:
    return {"t": torch.randn(3, generator=_gen(17)).as_subclass(MyTensor)}


@_entry("tensor_attributes", special=True)
def _tensor_attributes() -> Any:
    t = torch.randn(3, generator=_gen(18))
    t.foo = "bar"
    t.meta = {"scale": 2.0, "shape": torch.Size([3])}
    p = nn.Parameter(torch.randn(2, generator=_gen(19)))
    p.tag = 5
    sub = torch.randn(2, generator=_gen(20)).as_subclass(MyTensor)
    sub.note = [1, 2]
    return {"t": t, "p": p, "sub": sub}


# -- special layouts -----------------------------------------------------------------------


@_entry("sparse_coo", special=True)
def _sparse_coo() -> Any:
    dense = torch.randn(4, 5, generator=_gen(21)) * (torch.rand(4, 5, generator=_gen(22)) > 0.6)
    idx = torch.tensor([[0, 1, 1], [2, 0, 0]])
    uncoalesced = torch.sparse_coo_tensor(idx, torch.tensor([1.0, 2.0, 3.0]), (3, 3))
    return {"coalesced": dense.to_sparse(), "uncoalesced": uncoalesced}


@_entry("sparse_csr", special=True)
def _sparse_csr() -> Any:
    dense = torch.randn(4, 5, generator=_gen(23)) * (torch.rand(4, 5, generator=_gen(24)) > 0.6)
    return {"csr": dense.to_sparse_csr()}


@_entry("quantized_per_tensor", special=True)
def _quantized_per_tensor() -> Any:
    x = torch.randn(4, 3, generator=_gen(25))
    return {
        "qint8": torch.quantize_per_tensor(x, 0.05, 3, torch.qint8),
        "quint8": torch.quantize_per_tensor(x, 0.1, 128, torch.quint8),
        "qint32": torch.quantize_per_tensor(x, 0.001, 0, torch.qint32),
    }


@_entry("quantized_per_channel", special=True)
def _quantized_per_channel() -> Any:
    x = torch.randn(3, 4, generator=_gen(26))
    scales = torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64)
    zero_points = torch.tensor([0, 2, -1])
    return {"q": torch.quantize_per_channel(x, scales, zero_points, 0, torch.qint8)}


@_entry("quantized_module_state_dict", special=True)
def _quantized_module() -> Any:
    with quantized_engine_set():
        return build_quantized_model().state_dict()


@_entry("nested_jagged", special=True)
def _nested_jagged() -> Any:
    g = _gen(27)
    parts = [torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)]
    return {"nt": torch.nested.nested_tensor(parts, layout=torch.jagged)}


@_entry("nested_strided", special=True)
def _nested_strided() -> Any:
    g = _gen(28)
    parts = [torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g)]
    return {"nt": torch.nested.nested_tensor(parts, layout=torch.strided)}


@_entry("raw_storage", special=True)
def _raw_storage() -> Any:
    # torch.load gives an untyped storage back as a (uint8) TypedStorage
    return {"storage": torch.arange(6, dtype=torch.int16).untyped_storage()}


# -- numpy and torch metadata --------------------------------------------------------------


@_entry("numpy_arrays")
def _numpy_arrays() -> Any:
    rng = np.random.default_rng(29)
    a = rng.standard_normal((4, 5))
    return {
        "f64": a,
        "f32_transposed": a.astype(np.float32).T,
        "i16": np.arange(7, dtype=np.int16),
        "zero_dim": np.array(3.5),
        "scalar": np.float32(1.25),
        "int_scalar": np.int64(9),
        "bools": a > 0,
    }


@_entry("torch_metadata")
def _torch_metadata() -> Any:
    return {
        "size": torch.Size([2, 3]),
        "dtypes": [torch.float32, torch.bfloat16, torch.int64],
        "device": torch.device("cpu"),
        "cuda_device": torch.device("cuda", 0),
        "layout": torch.sparse_coo,
    }


@_entry("memory_format_object", torch_save_fails=True)
def _memory_format() -> Any:
    # plain pickle takes torch.channels_last; torch.save raises "cannot pickle 'module'"
    return {"memory_format": torch.channels_last}


# -- Python objects ------------------------------------------------------------------------


@_entry("enum_and_sets")
def _enum_and_sets() -> Any:
    return {
        "color": Color.GREEN,
        "set": {1, 2, 3},
        "frozen": frozenset({"a", "b"}),
        "e": [Color.RED],
    }


@_entry("namedtuple")
def _namedtuple() -> Any:
    return {"pt": Point(torch.randn(2, generator=_gen(30)), 7), "pts": [Point(1, 2)]}


@_entry("ordered_dict_metadata")
def _ordered_dict() -> Any:
    od: collections.OrderedDict[str, Any] = collections.OrderedDict()
    od["w"] = torch.randn(2, generator=_gen(31))
    od["b"] = torch.zeros(2)
    od._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return od


@_entry("defaultdict")
def _defaultdict() -> Any:
    dd: collections.defaultdict[str, list[Any]] = collections.defaultdict(list)
    dd["a"].append(torch.ones(2))
    dd["b"].append(3)
    return dd


@_entry("dataclass_object")
def _dataclass() -> Any:
    return TrainState(step=10, lr=0.01, weights=torch.randn(3, generator=_gen(32)), history=[1.0])


@_entry("plain_object")
def _plain_object() -> Any:
    return {"obj": PlainObject(torch.randn(2, generator=_gen(33)))}


@_entry("container_twice")
def _container_twice() -> Any:
    d = {"x": torch.randn(2, generator=_gen(34)), "n": 1}
    lst = [1, 2]
    return {"a": d, "b": d, "l1": lst, "l2": lst, "t": (d, lst)}


@_entry("self_referencing_list")
def _self_list() -> Any:
    lst: list[Any] = [torch.randn(2, generator=_gen(35)), 1]
    lst.append(lst)
    return lst


@_entry("self_referencing_dict")
def _self_dict() -> Any:
    d: dict[str, Any] = {"t": torch.ones(3)}
    d["self"] = d
    d["nested"] = {"parent": d}
    return d


@_entry("rng_states")
def _rng_states() -> Any:
    return {
        "torch": torch.get_rng_state(),
        "generator": _gen(36).get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "numpy_generator": np.random.default_rng(37).bit_generator.state,
        "numpy_random_state": np.random.RandomState(38),
    }


@_entry("mixed_state")
def _mixed_state() -> Any:
    g = _gen(39)
    return {
        "model": {f"layer{i}.weight": torch.randn(100 // (i + 1), generator=g) for i in range(6)},
        "iteration": 12,
        "note": "hello",
        "half": torch.randn(8, generator=g).half(),
        "ints": torch.arange(17),
    }


@_entry("tensor_dict_keys")
def _tensor_keys() -> Any:
    k = torch.tensor([1, 2])
    return {k: "value", "k": k}


# -- what torch.save refuses ----------------------------------------------------------------


@_entry("unpicklable_lambda", torch_save_fails=True)
def _lambda() -> Any:
    return {"w": torch.ones(2), "fn": lambda x: x}


@_entry("unpicklable_local_class", torch_save_fails=True)
def _local_class() -> Any:
    class Local:
        pass

    return {"w": torch.ones(2), "obj": Local()}

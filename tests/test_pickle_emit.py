"""The direct data.pkl emitter against the pickler tier and torch.save, byte for byte."""

from __future__ import annotations

import collections
import copyreg
import gc
import io
import math
import pickletools
import random
import zipfile
from typing import Any

import pytest
import torch

from snapwriter import _fastsave, _pickle_emit
from snapwriter._fastsave import _Pickler, fast_torch_save, pickle_state
from snapwriter._pickle_emit import emit
from snapwriter._pool import device_tags
from tests.fidelity.corpus import CORPUS, TORCH_WARNING_FILTERS, MyTensor

pytestmark = [pytest.mark.filterwarnings(f) for f in TORCH_WARNING_FILTERS]


def _pickled(obj: Any) -> tuple[bytes, list[tuple[str, torch.UntypedStorage]]]:
    """data.pkl and records as the pickler tier writes them."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), list(pickler.storages.items())


def _torch_save_pkl(obj: Any) -> bytes:
    """The data.pkl record of torch.save's file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _dis(data: bytes) -> str:
    out = io.StringIO()
    pickletools.dis(data, out)
    return out.getvalue()


def assert_emitted_like_pickler(obj: Any) -> bytes:
    """``emit`` accepts ``obj`` and writes the pickler tier's bytes and records."""
    emitted = emit(obj)
    assert emitted is not None, "the emitter gave up"
    data, storages = _pickled(obj)
    if emitted[0] != data:  # a readable difference
        assert _dis(emitted[0]) == _dis(data)
        assert emitted[0] == data
    assert [k for k, _ in emitted[1]] == [k for k, _ in storages]
    assert [s._cdata for _, s in emitted[1]] == [s._cdata for _, s in storages]
    return emitted[0]


# -- the fidelity corpus ------------------------------------------------------------------

ACCEPTED = {
    "module_state_dict",
    "adam_state_dict",
    "sgd_momentum_state_dict",
    "checkpoint",
    "module_state_dict_keep_vars",
    "dtype_float32",
    "dtype_bfloat16",
    "dtype_complex128",
    "dtype_bool",
    "dtype_uint8",
    "special_floats",
    "zero_dim",
    "empty",
    "transposed",
    "sliced_with_step",
    "channels_last",
    "expanded",
    "view_and_base",
    "two_offsets_one_storage",
    "conj_bit",
    "neg_bit",
    "tied_parameter_twice",
    "tied_embedding_state_dict",
    "same_tensor_twice",
    "parameters_grad",
    "plain_requires_grad",
    "non_leaf_requires_grad",
    "ordered_dict_metadata",
    "container_twice",
    "self_referencing_list",
    "self_referencing_dict",
    "mixed_state",
}


@pytest.mark.parametrize("name", [n for n, e in CORPUS.items() if not e.torch_save_fails])
def test_corpus_entry_emitted_like_pickler_or_refused(name: str) -> None:
    obj = CORPUS[name].build()
    if emit(obj) is None:
        assert name not in ACCEPTED, f"the emitter gave up on {name}"
        return
    data = assert_emitted_like_pickler(obj)
    assert data == _torch_save_pkl(obj)


def test_corpus_accepted_entries_exist() -> None:
    assert set(CORPUS) >= ACCEPTED


# -- state dicts ----------------------------------------------------------------------------


def test_module_and_optimizer_state_dicts() -> None:
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "optimizer": optim.state_dict(), "epoch": 7}
    assert hasattr(state["model"], "_metadata")
    assert assert_emitted_like_pickler(state) == _torch_save_pkl(state)
    assert_emitted_like_pickler(model.state_dict(keep_vars=True))


def test_many_tensors_workload() -> None:
    """The shape of a big checkpoint: long LONG_BINPUT runs, batches of 1000 items."""
    model = collections.OrderedDict((f"layer{i}.weight", torch.randn(4)) for i in range(2500))
    state = {"model": model, "iteration": 0}
    assert assert_emitted_like_pickler(state) == _torch_save_pkl(state)


# -- sharing and memo -----------------------------------------------------------------------


def test_shared_objects_are_memo_references() -> None:
    s = "shared string"
    lst = [1, 2]
    t = torch.arange(6.0)
    obj = {"a": s, "b": s, "l1": lst, "l2": lst, "t1": t, "t2": t, s: (lst, t, s), "v": t[2:]}
    assert_emitted_like_pickler(obj)


def test_shared_objects_beyond_256_memo_entries() -> None:
    s = "late"
    t = torch.ones(2)
    filler = [f"item{i}" for i in range(300)]
    obj = [filler, s, t, [s, t, filler], {"again": (s, t)}]
    assert_emitted_like_pickler(obj)
    tensors = [torch.full((2,), float(i)) for i in range(200)]
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(50)]
    assert_emitted_like_pickler([tensors, params, tensors[::-1], params[::-1], {"x": tensors[99]}])


def test_persistent_id_objects_shared_with_the_graph() -> None:
    """ "storage" and "cpu" are the very objects both tiers put in persistent ids."""
    obj = {"storage": "cpu", "cpu": ["storage", torch.zeros(1)], "t": torch.ones(1)}
    assert_emitted_like_pickler(obj)
    assert_emitted_like_pickler(["storage", "cpu", torch.zeros(1), "0", "1", torch.ones(2)])


def test_many_tensors_over_one_storage() -> None:
    base = torch.arange(100.0)
    views = [base[i : i + 3] for i in range(60)] + [base.view(10, 10)[:, 1], base]
    obj = {"views": views, "more": {f"v{i}": base[i:] for i in range(300)}}
    assert_emitted_like_pickler(obj)


def test_same_memory_two_storages_two_dtypes_falls_back() -> None:
    x = torch.zeros(4)
    obj = {"f": x, "i": x.view(torch.int32)}
    assert emit(obj) is None
    obj2 = {"f": x, "i": torch.from_numpy(x.numpy().view("int32"))}
    assert emit(obj2) is None


# -- containers ---------------------------------------------------------------------------

SIZES = [0, 1, 2, 3, 4, 5, 255, 256, 257, 999, 1000, 1001, 1002, 2000, 2001]


@pytest.mark.parametrize("size", SIZES)
def test_container_sizes(size: int) -> None:
    obj = {
        "list": list(range(size)),
        "tuple": tuple(range(size)),
        "dict": {i: str(i) for i in range(size)},
        "odict": collections.OrderedDict((str(i), torch.ones(1)) for i in range(size)),
        "tensors": [torch.full((1,), float(i)) for i in range(min(size, 300))],
    }
    assert_emitted_like_pickler(obj)


def test_nested_lists_and_tuples() -> None:
    obj: list[Any] = []
    for depth in range(6):
        obj.append(tuple(range(depth)))
        obj.append(list(range(depth)))
        obj.append(tuple([i] for i in range(depth)))
        obj.append([tuple(range(i)) for i in range(depth)])
    obj.append(([1, 2], ("x",), []))
    obj.append((((),),))
    assert_emitted_like_pickler(obj)


def test_tuples_that_hold_themselves() -> None:
    for size in range(1, 6):
        inner: list[Any] = []
        t = (inner, *range(size - 1))
        inner.append(t)
        assert_emitted_like_pickler({"t": t, "again": t, "inner": inner})


def test_ordered_dict_state_and_empty() -> None:
    od: collections.OrderedDict[Any, Any] = collections.OrderedDict(a=1)
    od.note = {"x": od}  # type: ignore[attr-defined]
    empty: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    empty.flag = True  # type: ignore[attr-defined]
    assert_emitted_like_pickler([od, empty, collections.OrderedDict(), od])


def test_dict_keys_of_every_supported_type() -> None:
    obj = {1: "a", -5: "b", 2.5: "c", None: "d", False: "e", (1, "x"): "f", "s": "g", 2**70: "h"}
    assert_emitted_like_pickler(obj)


# -- scalars --------------------------------------------------------------------------------

INTS = [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32, -1, -128, -129, -256, -(2**31)]
INTS += [-(2**31) - 1, 2**63, 2**64, -(2**64), 10**100, -(10**300), 2**2100, -(2**2100) + 1]
INTS += [-(2**2040), 2**2039, -(2**2039)]


def test_ints_at_every_opcode_boundary() -> None:
    values = INTS + [v + d for v in INTS for d in (-1, 1)]
    assert_emitted_like_pickler(values)
    assert_emitted_like_pickler({"ints": tuple(values), "keys": dict.fromkeys(values, 0)})


def test_floats_bools_none() -> None:
    values = [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]
    assert_emitted_like_pickler([*values, True, False, None, [True, None, False]])


def test_strings() -> None:
    values = ["", "a", "ascii", "ünïcødé", "日本語", "🙂 emoji", "x" * 300, "\x00\n", "\ud800 lone"]
    assert_emitted_like_pickler(values + [{v: v} for v in values])


# -- tensors --------------------------------------------------------------------------------


def test_parameters() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    ints = torch.nn.Parameter(torch.arange(3), requires_grad=False)
    assert_emitted_like_pickler({"p": p, "frozen": frozen, "ints": ints, "again": [p, frozen]})
    assert_emitted_like_pickler([torch.nn.Parameter(torch.ones(1)) for _ in range(300)])


def test_conj_and_neg_tensors() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    obj = {"conj": z.conj(), "plain": z, "later": [z.conj()] * 2}
    obj["many"] = [torch.randn(2, dtype=torch.complex128).conj() for _ in range(300)]
    assert_emitted_like_pickler(obj)
    # a float view of a complex storage with the negative bit (alone: one dtype a storage)
    negs = [torch.randn(3, dtype=torch.complex64).conj().imag for _ in range(300)]
    assert_emitted_like_pickler({"neg": negs, "again": negs[-1]})


def test_tensor_geometry_and_dtypes() -> None:
    base = torch.randn(4, 6)
    dtypes = [torch.float16, torch.float64, torch.bfloat16, torch.int8, torch.int16, torch.int64]
    obj: list[Any] = [base.t(), base[1::2, ::3], torch.tensor(2.0), torch.empty(0), base[3, 5]]
    obj += [torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    obj += [torch.ones(3).expand(4, 3)]
    obj += [torch.zeros(3, dtype=d) for d in dtypes] + [torch.ones(2, requires_grad=True)]
    obj += [torch.arange(70000.0)[66000:], torch.arange(10.0)[3:] * 1]
    obj = obj * 2 + [t.clone() for t in obj] * 20  # past 256 memo entries
    assert_emitted_like_pickler(obj)


def test_staged_device_location() -> None:
    tagged = torch.ones(3)
    other = torch.zeros(2)
    with device_tags([(tagged.untyped_storage(), "cuda:0"), (other.untyped_storage(), "cuda:1")]):
        obj = [torch.ones(1) for _ in range(300)] + [tagged, other, tagged[1:], "cuda:0"]
        assert_emitted_like_pickler(obj)


# -- a random graph generator ---------------------------------------------------------------


def _random_graph(rng: random.Random, depth: int = 0) -> Any:
    pool: list[Any] = []

    def leaf() -> Any:
        kind = rng.randrange(9)
        if kind == 0:
            return rng.choice(INTS)
        if kind == 1:
            return rng.choice([0.5, -0.0, math.inf, 1e300, math.nan])
        if kind == 2:
            return rng.choice([True, False, None])
        if kind == 3:
            return rng.choice(["", "k", "ключ", "s" * rng.randrange(300)])
        if kind == 4:
            generator = torch.Generator().manual_seed(rng.randrange(99))
            t = torch.randn(rng.randrange(4), generator=generator)
            return t if rng.random() < 0.7 else t.to(rng.choice([torch.int32, torch.float16]))
        if kind == 5:
            return torch.nn.Parameter(torch.ones(2), requires_grad=rng.random() < 0.5)
        if kind == 6:
            return torch.randn(3, dtype=torch.complex64).conj()
        if kind == 7 and pool:
            return rng.choice(pool)  # a shared object
        return rng.randrange(-300, 300)

    def node(level: int) -> Any:
        if level > 3 or rng.random() < 0.3:
            value = leaf()
        else:
            big = rng.randrange(1200) if level == 3 else 6  # batches, past 256 memo entries
            size = rng.choice([0, 1, 2, 3, 4, 5, 7, big])
            kind = rng.randrange(4)
            if kind == 0:
                value = [node(level + 1) for _ in range(size)]
            elif kind == 1:
                value = tuple(node(level + 1) for _ in range(size))
            elif kind == 2:
                value = {_key(): node(level + 1) for _ in range(size)}
            else:
                od = collections.OrderedDict((_key(), node(level + 1)) for _ in range(size))
                if rng.random() < 0.3:
                    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
                value = od
        if rng.random() < 0.2:
            pool.append(value)
        return value

    def _key() -> Any:
        return rng.choice([f"k{rng.randrange(10**6)}", rng.randrange(10**6), (1, "x"), 2.5])

    return node(depth)


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        assert_emitted_like_pickler(_random_graph(rng))


def test_random_graphs_against_torch_save() -> None:
    rng = random.Random(1234)
    for _ in range(20):
        graph = _random_graph(rng)
        assert assert_emitted_like_pickler(graph) == _torch_save_pkl(graph)


# -- what the emitter refuses ----------------------------------------------------------------


class _Int(int):
    pass


class _Custom:
    def __init__(self) -> None:
        self.t = torch.ones(2)


def _unsupported() -> dict[str, Any]:
    sub = torch.randn(2).as_subclass(MyTensor)
    attr = torch.ones(2)
    attr.note = "x"  # type: ignore[attr-defined]
    param = torch.nn.Parameter(torch.ones(2))
    param.tag = 1  # type: ignore[attr-defined]
    return {
        "set": {"a": torch.ones(2), "s": {1, 2}},
        "frozenset": [frozenset({3})],
        "custom": {"obj": _Custom()},
        "subclass": {"t": sub},
        "int_keys_subclass": {1: {2: [torch.ones(1), sub]}},
        "tensor_attr": [attr],
        "parameter_attr": [param],
        "bytes": {"b": b"raw"},
        "storage": {"s": torch.ones(2).untyped_storage()},
        "sparse": {"s": torch.eye(3).to_sparse()},
        "dict_subclass": [True, collections.Counter(a=1)],
        "int_subclass": [1, _Int(2)],
        "dtype": [torch.float32],
        "size": [torch.Size([2])],
        "defaultdict": collections.defaultdict(list, a=[torch.ones(1)]),
        "late": [torch.ones(1)] * 3 + [torch.ones(1) for _ in range(300)] + [{1j}],
    }


@pytest.mark.parametrize("name", list(_unsupported()))
def test_unsupported_graphs_fall_back_to_the_same_bytes(name: str) -> None:
    obj = _unsupported()[name]
    assert emit(obj) is None
    pickled = pickle_state(obj)
    buffer = io.BytesIO()
    fast_torch_save(obj, buffer)
    reference = io.BytesIO()
    torch.save(obj, reference)
    assert buffer.getvalue() == reference.getvalue()
    if pickled is not None:
        assert pickled.data == _torch_save_pkl(obj)


def test_copyreg_extension_registry_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(copyreg._extension_registry, ("collections", "OrderedDict"), 240)  # type: ignore[attr-defined]
    assert emit({"a": 1}) is None


def test_deep_nesting_gives_up_not_raises() -> None:
    deep: list[Any] = []
    for _ in range(100000):
        deep = [deep]
    assert emit(deep) is None


# -- the public entry points ------------------------------------------------------------------


def test_pickle_state_uses_the_emitter_without_a_pickler(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pickler(*args: Any) -> Any:
        raise AssertionError("the pickler tier ran")

    obj = {"model": torch.nn.Linear(2, 2).state_dict(), "step": 3}
    expected = _pickled(obj)[0]
    monkeypatch.setattr(_fastsave, "_Pickler", no_pickler)
    pickled = pickle_state(obj)
    assert pickled is not None and pickled.data == expected


def test_fast_torch_save_files_equal_torch_save_files() -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2)
    graphs = [
        {"model": model.state_dict(), "params": list(model.parameters()), "i": 2**40},
        [torch.randn(2).conj(), torch.arange(5)[1:], "ü", (1, [2]), {None: -0.0}],
        _random_graph(random.Random(7)),
        collections.OrderedDict((f"w{i}", torch.randn(2)) for i in range(1500)),
    ]
    for graph in graphs:
        assert emit(graph) is not None
        ours = io.BytesIO()
        fast_torch_save(graph, ours)
        theirs = io.BytesIO()
        torch.save(graph, theirs)
        assert ours.getvalue() == theirs.getvalue()


def test_gil_hand_over_and_collector_state(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = [torch.ones(1) for _ in range(100)]
    expected = _pickled(obj)[0]
    slept: list[float] = []
    monkeypatch.setattr(_pickle_emit, "YIELD_SECONDS", 0.0)
    monkeypatch.setattr(_pickle_emit.time, "sleep", slept.append)
    emitted = emit(obj)
    monkeypatch.undo()
    assert emitted is not None and emitted[0] == expected
    assert len(slept) == 100 // _pickle_emit.CHECK_EVERY
    assert gc.isenabled()
    gc.disable()
    try:
        assert emit(obj) is not None and emit({1}) is None
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert emit({1}) is None and gc.isenabled()


def test_type_check_before_emitting() -> None:
    """Unsupported types anywhere (keys, deep values, an OrderedDict's attributes) are
    found by a walk over types before any tensor is looked at."""
    assert _pickle_emit._plain(CORPUS["checkpoint"].build())
    od: collections.OrderedDict[str, Any] = collections.OrderedDict(a=1)
    od.extra = {"s": {1, 2}}  # type: ignore[attr-defined]
    cycle: list[Any] = [1]
    cycle.append(cycle)
    assert _pickle_emit._plain([cycle, (cycle,)])
    for graph in ([{1}], {"a": {(1, frozenset()): 2}}, od, ((([b"x"],),),), {"k": [1, _Int(2)]}):
        assert not _pickle_emit._plain(graph)
        assert emit(graph) is None

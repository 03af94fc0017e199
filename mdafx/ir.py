"""The graph IR: torch.fx GraphModules with shapes on every node, and the helpers every layer
above shares (one copy each).

``trace`` is the only way models enter mdafx. It returns a GraphModule whose nodes carry
``node.meta["tensor_meta"]`` (fx's ShapeProp) for an example input, so every later pass can read
shapes without running the model again; the pass manager refreshes them after each transform.
It traces what the model runs (a rebound ``forward``, hooks of submodules), checks the graph
against the eager model on the example, and points errors at the user's source line.

The only mdafx key in ``node.meta`` is :data:`META_KEPT`, which PruneChannels writes for dumps;
analysis results live in the analysis manager (``mdafx.passmanager``).
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import traceback
import types
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx import _symbolic_trace
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import PreconditionError, TraceError

__all__ = ["META_KEPT", "trace", "propagate_shapes", "shape_of", "input_shape", "example_input",
           "eval_mode", "module_device", "count_params", "count_macs"]

META_KEPT = "mdafx.kept"          # (kept, total) channels of the output after pruning (dumps)


class _ReportingTracer(fx.Tracer):
    """A Tracer that remembers which module it was inside, to name it when tracing fails, and
    traces the modules of :data:`DECOMPOSITIONS` as the functional ops they compute."""

    def __init__(self, leaf_modules: Iterable[type] = ()) -> None:
        super().__init__()
        # buffers read in forward become get_attr nodes, not constants folded at trace time
        # (frozen norms, masks): their channels are tracked and they stay buffers in files
        self.proxy_buffer_attributes = True
        self.leaf_types = tuple(leaf_modules)
        self.path: list[str] = []
        self.failed_in: list[str] | None = None  # the module path when tracing first failed

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname) or _computes_as_torch_nn(m)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m) or type(m).__name__)
        try:
            decompose = DECOMPOSITIONS.get(type(m))
            if decompose is not None and not (self.leaf_types and isinstance(m, self.leaf_types)):
                out = decompose(m, *args, **kwargs)
                if out is not NotImplemented:
                    return out
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.path)
            raise
        finally:
            self.path.pop()


class _ShapedProxy(fx.Proxy):
    """A Proxy whose sizes are known: ``shape``, ``size()``, ``dim()``, ``ndim``, ``dtype`` and
    ``device`` read the values the tracer computes alongside (:class:`_ShapeTracer`); a size that
    depends on the batch stays a node of the graph, every other one is an int."""

    def __getattr__(self, k: str):
        values = self.tracer.values.get(self.node)
        if values is not None and isinstance(values[0], torch.Tensor):
            if k == "shape":
                return self.tracer.sizes(self)
            if k == "size":
                return lambda *d: self.tracer.sizes(self, *d)
            if k == "dim":
                return values[0].dim
            if k in ("ndim", "dtype", "device", "is_cuda"):
                return getattr(values[0], k)
        return super().__getattr__(k)


@contextlib.contextmanager
def _eager_modules() -> Iterator[None]:
    """Module attribute access and calls as outside tracing (fx patches both while it traces),
    for computing real values in the middle of a trace."""
    patched = torch.nn.Module.__getattr__, torch.nn.Module.__call__
    torch.nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr
    torch.nn.Module.__call__ = _symbolic_trace._orig_module_call
    try:
        yield
    finally:
        torch.nn.Module.__getattr__, torch.nn.Module.__call__ = patched


class _ShapeTracer:
    """Mixin: trace with every value computed alongside, at the example's batch and at another,
    so Python control flow on sizes (padding 'same', a resized position embedding, a check of
    the input size) follows the example's shapes while the batch stays free."""

    def init_values(self, examples: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.examples = examples
        self.values: dict[fx.Node, tuple[Any, Any]] = {}
        self.input_node: fx.Node | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if isinstance(proxy, fx.Proxy) and kind != "output":
            self.values[proxy.node] = tuple(self._evaluate(proxy.node, i) for i in (0, 1))
        return proxy

    def _evaluate(self, node: fx.Node, i: int) -> Any:
        if node.op == "placeholder":
            if self.input_node in (None, node):  # the model's input; the rest: defaults
                self.input_node = node
                return self.examples[i]
            return node.args[0] if node.args else None
        args = fx.node.map_arg(node.args, lambda n: self.values[n][i])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n][i])
        with torch.no_grad(), _eager_modules():
            if node.op == "get_attr":
                value = self.root
                for atom in str(node.target).split("."):
                    value = getattr(value, atom)
                return value
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def sizes(self, proxy: fx.Proxy, *dims: int):
        first, second = self.values[proxy.node]
        picked = dims[0] if dims else None
        out = []
        for d in (range(first.dim()) if picked is None else [picked]):
            if first.shape[d] == second.shape[d]:
                out.append(int(first.shape[d]))
            else:  # depends on the batch: a node of the graph
                out.append(self.create_proxy("call_method", "size", (proxy, d), {}))
        return out[0] if picked is not None else tuple(out)


_FORWARD_NAMES = ("forward", "_conv_forward")
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _computes_as_torch_nn(m: torch.nn.Module) -> bool:
    """A subclass of a torch.nn layer that does not redefine its forward computes what that
    layer computes: it is a leaf like it (and gets its channel rule), not traced through."""
    if any(name in vars(m) for name in _FORWARD_NAMES):
        return False
    for cls in type(m).__mro__:
        if any(name in vars(cls) for name in _FORWARD_NAMES):
            return cls.__module__.startswith("torch.nn") and not issubclass(cls, _CONTAINERS)
    return False


def _mha_forward(m: torch.nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention`` self-attention in eval mode as the functional ops it computes
    (the qkv projection, ``num_heads`` reshape, attention, output projection), so its heads are
    channels like those of any attention block; other configurations stay a leaf (a barrier)."""
    if not (m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
            and key_padding_mask is None and attn_mask is None and not is_causal
            and query is key and key is value and not m.training):
        return NotImplemented
    x = query if m.batch_first else query.transpose(0, 1)
    batch, length = x.shape[0], x.shape[1]
    heads, width = m.num_heads, m.embed_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if need_weights:
        attn = torch.matmul(q * (width // heads) ** -0.5, k.transpose(-2, -1)).softmax(-1)
        out = torch.matmul(attn, v)
        weights = attn.mean(1) if average_attn_weights else attn
    else:
        out, weights = F.scaled_dot_product_attention(q, k, v), None
    out = F.linear(out.transpose(1, 2).reshape(batch, length, width), m.out_proj.weight,
                   m.out_proj.bias)
    return (out if m.batch_first else out.transpose(0, 1)), weights


DECOMPOSITIONS = {torch.nn.MultiheadAttention: _mha_forward}
"""Module types traced as the functional ops they compute (checked against the module by the
eager comparison of :func:`trace`); unsupported configurations return NotImplemented."""


def trace(
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    leaf_modules: Iterable[type] = (),
    concrete_args: dict | None = None,
    check: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule with shapes for ``example``.

    What is traced is what the model runs: the instance's ``forward`` when it was rebound
    (``model.forward = types.MethodType(f, model)``), forward hooks of submodules as their code
    does (hooks on the model itself are refused, naming them). Optional forward arguments after
    the input are fixed to their defaults. With ``check`` the graph is run on ``example`` and
    must give the model's output (to float rounding), else TraceError: a trace that silently
    computes another function is never returned.

    A model that fx cannot trace because it branches on *sizes* (padding 'same', a resized
    position embedding, an input-size check) is traced again with every size known
    (:class:`_ShapeTracer`: values computed alongside at the example's batch and at another, so
    sizes that depend on the batch stay in the graph and the rest become ints); that graph is
    checked against the model at both batch sizes.

    Raises TraceError naming the submodule and the user's source line that torch.fx could not
    trace, with the fix to try (a leaf module keeps its channels as a reported barrier).
    """
    if isinstance(model, fx.GraphModule):
        gm = model
        gm.eval()
        propagate_shapes(gm, example)
        return gm
    _refuse_root_hooks(model)
    tracer = _ReportingTracer(leaf_modules)
    with eval_mode(model), _forward_of(model) as fn:
        concrete = {**_defaults_after_input(fn), **(concrete_args or {})}
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
            shaped = False
        except TraceError:
            raise
        except Exception as e:  # fx raises many types; all mean "not traceable"
            error = _trace_error(model, tracer, e)
            graph = _trace_with_shapes(model, example, leaf_modules, concrete)
            if graph is None:
                raise error from e
            tracer, shaped = graph[1], True
            graph = graph[0]
    _drop_specialised_inputs(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.eval()
    propagate_shapes(gm, example)
    if check or shaped:
        _check_against_eager(model, gm, example)
        if shaped:  # sizes were specialised: the batch must still be free
            _check_against_eager(model, gm, _other_batch(example))
    return gm


def _other_batch(example: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn((example.shape[0] + 1, *example.shape[1:]), generator=g).to(example)


class _ShapeReportingTracer(_ShapeTracer, _ReportingTracer):
    pass


def _trace_with_shapes(model, example, leaf_modules, concrete):
    """The fallback front end: fx with the sizes of ``example`` known (:class:`_ShapeTracer`);
    None when it cannot trace either (the first error is the one to show)."""
    tracer = _ShapeReportingTracer(leaf_modules)
    tracer.init_values((example, _other_batch(example)))
    try:
        return tracer.trace(model, concrete_args=concrete or None), tracer
    except Exception:
        return None


@contextlib.contextmanager
def _forward_of(model: torch.nn.Module) -> Iterator[Any]:
    """The forward fx must trace: fx reads ``type(model).forward``, so an instance whose forward
    was rebound is traced through a subclass carrying that function (restored afterwards)."""
    bound = vars(model).get("forward")
    if bound is None:
        yield type(model).forward
        return
    if not (isinstance(bound, types.MethodType) and bound.__self__ is model):
        raise TraceError(f"{type(model).__name__}.forward was replaced on the instance by "
                         f"{bound!r}, which is not a method of this model; bind it with "
                         "types.MethodType(f, model) so that it can be traced")
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": bound.__func__,
                                                  "__module__": cls.__module__})
    try:
        yield bound.__func__
    finally:
        model.__class__ = cls


def _refuse_root_hooks(model: torch.nn.Module) -> None:
    from torch.nn.modules import module as nn_module

    kinds = [name for name, hooks in (("forward hook", model._forward_hooks),
                                      ("forward pre-hook", model._forward_pre_hooks))
             if hooks]
    global_hooks = [name for name, hooks in (
        ("global forward hook", nn_module._global_forward_hooks),
        ("global forward pre-hook", nn_module._global_forward_pre_hooks)) if hooks]
    if kinds or global_hooks:
        what = ", ".join(kinds + global_hooks)
        raise TraceError(f"{type(model).__name__} has a {what}: torch.fx traces forward "
                         "without the hooks of the traced module itself, so the graph would "
                         "compute something else; remove the hook (or wrap the model in a "
                         "module whose forward calls it, so the hook runs inside the trace)")


def _defaults_after_input(fn: Any) -> dict[str, Any]:
    """``{name: default}`` of the forward's optional parameters after the input."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """fx keeps a placeholder and an assert per concrete argument: fold them into constants,
    so the graph takes its one input."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        if not ph.args:  # a required input: not ours to drop
            continue
        value = ph.args[0]
        for user in list(ph.users):
            checks = [u for u in user.users]
            if user.target is _assert_is_none:
                graph.erase_node(user)
            elif (user.target is operator.eq and checks
                  and all(u.target is torch._assert for u in checks)):
                for u in checks:
                    graph.erase_node(u)
                graph.erase_node(user)
            else:
                user.args = fx.node.map_arg(user.args, lambda n: value if n is ph else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is ph else n)
        if not ph.users:
            graph.erase_node(ph)


def _check_against_eager(model: torch.nn.Module, gm: fx.GraphModule,
                         example: torch.Tensor) -> None:
    with eval_mode(model), torch.no_grad():  # clones: a forward may write into its input
        want = model(example.clone())
        got = gm(example.clone())
    wants, spec_w = pytree.tree_flatten(want)
    gots, spec_g = pytree.tree_flatten(got)
    if spec_w != spec_g:
        raise TraceError(f"the traced graph of {type(model).__name__} returns {spec_g}, the "
                         f"model returns {spec_w} on the example input")
    for i, (w, g) in enumerate(zip(wants, gots)):
        if not isinstance(w, torch.Tensor):
            if w != g:
                raise TraceError(f"the traced graph of {type(model).__name__} returns {g!r} "
                                 f"where the model returns {w!r} (output {i})")
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            raise TraceError(f"the traced graph of {type(model).__name__} gives output {i} of "
                             f"shape {getattr(g, 'shape', None)}, the model {tuple(w.shape)}")
        if not w.is_floating_point():
            ok = torch.equal(w, g)
            err = 0.0 if ok else 1.0
        else:
            finite = torch.isfinite(w)
            same_nonfinite = torch.equal(finite, torch.isfinite(g)) and torch.equal(
                w[~finite].nan_to_num(), g[~finite].nan_to_num())
            w, g = w[finite], g[finite]
            scale = float(w.abs().max()) if w.numel() else 0.0
            err = float((w - g).abs().max()) / max(scale, 1e-12) if w.numel() else 0.0
            ok = same_nonfinite and err <= EAGER_RTOL
        if not ok:
            raise TraceError(
                f"the traced graph of {type(model).__name__} computes something else than the "
                f"model on the example input (output {i}: max error {err:.3g} of its scale): "
                "the model's forward depends on something torch.fx does not record (Python "
                "control flow on values, a global, a forward replaced after tracing began); "
                "make that part a leaf module (trace(..., leaf_modules=[...])) or fix the input "
                "it branches on with concrete_args")


EAGER_RTOL = 1e-4
"""How far (relative to the output's scale) the traced graph may be from the eager model."""


_OWN_DIRS = tuple(os.path.dirname(p) + os.sep for p in (torch.__file__, __file__))


def _user_frames(tb) -> list[traceback.FrameSummary]:
    """The traceback without the frames inside torch and mdafx: where the user's code is."""
    return [f for f in traceback.extract_tb(tb) if not f.filename.startswith(_OWN_DIRS)]


def _trace_error(model: torch.nn.Module, tracer: _ReportingTracer, e: Exception) -> TraceError:
    where = (tracer.failed_in or [type(model).__name__])[-1]
    frames = _user_frames(e.__traceback__)
    line = f"{frames[-1].filename}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
    leaf = f"trace(..., leaf_modules=[{_class_at(model, where)}])"
    return TraceError(
        f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
        f"  inside submodule: {where}\n  at: {line}\n"
        f"  Fix: make that submodule a leaf ({leaf}; its channels are then kept as a barrier "
        "and everything around it stays prunable), or pass concrete_args for Python control "
        "flow that depends on inputs.")


def _class_at(model: torch.nn.Module, path: str) -> str:
    try:
        return type(model.get_submodule(path)).__name__
    except AttributeError:
        return "ItsClass"


class _ShapeProp(fx.Interpreter):
    """fx's ShapeProp (the same ``tensor_meta`` and ``type`` keys), failing with one line that
    names the node that does not execute instead of printing a traceback."""

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PreconditionError(f"the graph does not execute at node {n.format_node()}: "
                                    f"{type(e).__name__}: {first}") from e
        found = False

        def meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        value = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = value
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Fill ``node.meta['tensor_meta']`` for ``example`` (fx's ShapeProp), in eval mode; a node
    that does not execute is a PreconditionError naming it."""
    with eval_mode(gm), torch.no_grad():
        _ShapeProp(gm).run(example)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _placeholder(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PreconditionError(f"mdafx models take one input tensor; this graph has "
                                f"{len(placeholders)} placeholders")
    return placeholders[0]


def input_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    """The recorded shape of the graph's one input (batch included), from its placeholder."""
    ph = _placeholder(gm)
    shape = shape_of(ph)
    if shape is None:
        raise PreconditionError(f"placeholder {ph.name} has no shape: trace the model with "
                                "mdafx.trace first")
    return shape


def example_input(gm: fx.GraphModule, batch: int | None = None, *, seed: int | None = 0,
                  ) -> torch.Tensor:
    """A random input of the graph's recorded shape (``batch`` rows if given), in its dtype;
    drawn from its own generator, so the global RNG is untouched."""
    ph = _placeholder(gm)
    shape = list(input_shape(gm))
    if batch is not None:
        shape[0] = batch
    dtype = ph.meta["tensor_meta"].dtype
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(shape, generator=generator).to(dtype)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module.eval()`` for the duration, then every submodule gets back its own training
    flag (a model with some submodules frozen in eval mode stays that way)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module with none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: torch.nn.Module, shape: Iterable[int] | None = None) -> int:
    """Multiply-accumulates of one forward at input ``shape`` (default: the graph's recorded
    input at batch 1), as FLOPs / 2 from torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    if shape is None:
        if not isinstance(module, fx.GraphModule):
            raise PreconditionError("count_macs needs the input shape of a plain nn.Module")
        shape = (1, *input_shape(module)[1:])
    device = module_device(module)
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(*shape, device=device))
    return int(counter.get_total_flops()) // 2

"""Graph surgery with onnx-graphsurgeon: folding balancing vectors, run-time Muls, LoRA branches.

Each pass takes the graph (and what it needs), edits it, and returns
``graph.cleanup().toposort()``. Weight arithmetic is done in float32 on a *master copy*
(:class:`MasterWeights`, seeded from the fp32 torch model), never on the graph's possibly fp16
values, and written to the graph in the graph's dtype. The float32 arithmetic is the same as
``runtime.recipe.fold_balance`` (same operations, same order), so the folded weights are
bit-identical to the simulated model's.

Layout reminder (see onnx_export): MatMul weights are ``W^T`` ``[C_in, C_out]``, Gemm weights
(adaLN) are ``W`` ``[C_out, C_in]``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ..formats import ROLE_FOLDS, layer_role
from ..runtime.recipe import Recipe
from ..runtime.rotation import hadamard, rotate
from .onnx_export import LinearSite, find_linears


class SurgeryError(ValueError):
    pass


class MasterWeights:
    """float32 values of every Linear's weight and bias, keyed by graph initializer name, in the
    graph's layout. Passes read and write here, then :meth:`write` pushes to the graph."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = values

    @classmethod
    def from_model(cls, model: nn.Module, sites: dict[str, LinearSite]) -> "MasterWeights":
        sd = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
        values = {}
        for name, site in sites.items():
            w = sd[f"{name}.weight"]
            values[site.weight] = np.ascontiguousarray(w.T) if site.op == "MatMul" else w.copy()
            if site.bias is not None:
                values[site.bias] = sd[f"{name}.bias"].copy()
        return cls(values)

    @classmethod
    def from_graph(cls, graph: gs.Graph) -> "MasterWeights":
        sites = find_linears(graph)
        tensors = graph.tensors()
        values = {}
        for site in sites.values():
            for key in (site.weight, site.bias):
                if key is not None:
                    values[key] = np.asarray(tensors[key].values).astype(np.float32)
        return cls(values)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.values[key]

    def set(self, graph: gs.Graph, key: str, value: np.ndarray) -> None:
        """Store ``value`` (float32) and write it into the graph constant in the graph's dtype."""
        value = np.asarray(value, dtype=np.float32)
        self.values[key] = value
        const = graph.tensors().get(key)
        if isinstance(const, gs.Constant):
            const.values = value.astype(const.dtype)


def _site(sites: dict[str, LinearSite], name: str) -> LinearSite:
    if name not in sites:
        raise SurgeryError(f"Linear {name!r} not found in the graph")
    return sites[name]


def _block(name: str) -> str:
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "blocks":
        raise SurgeryError(f"{name!r} is not a layer of a DiT block")
    return ".".join(parts[:2])


def _scale_weight_inputs(graph: gs.Graph, master: MasterWeights, site: LinearSite, b: np.ndarray) -> None:
    """``W' = W diag(b)``: the layer's input channels are multiplied by ``b``."""
    w = master[site.weight]
    new = w * b[:, None] if site.op == "MatMul" else w * b[None, :]
    master.set(graph, site.weight, new)


def _vectors(balances: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in balances.items()}


def _fold_adaln(graph: gs.Graph, master: MasterWeights, sites: dict, name: str, b: np.ndarray) -> None:
    """Divide qkv's / fc1's input by ``b`` by editing the adaLN Linear that modulates it (shift
    rows and bias ``/ b``; scale rows ``/ b`` and scale bias ``(bias + 1) / b - 1``), then
    ``W' = W diag(b)`` for the layer itself."""
    role = layer_role(name)
    if "adaLN" not in ROLE_FOLDS.get(role, ()):
        raise SurgeryError(f"{name}: adaLN folding applies to {', '.join(r for r, f in ROLE_FOLDS.items() if 'adaLN' in f)} only")
    ada = _site(sites, f"{_block(name)}.adaLN_modulation.1")
    if ada.op != "Gemm":
        raise SurgeryError(f"{ada.name}: expected a Gemm (weight [C_out, C_in])")
    c = b.shape[0]
    shift, scale = (0, 1) if role == "attn.qkv" else (3, 4)
    w, bias = master[ada.weight].copy(), master[ada.bias].copy()
    rs, rc = slice(shift * c, (shift + 1) * c), slice(scale * c, (scale + 1) * c)
    w[rs] = w[rs] / b[:, None]
    bias[rs] = bias[rs] / b
    w[rc] = w[rc] / b[:, None]
    bias[rc] = (bias[rc] + np.float32(1)) / b - np.float32(1)
    master.set(graph, ada.weight, w)
    master.set(graph, ada.bias, bias)
    _scale_weight_inputs(graph, master, _site(sites, name), b)


def _fold_v(graph: gs.Graph, master: MasterWeights, sites: dict, name: str, b: np.ndarray) -> None:
    """Divide proj's input (attention-weighted V) by ``b``: V's output channels of qkv (columns
    ``2C:3C`` of the MatMul weight ``W^T``, and the bias) ``/ b``; then ``W diag(b)`` for proj."""
    if "v" not in ROLE_FOLDS.get(layer_role(name), ()):
        raise SurgeryError(f"{name}: V folding applies to attn.proj only")
    qkv = _site(sites, f"{_block(name)}.attn.qkv")
    c = b.shape[0]
    w, bias = master[qkv.weight].copy(), master[qkv.bias].copy()
    cols = slice(2 * c, 3 * c)
    if qkv.op == "MatMul":
        w[:, cols] = w[:, cols] / b[None, :]
    else:
        w[cols] = w[cols] / b[:, None]
    bias[cols] = bias[cols] / b
    master.set(graph, qkv.weight, w)
    master.set(graph, qkv.bias, bias)
    _scale_weight_inputs(graph, master, _site(sites, name), b)


def _input_mul(graph: gs.Graph, master: MasterWeights, sites: dict, name: str, b: np.ndarray) -> None:
    """Where folding is impossible (fc2 after GELU): a run-time ``Mul`` by ``1 / b`` on the
    layer's input (before its Q/DQ), and ``W diag(b)``."""
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    site = _site(sites, name)
    node = nodes[site.node]
    inv = (np.float32(1.0) / b).astype(np.float32)  # recipe.fold_balance: ones * (1.0 / b)
    x = node.inputs[0]
    dtype = tensors[site.weight].dtype
    out = gs.Variable(f"{name}/input_mul_output", dtype=x.dtype, shape=x.shape)
    mul = gs.Node("Mul", name=f"{name}/input_mul",
                  inputs=[x, gs.Constant(f"{name}.input_mul", inv.astype(dtype))], outputs=[out])
    node.inputs[0] = out
    graph.nodes.append(mul)
    _scale_weight_inputs(graph, master, site, b)


def _each(helper, graph: gs.Graph, master: MasterWeights, balances: dict[str, np.ndarray]) -> gs.Graph:
    sites = find_linears(graph)
    for name, b in _vectors(balances).items():
        helper(graph, master, sites, name, b)
    return graph.cleanup().toposort()


def fold_into_adaln(graph: gs.Graph, master: MasterWeights, balances: dict[str, np.ndarray]) -> gs.Graph:
    """Pass: ``{qkv or fc1 layer: b}`` folded into adaLN rows (see ``_fold_adaln``)."""
    return _each(_fold_adaln, graph, master, balances)


def fold_into_v(graph: gs.Graph, master: MasterWeights, balances: dict[str, np.ndarray]) -> gs.Graph:
    """Pass: ``{proj layer: b}`` folded into V's rows of qkv (see ``_fold_v``)."""
    return _each(_fold_v, graph, master, balances)


def insert_input_mul(graph: gs.Graph, master: MasterWeights, balances: dict[str, np.ndarray]) -> gs.Graph:
    """Pass: ``{layer: b}`` as run-time ``Mul`` by ``1 / b`` (see ``_input_mul``)."""
    return _each(_input_mul, graph, master, balances)


def add_lora(graph: gs.Graph, name: str, down: np.ndarray, up: np.ndarray) -> gs.Graph:
    """Low-rank side branch ``Y += (X R^T) L^T`` in the float dtype, with ``down`` = R
    ``[r, C_in]`` and ``up`` = L ``[C_out, r]``. X is the MatMul's input at the time of the call:
    after ``apply_balancing`` the balanced input (after a run-time ``Mul``), and unquantized as long
    as Q/DQ is inserted later (``insert_qdq`` requantizes only the MatMul's own input). The branch's
    Add follows the bias Add: ``QuantLinear.forward``'s order."""
    site = _site(find_linears(graph), name)
    if site.op != "MatMul" or site.bias_node is None:
        raise SurgeryError(f"{name}: LoRA branches are supported on MatMul+Add Linears")
    nodes = {n.name: n for n in graph.nodes}
    mm, add = nodes[site.node], nodes[site.bias_node]
    dtype = graph.tensors()[site.weight].dtype
    x = mm.inputs[0]
    rt = gs.Constant(f"{name}.lora_down", np.ascontiguousarray(np.asarray(down, np.float32).T).astype(dtype))
    lt = gs.Constant(f"{name}.lora_up", np.ascontiguousarray(np.asarray(up, np.float32).T).astype(dtype))
    h = gs.Variable(f"{name}/lora_down_output", dtype=x.dtype)
    d = gs.Variable(f"{name}/lora_up_output", dtype=x.dtype)
    y = add.outputs[0]
    merged = gs.Variable(f"{name}/lora_add_output", dtype=y.dtype, shape=y.shape)
    consumers = list(y.outputs)
    graph.nodes += [
        gs.Node("MatMul", name=f"{name}/lora_down", inputs=[x, rt], outputs=[h]),
        gs.Node("MatMul", name=f"{name}/lora_up", inputs=[h, lt], outputs=[d]),
        gs.Node("Add", name=f"{name}/lora_add", inputs=[y, d], outputs=[merged]),
    ]
    for c in consumers:
        c.inputs = [merged if t is y else t for t in c.inputs]
    if y in graph.outputs:
        graph.outputs = [merged if t is y else t for t in graph.outputs]
    return graph.cleanup().toposort()


def _input_rotation(graph: gs.Graph, master: MasterWeights, sites: dict, name: str, k: int) -> None:
    """The layer's input rotated by the block Hadamard ``B`` (block ``k``): ``Reshape [-1, k] ->
    MatMul(H_k^T) -> Reshape`` back to the input's shape, and ``W B^T`` in the master weight (by
    ``runtime.rotation.rotate`` on the float32 ``W``, as ``runtime.recipe.fold_rotation``: the same
    numbers as the simulation). Before balancing: a run-time ``Mul`` then follows the rotation."""
    site = _site(sites, name)
    if site.op != "MatMul":
        raise SurgeryError(f"{name}: input rotation is supported on MatMul Linears")
    node = {n.name: n for n in graph.nodes}[site.node]
    dtype = graph.tensors()[site.weight].dtype
    x = node.inputs[0]
    shape = gs.Variable(f"{name}/rotate_shape_output", dtype=np.int64)
    flat = gs.Variable(f"{name}/rotate_flat_output", dtype=x.dtype)
    turned = gs.Variable(f"{name}/rotate_matmul_output", dtype=x.dtype)
    out = gs.Variable(f"{name}/rotate_output", dtype=x.dtype, shape=x.shape)
    h_t = np.ascontiguousarray(hadamard(k, torch.float32).T.numpy()).astype(dtype)
    graph.nodes += [
        gs.Node("Shape", name=f"{name}/rotate_shape", inputs=[x], outputs=[shape]),
        gs.Node("Reshape", name=f"{name}/rotate_flat",
                inputs=[x, gs.Constant(f"{name}.rotate_flat_shape", np.array([-1, k], np.int64))], outputs=[flat]),
        gs.Node("MatMul", name=f"{name}/rotate_matmul",
                inputs=[flat, gs.Constant(f"{name}.input_rotation", h_t)], outputs=[turned]),
        gs.Node("Reshape", name=f"{name}/rotate_unflat", inputs=[turned, shape], outputs=[out]),
    ]
    node.inputs[0] = out
    w = torch.from_numpy(np.ascontiguousarray(master[site.weight].T))  # W [C_out, C_in], float32
    master.set(graph, site.weight, np.ascontiguousarray(rotate(w, k).numpy().T))


def apply_rotations(graph: gs.Graph, master: MasterWeights, recipe: Recipe) -> gs.Graph:
    """Pass (before ``apply_balancing``): every recipe layer's ``input_rotation`` (``_input_rotation``)."""
    sites = find_linears(graph)
    for name, layer in recipe.layers.items():
        if layer.input_rotation:
            _input_rotation(graph, master, sites, name, int(layer.input_rotation))
    return graph.cleanup().toposort()


_FOLDS = {"adaLN": _fold_adaln, "v": _fold_v, "runtime": _input_mul}


def apply_balancing(graph: gs.Graph, master: MasterWeights, recipe: Recipe) -> gs.Graph:
    """Pass: every balancing vector of the recipe, in the recipe's layer order (the order
    ``balanced_model`` uses: qkv's weight is scaled by its own b and by proj's V fold, and float32
    products depend on the order)."""
    sites = find_linears(graph)
    for name, layer in recipe.layers.items():
        b = recipe.balance(name)
        if b is None:
            continue
        if layer.balance_fold not in _FOLDS:
            raise SurgeryError(f"{name}: unknown balance fold {layer.balance_fold!r}")
        _FOLDS[layer.balance_fold](graph, master, sites, name, b.detach().float().cpu().numpy().astype(np.float32))
    return graph.cleanup().toposort()


def apply_recipe_weights(graph: gs.Graph, master: MasterWeights, recipe: Recipe) -> gs.Graph:
    """Pass (after ``apply_balancing``): a recipe layer's ``weight`` (GPTQ's weight, or the residual
    ``W diag(b) - L R`` of a low-rank branch) replaces the folded weight in the master copy, which
    ``qdq.insert_qdq`` quantizes; then each low-rank branch as a side path (``add_lora``)."""
    sites = find_linears(graph)
    for name in recipe.layers:
        w = recipe.weight(name)
        if w is not None:
            site = _site(sites, name)
            w = w.detach().float().cpu().numpy()
            master.set(graph, site.weight, np.ascontiguousarray(w.T) if site.op == "MatMul" else w.copy())
    for name in recipe.layers:
        lr = recipe.lowrank(name)
        if lr is not None:
            up, down = (t.detach().float().cpu().numpy() for t in lr)
            graph = add_lora(graph, name, down, up)
    return graph.cleanup().toposort()

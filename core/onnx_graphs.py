"""ONNX graphs of the generator's parts, built node by node from the modules, for the export bundle.

Every graph leaves its weights out: each is declared as an external initializer that the bundle's
runner supplies at load time (from the bundle's entropy-coded weights file), so the graph files hold
only the computation. A graph's weights come back beside it, as the runner must hand them over:
float32 tensors, and for an int8 layer its int8 weight and float32 scale per output row (or one).

- transformer step: the embeddings of T new positions and the key/value cache of the earlier ones ->
  the logits of the last position and the new positions' keys and values, which the runner appends to
  its cache (so no step copies the cache). T = 1 decodes one token; a longer T fills a window.
- transformer encoder (cascade): embeddings of [label, coarse tokens] -> each decoder layer's
  cross-attention keys and values.
- decoder: feature maps (B, C, h, w) -> images (B, C', H, W) in [-1, 1].

The runner looks the embeddings up itself (numpy), so the graphs start from them. An int8 linear layer
runs as DequantizeLinear + Gemm: the weight stays int8 in the session and is widened per call, which
onnxruntime does not fold back to float; an int8 convolution likewise. The maths follow
core.models.transformer and core.models.autoencoder; tests/test_export.py checks that both give the
same tokens."""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from core.models.autoencoder import ImageDecoder, ResBlock
from core.models.quantized import Int8Conv2d, Int8Linear
from core.models.transformer import Block, TokenTransformer

OPSET = 21
EXTERNAL = "supplied-by-runner"  # the location the graphs name for their weights; the runner supplies them
DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int8): TensorProto.INT8,
          np.dtype(np.int64): TensorProto.INT64}
ACTIVATIONS = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh",
               nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


class GraphBuilder:
    """Nodes, constants and external weights of one graph, with fresh names for intermediate values."""

    def __init__(self, prefix: str):
        self.prefix = prefix  # weights are named prefix + the module's tensor name
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self.count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        """A node of one output; returns the output's name."""
        name = f"{op_type.lower()}_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = f"const_{self.count}"
        self.count += 1
        self.constants.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """An external weight: declared in the graph, its values kept for the bundle."""
        full = self.prefix + name
        array = tensor.detach().cpu().numpy()
        self.weights[full] = array.astype(np.float32) if array.dtype.kind == "f" else array
        return full

    def declared_weights(self) -> list[onnx.TensorProto]:
        declared = []
        for name, array in self.weights.items():
            t = onnx.TensorProto(name=name, data_type=DTYPES[array.dtype], dims=list(array.shape),
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", EXTERNAL), ("offset", "0"), ("length", str(array.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            declared.append(t)
        return declared

    def model(self, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, self.constants + self.declared_weights())
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qarig")
        model.ir_version = 10
        return model

    # -- layers

    def layer_inputs(self, x: str, module: nn.Module, name: str) -> list[str]:
        """[x, weight, bias if any] of a Gemm or Conv: an int8 weight (Int8Linear, Int8Conv2d) stays int8,
        dequantized per output row in the graph."""
        if isinstance(module, (Int8Linear, Int8Conv2d)):
            weight = self.op("DequantizeLinear", self.weight(f"{name}.weight", module.weight),
                             self.weight(f"{name}.weight_scale", module.weight_scale), axis=0)
        else:
            weight = self.weight(f"{name}.weight", module.weight)
        return [x, weight] + ([self.weight(f"{name}.bias", module.bias)] if module.bias is not None else [])

    def linear(self, x: str, module: nn.Module, name: str) -> str:
        """x (N, in) -> (N, out), for an nn.Linear or an Int8Linear named `name`."""
        return self.op("Gemm", *self.layer_inputs(x, module, name), transB=1)

    def conv(self, x: str, module: nn.Module, name: str) -> str:
        kernel = list(module.weight.shape[2:])
        padding = list(module.padding) * 2
        return self.op("Conv", *self.layer_inputs(x, module, name), kernel_shape=kernel, pads=padding,
                       strides=list(module.stride), dilations=list(module.dilation), group=module.groups)

    def layer_norm(self, x: str, module: nn.LayerNorm, name: str) -> str:
        return self.op("LayerNormalization", x, self.weight(f"{name}.weight", module.weight),
                       self.weight(f"{name}.bias", module.bias), axis=-1, epsilon=module.eps)

    def activation(self, x: str, module: nn.Module) -> str:
        kind = ACTIVATIONS.get(type(module))
        if kind == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        if kind == "gelu":
            return self.op("Gelu", x, approximate=module.approximate)
        if kind == "leaky_relu":
            return self.op("LeakyRelu", x, alpha=module.negative_slope)
        if kind in ("relu", "tanh", "sigmoid"):
            return self.op({"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[kind], x)
        if kind == "identity":
            return x
        raise ValueError(f"no ONNX form of {type(module).__name__}")


# ---------------------------------------------------------------- transformer

def float_input(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def split_heads(g: GraphBuilder, x: str, shape: dict, heads: int, parts: int = 1) -> list[str]:
    """(B*T, parts*D) -> `parts` tensors (B, H, T, hd)."""
    dims = g.op("Concat", shape["B"], shape["T"], g.const([parts, heads, -1]), axis=0)
    x = g.op("Transpose", g.op("Reshape", x, dims), perm=[2, 0, 3, 1, 4])
    return [g.op("Gather", x, g.const(i), axis=0) for i in range(parts)]


def merge_heads(g: GraphBuilder, y: str, shape: dict) -> str:
    """(B, H, T, hd) -> (B*T, D)."""
    return g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.const([-1, shape["D"]]))


def scores(g: GraphBuilder, q: str, k: str, head_dim: int) -> str:
    return g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                g.const(1 / math.sqrt(head_dim), np.float32))


def attend(g: GraphBuilder, q: str, k: str, v: str, head_dim: int) -> str:
    """Full attention of q (B, H, T, hd) over k, v (B, H, S, hd) -> (B, H, T, hd)."""
    return g.op("MatMul", g.op("Softmax", scores(g, q, k, head_dim), axis=-1), v)


def attend_cached(g: GraphBuilder, q: str, k: str, v: str, past_k: str, past_v: str, mask: str, head_dim: int) -> str:
    """Attention of the new positions' q over the cache (past_k, past_v: (B, H, M, hd), of which the mask
    keeps the filled part) and over the new positions themselves (k, v), as one softmax. The cache is
    read where it lies: the runner appends the new keys and values to it, so no step copies it."""
    both = g.op("Add", g.op("Concat", scores(g, q, past_k, head_dim), scores(g, q, k, head_dim), axis=-1), mask)
    weights = g.op("Softmax", both, axis=-1)
    filled = g.op("Slice", g.op("Shape", past_k), g.const([2]), g.const([3]))
    on_past = g.op("Slice", weights, g.const([0]), filled, g.const([3]))
    on_new = g.op("Slice", weights, filled, g.const([2 ** 62]), g.const([3]))
    return g.op("Add", g.op("MatMul", on_past, past_v), g.op("MatMul", on_new, v))


def block(g: GraphBuilder, x: str, blk: Block, name: str, shape: dict, cache: dict | None = None,
          cross: tuple[str, str] | None = None) -> tuple[str, list[str]]:
    """One transformer block on x (B*T, D) -> (x, [new keys, new values]). `cache` holds the decoder's
    past_k, past_v and mask; without it the attention is full (the encoder)."""
    attn, heads = blk.attn, blk.attn.heads
    h = g.layer_norm(x, blk.ln1, f"{name}.ln1")
    q, = split_heads(g, g.linear(h, attn.q, f"{name}.attn.q"), shape, heads)
    k, v = split_heads(g, g.linear(h, attn.kv, f"{name}.attn.kv"), shape, heads, parts=2)
    head_dim = shape["D"] // heads
    if cache is None:
        y = attend(g, q, k, v, head_dim)
    else:
        y = attend_cached(g, q, k, v, cache["past_k"], cache["past_v"], cache["mask"], head_dim)
    x = g.op("Add", x, g.linear(merge_heads(g, y, shape), attn.proj, f"{name}.attn.proj"))
    if blk.cross is not None:
        h = g.layer_norm(x, blk.ln_cross, f"{name}.ln_cross")
        q, = split_heads(g, g.linear(h, blk.cross.q, f"{name}.cross.q"), shape, blk.cross.heads)
        y = attend(g, q, cross[0], cross[1], shape["D"] // blk.cross.heads)
        x = g.op("Add", x, g.linear(merge_heads(g, y, shape), blk.cross.proj, f"{name}.cross.proj"))
    hidden = g.activation(g.linear(g.layer_norm(x, blk.ln2, f"{name}.ln2"), blk.mlp[0], f"{name}.mlp.0"), blk.mlp[1])
    return g.op("Add", x, g.linear(hidden, blk.mlp[2], f"{name}.mlp.2")), [k, v]


def batch_shape(g: GraphBuilder, x: str, dim: int) -> dict:
    """B and T of x (B, T, D) as 1-element tensors, and D as a number."""
    dims = g.op("Shape", x)
    return {"B": g.op("Slice", dims, g.const([0]), g.const([1])), "T": g.op("Slice", dims, g.const([1]), g.const([2])),
            "D": dim}


def output(g: GraphBuilder, value: str, name: str) -> None:
    g.nodes.append(helper.make_node("Identity", [value], [name]))


def step_io_names(layers: int, cascade: bool) -> dict[str, list[str]]:
    """The step graph's inputs and outputs, by name (the runner feeds them in this order)."""
    caches = [f"past_{kv}.{i}" for i in range(layers) for kv in "kv"]
    cross = [f"cross_{kv}.{i}" for i in range(layers) for kv in "kv"] if cascade else []
    return {"inputs": ["x", "mask"] + caches + cross,
            "outputs": ["logits"] + [f"new_{kv}.{i}" for i in range(layers) for kv in "kv"]}


def transformer_step(model: TokenTransformer, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The decoder's step (see the module's docstring). Inputs: x (B, T, D), the embeddings of the new
    positions; mask (T, M + T), additive: 0 where a new position may look (the M cache slots filled so
    far, the new positions up to itself), -inf elsewhere; per layer past_k.i, past_v.i (B, H, M, hd), the
    runner's cache; a cascade's cross_k.i, cross_v.i (B, H, S, hd). Outputs: logits (B, V) of the last
    position and each layer's keys and values of the new positions, new_k.i, new_v.i (B, H, T, hd)."""
    cfg, cascade = model.cfg, model.shape.kind == "cascade"
    heads, dim = cfg.self_attn_heads, cfg.in_dim
    g = GraphBuilder(prefix)
    shape = batch_shape(g, "x", dim)
    x = g.op("Reshape", "x", g.const([-1, dim]))
    for i, blk in enumerate(model.decoder):
        cache = {"past_k": f"past_k.{i}", "past_v": f"past_v.{i}", "mask": "mask"}
        x, (k, v) = block(g, x, blk, f"decoder.{i}", shape, cache, (f"cross_k.{i}", f"cross_v.{i}") if cascade else None)
        output(g, k, f"new_k.{i}")
        output(g, v, f"new_v.{i}")
    last = g.op("Gather", g.op("Reshape", x, g.op("Concat", shape["B"], shape["T"], g.const([dim]), axis=0)),
                g.const(-1), axis=1)
    output(g, g.linear(g.layer_norm(last, model.ln_f, "ln_f"), model.head, "head"), "logits")
    names = step_io_names(cfg.num_dec_layers, cascade)
    cache_dims = ["B", heads, "M", dim // heads]
    cross_dims = ["B", cfg.cross_attn_heads, "S", dim // cfg.cross_attn_heads]
    inputs = [float_input("x", ["B", "T", dim]), float_input("mask", ["T", "MT"])]
    inputs += [float_input(n, cross_dims if n.startswith("cross") else cache_dims) for n in names["inputs"][2:]]
    outputs = [float_input("logits", ["B", model.shape.fine_vocab])]
    outputs += [float_input(n, ["B", heads, "T", dim // heads]) for n in names["outputs"][1:]]
    return g.model(inputs, outputs), g.weights


def encoder_io_names(layers: int) -> list[str]:
    return [f"cross_{kv}.{i}" for i in range(layers) for kv in "kv"]


def transformer_encoder(model: TokenTransformer, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Cascade: the encoder over x, the embeddings of [label, coarse tokens] (B, S, D), and from its
    output each decoder layer's cross-attention keys and values, cross_k.i, cross_v.i (B, H, S, hd)."""
    cfg = model.cfg
    g = GraphBuilder(prefix)
    shape = batch_shape(g, "x", cfg.in_dim)
    x = g.op("Reshape", "x", g.const([-1, cfg.in_dim]))
    for i, blk in enumerate(model.encoder):
        x, _ = block(g, x, blk, f"encoder.{i}", shape)
    memory = g.layer_norm(x, model.enc_ln, "enc_ln")
    for i, blk in enumerate(model.decoder):
        k, v = split_heads(g, g.linear(memory, blk.cross.kv, f"decoder.{i}.cross.kv"), shape, blk.cross.heads, parts=2)
        output(g, k, f"cross_k.{i}")
        output(g, v, f"cross_v.{i}")
    heads = cfg.cross_attn_heads
    outputs = [float_input(n, ["B", heads, "S", cfg.in_dim // heads]) for n in encoder_io_names(cfg.num_dec_layers)]
    return g.model([float_input("x", ["B", "S", cfg.in_dim])], outputs), g.weights


# ---------------------------------------------------------------- autoencoder decoder

def image_decoder(decoder: ImageDecoder, prefix: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Feature maps (B, C, h, w) -> images (B, C', H, W), layer by layer as the module's Sequential."""
    g = GraphBuilder(prefix)
    x = "fmaps"
    for index, layer in enumerate(decoder.net):
        name = f"net.{index}"
        if isinstance(layer, (nn.Conv2d, Int8Conv2d)):
            x = g.conv(x, layer, name)
        elif isinstance(layer, ResBlock):
            inner = g.conv(g.activation(x, layer.act), layer.conv1, f"{name}.conv1")
            x = g.op("Add", x, g.conv(g.activation(inner, layer.act), layer.conv2, f"{name}.conv2"))
        elif isinstance(layer, nn.Upsample):
            if layer.mode != "nearest" or layer.scale_factor is None:
                raise ValueError(f"no ONNX form of {layer}")
            scale = float(layer.scale_factor)
            x = g.op("Resize", x, "", g.const([1, 1, scale, scale], np.float32), mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        else:
            x = g.activation(x, layer)
    output(g, x, "images")
    return g.model([float_input("fmaps", ["B", "C", "h", "w"])], [float_input("images", ["B", "c", "H", "W"])]), g.weights

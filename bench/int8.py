"""Microseconds of one linear layer of the tiny transformers (64 x 128 @ 128 x 384) in float32 and in the
int8 forms this CPU offers: PyTorch's float32 matmul, an int8 weight widened per call (what
core.models.quantized.Int8Linear does), aten's int8 weight-only kernel (bf16 activations, as torchao's
int8 weight-only config uses on a CPU), int8 x int8 with dynamically quantized activations, and the
same in onnxruntime (float32 Gemm, DequantizeLinear + Gemm as the export runs it, MatMulInteger).

    python bench/int8.py [--batch 64] [--threads 1]
"""
import time
from typing import Annotated

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import typer
from onnx import TensorProto, helper, numpy_helper

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def timed(fn, repeats: int = 300) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - start) / repeats * 1e6, 1)


def ort_session(nodes: list, weights: dict[str, np.ndarray], features: int, outputs: int, threads: int):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", outputs])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@app.command()
def main(batch: Annotated[int, typer.Option(help="rows of the input")] = 64, threads: int = 1,
         features: int = 128, outputs: int = 384) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    x = torch.randn(batch, features)
    weight = torch.randn(outputs, features) * 0.05
    scale = weight.abs().amax(1) / 127
    codes = torch.round(weight / scale[:, None]).to(torch.int8)
    dense = codes.float() * scale[:, None]

    def dynamic_int8():
        x_scale = x.abs().amax(1, keepdim=True) / 127
        return torch._int_mm(torch.round(x / x_scale).to(torch.int8), codes.t()).float() * x_scale * scale

    rows = {
        "torch float32": timed(lambda: F.linear(x, dense)),
        "torch int8 widened per call": timed(lambda: F.linear(x, codes.float() * scale[:, None])),
        "torch _weight_int8pack_mm (bf16)": timed(lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), codes,
                                                                                             scale.bfloat16())),
        "torch int8 x int8 (_int_mm)": timed(dynamic_int8, repeats=30),
    }
    xs, w8, s = x.numpy(), codes.numpy(), scale.numpy()
    sessions = {
        "onnxruntime float32 Gemm": ort_session([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
                                                {"w": dense.numpy()}, features, outputs, threads),
        "onnxruntime DequantizeLinear + Gemm": ort_session(
            [helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], axis=0),
             helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], {"w8": w8, "s": s}, features, outputs, threads),
        "onnxruntime MatMulInteger (dynamic u8)": ort_session(
            [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w8t", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "s"], ["both"]), helper.make_node("Mul", ["accf", "both"], ["y"])],
            {"w8t": np.ascontiguousarray(w8.T), "s": s}, features, outputs, threads),
    }
    reference = xs @ dense.numpy().T
    for name, session in sessions.items():
        rows[name] = timed(lambda: session.run(None, {"x": xs}))
        error = np.abs(session.run(None, {"x": xs})[0] - reference).max()
        rows[name + f" (max error {error:.1e})"] = rows.pop(name)
    for name, micros in rows.items():
        print(f"{name:60s} {micros:10.1f} us")


if __name__ == "__main__":
    app()

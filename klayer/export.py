"""A trained network as an ONNX graph or a PyTorch state dict that takes raw pixels.

Both exports hold everything between the pixels and the class probabilities, computed
once here in float64 and stored as float32:

* standardisation x -> x / (255 σ) - μ / σ (σ = 1 where the training images had σ = 0),
  folded into the first affine layer: W_1' = W_1 diag(1 / (255 σ)), b_1' = b_1 - W_1 μ/σ;
* batch norm in eval mode, a per-unit scale and shift with the moving averages
  a = γ / sqrt(v_av + ε), c = β - a ⊙ μ_av;
* layer norm as such (it normalises each example on its own);
* residual connections s_l = W_l x_{l-1} + b_l + x_{l-1};
* dropout: nothing (it is the identity at inference).

ONNX (:func:`onnx_model`, opset 17, IR version 8, built with ``onnx.helper``)::

    pixels        float32 (n, 3072), raw values 0..255 in CIFAR-10's layout (red plane,
                  green plane, blue plane, each 32×32 row-major);
                  input_layout="hwc": (n, 32, 32, 3) -> Transpose, Flatten;
                  input_dtype="uint8": uint8 -> Cast to float32
    hidden l      Gemm(W_l, b_l) [+ Add x_{l-1}] -> norm, Relu in the network's order;
                  batch norm right after the Gemm (norm_position "before", no residual)
                  is folded into it (W ← a W, b ← a b + c), elsewhere it is Mul(a), Add(c);
                  layer norm is LayerNormalization(γ, β, ε) over the last axis
    output        Gemm(W_k, b_k) -> Softmax -> probabilities float32 (n, C)

    metadata_props: class_names (JSON list), klayer_version, config_hash (when known),
    input (the input's description)

PyTorch (:func:`torch_state_dict`): the state dict, float32 tensors only (load it with
``torch.load(path, weights_only=True)``), of the ``nn.Sequential`` listed by
:func:`torch_layout`. For each hidden layer l = 1..k-1::

    nn.Linear(m_{l-1}, m_l)           Residual(nn.Linear(...)) when layer l has a skip
    nn.BatchNorm1d(m_l, eps=ε)        batch norm, with its moving averages (eval mode)
    | nn.LayerNorm(m_l, eps=ε)        layer norm; nothing without normalization
    nn.ReLU()                         before the norm when norm_position is "after"

then ``nn.Linear(m_{k-1}, C)`` and ``nn.Softmax(dim=1)``; standardisation is folded into
the first Linear. ``Residual(linear)`` computes ``x + linear(x)`` and holds it as
``.linear``; docs/export.md ("Using a trained model elsewhere") has it and the function that
rebuilds the Sequential from a run's model.json.

These functions are pure (arrays in, a model out); ``klayer export`` writes the files.
"""

from __future__ import annotations

import json

import numpy as np

from klayer.nn.errors import UserError
from klayer.version import __version__
from klayer.model import check_applicable
from klayer.nn.network import Network

OPSET = 17  # LayerNormalization entered the default domain at opset 17
IR_VERSION = 8  # the IR version that came with opset 17 (newer ones shut out older runtimes)
INPUT_LAYOUTS = ("planes", "hwc")
INPUT_DTYPES = ("float32", "uint8")


def folded_first_layer(net: Network, standardizer) -> tuple[np.ndarray, np.ndarray]:
    """(W_1', b_1') in float64: the first affine layer applied to raw pixels 0..255."""
    std = np.where(standardizer.std > 0, standardizer.std, 1.0)
    W = net.params["W1"].astype(np.float64)
    b = net.params["b1"].astype(np.float64)
    return W / (255.0 * std), b - W @ (standardizer.mean / std)


def batchnorm_scale_shift(net: Network, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) in float64 with BN_eval(s) = a ⊙ s + c for hidden layer ``layer``."""
    p, buf = net.params, net.buffers
    gamma, beta = p[f"gamma{layer}"].astype(np.float64), p[f"beta{layer}"].astype(np.float64)
    a = gamma / np.sqrt(buf[f"running_var{layer}"].astype(np.float64) + net.bn_eps)
    return a, beta - a * buf[f"running_mean{layer}"].astype(np.float64)


# --- ONNX ------------------------------------------------------------------------------


def onnx_model(net: Network, standardizer, class_names, *, input_layout: str = "planes",
               input_dtype: str = "float32", config_hash: str | None = None):
    """The network as a checked ``onnx.ModelProto`` from raw pixels to probabilities.

    input_layout "planes": (n, 3072) CIFAR-10 rows; "hwc": (n, 32, 32, 3) images.
    input_dtype "float32" or "uint8". See the module docstring for the graph.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_applicable(net, standardizer)
    if input_layout not in INPUT_LAYOUTS:
        raise UserError(f"input_layout must be one of {INPUT_LAYOUTS}, got {input_layout!r}")
    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if input_layout == "hwc" and net.input_size != 3 * 32 * 32:
        raise UserError(f"input_layout 'hwc' needs 32x32 RGB inputs (3072 values), but the "
                        f"network takes {net.input_size}")
    nodes, initializers = [], []

    def const(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def op(op_type, inputs, output, **attributes):
        nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    h = "pixels"
    if input_dtype == "uint8":
        h = op("Cast", [h], "pixels_float", to=TensorProto.FLOAT)
    if input_layout == "hwc":
        h = op("Transpose", [h], "pixels_chw", perm=[0, 3, 1, 2])
        h = op("Flatten", [h], "pixels_planes", axis=1)
    k = net.num_layers
    after = net.norm_position == "after"
    for l in range(1, k + 1):
        if l == 1:
            W, b = folded_first_layer(net, standardizer)
        else:
            W, b = (net.params[f"W{l}"].astype(np.float64),
                    net.params[f"b{l}"].astype(np.float64))
        if l == k:
            scores = op("Gemm", [h, const(f"W{l}", W), const(f"b{l}", b)], "scores", transB=1)
            break
        skip = net.has_skip(l)
        fold_bn = net.batch_norm and not after and not skip
        if fold_bn:
            a, c = batchnorm_scale_shift(net, l)
            W, b = a[:, None] * W, a * b + c
        s = op("Gemm", [h, const(f"W{l}", W), const(f"b{l}", b)], f"affine{l}", transB=1)
        if skip:
            s = op("Add", [s, h], f"residual{l}")
        if after:
            s = op("Relu", [s], f"relu{l}")
        if net.batch_norm and not fold_bn:
            a, c = batchnorm_scale_shift(net, l)
            s = op("Mul", [s, const(f"bn_scale{l}", a)], f"bn_scaled{l}")
            s = op("Add", [s, const(f"bn_shift{l}", c)], f"batchnorm{l}")
        elif net.layer_norm:
            s = op("LayerNormalization", [s, const(f"gamma{l}", net.params[f"gamma{l}"]),
                                          const(f"beta{l}", net.params[f"beta{l}"])],
                   f"layernorm{l}", axis=-1, epsilon=net.bn_eps)
        if not after:
            s = op("Relu", [s], f"relu{l}")
        h = s
    op("Softmax", [scores], "probabilities", axis=1)

    d = net.input_size
    shape = ["n", 32, 32, 3] if input_layout == "hwc" else ["n", d]
    elem = TensorProto.UINT8 if input_dtype == "uint8" else TensorProto.FLOAT
    described = (f"pixels: {input_dtype} {tuple(shape)}, raw values 0..255, "
                 + ("height x width x RGB" if input_layout == "hwc" else
                    "CIFAR-10 layout (red plane, green plane, blue plane, each 32x32 "
                    "row-major)"))
    graph = helper.make_graph(
        nodes, "klayer",
        [helper.make_tensor_value_info("pixels", elem, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["n", net.num_classes])],
        initializers, doc_string=described + "; output: class probabilities")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="klayer",
                              producer_version=__version__)
    metadata = {"class_names": json.dumps(list(class_names)), "klayer_version": __version__,
                "input": described, "architecture": json.dumps(net.hyperparameters())}
    if config_hash:
        metadata["config_hash"] = config_hash
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


# --- PyTorch ---------------------------------------------------------------------------


def torch_layout(net: Network) -> list[tuple[str, int]]:
    """The modules of the exported ``nn.Sequential`` in order, as (kind, layer) with kind
    one of "linear", "residual", "batchnorm", "layernorm", "relu", "softmax"."""
    modules = []
    for l in range(1, net.num_layers):
        modules.append(("residual" if net.has_skip(l) else "linear", l))
        norm = [(f"{net.norm}norm", l)] if net.norm else []
        relu = [("relu", l)]
        modules += relu + norm if net.norm_position == "after" else norm + relu
    return modules + [("linear", net.num_layers), ("softmax", net.num_layers)]


def torch_state_dict(net: Network, standardizer) -> dict[str, np.ndarray]:
    """The state dict of the Sequential of :func:`torch_layout` as float32 NumPy arrays
    (``num_batches_tracked``: int64 0), keyed as ``nn.Sequential.state_dict()`` keys it."""
    check_applicable(net, standardizer)
    p, f32 = net.params, np.float32
    state = {}
    for index, (kind, l) in enumerate(torch_layout(net)):
        if kind in ("linear", "residual"):
            if l == 1:
                W, b = folded_first_layer(net, standardizer)
            else:
                W, b = p[f"W{l}"], p[f"b{l}"]
            prefix = f"{index}.linear." if kind == "residual" else f"{index}."
            state[prefix + "weight"], state[prefix + "bias"] = W.astype(f32), b.astype(f32)
        elif kind in ("batchnorm", "layernorm"):
            state[f"{index}.weight"] = p[f"gamma{l}"].astype(f32)
            state[f"{index}.bias"] = p[f"beta{l}"].astype(f32)
            if kind == "batchnorm":
                state[f"{index}.running_mean"] = net.buffers[f"running_mean{l}"].astype(f32)
                state[f"{index}.running_var"] = net.buffers[f"running_var{l}"].astype(f32)
                state[f"{index}.num_batches_tracked"] = np.array(0, np.int64)
    return state

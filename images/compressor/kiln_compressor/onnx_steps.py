"""The ONNX steps: export (torch.onnx, with a parity check), optimize (ORT transformer optimizer or session
level), quantize (ORT dynamic / static QDQ or QOperator) and float16 (ORT's converter, IO and unsafe nodes fp32).

Each step reads one model.onnx and writes another, and returns the facts the report records about it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kiln_artifacts.contract import ParityError, UserError

from .models import Data, Source, feeds, input_features, torch_logits

log = logging.getLogger("kiln_compressor")

# Operators kept in fp32 by the float16 step besides ORT's defaults: the pieces of an unfused LayerNorm/softmax
# that overflow or lose too much in fp16 (x^2, mean of squares, exp), and index-like ops.
UNSAFE_FP16 = ["Pow", "ReduceMean", "Sqrt", "Exp", "Log", "Range", "CumSum"]
# Operators a GPU candidate must not leave on the CPU provider.
HEAVY_OPS = {
    "MatMul",
    "Gemm",
    "Conv",
    "Attention",
    "MultiHeadAttention",
    "FusedMatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "Softmax",
    "FusedConv",
    "NhwcConv",
}


def session(path: Path, provider: str, threads: int = 0, level: str = "All", profile_dir: Path | None = None) -> Any:
    """An ORT session on ``provider`` (CPU as the fallback, as ORT places unsupported nodes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "Disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "Basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "Extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "All": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "ort-profile")
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "CUDAExecutionProvider":
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    elif provider == "TensorrtExecutionProvider":
        cache = Path(profile_dir or path.parent) / "trt-cache"
        opts = {
            "trt_fp16_enable": True,
            "trt_int8_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
        }
        providers = [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=so, providers=providers)


def onnx_logits(
    sess: Any,
    source: Source,
    x: Any,
    max_length: int,
    batch: int = 64,
    features: list[dict[str, Any]] | None = None,
) -> Any:
    """Logits of the session over ``x``; with ``features``, each batch's input signals (`input_features`) are
    appended to it, computed from the very inputs the session was fed."""
    import numpy as np

    names = tuple(i.name for i in sess.get_inputs())
    wanted = names
    if source.text and "attention_mask" in source.tokenizer().model_input_names:
        # The token counts need the attention mask, whether or not the optimised graph still takes it.
        wanted = tuple(dict.fromkeys((*names, "input_ids", "attention_mask")))
    out = []
    for start in range(0, len(x), batch):
        f = feeds(source, x[start : start + batch], max_length, wanted)
        out.append(np.asarray(sess.run(["logits"], {n: f[n] for n in names})[0], dtype=np.float32))
        if features is not None:
            features.append(input_features(source, f))
    return np.concatenate(out)


# --- export -------------------------------------------------------------------------------------------------------


def export(
    model: Any, source: Source, data: Data, out: Path, params: Mapping[str, Any], max_length: int, threads: int
) -> dict[str, Any]:
    """torch.onnx.export (TorchScript exporter: fast, and the graph the ORT fusions match), then parity."""
    import numpy as np
    import torch

    sample = data.x[: min(16, len(data))]
    f = feeds(source, sample, max_length)
    args = tuple(torch.from_numpy(f[n]) for n in source.input_names)
    if source.text:
        axes = {n: {0: "batch", 1: "sequence"} for n in source.input_names}
    else:
        axes = {"pixel_values": {0: "batch"}}
    axes["logits"] = {0: "batch"}
    exporter = "torch.onnx (TorchScript)"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                args,
                str(out),
                input_names=list(source.input_names),
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=int(params["opset"]),
                do_constant_folding=True,
                dynamo=False,
            )
        except torch.onnx.errors.OnnxExporterError as e:
            # e.g. adaptive pooling to a size that does not divide the input (KilnCNN on 28x28): the dynamo
            # exporter decomposes what TorchScript's cannot express.
            log.info("TorchScript exporter failed (%s); exporting with dynamo", str(e).splitlines()[0][:200])
            exporter = "torch.onnx (dynamo)"
            dims = {n: {k: torch.export.Dim(v) for k, v in a.items()} for n, a in axes.items() if n != "logits"}
            torch.onnx.export(
                model,
                args,
                str(out),
                input_names=list(source.input_names),
                output_names=["logits"],
                dynamic_shapes=tuple(dims[n] for n in source.input_names),
                opset_version=max(18, int(params["opset"])),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    import onnx

    onnx.checker.check_model(str(out))
    # Parity: the evaluation samples, plus a batch of another size (and length) to prove the axes are dynamic.
    sess = session(out, "CPUExecutionProvider", threads)
    diff = 0.0
    batches = [sample, data.x[len(sample) : len(sample) + 3] if len(data) > len(sample) + 2 else data.x[:3]]
    for b in batches:
        ref = torch_logits(model, source, b, max_length)
        got = onnx_logits(sess, source, b, max_length)
        diff = max(diff, float(np.max(np.abs(ref - got))))
    tol = float(params["parityTolerance"])
    facts = {
        "exporter": exporter,
        "opset": int(params["opset"]),
        "parityMaxAbsDiff": diff,
        "parityTolerance": tol,
        "paritySamples": int(sum(len(b) for b in batches)),
    }
    if not diff <= tol:
        raise ParityError(
            f"recipe export.parityTolerance: ONNX logits differ from the source model by {diff:.3g} "
            f"(> {tol:g}) on {facts['paritySamples']} evaluation samples"
        )
    return facts


# --- optimize -----------------------------------------------------------------------------------------------------


def optimize(
    src: Path, out: Path, source: Source, params: Mapping[str, Any], use_gpu: bool, where: str
) -> dict[str, Any]:
    """Transformers: ORT's transformer optimizer (fusions, then the session level); images: the session level."""
    import onnx

    level = params["level"]
    facts: dict[str, Any] = {"level": level}
    if source.text:
        from onnxruntime.transformers.optimizer import optimize_model

        from .models import OPTIMIZER_TYPES

        model_type = OPTIMIZER_TYPES.get(source.config.get("model_type", ""), "bert")
        cfg = source.config
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_heads") or 0)
        hidden = int(cfg.get("hidden_size") or cfg.get("dim") or 0)
        # Level All would add CPU-layout (NCHWc) nodes tied to this machine: the fusions need only Extended.
        opt_level = {"Basic": 1, "Extended": 2, "All": 2}[level]
        om = optimize_model(
            str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=opt_level, use_gpu=use_gpu
        )
        fused = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
        om.save_model_to_file(str(out))
        facts.update(tool="onnxruntime.transformers.optimizer", modelType=model_type, optLevel=opt_level)
    else:
        # CNNs: the artifact keeps standard ONNX operators only (Basic: constant folding, redundant nodes), so that
        # any provider and the quantizer can read it; Extended/All fusions (FusedConv, NCHWc layouts) are tied to
        # the provider and CPU, and ORT applies them itself when the serving session loads the model. The fusions
        # checked are those that load-time optimisation at ``level`` makes.
        _session_optimized(src, out, "Basic")
        probe = out.parent / f"{out.stem}-level-{level}.onnx"
        _session_optimized(src, probe, level)
        before = {n.op_type for n in onnx.load(str(src)).graph.node}
        counts: dict[str, int] = {}
        for n in onnx.load(str(probe)).graph.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        probe.unlink()
        fused = {k: v for k, v in counts.items() if k not in before}
        facts.update(tool="onnxruntime graph optimisation", offlineLevel="Basic", sessionLevel=level)
    facts["fusions"] = fused
    missing = [op for op in params["expectFusions"] if not fused.get(op)]
    if missing:
        raise ParityError(
            f"{where}.expectFusions: {', '.join(missing)} did not appear after optimisation "
            f"(fused: {', '.join(f'{k}={v}' for k, v in fused.items()) or 'none'})"
        )
    nodes = len(onnx.load(str(out)).graph.node)
    facts["nodes"] = nodes
    return facts


def _session_optimized(src: Path, out: Path, level: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "Basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "Extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "All": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


# --- quantize -----------------------------------------------------------------------------------------------------


class _Reader:
    """ORT CalibrationDataReader over the calibration samples (batches of 8)."""

    def __init__(self, source: Source, x: Any, names: tuple[str, ...], max_length: int) -> None:
        self.batches: Iterator[dict[str, Any]] = iter(
            [feeds(source, x[i : i + 8], max_length, names) for i in range(0, len(x), 8)]
        )

    def get_next(self) -> dict[str, Any] | None:
        return next(self.batches, None)


def quantize(
    src: Path,
    out: Path,
    source: Source,
    params: Mapping[str, Any],
    calibration: Data | None,
    provider: str,
    max_length: int,
    work: Path,
) -> dict[str, Any]:
    import onnx
    from onnxruntime import quantization as q

    facts: dict[str, Any] = {"mode": params["mode"], "perChannel": params["perChannel"], "tool": "onnxruntime"}
    # Pre-processing (symbolic shape inference + basic ORT optimisation) gives the quantizer full shapes.
    prep = work / "preprocessed.onnx"
    cwd = os.getcwd()
    os.chdir(work)  # symbolic shape inference drops sym_shape_infer_temp.onnx (+ data) into the cwd on failure
    try:
        q.quant_pre_process(str(src), str(prep), skip_optimization=True)
    except Exception as e:  # shape inference can fail on contrib ops; quantization works without it
        log.info("quant_pre_process skipped: %s", e)
        prep = src
    finally:
        os.chdir(cwd)
    if params["mode"] == "Dynamic":
        # Every operator ORT can quantize dynamically, embeddings (Gather / EmbedLayerNormalization) included:
        # they are half of a small encoder's weights.
        q.quantize_dynamic(
            str(prep),
            str(out),
            weight_type=q.QuantType.QInt8,
            per_channel=params["perChannel"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        facts.update(format="QOperator (IntegerOps)", weightType="QInt8")
    else:
        assert calibration is not None
        cal = params["calibration"]
        names = tuple(i.name for i in onnx.load(str(src), load_external_data=False).graph.input)
        x = calibration.x[: cal["samples"]]
        reader = _Reader(source, x, names, max_length)
        # TensorRT wants symmetric S8S8 QDQ; on CPUs U8S8 (uint8 activations, int8 weights) is the fast path of
        # ORT's kernels on AVX2 (VPMADDUBSW): MiniLM static QDQ at batch 1 ran at 0.8x of fp32 with U8S8 and 1.3x
        # with S8S8 on the development machine (AVX2, no VNNI).
        symmetric = provider == "TensorrtExecutionProvider"
        activation = q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8
        q.quantize_static(
            str(prep),
            str(out),
            reader,  # type: ignore[arg-type]
            quant_format=q.QuantFormat.QDQ if params["format"] == "QDQ" else q.QuantFormat.QOperator,
            per_channel=params["perChannel"],
            activation_type=activation,
            weight_type=q.QuantType.QInt8,
            calibrate_method={
                "MinMax": q.CalibrationMethod.MinMax,
                "Entropy": q.CalibrationMethod.Entropy,
                "Percentile": q.CalibrationMethod.Percentile,
            }[cal["method"]],
            # Transformers: the matrix products and the embedding table (quantizing softmax/layernorm inputs
            # costs accuracy for no size gain).
            op_types_to_quantize=["MatMul", "Gemm", "Gather"] if source.text else None,
            extra_options={
                "ActivationSymmetric": symmetric,
                "WeightSymmetric": True,
                "DefaultTensorType": onnx.TensorProto.FLOAT,
            },
        )
        facts.update(
            format=params["format"],
            activationType="QInt8" if symmetric else "QUInt8",
            weightType="QInt8",
            method=cal["method"],
            calibrationSamples=len(x),
            calibrationDataset=calibration.uri,
            calibrationDigest=calibration.digest,
        )
    counts: dict[str, int] = {}
    for n in onnx.load(str(out)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    int_ops = {k: v for k, v in counts.items() if "Integer" in k or k.startswith("QLinear") or k.startswith("Q")}
    facts["quantizedOps"] = int_ops
    if not int_ops:
        raise UserError(f"quantize: nothing was quantized in this model (operators: {sorted(counts)})")
    return facts


# --- float16 ------------------------------------------------------------------------------------------------------


def float16(src: Path, out: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(UNSAFE_FP16) | set(params["blockList"]))
    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=params["keepIOTypes"], op_block_list=block)
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(converted).topological_sort()  # the converter appends the Casts it inserts at the end
    onnx.save(converted, str(out))
    onnx.checker.check_model(str(out))
    kept = sum(1 for n in converted.graph.node if n.op_type in block)
    return {
        "tool": "onnxruntime.transformers.float16",
        "keepIOTypes": params["keepIOTypes"],
        "blockList": [b for b in block if b in UNSAFE_FP16 or b in params["blockList"]],
        "nodesKeptFp32": kept,
    }

"""int8 quantization of exported graphs with ONNX Runtime, the Turbo merge kept in float.

``quantize_graph(src, dst, mode)`` works on any exported graph (ViT, BLIP vision / text, SD UNet, plain or Turbo):

1. **Cleanup** (float graph in, float graph out; ``cleanup_graph``): Reshape -> Gemm -> Reshape chains that ONNX
   Runtime's graph optimizer writes for a Linear on a 3-D activation go back to MatMul + Add, duplicate nodes
   (same op, same inputs, same attributes; equal small constants count as the same input) become one, Identity
   nodes go, and an Add of a constant all-zero tensor that does not change the shape (the attention mask of an
   unmasked image model) is bypassed. Why it matters: the quantizer puts one DynamicQuantizeLinear (or one Q/DQ
   pair) on each distinct activation a MatMul reads, so q, k and v reading three reshaped copies of the same
   LayerNorm output cost three quantizations instead of one. The dynamo export itself has q, k and v share the
   LayerNorm output (ViT-B: 50 DynamicQuantizeLinear, 49 Reshapes, as in optimum's graph); the copies come from
   ONNX Runtime's quantization pre-processing (``quant_pre_process``, which ``quantize_dynamic``'s warning asks
   for, or any model saved by an ONNX Runtime session): its MatMulAddFusion turns every MatMul + Add on a 3-D
   activation into Reshape -> Gemm -> Reshape, one input Reshape per projection (ViT-B: 74 and 193). The
   cleanup makes either input give the same 50 / 49, and the quantizer's warning is answered (shapes inferred).
2. **Merge exclusion** (``merge_nodes``): the Turbo merge's nodes are found from the graph's structure and passed
   as ``nodes_to_exclude``, so the matching (similarity of the normalised keys, ReduceMax / ArgMax, TopK) and the
   token movement (row Gathers, the one-hot MatMul, GatherElements / ScatterElements / ScatterND and the size
   bookkeeping around them) stay float.
3. **Quantization**: ``dynamic`` = ``quantize_dynamic`` (int8 weights, activations quantized at run time);
   ``static`` = ``quantize_static`` in QDQ format (int8 weights and activations), calibrated on the caller's feeds
   (``calibration``) or, when none are given, on seeded random inputs (``seeded_calibration``), which the report
   says; a random-weight preset has nothing better to calibrate on, a real checkpoint should pass real data.

The returned ``QuantizeReport`` says what was excluded and why, and counts DynamicQuantizeLinear / Q / DQ /
Reshape / MatMul nodes before the cleanup, after it, and in the quantized graph.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from turbo_export.errors import TurboExportError
from turbo_export.export.graph_cleanup import (
    TURBO_DOMAIN,
    MergeExclusion,
    _counted,
    cleanup_graph,
    merge_nodes,
    op_counts,
)
from turbo_export.export.tensor_symbols import name_symbols_per_tensor
from turbo_export.export.weight_folding import fold_weight_transposes
from turbo_export.logs import quieted

MODES = ("dynamic", "static")
TWO_GB = 2**31

# static QDQ: quantize the ops that carry the FLOPs; QDQ around LayerNorm / Softmax / elementwise ops only adds
# conversions on a CPU (no int8 kernels for them) and costs accuracy
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")
# dynamic int8 leaves Conv float: ONNX Runtime's CPU ConvInteger is 4-5x slower than its float Conv (measured with
# ONNX Runtime 1.32 on 2 cores: ViT-B/16's 16x16 patch embedding at batch 8 7.2 ms float vs 30.9 ms ConvInteger; an
# SD UNet 3x3 conv, 320 channels at 64x64, batch 2: 46 vs 250 ms). The MatMuls carry a ViT's FLOPs anyway.
DYNAMIC_SKIPPED_OP_TYPES = ("Conv",)


# ---- the report ------------------------------------------------------------------------------------------------

@dataclass
class QuantizeReport:
    src: str
    dst: str
    mode: str
    weight_type: str
    activation_type: str
    per_channel: bool
    op_types: list[str]
    excluded: MergeExclusion
    # also kept float: the caller's nodes_to_exclude and, in static mode with MatMulConstBOnly, attention's
    # activation x activation MatMuls (ONNX Runtime's QDQ quantizer ignores that option)
    extra_excluded: list[str]
    # op counts of the graph as given, after the cleanup (float), and quantized
    counts_src: dict[str, int]
    counts_cleaned: dict[str, int]
    counts_dst: dict[str, int]
    cleanup: list[str]
    calibration: str | None
    seconds: float
    dst_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["excluded"]["summary"] = self.excluded.summary()
        return out

    def lines(self) -> list[str]:
        def counts(c: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {c.get(k, 0)}" for k in ("DynamicQuantizeLinear", "QuantizeLinear", "Reshape",
                                                                "MatMul", "MatMulInteger") if c.get(k, 0))
        channel = ", per channel" if self.per_channel else ""
        out = [(f"int8 {self.mode} ({self.weight_type} weights{channel}, {self.activation_type} activations): "
                f"{os.path.basename(self.src)} -> {os.path.basename(self.dst)} in {self.seconds:.1f} s")]
        out.append(f"  cleanup: {'; '.join(self.cleanup) if self.cleanup else 'nothing to do'}")
        out.append(f"  float graph: {counts(self.counts_src)}; cleaned: {counts(self.counts_cleaned)}")
        out.append(f"  int8 graph: {counts(self.counts_dst)}")
        out.append(f"  merge: {self.excluded.summary()}")
        if self.excluded.names:
            out.append(f"    why: {self.excluded.reason}")
        if self.calibration:
            out.append(f"  calibration: {self.calibration}")
        return out


# ---- calibration -----------------------------------------------------------------------------------------------

class SeededCalibration(list):
    """Calibration feeds drawn from a seeded generator (a list of feeds), with the sentence the report shows."""

    description: str = ""


def seeded_calibration(input_specs: Any, n: int = 8, seed: int = 0, int_high: int = 2) -> SeededCalibration:
    """``n`` seeded random feeds for a graph's inputs, to calibrate a random-weight preset that has no data.

    ``input_specs``: an ONNX file's path, a runner's ``inputs`` (objects with name / shape / dtype), or a mapping
    name -> (shape, dtype) or name -> example array. Float inputs draw from N(0, 1), integer inputs from
    [0, ``int_high``). The result is a list of feeds; its ``description`` says what they are, for the report.
    """
    if n < 1:
        raise TurboExportError(f"calibration: need at least one seeded feed, got n={n}")
    specs = _input_specs(input_specs)
    rng = np.random.default_rng(seed)
    feeds = SeededCalibration()
    for _ in range(n):
        feed = {}
        for name, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            if np.issubdtype(dtype, np.floating):
                feed[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[name] = np.ones(shape, dtype=bool)
            else:
                feed[name] = rng.integers(0, int_high, size=shape).astype(dtype)
        feeds.append(feed)
    feeds.description = (f"{n} seeded random feeds (seed {seed}; float inputs N(0, 1)): no calibration data was "
                         "given; fine for a random-weight preset, not representative of real inputs")
    return feeds


def _input_specs(input_specs: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if isinstance(input_specs, (str, os.PathLike)):
        import onnx
        from onnx import helper

        model = onnx.load(str(input_specs), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        specs = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
            specs[vi.name] = (shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return specs
    if isinstance(input_specs, Mapping):
        out = {}
        for name, spec in input_specs.items():
            if hasattr(spec, "shape") and hasattr(spec, "dtype"):
                out[name] = (tuple(spec.shape), np.dtype(str(spec.dtype).replace("torch.", "")))
            else:
                shape, dtype = spec
                out[name] = (tuple(shape), np.dtype(dtype))
        return out
    out = {}
    for info in input_specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in info.shape)
        out[info.name] = (shape, np.dtype(info.dtype))
    return out


def _calibration_reader(feeds: list[dict[str, np.ndarray]], input_names: Sequence[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._it, None)
            return None if feed is None else {k: feed[k] for k in input_names}

        def rewind(self) -> None:
            self._it = iter(feeds)

    return FeedReader()


def _check_feeds(feeds: list[Mapping[str, Any]], input_names: Sequence[str], src: str) -> list[dict[str, np.ndarray]]:
    if not feeds:
        raise TurboExportError(f"calibration: no feeds to calibrate {os.path.basename(src)} on (an empty list); "
                               "give at least one, or calibration=None to calibrate on seeded random inputs")
    out = []
    for k, feed in enumerate(feeds):
        missing = [n for n in input_names if n not in feed]
        if missing:
            raise TurboExportError(f"calibration: feed {k} lacks input(s) {', '.join(missing)} of "
                                   f"{os.path.basename(src)} (it has {', '.join(sorted(feed)) or 'none'})")
        out.append({n: np.asarray(feed[n].detach().cpu().numpy() if hasattr(feed[n], "detach") else feed[n])
                    for n in input_names})
    return out


# ---- the entry point -------------------------------------------------------------------------------------------

def quantize_graph(
    src: str,
    dst: str,
    mode: str = "dynamic",
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    *,
    per_channel: bool | None = None,
    op_types: Sequence[str] | None = None,
    exclude_merge: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    cleanup: bool = True,
    calibration_size: int = 8,
    calibration_method: str = "minmax",
    symmetric_activations: bool = False,
    extra_options: Mapping[str, Any] | None = None,
) -> QuantizeReport:
    """Quantize the ONNX file ``src`` to int8 into ``dst``; the merge's nodes stay float.

    mode: ``dynamic`` (int8 weights, uint8 activations quantized at run time by DynamicQuantizeLinear; the ONNX
    Runtime CPU default) or ``static`` (QDQ: int8 weights and int8 activations with scales from calibration).
    calibration (static): the feeds to calibrate on, each {input name: array}; None calibrates on
    ``calibration_size`` seeded random feeds (``seeded_calibration``), which the report says; an empty
    iterable is a TurboExportError. Its ``description`` attribute, if any, goes into the report.
    per_channel: per-output-channel weight scales; default True for static, False for dynamic (per tensor is
    what one ``quantize_dynamic`` call does; on ViT-B with seeded weights per channel moves the logits' cosine to
    the fp32 graph only from 0.99893 to 0.99917).
    op_types: the op types to quantize; default ONNX Runtime's dynamic set but Conv (MatMul, Gather, ...; see
    ``DYNAMIC_SKIPPED_OP_TYPES``) for dynamic, ``STATIC_OP_TYPES`` (MatMul, Gemm, Conv) for static. MatMuls whose B
    is an activation (attention scores, probabilities x values) stay float in both modes unless ``extra_options``
    says ``MatMulConstBOnly: False``.
    symmetric_activations (static): zero-point-0 activation scales, which TensorRT's explicit quantization needs;
    the default (asymmetric) suits ONNX Runtime's CPU kernels.
    cleanup: run ``cleanup_graph`` first (fewer quantize nodes and Reshapes; see the module docstring).
    extra_options: passed to ONNX Runtime's quantizer on top of the above.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    if mode not in MODES:
        raise TurboExportError(f"int8 mode: unknown '{mode}'; choose one of {', '.join(MODES)}")
    if not os.path.isfile(src):
        raise TurboExportError(f"ONNX file '{src}' does not exist")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise TurboExportError(f"quantize: the int8 graph needs its own file, not '{src}' itself")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibration_method not in methods:
        raise TurboExportError(f"calibration method: unknown '{calibration_method}'; choose one of "
                               f"{', '.join(methods)}")
    start = time.perf_counter()
    feeds: list[dict[str, np.ndarray]] | None = None
    calibration_note = None
    if mode == "static":
        input_names = _graph_input_names(src)
        if calibration is None:
            calibration = seeded_calibration(src, calibration_size)
        description = getattr(calibration, "description", None)
        feeds = _check_feeds(list(calibration), input_names, src)
        calibration_note = description or f"{len(feeds)} caller-supplied feeds"
    per_channel = (mode == "static") if per_channel is None else per_channel
    if op_types is None:
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        op_types = [o for o in IntegerOpsRegistry if o not in DYNAMIC_SKIPPED_OP_TYPES] if mode == "dynamic" \
            else list(STATIC_OP_TYPES)
    options = {"MatMulConstBOnly": True, **dict(extra_options or {})}

    large = _file_bytes(src) >= TWO_GB
    # the graph without its external weights: the cleanup and the exclusions read nodes and small constants only,
    # and loading a large model's weights here (3.4 GB for SD 1.5's UNet) would hold them twice while quantizing
    model = onnx.load(src, load_external_data=False)
    counts_src = op_counts(model)
    notes: list[str] = []
    if cleanup:
        model, notes = cleanup_graph(model)
        folded = fold_weight_transposes(model, os.path.dirname(os.path.abspath(src)))
        if folded:
            notes.append(f"folded {folded} transposed weights into initializers (the quantizer quantizes only "
                         "MatMuls whose weight is an initializer)")
    counts_cleaned = op_counts(model)
    exclusion = merge_nodes(model, op_types) if exclude_merge else MergeExclusion(reason="merge exclusion off")
    exclude = list(dict.fromkeys([*exclusion.names, *nodes_to_exclude]))
    activation_matmuls: list[str] = []
    if mode == "static" and options["MatMulConstBOnly"]:
        # ONNX Runtime's QDQ quantizer ignores MatMulConstBOnly: keep attention's activation x activation MatMuls
        # (scores, probabilities x values) float ourselves, as dynamic mode does
        merged = set(exclude)
        activation_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in merged
                              and not any(_is_initializer(model, i) for i in n.input[:2])]
        exclude += activation_matmuls
    add_pre_process_metadata(model)  # shape inference and cleanup done: no pre-processing warning
    has_turbo = any(n.domain == TURBO_DOMAIN for n in model.graph.node)
    if any(n.domain not in ("", "ai.onnx", "com.microsoft") for n in model.graph.node):
        # shape inference knows no custom op (turbo.TurboMerge): a tensor it cannot type is float
        options.setdefault("DefaultTensorType", onnx.TensorProto.FLOAT)

    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    # the cleaned graph goes beside ``src``, so that its external weights (named relative to the graph) still resolve
    src_dir, src_name = os.path.split(os.path.abspath(src))
    cleaned = os.path.join(src_dir, f".cleaned-{os.getpid()}-{src_name}")
    try:
        onnx.save_model(model, cleaned)
    except OSError:  # a read-only folder: the graph and its weights go to a temporary folder instead
        cleaned = os.path.join(tempfile.mkdtemp(prefix="quantize-"), src_name)
        onnx.load_external_data_for_model(model, src_dir)
        onnx.save_model(model, cleaned, save_as_external_data=large, all_tensors_to_one_file=True,
                        location=src_name + ".data")
    del model
    try:
        with _quiet_quantizer():
            if mode == "dynamic":
                quantize_dynamic(cleaned, dst, op_types_to_quantize=list(op_types), per_channel=per_channel,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=large,
                                 extra_options=options)
                weight_type, activation_type = "int8", "uint8 (dynamic)"
            else:
                reader = _calibration_reader(feeds, _graph_input_names(src))
                static_options = {
                    "ActivationSymmetric": symmetric_activations,
                    # Q/DQ on the inputs only: ONNX Runtime runs DQ -> MatMul as one integer MatMul with a float output
                    "OpTypesToExcludeOutputQuantization": list(op_types), **options}
                with _turbo_ops_in_calibration(has_turbo):
                    quantize_static(cleaned, dst, reader, quant_format=QuantFormat.QDQ,
                                    op_types_to_quantize=list(op_types), per_channel=per_channel,
                                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                    nodes_to_exclude=exclude, use_external_data_format=large,
                                    calibrate_method=methods[calibration_method], extra_options=static_options)
                weight_type, activation_type = "int8", "int8 (static, QDQ)"
    finally:
        os.remove(cleaned)
        if os.path.dirname(cleaned) != src_dir:
            shutil.rmtree(os.path.dirname(cleaned), ignore_errors=True)
    quantized = onnx.load(dst, load_external_data=False)
    if name_symbols_per_tensor(quantized):  # the quantizer's new tensors too; see tensor_symbols
        onnx.save(quantized, dst)
        notes.append("each intermediate tensor given its own names for the symbolic dimensions (see tensor_symbols)")
    counts_dst = op_counts(quantized)
    del quantized
    return QuantizeReport(
        src=src, dst=dst, mode=mode, weight_type=weight_type, activation_type=activation_type,
        per_channel=per_channel, op_types=sorted(op_types), excluded=exclusion,
        extra_excluded=[*nodes_to_exclude, *activation_matmuls],
        counts_src=_counted(counts_src), counts_cleaned=_counted(counts_cleaned), counts_dst=_counted(counts_dst),
        cleanup=notes, calibration=calibration_note, seconds=time.perf_counter() - start, dst_bytes=_file_bytes(dst),
    )


def naive_quantize_dynamic(src: str, dst: str) -> None:
    """One plain ``quantize_dynamic`` call (int8 weights): what a user does to any ONNX file; the reference."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=_file_bytes(src) >= TWO_GB)


def _is_initializer(model: Any, name: str) -> bool:
    return any(t.name == name for t in model.graph.initializer) or any(
        n.op_type == "Constant" and name in n.output for n in model.graph.node)


def _graph_input_names(path: str) -> list[str]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _file_bytes(path: str) -> int:
    total = os.path.getsize(path)
    folder = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(Exception):
        import onnx

        model = onnx.load(path, load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum(os.path.getsize(os.path.join(folder, loc)) for loc in locations
                     if os.path.isfile(os.path.join(folder, loc)))
    return total


@contextlib.contextmanager
def _turbo_ops_in_calibration(active: bool):
    """Calibration runs the graph in an ONNX Runtime session that ``quantize_static`` makes itself; a graph with
    turbo.TurboMerge nodes (--merge-impl plugin) needs their Python reference kernels registered in it."""
    if not active:
        yield
        return
    from onnxruntime.quantization import calibrate

    from turbo_export.core.plugin_ops import import_turbo_plugin

    import_turbo_plugin()
    try:
        from turbo_plugin import ort_ops
    except ImportError as exc:
        raise TurboExportError(f"static int8 of a graph with turbo.TurboMerge nodes calibrates through "
                               f"onnxruntime-extensions ({exc}); pip install 'turbo-export[plugin]'") from None

    real = calibrate.onnxruntime

    class WithTurboOps:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def SessionOptions() -> Any:  # onnxruntime's name
            return ort_ops.session_options(real.SessionOptions())

    calibrate.onnxruntime = WithTurboOps()
    try:
        yield
    finally:
        calibrate.onnxruntime = real


def _quiet_quantizer():
    """ONNX Runtime's quantizer logs warnings and progress at the root logger; keep output readable."""
    return quieted("")


# ---- fp16 ------------------------------------------------------------------------------------------------------

def check_fp16_onnxruntime() -> str | None:
    """None when ONNX Runtime has the CUDA execution provider (fp16 graphs run there), else the one-line reason."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime cannot be imported ({exc})"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return None
    return (f"fp16 with ONNX Runtime needs the CUDA execution provider (onnxruntime-gpu and a CUDA GPU); this "
            f"onnxruntime {ort.__version__} has only {', '.join(providers)}, and its CPU kernels lack fp16 for most "
            "ops, the UNet merge's ScatterElements(reduction='add') among them")

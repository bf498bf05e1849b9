"""The efficiency rows of one variant on one task: latency, throughput, memory, energy, FLOPs, size.

:func:`profile_variant` measures a loaded variant on the first ``batch_size`` readable images of
a dataset split, the way inference runs it (the task's prompts, the family's encode and generate),
and returns long-format rows, one per measure: ``measure``, ``value`` (None where it cannot be
measured), ``unit``, ``method`` and ``note`` (why a value is missing, or what it leaves out).

Generative tasks (captioning, vqa, real_vs_generated) generate exactly ``max_new_tokens`` tokens
(``min_new_tokens`` equal, greedy), so that a variant that stops early does not look faster:

- ``latency_ms_p50`` / ``latency_ms_p95``: one batch, end to end (encode excluded: the batch is
  encoded once, moved to the model's device, then generated from ``repeats`` times);
- ``prefill_ms_p50``: the same with one new token (the image encoder and the prompt's forward);
- ``decode_ms_per_token_p50``: (end to end - prefill) / (max_new_tokens - 1), medians;
- ``vision_ms_p50``: the vision part's transformer layers alone (forward hooks on its first and
  last layer, during the prefill), for families whose parts name a vision encoder;
- roofline (:mod:`vlmopt.profiling.roofline`): ``decode_weight_bytes_per_step`` (the weights a
  decode step reads), ``decode_bandwidth_gb_s`` (those bytes over ``decode_ms_per_token_p50``) and
  its ``decode_bandwidth_fraction`` of the device's peak; ``prefill_tflops`` and its
  ``prefill_compute_fraction`` of peak compute; the peaks are a known GPU's vendor figures, else
  measured, and the method says which.

``first_call_ms`` is the call before the warm-up (compilation and first-touch costs), and the
inputs are described by ``input_image_px_per_sample`` (the images as handed to the processor),
``prompt_tokens_per_sample`` (text tokens of the prompt), ``input_tokens_per_sample`` (the encoded
``input_ids`` width, image placeholders included) and ``pixel_values_per_sample`` (elements of the
encoded image tensors), so that a sweep over image size or prompt length shows what the model got.

Similarity tasks (retrieval, classification) time the image side, the per-sample work of both:
``adapter.embed_images`` on the batch (class or caption texts are embedded once per split).

Per-sample values divide by the batch size. Memory is the peak over one timed call (process RSS
on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU); energy covers the timed calls (NVML on
a GPU, RAPL on a CPU where readable, else None and the reason); FLOPs count one call with
``torch.utils.flop_counter``. Size rows come from the variant's ``manifest.json``. A simulated
variant (fake-quantized weights in float tensors) keeps the dense model's latency and memory; its
rows say so in ``note``. A packed variant whose Linears run on a low-bit kernel
(:func:`vlmopt.compress.kernels.use_kernels`, ``kernel``) is measured as it runs: every row carries
the kernel in ``kernel`` (``none`` for dense weights), and the rows stay ``simulated`` unless every
packed Linear ran on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from vlmopt.compress.kernels import NONE as NO_KERNEL
from vlmopt.compress.kernels import KernelUse
from vlmopt.device import model_device, to_model_device
from vlmopt.infer import cache_kwargs, cache_name
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.profiling.energy import EnergyMeter
from vlmopt.profiling.flops import count_flops
from vlmopt.profiling.latency import VisionTimer, measure_latency
from vlmopt.profiling.memory import PeakMemory
from vlmopt.profiling.roofline import decode_weight_bytes, device_peaks
from vlmopt.profiling.sweep import lengthen_prompts, resize_longest
from vlmopt.streaming import image_batches
from vlmopt.tasks import get_task

__all__ = ["DEFAULTS", "HEADLINE", "not_measured", "profile_variant", "runs_simulated", "size_rows"]

log = logging.getLogger(__name__)

#: Profiling settings (the study's ``profiling:`` section overrides them).
DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "warmup": 3,
    "repeats": 10,
    "energy_idle_s": 1.0,
    # Seconds of work the energy region lasts at least, where a counter is read.
    "energy_min_s": 1.0,
    "compile_backend": "inductor",
    # Run packed variants' Linears through a low-bit kernel where one exists (vlmopt.compress.kernels).
    "kernels": True,
}
#: The measures a configuration that cannot be measured still has a row of (value None, note why).
HEADLINE = {
    "latency_ms_p50": "ms",
    "latency_ms_per_sample_p50": "ms/sample",
    "throughput_samples_per_s": "samples/s",
    "peak_mem_mb": "MiB",
    "energy_j_per_sample": "J/sample",
    "gflops_per_sample": "GFLOP/sample",
}


def _row(measure: str, value: float | None, unit: str, method: str, note: str | None = None) -> dict[str, Any]:
    return {
        "measure": measure,
        "value": None if value is None else float(value),
        "unit": unit,
        "method": method,
        "note": note,
    }


def _batch(loaded: LoadedModel, table: pd.DataFrame, dataset_root: str | Path, task: str, batch_size: int):
    """The first ``batch_size`` readable rows: (rows, images)."""
    spec = get_task(task)
    missing = [c for c in ("sample_id", "image", *spec.columns) if c not in table.columns]
    if missing:
        raise ValueError(f"the profiling table has no column(s) {missing} needed by task {task!r}")
    rows, images = [], []
    # Read a batch at a time, only as far as the first batch_size readable images.
    for read in image_batches(table, dataset_root, batch_size):
        for i, image, error in zip(read.rows, read.images, read.errors, strict=True):
            if error is not None:
                log.warning("profiling skips %s: %s", table["sample_id"].iloc[i], error)
            elif len(rows) < batch_size:
                rows.append(i)
                images.append(image)
        if len(rows) == batch_size:
            break
    if len(rows) < batch_size:
        raise ValueError(f"profiling needs {batch_size} readable images; the split has {len(rows)}")
    return table.iloc[rows].reset_index(drop=True), images


def _timed_rows(
    name: str, fn: Callable[[], Any], settings: dict[str, Any], device: torch.device, batch: int
) -> tuple[list[dict[str, Any]], float]:
    stats = measure_latency(fn, warmup=settings["warmup"], repeats=settings["repeats"], device=device)
    rows = [
        _row(f"{name}_p50", stats.median_ms, "ms", stats.method),
        _row(f"{name}_p95", stats.p95_ms, "ms", stats.method),
    ]
    if name == "latency_ms":
        per = f"{stats.method}; divided by batch size {batch}"
        rows += [
            _row("latency_ms_per_sample_p50", stats.median_ms / batch, "ms/sample", per),
            _row("latency_ms_per_sample_p95", stats.p95_ms / batch, "ms/sample", per),
            _row("latency_spread", (stats.max_ms - stats.min_ms) / stats.median_ms, "fraction", "(max - min) / median"),
        ]
    return rows, stats.median_ms


def not_measured(
    reason: str, *, batch_size: int, device: str, simulated: bool = False, kernel: str = NO_KERNEL
) -> pd.DataFrame:
    """The :data:`HEADLINE` rows of a configuration that cannot be measured: values None, ``reason`` in note."""
    df = pd.DataFrame([_row(m, None, unit, "not measured", reason) for m, unit in HEADLINE.items()])
    df["batch_size"] = batch_size
    df["device"] = device
    df["simulated"] = simulated
    df["kernel"] = kernel
    return df


def runs_simulated(manifest: dict[str, Any] | None, kernel: KernelUse | None) -> bool:
    """Whether a variant's cost is the dense model's standing in: a simulated method whose packed
    Linears do not all run on a low-bit kernel."""
    return bool(manifest and manifest.get("simulated")) and not (kernel is not None and kernel.complete)


def _cost_note(manifest: dict[str, Any] | None, kernel: KernelUse | None) -> str | None:
    if kernel is not None and kernel.replaced:
        if kernel.complete:
            return f"packed variant: {kernel.describe()}"
        return f"partly simulated: {kernel.describe()}; the others run as dense floats"
    if manifest and manifest.get("simulated"):
        why = f" ({kernel.reason})" if kernel is not None and kernel.packed and kernel.reason else ""
        return (
            "simulated variant: weights are fake-quantized in float tensors, so latency and memory are the "
            f"dense model's{why}"
        )
    return None


def profile_variant(
    loaded: LoadedModel,
    table: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    *,
    settings: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
    image_size: int | None = None,
    prompt_length: int | None = None,
    sizes: bool = True,
    kernel: KernelUse | None = None,
) -> pd.DataFrame:
    """Efficiency rows of ``loaded`` on ``task`` (see the module docstring), plus size rows from ``manifest``
    unless ``sizes`` is false. ``kernel`` says which low-bit kernel the packed Linears of ``loaded``
    run on (:func:`vlmopt.compress.kernels.use_kernels`).

    ``image_size`` resizes the images to that longest side before encoding; ``prompt_length``
    lengthens each prompt to that many text tokens (:mod:`vlmopt.profiling.sweep`). Parameters are
    frozen while it runs (the FLOP counter's module tracker fails on parameters that require
    gradients inside inference mode) and restored afterwards.
    """
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    loaded.model.requires_grad_(False)
    try:
        with torch.inference_mode():
            return _profile(
                loaded,
                table,
                dataset_root,
                task,
                settings,
                generation,
                manifest,
                image_size,
                prompt_length,
                sizes,
                kernel,
            )
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _profile(
    loaded: LoadedModel,
    table: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    settings: dict[str, Any] | None,
    generation: dict[str, Any] | None,
    manifest: dict[str, Any] | None,
    image_size: int | None = None,
    prompt_length: int | None = None,
    sizes: bool = True,
    kernel: KernelUse | None = None,
) -> pd.DataFrame:
    settings = {**DEFAULTS, **(settings or {})}
    batch = int(settings["batch_size"])
    if batch < 1:
        raise ValueError(f"profiling.batch_size must be at least 1, got {batch}")
    if task not in loaded.adapter.tasks:
        raise ValueError(f"family {loaded.family!r} cannot run task {task!r}; it runs {list(loaded.adapter.tasks)}")
    spec = get_task(task)
    device = model_device(loaded.model)
    simulated = runs_simulated(manifest, kernel)
    kernel_name = kernel.kernel if kernel is not None else NO_KERNEL
    if prompt_length is not None and spec.kind == "similarity":
        reason = f"prompt_length does not apply: task {task} embeds images only in the timed call"
        return not_measured(reason, batch_size=batch, device=str(device), simulated=simulated, kernel=kernel_name)
    rows_df, images = _batch(loaded, table, dataset_root, task, batch)
    if image_size is not None:
        images = resize_longest(images, image_size)
    loaded.model.eval()
    note = _cost_note(manifest, kernel)
    out: list[dict[str, Any]] = [
        _row(
            "input_image_px_per_sample",
            sum(im.size[0] * im.size[1] for im in images) / batch,
            "pixels/sample",
            "width x height of the images handed to the processor, mean",
        )
    ]
    if spec.kind == "similarity":

        def full() -> Any:
            return loaded.adapter.embed_images(loaded, images)

        what = "image embedding of one batch (adapter.embed_images)"
        new_tokens = 0
    else:
        generation = {"max_new_tokens": 20, "num_beams": 1, **(generation or {})}
        new_tokens = int(generation["max_new_tokens"])
        if new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 to profile generation, got {new_tokens}")
        prompts = spec.prompts(rows_df, loaded.adapter)
        if prompt_length is not None:
            prompts, counts = lengthen_prompts(loaded.tokenizer, prompts, prompt_length)
        else:
            counts = [len(text_ids(loaded.tokenizer, p)) for p in prompts]
        encoded = loaded.adapter.encode(loaded, images, prompts)
        encoded.inputs = to_model_device(encoded.inputs, loaded.model)
        tensors = [t for t in encoded.inputs.values() if isinstance(t, torch.Tensor)]
        pixels = sum(t.numel() for t in tensors if torch.is_floating_point(t))
        # Encoder-decoder families that draw the prompt into the image (Pix2Struct) have decoder ids only.
        ids = next((k for k in ("input_ids", "decoder_input_ids") if k in encoded.inputs), None)
        out += [
            _row("prompt_tokens_per_sample", sum(counts) / batch, "tokens/sample", "text tokens of the prompt, mean"),
            _row(
                "input_tokens_per_sample",
                encoded.inputs[ids].shape[1] if ids else None,
                "tokens/sample",
                f"width of the encoded {ids or 'input ids'} (image placeholder tokens and padding included)",
                None if ids else "the family's encoded inputs have no token ids",
            ),
            _row(
                "pixel_values_per_sample",
                pixels / batch,
                "values/sample",
                "elements of the encoded image tensors (what the processor made of the images)",
            ),
        ]
        kwargs = {k: v for k, v in generation.items() if k not in ("max_new_tokens", "min_new_tokens")}
        kwargs["do_sample"] = False

        cache = cache_kwargs(loaded)

        def generate(n: int) -> Callable[[], Any]:
            return lambda: loaded.adapter.generate(
                loaded, encoded, max_new_tokens=n, min_new_tokens=n, **kwargs, **cache
            )

        full = generate(new_tokens)
        what = f"generate exactly {new_tokens} new tokens for one batch, {cache_name(cache)} KV cache"

    first = measure_latency(full, warmup=0, repeats=1, device=device)
    out.append(
        _row("first_call_ms", first.median_ms, "ms", f"{what}, the first call (compilation, caches); {first.method}")
    )
    timed, full_ms = _timed_rows("latency_ms", full, settings, device, batch)
    out += [{**r, "method": f"{what}; {r['method']}"} for r in timed]
    out.append(_row("throughput_samples_per_s", batch / (full_ms / 1000.0), "samples/s", f"{batch} / median latency"))
    if new_tokens:
        out.append(
            _row(
                "throughput_tokens_per_s",
                batch * new_tokens / (full_ms / 1000.0),
                "tokens/s",
                f"{batch} x {new_tokens} new tokens / median latency",
            )
        )
        prefill = generate(1)
        prefill_rows, prefill_ms = _timed_rows("prefill_ms", prefill, settings, device, batch)
        out += [{**r, "method": f"generate 1 new token; {r['method']}"} for r in prefill_rows[:1]]
        decode = (full_ms - prefill_ms) / (new_tokens - 1) if new_tokens > 1 else None
        out.append(
            _row(
                "decode_ms_per_token_p50",
                decode,
                "ms/token",
                "(median end to end - median prefill) / (max_new_tokens - 1)",
                None if decode is not None else "max_new_tokens is 1: no decoding step after the prefill",
            )
        )
        vision = VisionTimer(loaded)
        try:
            if vision.available:
                for _ in range(settings["repeats"]):
                    prefill()
        finally:
            vision.remove()
        if vision.times:
            out.append(
                _row(
                    "vision_ms_p50",
                    float(pd.Series(vision.times).median()),
                    "ms",
                    f"forward hooks on the first and last vision layer during {len(vision.times)} prefills, median",
                )
            )
        else:
            out.append(_row("vision_ms_p50", None, "ms", "forward hooks on the vision layers", "no vision layers"))

    with PeakMemory(device) as memory:
        full()
    peak = memory.result
    out.append(_row("peak_mem_mb", peak.peak_mb, peak.unit, f"one call; {peak.method}"))
    out.append(_row("peak_mem_delta_mb", peak.peak_delta_mb, peak.unit, f"one call, above the start; {peak.method}"))

    meter = EnergyMeter(device, idle_s=float(settings["energy_idle_s"]))
    minimum = float(settings["energy_min_s"])
    calls = 0
    with meter:
        start = time.perf_counter()
        # At least `repeats` calls and, where a counter is read, `energy_min_s` of work: NVML's
        # counter advances periodically, so a shorter region reads too little or nothing.
        while calls < settings["repeats"] or (meter.measuring and time.perf_counter() - start < minimum):
            full()
            calls += 1
    energy = meter.result
    n = calls * batch
    region = f"{calls} calls of {batch} samples over {energy.seconds:.2f} s"
    if calls > settings["repeats"]:
        region += f" (more than repeats, to last {minimum:g} s)"
    out += [
        _row(
            "energy_j_per_sample",
            None if energy.energy_j is None else energy.energy_j / n,
            "J/sample",
            f"net: gross minus idle power x time; {region}; {energy.method}",
            energy.reason,
        ),
        _row(
            "energy_gross_j_per_sample",
            None if energy.total_j is None else energy.total_j / n,
            "J/sample",
            f"the counter's difference over {region}",
            None if energy.total_j is not None else energy.reason,
        ),
        _row(
            "idle_power_w",
            energy.idle_w,
            "W",
            "mean power before the region, once settled; subtracted from the gross energy",
            None if energy.idle_w is not None else energy.reason or "no idle power subtracted (energy_idle_s: 0)",
        ),
    ]

    flops = count_flops(full, model=loaded.model)
    gflops = flops.total_flops / batch / 1e9
    out.append(_row("gflops_per_sample", gflops, "GFLOP/sample", f"one call; {flops.method}", flops.note))
    if new_tokens:
        first = count_flops(generate(1), model=loaded.model)
        out.append(
            _row("gflops_prefill_per_sample", first.total_flops / batch / 1e9, "GFLOP/sample", first.method, first.note)
        )
        if new_tokens > 1:
            per_token = (flops.total_flops - first.total_flops) / (new_tokens - 1) / batch / 1e9
            out.append(
                _row(
                    "gflops_per_token_per_sample",
                    per_token,
                    "GFLOP/token/sample",
                    "(FLOPs of max_new_tokens - FLOPs of 1) / (max_new_tokens - 1) / batch",
                    flops.note,
                )
            )
    if new_tokens:
        out += _roofline_rows(loaded, generate, new_tokens, batch, device, decode, prefill_ms, out)
    if note:
        for r in out:
            if r["measure"].startswith(
                ("latency", "first_call", "prefill", "decode", "vision", "throughput", "peak_mem", "energy")
            ):
                r["note"] = "; ".join(x for x in (r["note"], note) if x)
    if sizes:
        out += size_rows(manifest)
    df = pd.DataFrame(out)
    df["batch_size"] = batch
    df["device"] = str(device)
    df["simulated"] = simulated
    df["kernel"] = kernel_name
    return df


def _roofline_rows(
    loaded: LoadedModel,
    generate: Callable[[int], Callable[[], Any]],
    new_tokens: int,
    batch: int,
    device: torch.device,
    decode_ms: float | None,
    prefill_ms: float,
    rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Weight bytes per decode step, achieved bandwidth and prefill FLOP/s against the device's peaks."""
    dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
    peaks = device_peaks(device, dtype)
    read = decode_weight_bytes(loaded.model, lambda n: generate(n)(), new_tokens)
    timed = decode_ms is not None and decode_ms > 0
    bandwidth = read / (decode_ms / 1000.0) / 1e9 if read is not None and timed else None
    missing = (
        "max_new_tokens is 1: no decoding step after the prefill"
        if read is None
        else "the measured decode time per token is not positive (end to end within the prefill's noise)"
    )
    flops = next((r["value"] for r in rows if r["measure"] == "gflops_prefill_per_sample"), None)
    achieved = None if flops is None else flops * batch / (prefill_ms / 1000.0) / 1e3
    hooks = "tensors of the modules a decode step calls (forward hooks; embeddings: the rows looked up)"
    return [
        _row("decode_weight_bytes_per_step", read, "bytes", hooks, None if read is not None else missing),
        _row(
            "decode_bandwidth_gb_s",
            bandwidth,
            "GB/s",
            "decode_weight_bytes_per_step / decode_ms_per_token_p50",
            None if bandwidth is not None else missing,
        ),
        _row(
            "decode_bandwidth_fraction",
            None if bandwidth is None else bandwidth / peaks.bandwidth_gb_s,
            "fraction",
            f"decode_bandwidth_gb_s / peak {peaks.bandwidth_gb_s:.0f} GB/s ({peaks.source})",
            None if bandwidth is not None else missing,
        ),
        _row("prefill_tflops", achieved, "TFLOP/s", "gflops_prefill_per_sample x batch / prefill_ms_p50"),
        _row(
            "prefill_compute_fraction",
            None if achieved is None else achieved / peaks.tflops,
            "fraction",
            f"prefill_tflops / peak {peaks.tflops:.3g} TFLOP/s ({peaks.source})",
        ),
    ]


def size_rows(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Parameters (total and per part), nominal and serialized size, and compression ratio from a manifest."""
    if not manifest:
        return []
    rows = []
    method = "manifest.json of the variant"
    for part, counts in (manifest.get("parameters") or {}).items():
        name = "params" if part == "model" else f"params_{part}"
        rows.append(_row(name, counts.get("total"), "parameters", method))
    rows.append(_row("nominal_bits_per_parameter", manifest.get("nominal_bits_per_parameter"), "bits", method))
    rows.append(
        _row("nominal_size_bytes", manifest.get("nominal_size_bytes"), "bytes", f"{method}: parameters x nominal bits")
    )
    rows.append(
        _row("size_bytes", manifest.get("serialized_size_bytes"), "bytes", f"{method}: serialized state of the model")
    )
    rows.append(
        _row(
            "compression_ratio",
            manifest.get("nominal_compression_ratio"),
            "ratio",
            f"{method}: dense size / nominal size",
        )
    )
    return rows

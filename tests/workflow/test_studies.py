"""The real studies (config/studies/*.yaml): valid, true to their seed studies, planned offline.

Every file matching the glob is checked the same way, so a new study is covered as soon as it
exists: it passes the schema and the study checks; its number of evaluations matches a count
derived here from its runs and grids, the number its seed study calls for, and the number its
header comment states; every compression step selects modules on a model with the checkpoint's
layer layout (a setting that matches nothing would otherwise fail only on the cluster); and
``snakemake --dry-run`` plans one score job per evaluation without reaching a network.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from vlmopt.compress import apply_variant, parse_step, step_datasets
from vlmopt.study import check_study, evaluations, expand_grids, planned_figures

from .conftest import REPO, run_snakemake

STUDIES = sorted((REPO / "config" / "studies").glob("*.yaml"))
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

#: Evaluations each study must plan, from its seed study's settings (README, "Studies").
SEED_EVALUATIONS = {
    # S2, BLIP-2 OPT: GPTQ bits {2,3,4,5,6,8,16}^3 (all-16 is the baseline) + AWQ {4,2}^7 + baseline,
    # on COCO captioning, VQAv2 and GQA.
    "blip2-quantization.yaml": (7**3 - 1 + 2**7 + 1) * 3,
    # S2, round-to-nearest: per bit width (5) and layer type (3), the 79 distinct configurations of the
    # seed's generator (test_uniform_grids_hold_each_seed_configuration_once), + baseline; captioning.
    "blip2-quantization-uniform.yaml": 5 * 3 * 79 + 1,
    # S2, BLIP-2 ITM (vision + Q-Former): 27 uniform configurations per bit width and type, GPTQ
    # {2,...,16}^2, AWQ {4,2}^5 (text and query feed-forward share a width), baseline; Flickr30k.
    "blip2-quantization-retrieval.yaml": 5 * 3 * 27 + (7**2 - 1) + 2**5 + 1,
    # S2, LLaVA: GPTQ and AWQ over vision x language bits {2,...,16}^2, + baseline; VQAv2 and GQA.
    "blip2-quantization-llava.yaml": (2 * (7**2 - 1) + 1) * 2,
    # S1: SVD ratio 0.1..0.9 x first n blocks, n = 4..9 (1..3 not expressible), + baseline; 3 datasets.
    "clip-svd.yaml": (9 * 6 + 1) * 3,
    # S3: baseline, LoRA, Q6, Q8, LLM28, LLM28+Q8 (each pruning followed by LoRA); RSICD.
    "rsicd-lora-pruning.yaml": 6,
    # S0: 3 finetuned captioners x (baseline, dynamic int8); GenImage BigGAN.
    "genimage-real-vs-generated.yaml": 3 * 2,
    # S4: 5 models x (float32, float16, bfloat16) x 3 datasets.
    "vlm-profiling.yaml": 5 * 3 * 3,
}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _expanded(path: Path) -> dict:
    """The study as the workflow sees it: schema-checked, grids expanded, cross-references checked."""
    config = _raw(path)
    jsonschema.validate(config, SCHEMA)
    config["variants"] = {**config["variants"], **expand_grids(config)}
    check_study(config)
    return config


def _grid_size(spec: dict) -> int:
    """Points of a grid: the cartesian product of its axes less the points a ``skip`` entry matches."""
    names = list(spec["axes"])
    size = 0
    for values in itertools.product(*spec["axes"].values()):
        point = dict(zip(names, values, strict=True))
        size += not any(all(point[k] == v for k, v in skip.items()) for skip in spec.get("skip", []))
    return size


def _counted_evaluations(config: dict) -> int:
    """Evaluations counted from the raw study: per run, models x finetunes x variants x tasks."""
    n_variants = len(config["variants"]) + sum(_grid_size(g) for g in config.get("grids", {}).values())
    total = 0
    for run in config["runs"]:
        variants = n_variants if run["variants"] == "all" else len(run["variants"])
        total += len(run["models"]) * len(run["finetune"]) * variants * len(run["tasks"])
    return total


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_counts_match_its_seed(path):
    config = _expanded(path)
    n = len(evaluations(config))
    assert n == _counted_evaluations(_raw(path))
    assert path.name in SEED_EVALUATIONS, f"add {path.name}'s expected evaluations, derived from its seed, here"
    assert n == SEED_EVALUATIONS[path.name]
    stated = re.search(r"^# Evaluations: .* = ([\d,]+)\.$", path.read_text(), re.MULTILINE)
    assert stated, "the header comment must state the number of evaluations"
    assert int(stated.group(1).replace(",", "")) == n


# --- the seed studies' grids ----------------------------------------------------------------------

_THIRDS = ("first", "middle", "last")


def _seed_uniform_configs(parts: tuple[str, ...]) -> set:
    """The seed's uniform grid (mmq, config_creator.ipynb) without 16 bits, as a set of configurations.

    For each bit width, layer type and main part: a combination of the main part's thirds (none
    included) and, for each other part, all of it or none of it. Parts outside ``parts`` are
    dropped (the retrieval model has no language model), and so are empty configurations.
    """
    combos = [c for k in range(4) for c in itertools.combinations(_THIRDS, k)]
    out = set()
    for bits, role, main in itertools.product((8, 6, 5, 4, 3), ("mlp", "attention", "both"), parts):
        others = [p for p in ("vision", "bridge", "language") if p != main]
        for combo, whole in itertools.product(combos, itertools.product((True, False), repeat=2)):
            config = {main: frozenset(combo)} if combo else {}
            config |= {p: frozenset(_THIRDS) for p, w in zip(others, whole, strict=True) if w}
            config = {p: v for p, v in config.items() if p in parts}
            if config:
                out.add((bits, role, frozenset(config.items())))
    return out


def _uniform_config(steps: list[dict]) -> tuple:
    """(bits, role, {part: thirds}) of a variant made of uniform steps with one bit width and role."""
    assert {(s["method"], s["granularity"], s["symmetric"]) for s in steps} == {("uniform", "per_tensor", False)}
    config: dict[str, frozenset] = {}
    for step in steps:
        positions = [step["position"]] if isinstance(step["position"], str) else step["position"]
        thirds = frozenset(_THIRDS) if "all" in positions else frozenset(positions)
        for part in [step["part"]] if isinstance(step["part"], str) else step["part"]:
            config[part] = config.get(part, frozenset()) | thirds
    (bits,), (role,) = {s["bits"] for s in steps}, {s["role"] for s in steps}
    return bits, role, frozenset(config.items())


@pytest.mark.parametrize(
    "name,parts",
    [
        ("blip2-quantization-uniform.yaml", ("vision", "bridge", "language")),
        ("blip2-quantization-retrieval.yaml", ("vision", "bridge")),
    ],
)
def test_uniform_grids_hold_each_seed_configuration_once(name, parts):
    config = _expanded(REPO / "config" / "studies" / name)
    uniform = [steps for slug, steps in config["variants"].items() if slug.startswith("rtn")]
    configs = [_uniform_config(steps) for steps in uniform]
    assert len(configs) == len(set(configs)), "two variants quantize the same modules"
    assert set(configs) == _seed_uniform_configs(parts)


_SEED_BITS = (2, 3, 4, 5, 6, 8, 16)  # 16: the part is left alone


@pytest.mark.parametrize(
    "name,method,parts",
    [
        ("blip2-quantization.yaml", "gptq", ("vision", "bridge", "language")),
        ("blip2-quantization-retrieval.yaml", "gptq", ("vision", "bridge")),
        ("blip2-quantization-llava.yaml", "gptq", ("vision", "language")),
        ("blip2-quantization-llava.yaml", "awq", ("vision", "language")),
    ],
)
def test_per_part_grids_walk_the_seed_bits(name, method, parts):
    config = _expanded(REPO / "config" / "studies" / name)
    points = []
    for slug, steps in config["variants"].items():
        if slug != "baseline" and not slug.startswith(method):
            continue
        assert {s["method"] for s in steps} <= {method}, slug
        bits = {s["part"]: s["bits"] for s in steps}
        assert len(bits) == len(steps) and set(bits) <= set(parts), slug
        # Pipeline order, as the seed quantized: each part calibrated after the parts before it.
        assert [s["part"] for s in steps] == [p for p in parts if p in bits], slug
        points.append(tuple(bits.get(p, 16) for p in parts))
        for step in steps:
            if method == "gptq":  # the seed's settings: symmetric, per channel, damping 0.01
                assert (step["symmetric"], step["group_size"], step["damp"], step["act_order"]) == (
                    True,
                    None,
                    0.01,
                    False,
                )
            else:  # groups of 128, a 20-point scale grid, folded scales
                assert (step["group_size"], step["n_grid"], step["fold"]) == (128, 20, True)
            assert step["calibration"]["n"] == 128
    assert sorted(points) == sorted(itertools.product(_SEED_BITS, repeat=len(parts)))


@pytest.mark.parametrize(
    "name,groups",
    [
        ("blip2-quantization.yaml", 7),  # ViT attn, fc; Q-Former self, cross, query ff; OPT attn, fc
        ("blip2-quantization-retrieval.yaml", 5),  # ViT attn, fc; Q-Former self, cross, ff
    ],
)
def test_awq_grids_give_each_seed_group_4_or_2_bits(name, groups):
    config = _expanded(REPO / "config" / "studies" / name)
    awq = [steps for slug, steps in config["variants"].items() if slug.startswith("awq")]
    selections = {tuple((s["part"], s["role"]) for s in steps) for steps in awq}
    assert len(selections) == 1 and len(set(next(iter(selections)))) == groups
    assert sorted(tuple(s["bits"] for s in steps) for steps in awq) == sorted(itertools.product((4, 2), repeat=groups))


# --- every step selects modules on the checkpoint's layout ---------------------------------------


def _blip2(retrieval: bool):
    """BLIP-2 with the layer layout of blip2-opt-2.7b / blip2-itm-vit-g-coco at a tiny width.

    Their config.json: ViT-g 39 layers; Q-Former 12 layers, cross-attention every 2nd; OPT-2.7b 32.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    vision = Blip2VisionConfig(**small, num_hidden_layers=39, image_size=28, patch_size=14)
    qformer = Blip2QFormerConfig(
        **small,
        num_hidden_layers=12,
        encoder_hidden_size=16,
        cross_attention_frequency=2,
        use_qformer_text_input=retrieval,
        vocab_size=64,
    )
    if retrieval:
        return Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=2))
    text = OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, num_hidden_layers=32, vocab_size=64)
    return Blip2ForConditionalGeneration(
        Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=2)
    )


def _llava():
    """LLaVA-1.5-7b's layout: CLIP ViT-L/14-336, 24 layers; Llama (Vicuna-7B), 32 layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=24, image_size=28, patch_size=14
    )
    text = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=32,
        vocab_size=64,
    )
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))


def _clip():
    """CLIP ViT-B/32's layout: 12 image and 12 text encoder layers."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    small = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 12}
    text = CLIPTextConfig(**small, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=CLIPVisionConfig(**small, image_size=64, patch_size=32))
    )


#: Checkpoint -> (family, model with its layer layout). Studies whose steps depend on layer
#: counts (thirds, kept layers, named blocks) get the real counts; the others a tiny model.
CHECKPOINTS = {
    "Salesforce/blip2-opt-2.7b": ("blip2-opt", lambda: _blip2(retrieval=False)),
    "Salesforce/blip2-itm-vit-g-coco": ("blip2-itm", lambda: _blip2(retrieval=True)),
    "llava-hf/llava-1.5-7b-hf": ("llava", _llava),
    "openai/clip-vit-base-patch32": ("clip", _clip),
    "Salesforce/blip-image-captioning-base": ("blip", None),
    "google/matcha-chartqa": ("pix2struct", None),
    "microsoft/git-base-textvqa": ("git", None),
    "Salesforce/blip2-flan-t5-xl": ("blip2-t5", None),
    "adept/fuyu-8b": ("fuyu", None),
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", None),
}


def _checkpoint_model(source: str):
    from vlmopt.models import get_family, load_model

    assert source in CHECKPOINTS, f"add {source}'s family and layer layout to CHECKPOINTS"
    family, build = CHECKPOINTS[source]
    model = build() if build else load_model(f"tiny:{family}").model
    return get_family(family), model


# Settings that do not change which modules a step selects: a selection is computed once per step
# with these left out (a uniform grid repeats each selection for every bit width).
_VALUE_ONLY = ("bits", "ratio", "calibration")


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_step_selects_modules_on_the_checkpoint_layout(path):
    config = _expanded(path)
    used = {(e.model, e.variant) for e in evaluations(config)}
    for model_slug in sorted({m for m, _ in used}):
        adapter, base = _checkpoint_model(config["models"][model_slug]["source"])
        selected: dict[str, int] = {}
        for variant in sorted(v for m, v in used if m == model_slug):
            steps = config["variants"][variant]
            structural = any(s["method"] == "prune_layers" for s in steps)
            model = copy.deepcopy(base) if structural else base
            for i, step in enumerate(steps):
                parts = adapter.parts(model)
                if step["method"] == "prune_layers":
                    apply_variant(model, parts, [step])
                    continue
                key = json.dumps({k: v for k, v in step.items() if k not in _VALUE_ONLY}, sort_keys=True)
                key += f"|{[len(layers) for layers in parts.values()]}"
                if key not in selected:
                    _, spec = parse_step(step)
                    selected[key] = len(spec.select(model, parts))
                assert selected[key] > 0, f"{model_slug} {variant}[{i}] selects nothing"


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_checkpoints_run_their_tasks_and_finetunes_are_valid(path):
    """What the study checks cannot know before a hub checkpoint is loaded: its family's tasks."""
    from vlmopt.finetune import FullFinetuneConfig
    from vlmopt.models import get_family

    config = _expanded(path)
    for e in evaluations(config):
        source = config["models"][e.model]["source"]
        assert source in CHECKPOINTS, f"add {source}'s family and layer layout to CHECKPOINTS"
        family = get_family(CHECKPOINTS[source][0])
        assert e.task in family.tasks, f"{e.model} ({family.name}) cannot run {e.task}"
        if e.ft != "none":
            settings = {k: v for k, v in config["finetune"][e.ft].items() if k not in ("method", "dataset")}
            assert set(FullFinetuneConfig.from_dict(settings).tasks) <= set(family.tasks), e.ft


def test_clip_svd_grids_factorize_the_attention_of_the_first_n_blocks():
    from vlmopt.compress.svd import SVDConfig
    from vlmopt.models import get_family

    config = _expanded(REPO / "config" / "studies" / "clip-svd.yaml")
    model = _clip()
    parts = get_family("clip").parts(model)
    blocks = {}
    for slug, steps in config["variants"].items():
        if slug == "baseline":
            continue
        n = int(re.fullmatch(r"svd-n(\d)-ratio0p\d", slug).group(1))
        _, spec = parse_step(steps[0])
        refs = spec.select(model, parts)
        blocks.setdefault(n, set()).add(tuple(sorted(r.name for r in refs)))
        # CLIP ViT-B/32's attention weights are 768 x 768: every ratio must really cut parameters.
        rank = SVDConfig.from_dict({"part": "vision", "ratio": steps[0]["ratio"]}).rank_for(768, 768)
        assert 1 <= rank and rank * (768 + 768) < 768 * 768
    expected = {
        n: {
            tuple(
                sorted(
                    f"vision_model.encoder.layers.{i}.self_attn.{p}"
                    for i in range(n)
                    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                )
            )
        }
        for n in range(4, 10)
    }
    assert blocks == expected


def test_rsicd_variants_prune_the_seed_layers_and_recover_the_seed_targets():
    from vlmopt.models import get_family

    config = _expanded(REPO / "config" / "studies" / "rsicd-lora-pruning.yaml")
    adapter = get_family("blip2-opt")
    base = _blip2(retrieval=False)
    expected = {  # kept Q-Former and OPT layers; parts whose modules get adapters
        "lora": (12, 32, {"bridge", "language"}),
        "q6-lora": (6, 32, {"bridge", "language"}),
        "q8-lora": (8, 32, {"bridge", "language"}),
        "llm28-lora": (12, 28, {"language"}),
        "llm28-q8-lora": (8, 28, {"bridge", "language"}),
    }
    for variant, (bridge, language, lora_parts) in expected.items():
        model = copy.deepcopy(base)
        *prunes, lora = config["variants"][variant]
        if prunes:
            apply_variant(model, adapter.parts(model), prunes)
        parts = adapter.parts(model)
        assert (len(parts["bridge"]), len(parts["language"])) == (bridge, language), variant
        _, spec = parse_step(lora)
        refs = spec.select(model, parts)
        assert {r.part for r in refs} == lora_parts, variant
        names = {r.name.rsplit(".", 1)[1] for r in refs}
        assert names == ({"q_proj", "k_proj", "query", "key"} if "bridge" in lora_parts else {"q_proj", "k_proj"})
        assert (lora["r"], lora["alpha"], lora["dropout"], lora["training"]["lr"], lora["training"]["batch_size"]) == (
            16,
            32,
            0.05,
            5.0e-4,
            4,
        )


# --- the workflow plans each study offline ---------------------------------------------------------


def _job_counts(output: str) -> dict[str, int]:
    """The first 'Job stats' table of a dry run as {rule: count}."""
    counts = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        m = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return counts


def _expected_jobs(config: dict) -> dict[str, int]:
    """Jobs a study needs, from its evaluations: data, models, finetunes, variants, shards, scores."""
    evals = evaluations(config)
    chains = {(e.model, e.ft, e.variant) for e in evals}
    datasets = {e.dataset for e in evals}
    datasets |= {d for _, _, v in chains for step in config["variants"][v] for d, _ in step_datasets(step)}
    trained = {(e.model, e.ft) for e in evals if e.ft != "none"}
    models = {e.model for e in evals}
    datasets |= {config["finetune"][ft]["dataset"] for _, ft in trained}
    # A labeled dataset needs its source dataset and its captioner (built, perhaps finetuned).
    labeled = {d for d in datasets if config["datasets"][d]["source"] == "labeled"}
    for d in labeled:
        datasets.add(config["datasets"][d]["dataset"])
        captioner = config["datasets"][d].get("captioner")
        if captioner:
            models.add(captioner["model"])
            if captioner.get("finetune", "none") != "none":
                trained.add((captioner["model"], captioner["finetune"]))
                datasets.add(config["finetune"][captioner["finetune"]]["dataset"])
    profiling = config.get("profiling") or {}
    picks = profiling.get("sweep_on") or {}
    swept = [
        c
        for c in chains
        if all(
            picks.get(key) is None or name in picks[key]
            for key, name in zip(("models", "finetune", "variants"), c, strict=True)
        )
    ]
    points = sum(len(values) for values in (profiling.get("sweep") or {}).values())
    sweeps = len(swept) * points if profiling.get("enabled", True) else 0
    jobs = {
        "prepare_dataset": len(datasets - labeled),
        "label_dataset": len(labeled),
        "build_model": len(models),
        "finetune": len(trained),
        "compress": len(chains),
        "infer": len(evals) * config.get("inference", {}).get("shards", 2),
        "gather_predictions": len(evals),
        "score": len(evals),
        # One profile per (model, ft, variant), unless the study turns profiling off.
        "profile": len(chains) if profiling.get("enabled", True) else 0,
        # One job per sweep value for each profiled variant that sweep_on picks, and their figure.
        "sweep": sweeps,
        "tables": 1,
        # One job per figure the study has data for (the sweep's curves only with sweep jobs).
        "figure": len([f for f in planned_figures(config) if f != "scaling"]) + (1 if sweeps else 0),
        "html_report": 1,
        "all": 1,
    }
    return {rule: n for rule, n in jobs.items() if n}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """``snakemake --dry-run`` of every study, in a fresh directory each, two at a time."""

    def dry_run(path):
        workdir = tmp_path_factory.mktemp(path.stem)
        start = time.perf_counter()
        result = run_snakemake(workdir, "--dry-run", "--quiet", "rules", configfile=path, timeout=600)
        return path.name, (result, time.perf_counter() - start, workdir)

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(dry_run, STUDIES))


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_dry_run_plans_one_score_job_per_evaluation(path, dry_runs):
    result, seconds, workdir = dry_runs[path.name]
    assert result.returncode == 0, result.stderr[-4000:]
    assert _job_counts(result.stdout) == _expected_jobs(_expanded(path))
    # A dry run writes nothing but snakemake's own bookkeeping.
    assert sorted(p.name for p in workdir.iterdir()) == [".snakemake"]
    print(f"{path.name}: dry run {seconds:.1f} s")

# vlmopt: `make demo` runs the embedded default study, `make test` runs the test suite.
# Both create .venv on first use: torch first (the CPU build where there is no CUDA), then the project.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmopt-installed
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# auto: the CUDA build where nvidia-smi sees a GPU, else the CPU build. On a cluster, install from a
# login node (no GPU) for GPU jobs with `make install TORCH_BUILD=cuda`; TORCH_BUILD=cpu forces the CPU build.
TORCH_BUILD ?= auto
CORES ?= all

.PHONY: install demo test lint format report clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v java >/dev/null || echo "warning: java not found; METEOR (pycocoevalcap) needs Java 8+ (e.g. apt install openjdk-17-jre-headless)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# A local CPU wheel if pip is configured with one (find-links; its dependencies come with the
	@# project below), else the CPU build from the PyTorch index; with a GPU, the default (CUDA)
	@# build. Installing torch first stops other packages pulling the CUDA build.
	@case "$(TORCH_BUILD)" in auto|cpu|cuda) ;; *) echo "TORCH_BUILD must be auto, cpu or cuda, not '$(TORCH_BUILD)'"; exit 2;; esac
	if [ "$(TORCH_BUILD)" = cuda ] || { [ "$(TORCH_BUILD)" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION); \
	else \
		$(PY) -m pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null || \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) \
			--extra-index-url https://pypi.org/simple; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --profile profiles/default --cores $(CORES)
	@echo "Tables in results/tables/, figures in results/plots/, the report in results/report/index.html."

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests workflow/scripts
	$(VENV)/bin/ruff format --check src tests workflow/scripts
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint

format: $(STAMP)
	$(VENV)/bin/ruff format src tests workflow/scripts
	$(VENV)/bin/ruff check --fix src tests workflow/scripts
	$(VENV)/bin/snakefmt Snakefile rules

report: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --profile profiles/default --cores $(CORES) --report results/report.html

clean:
	rm -rf results logs .snakemake

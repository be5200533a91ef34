# zimage-batch: `make demo` and `make test` work on a fresh clone (they create .venv when missing).
# GPU hosts: make TORCH_SPEC="torch==2.11.0" ... (or any CUDA build) to keep their torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_TEMPLATES := -t templates/product_white.j2 -t templates/lifestyle_scene.j2 -t templates/poster_text.j2

.PHONY: demo test venv bench photos clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/zimage-batch run catalogs/demo.csv $(DEMO_TEMPLATES) --model tiny-random --size 256x256 --out out/demo
	@echo
	@echo "The demo uses tiny-random: the real ZImagePipeline with tiny random weights, so every image is noise."
	@echo "Noise has no white backdrop, so product_white's quality check rejects those images (kept in out/demo/rejected/)."
	@echo "With the real model: --model Tongyi-MAI/Z-Image-Turbo (GPU, weights in the Hugging Face cache)."

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.stages

photos: $(STAMP)
	$(BIN)/python tests/scenes.py photos

clean:
	rm -rf out $(VENV)

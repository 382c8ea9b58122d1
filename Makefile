# On a fresh machine, as root:  make demo   (the lab)   and   make test   (the tests).
# Both install what is missing first (scripts/bootstrap).
VENV := .venv
PYTEST_ARGS ?=

.PHONY: bootstrap demo test unit lab-down clean

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	$(VENV)/bin/overlayctl lab demo

test: bootstrap
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

unit: bootstrap
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

lab-down: bootstrap
	$(VENV)/bin/overlayctl lab down

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

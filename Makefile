# Shortcuts; each target is one command you can also run by hand (see README).
.PHONY: run demo test lint format bench

run:            ## web + worker + beat on this machine (creates .venv on first run)
	python3 manage.py start

demo:           ## the same, with demo tokens and a local fake 报名工具 API
	python3 manage.py start --demo

test:           ## the whole suite: lint, SQLite and PostgreSQL, real Redis and workers
	bash .ci/run

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

bench:          ## token refresh and lease engine benchmarks (figures, see benchmarks/README.md)
	-.venv/bin/python benchmarks/refresh_tokens.py --tokens 2000 --latency 0.05 --rate 100 --workers 1
	-.venv/bin/python benchmarks/refresh_tokens.py --tokens 2000 --latency 0.05 --rate 100 --workers 2
	-.venv/bin/python benchmarks/leases_bench.py

"""Benchmark harness: our server vs vLLM's own OpenAI server vs AsyncLLM in-process (the ceiling).

Modules, in the order data flows:
- `images`: varied benchmark images, generated from a seed and cached on disk;
- `workload`: deterministic requests and the cells (workload x concurrency) of a run;
- `client`: the light closed-loop HTTP load client and its per-request timings;
- `ceiling`: the in-process AsyncLLM driver (run as a subprocess);
- `targets`, `procs`: starting, timing and stopping the targets, their logs and CPU time;
- `preprocess`: image preprocessing rate per core;
- `stats`, `report`: summaries, ratios, and the tables of docs/benchmarks.md;
- `run`: the command line (`python -m bench`).
"""

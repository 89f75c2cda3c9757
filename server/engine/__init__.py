"""The engine side: the narrow interface serving code uses (`interface`), and vLLM behind it.

`interface` is plain Python types and imports nothing heavy. `vllm_engine` (the adapter) and
`api_processes` (several API processes on one engine core) are the only modules of the server that
import vLLM; tests/unit/test_import_contract.py enforces it. Import them only where the engine is
started: importing vLLM takes seconds.
"""

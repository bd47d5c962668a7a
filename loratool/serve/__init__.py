"""`loratool serve`: one base and many adapters behind an OpenAI-compatible HTTP API.

run.py is the command, top to bottom; served.py what is served (the runs resolved and loaded once through
loratool.generate, the adapters loaded and unloaded at run time); engine.py the built-in engine, which
batches concurrent requests with their adapters mixed (transformers + PEFT, CPU or GPU); api.py the HTTP
side (FastAPI: routes, OpenAI's bodies and errors, streaming, the API key and body limits, the access log);
answers.py turns token ids into answer text, stream pieces and tool calls; vllm.py checks adapters against
vLLM's LoRA loader and hands serving over to vLLM.

FastAPI, uvicorn and torch are imported only when a server starts, so that `loratool --help` stays instant.
"""

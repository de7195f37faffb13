"""``lrpt serve``: many soft prompts behind one OpenAI-compatible server, mixed in one batch.

Needs the ``serve`` extra (FastAPI, uvicorn, sse-starlette); nothing in ``lrpt`` imports this
package except the ``serve`` subcommand. Modules: ``registry`` (the adapters of a directory),
``textstream`` (stop strings, streamable text), ``scheduler`` (the thread that owns the model and
runs the continuous batch), ``protocol`` (request bodies, errors), ``app`` (the FastAPI app),
``server`` (build and run).
"""

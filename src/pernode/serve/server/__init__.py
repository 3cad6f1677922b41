"""`pernode serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around the engine.

`app.build_app` makes the app, `serve.run_server` runs it with a graceful drain, `serve.ServerThread` runs it
in-process. This package's `__init__` imports nothing, so `pernode --help` stays fast.
"""

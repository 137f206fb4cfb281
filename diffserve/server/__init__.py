"""The cascade server: router, pools with adaptive batching, a live controller and an OpenAI API.

Public entry points:

- :func:`diffserve.server.build.build_runtime` / :class:`diffserve.server.runtime.Runtime` -- the
  serving core without HTTP (router, pools, workers, controller);
- :func:`diffserve.server.api.create_app` -- the FastAPI app around a runtime;
- :func:`diffserve.server.launch.serve_forever` -- uvicorn with graceful SIGTERM draining.
"""

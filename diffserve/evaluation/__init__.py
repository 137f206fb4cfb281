"""Trace-driven evaluation of a running diffserve server.

The pieces, each in its own module:

- :mod:`.sources`   arrival processes (trace file, Poisson, shape file, bursty on/off) in model time;
- :mod:`.prompts`   the prompt set that trace prompt indices point into;
- :mod:`.loadgen`   the open-loop replay and its HTTP transport (asyncio + aiohttp, loopback only);
- :mod:`.inprocess` the same replay into the server's runtime in-process, on a virtual-time loop;
- :mod:`.records`   the per-request log written as JSONL, nothing dropped;
- :mod:`.metrics`   violations, goodput, latency percentiles, per-second quality and timelines;
- :mod:`.oracle`    the bound no policy can beat at its violation ratio (an LP relaxation);
- :mod:`.report`    JSON, Markdown and PNG outputs;
- :mod:`.runner`    one run scored and written (both transports);
- :mod:`.compare`   one fresh emulated server per policy and seed, the same trace against each;
- :mod:`.sweep`     comparisons over cluster sizes and SLOs, one table and one plot.
"""

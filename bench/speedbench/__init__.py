"""The parts of ``bench/speed.py`` (stock vLLM vs the plugin), one file per job.

- :mod:`speedbench.bench_model`: the random-weight LLaVA-1.5-geometry model the engines serve;
- :mod:`speedbench.workload`: the measured configurations and the requests they share;
- :mod:`speedbench.runs`: the engine workers (one vLLM engine per subprocess) and the interleaved
  measurement that drives them;
- :mod:`speedbench.summary`: statistics, the FLOPs model's ideal speedups and the targets;
- :mod:`speedbench.report`: the markdown table, the plot and the result files.

``bench/speed.py`` puts ``bench/`` on ``sys.path`` and imports them as ``speedbench.*``.
"""

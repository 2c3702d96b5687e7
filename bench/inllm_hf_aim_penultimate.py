"""Reference backend AIM with its ToMe merge metric read from the penultimate ViT layer, as vLLM must
(it never loads the last layer): isolates the merge input from the in-LLM stages when comparing
with vLLM's in-LLM AIM. Usage: ``PYTHONPATH=. python bench/inllm_hf_aim_penultimate.py 0.9 0.5``."""
import sys
import vlmprune.backends.hf.vision_hooks as vh
from vlmprune import evaluate as ev
w, p = vh.wanted_projections, vh.patch_signals
vh.wanted_projections = lambda needs, f, l: w(needs, f, f)
vh.patch_signals = lambda cap, needs, f, l, h: p(cap, needs, f, f, h)
for r in sys.argv[1:]:
    res = ev.evaluate("demo", backend="hf", method="aim", ratio=float(r), samples=300, progress=False)
    print("hf aim (merge metric: penultimate ViT layer)", r, res["accuracy"], flush=True)

"""Reference backend AIM with the merge metric read from the penultimate ViT layer (as vLLM must)."""
import sys
import vlmprune.backends.hf.vision_hooks as vh
from vlmprune import evaluate as ev
w, p = vh.wanted_projections, vh.patch_signals
vh.wanted_projections = lambda needs, f, l: w(needs, f, f)
vh.patch_signals = lambda cap, needs, f, l, h: p(cap, needs, f, f, h)
for r in sys.argv[1:]:
    res = ev.evaluate("demo", backend="hf", method="aim", ratio=float(r), samples=300, progress=False)
    print("hf aim (merge metric: penultimate ViT layer)", r, res["accuracy"], flush=True)

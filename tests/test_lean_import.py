"""The algorithm core stays importable without the serving stack."""

import subprocess
import sys


def test_core_imports_pull_in_neither_vllm_nor_fastapi_nor_transformers():
    """Importing the policy, the core, the signals and the reduction layer loads no vLLM, FastAPI or
    transformers."""
    code = (
        "import sys, vlmprune, vlmprune.policy, vlmprune.methods, vlmprune.signals;"
        "import vlmprune.core.fastervlm, vlmprune.core.globalcom2, vlmprune.core.aim, vlmprune.core.transprune;"
        "import vlmprune.core.explain, vlmprune.core.baselines, vlmprune.core.schedule;"
        "import vlmprune.reduction.image_tokens, vlmprune.reduction.reduce, vlmprune.reduction.stages;"
        "import vlmprune.reduction.qwen_pooling;"
        "bad = [m for m in ('vllm', 'fastapi', 'transformers') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

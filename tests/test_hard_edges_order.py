"""Order independence: TensorFlow (export) then torch's optimiser (train) in one process must not crash.

In this environment ``import tensorflow`` followed by ``import triton`` is a segfault, and
torch.optim imports triton lazily. ghnq_deploy imports triton before TensorFlow, so every order
works; these run in fresh subprocesses, as a user's process would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

TF_THEN_OPTIMISER = textwrap.dedent("""
    import torch
    from ghnq_deploy.export.tflite import _tf
    tf = _tf()  # what export does
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # what train does next
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    print("survived")
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_tensorflow_then_optimiser_does_not_segfault():
    result = _run(TF_THEN_OPTIMISER)
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr[-1500:])


def test_evaluate_and_predict_never_import_tensorflow(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from ghnq_deploy.cli import main
        for argv in (["predict", "{tmp_path}/nothing.json"], ["evaluate", "{tmp_path}/nothing.json"]):
            sys.argv = ["ghnq-deploy", *argv]
            try:
                main()
            except SystemExit:
                pass
        print("tensorflow" in sys.modules)
    """)
    result = _run(code)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr[-1500:]

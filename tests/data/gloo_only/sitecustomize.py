"""Test-only start-up hook for DeepSpeed ranks on CPU: use plain torch.distributed (gloo) collectives.

DeepSpeed 0.19 otherwise JIT-compiles its shared-memory CPU all-reduce op on first use (minutes on a
2-core machine, once per machine). tests/train/test_train_deepspeed.py puts this folder on PYTHONPATH.
"""

import os

if "LOCAL_RANK" in os.environ:
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False

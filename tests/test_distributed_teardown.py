"""up2.utils.distributed in one process: the teardown destroys the default group and detectron2's
cached groups; launch with one process returns main_func's value (no group). The multi-process
path runs in tests/engine/test_ddp_train_net.py (train_net.py uses this launch)."""
from datetime import timedelta

import torch.distributed as dist
from detectron2.utils import comm

from up2.utils.distributed import launch, teardown_process_group


def test_teardown_destroys_default_and_detectron2_groups(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        comm.create_local_process_group(1)
        assert comm._get_global_gloo_group() is not None and comm.get_local_rank() == 0
    finally:
        teardown_process_group()
    assert not dist.is_initialized()
    assert comm._LOCAL_PROCESS_GROUP is None
    assert comm._get_global_gloo_group.cache_info().currsize == 0
    teardown_process_group()  # no group: a no-op


def test_launch_one_process_returns_value():
    assert launch(lambda a, b: a + b, 1, args=(2, 3)) == 5
    assert not dist.is_initialized()

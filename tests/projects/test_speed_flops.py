"""projects/benchmark/speed.py's fvcore flop count traces up2's detection + segmentation forward
(jit tracing turns image sizes into 0-dim tensors; the post-processing must accept them)."""
import sys

import torch
from detectron2.modeling import build_model

from conftest import REPO_ROOT, tiny_cfg

sys.path.insert(0, str(REPO_ROOT / "projects" / "benchmark"))
import speed  # noqa: E402


def test_flop_count_traces_detection_forward(shapes_datasets):
    from up2.modeling.tasks import resolve_task_data

    cfg = resolve_task_data(tiny_cfg())
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = [{"image": x, "height": 48, "width": 64}]
    with torch.no_grad():
        expected = model(one, task="TASK")[0]["instances"]
    res = speed.count_flops(speed.Call(model, lambda inputs: model(inputs, task="TASK")), (one,), True)
    assert "error" not in res, res["error"]
    # at least the proposal network's deformable attention (its handle) and the unified decoder's GEMMs
    assert res["gflops"] > 0 and "prim::PythonOp._CompiledMSDA" not in res["unsupported"]
    with torch.no_grad():  # tracing left the model as it was
        again = model(one, task="TASK")[0]["instances"]
    assert torch.equal(again.pred_masks, expected.pred_masks)

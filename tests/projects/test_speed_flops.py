"""projects/benchmark/flops.py's fvcore count traces up2's detection + segmentation forward
(tracing turns image sizes into 0-dim tensors; the count hands mask pasting Python ints) and
leaves the model as it was."""
import torch
from detectron2.modeling import build_model

from conftest import tiny_cfg
from projects.benchmark import flops


def test_flop_count_traces_detection_forward(shapes_datasets):
    from up2.modeling.tasks import resolve_task_data

    cfg = resolve_task_data(tiny_cfg())
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one = [{"image": x, "height": 48, "width": 64}]
    with torch.no_grad():
        expected = model(one, task="TASK")[0]["instances"]
    res = flops.count_flops(flops.Call(model, lambda inputs: model(inputs, task="TASK")), (one,), True)
    assert "error" not in res, res["error"]
    # at least the proposal network's deformable attention (its handle) and the unified decoder's GEMMs
    assert res["gflops"] > 0 and "prim::PythonOp._CompiledMSDA" not in res["unsupported"]
    assert "paste_masks" not in vars(model.tasks["TASK"])  # the wrapper is gone again
    with torch.no_grad():
        again = model(one, task="TASK")[0]["instances"]
    assert torch.equal(again.pred_masks, expected.pred_masks)


def test_dispatch_count_of_a_linear_layer():
    """torch's counter gives 2 flops per multiply-add; the benchmark reports multiply-adds."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    res = flops.count_flops_dispatch(layer, lambda: layer(torch.randn(3, 8)))
    assert res["gflops"] * 1e9 == 3 * 8 * 4
    assert all(p.requires_grad for p in layer.parameters())

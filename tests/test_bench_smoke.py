"""The GPU benchmark script runs end to end on the CPU (--smoke: tiny model, reference layers):
its JSON has the fields the results table and the targets are read from."""

import json

from dtq.tools.bench_engines import main


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--batches", "1", "--steps", "1",
                 "--repeats", "1", "--backends", "bf16-eager,int8,w4a16"]) == 0
    res = json.loads(out.read_text())
    assert {"date", "torch", "commit"} <= set(res["env"])
    backends = res["end_to_end"]["backends"]
    assert set(backends) == {"bf16-eager", "int8", "w4a16"}
    for name, entry in backends.items():
        assert "error" not in entry, entry.get("trace")
        assert entry["batches"]["1"]["images_per_s"] > 0
    assert backends["int8"]["quantized_layer_weights_vs_bf16"] < 0.55  # int8 codes + scales
    assert backends["w4a16"]["quantized_layer_weights_vs_bf16"] < 0.3
    assert "w4a16_weight_memory_vs_bf16" in res["summary"]["targets"]
    assert "| w4a16 |" in capsys.readouterr().out

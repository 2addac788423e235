"""Session 21 diagnosis (not kept): the held token-codes kernel per pinned config, each in its own process
with a watchdog, at DiT-XL/2's fc1 (32768 x 4608 x 1152): flat (static tiles) with and without the wait,
and with tickets; time (CUDA-graph median) and codes against the waiting kernel."""
import json
import subprocess
import sys

CHILD = r'''
import sys, json, torch
sys.path.insert(0, "benchmarks")
from attention_bench import time_ms
from dtq.runtime import token_gemm
cand, mode = json.loads(sys.argv[1]), sys.argv[2]
dev = torch.device("cuda"); g = torch.Generator(device=dev).manual_seed(0)
m, k, n = 32768, 1152, 4608
a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
sa = torch.rand(m, device=dev, generator=g) * 1e-3 + 1e-4
sw = torch.rand(n, device=dev, generator=g) * 1e-3 + 1e-4
b = torch.randn(n, device=dev, generator=g); mul = torch.rand(n, device=dev, generator=g) + 0.5
cfg = token_gemm._config(*cand)
if mode == "nowait":  # flat loop, nothing awaited or published (wrong codes): the loop's own speed
    from dtq.runtime.token_gemm import _mm8_token_codes_held_kernel as K
    orig = token_gemm._launch_held
    def patched(*args, **kw):
        import triton
        from dtq.runtime.kernels import _num_sms, _m_bucket, _tma_blocks
        a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias, mul_, M, N, K_, config, args_ = args[:15]
        _tma_blocks({"a_desc": a_desc, "w_desc": w_desc, **config})
        sms = _num_sms(q.device)
        K.fn[(sms,)](a_desc, w_desc, q.view(torch.int16), s, parts, sync, a_scale, w_scale, bias, mul_, M, N, K_,
                     _m_bucket(M), q.view(torch.int16).stride(0), sms, TICKETS=False, FLAT=True, WAIT=False,
                     **args_, **config)
    token_gemm._launch_held = patched
fn = lambda: token_gemm.mm8_gelu_token_codes(a, w, sa, sw, b, mul, torch.bfloat16, cfg, held=True, _tickets=(mode == "tickets"))
q1, s1 = fn(); torch.cuda.synchronize()
print("ran", flush=True)
q0, s0 = token_gemm.mm8_gelu_token_codes(a, w, sa, sw, b, mul, torch.bfloat16, held=False)
ms = time_ms(fn, "cudagraph")
print(json.dumps({"ms": round(ms, 5), "codes_differing": int((q1 != q0).sum()), "scales_equal": bool(torch.equal(s0, s1))}), flush=True)
'''

out = {}
from dtq.runtime import token_gemm  # noqa: E402
for cand in [(128, 128, 128, 3, 8, None), (128, 128, 128, 3, 8, 128)]:
    for mode in ("flat", "nowait", "tickets"):
        name = "{}x{}x{}_s{}_w{}_r{}_".format(*cand) + mode
        try:
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cand), mode], capture_output=True, text=True,
                               timeout=45)
            lines = p.stdout.strip().splitlines()
            out[name] = lines[-1] if lines else ("rc %d " % p.returncode) + p.stderr[-300:]
        except subprocess.TimeoutExpired as e:
            out[name] = "TIMEOUT (ran printed: %s)" % ("ran" in (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout)
        print(name, out[name], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)

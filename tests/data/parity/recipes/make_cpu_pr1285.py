"""Make a CPU copy of the #1285 record's train_gpt.py by exact text substitution (how pr1285.json was made).

Usage: make_cpu_pr1285.py PR1285_TRAIN_GPT.py OUT.py   (prints the substitution table, in markdown)

The input is records/track_10min_16mb/2026-04-03_MuonEqR_DepthRecurrence_WD090_AllInt6/train_gpt.py of
openai/parameter-golf at HEAD 4908dc46f: a two-line wrapper, exec(lzma.decompress(base64.b85decode(...), raw LZMA2)).
The wrapper's payload is decoded here without executing it (its string literal is read with ast), then only device
and precision plumbing changes, plus one Python 3.12 f-string rewritten for 3.11; every substitution is exact text
with its expected count, and the wrapper, the decoded script and the output are checked by sha256.
Runs: as make_cpu_pr1218.py's docstring (scratch directory, data/ links, DATA_DIR at its default ./data/).
"""
import ast
import base64
import hashlib
import lzma
import sys
src_path, out_path = sys.argv[1], sys.argv[2]
wrapper = open(src_path, encoding='utf-8').read()
assert hashlib.sha256(wrapper.encode('utf-8')).hexdigest() == '72cff512eaa726f2c6eaef957257443e9247893fb9905dc0e2ffc5f522a79ac9', 'not the #1285 record wrapper'
call = ast.parse(wrapper).body[-1].value.args[0]  # exec(L.decompress(B.b85decode(<literal>), format=..., filters=...))
payload = ast.literal_eval(call.args[0].args[0])
s = lzma.decompress(base64.b85decode(payload), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode('utf-8')
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == 'c6032e91c4af32996490dca1aed68288d92c6a860bb601d01f2d256091777f15'
SDPA = ("def flash_attn_3_func(q,k,v,causal=False):return F.scaled_dot_product_attention("
        "q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),is_causal=causal,enable_gqa=True).transpose(1,2)")
SUBS = [
 ("FlashAttention-3 import -> SDPA on (B,H,T,D)-transposed tensors, is_causal, enable_gqa; output transposed back to FA3's (B,T,H,D)",
  "from flash_attn_interface import flash_attn_func as flash_attn_3_func", SDPA, 1),
 ("@torch.compile on Newton-Schulz -> removed (eager)", "@torch.compile\ndef zeropower_via_newtonschulz5", "def zeropower_via_newtonschulz5", 1),
 ("torch.compile(base_model) -> base_model (training model)", "compiled_model=torch.compile(base_model,dynamic=_C,fullgraph=_B)", "compiled_model=base_model", 1),
 ("torch.compile(eval_model) -> eval_model (final evaluation)", "compiled_model=torch.compile(eval_model,dynamic=_C,fullgraph=_B)", "compiled_model=eval_model", 1),
 ("torch.compile(forward_logits) -> forward_logits (sliding window)", "logits_fn=torch.compile(base_model.forward_logits,dynamic=_C,fullgraph=_B)", "logits_fn=base_model.forward_logits", 1),
 ("torch.cuda.synchronize() -> no-op expression `None`", "torch.cuda.synchronize()", "None", 5),
 ("torch.cuda.max_memory_allocated() -> 0", "torch.cuda.max_memory_allocated()", "0", 1),
 ("torch.cuda.max_memory_reserved() -> 0", "torch.cuda.max_memory_reserved()", "0", 1),
 ("CUDA-required check removed", "\tif not torch.cuda.is_available():raise RuntimeError('CUDA is required')\n", "", 1),
 ("main(): device cuda:local_rank + set_device -> cpu", "device=torch.device(_M,local_rank);torch.cuda.set_device(device)", "device=torch.device('cpu')", 1),
 ("process group nccl -> gloo (no device_id)", "dist.init_process_group(backend='nccl',device_id=device)", "dist.init_process_group(backend='gloo')", 1),
 ("DDP without device_ids", "DDP(compiled_model,device_ids=[h.local_rank],", "DDP(compiled_model,", 1),
 ("GPTQ calibration loader and Hessians on cuda:local_rank -> cpu", "torch.device(_M,h.local_rank)", "torch.device('cpu')", 2),
 ("bf16 autocast (enabled=True) -> cpu autocast enabled=False", "torch.autocast(device_type=_M,dtype=torch.bfloat16,enabled=_B)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", 2),
 ("bf16 autocast (default enabled) -> cpu autocast enabled=False", "torch.autocast(device_type=_M,dtype=torch.bfloat16)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", 1),
 ("model .bfloat16() casts (train model, deserialized eval model) -> kept fp32", "GPT(h).to(device).bfloat16()", "GPT(h).to(device)", 2),
 ("nvidia-smi subprocess -> fixed string", "subprocess.run(['nvidia-smi'],stdout=subprocess.PIPE,stderr=subprocess.PIPE,text=_B,check=_C).stdout", "'nvidia-smi: not run (CPU reference run)'", 1),
 ("Python 3.12 f-string (nested double quotes) -> the same expression with single quotes, for Python 3.11",
  '{"physical"if h.parallel_start_layer_is_physical else"virtual"}', "{'physical'if h.parallel_start_layer_is_physical else'virtual'}", 1),
 ("Python 3.12 f-string (nested double quotes) -> the same expression with single quotes, for Python 3.11",
  'getattr(base_model,"repeat_untie_mlp_layers",[])}', "getattr(base_model,'repeat_untie_mlp_layers',[])}", 1),
]
rows = []
for why, old, new, n in SUBS:
    c = s.count(old)
    assert c == n, (why, c, n)
    s = s.replace(old, new)
    rows.append((why, old, new, c))
out_sha = hashlib.sha256(s.encode('utf-8')).hexdigest()
assert out_sha == '94b056ed357240376d39b0edbc084a922dc5733ae7797e3aeae373900ce58894', out_sha
open(out_path, 'w', encoding='utf-8').write(s)
compile(s, out_path, 'exec')
for kw in ('flash_attn_interface', 'torch.compile', 'device_type=_M', 'nccl', 'GPT(h).to(device).bfloat16()', "'nvidia-smi']", 'torch.cuda.synchronize', 'max_memory', 'torch.cuda.set_device', 'device_ids'):
    assert kw not in s, kw
def md(x): return '`' + x.replace('\n', '\\n').replace('\t', '\\t').replace('`', "'") + '`' if x else '(removed)'
print('| # | what | original text | replacement | count |')
print('|---|---|---|---|---|')
for i, (why, old, new, c) in enumerate(rows, 1):
    print(f"| {i} | {why} | {md(old)} | {md(new)} | {c} |")

"""Make CPU copies of records #1394 and #1493 (train_gpt.py) by exact text substitution (how pr1394.json and
pr1493.json were made).

Usage: make_cpu_sp8192_records.py TRAIN_GPT.py OUT.py PR   (PR = 1394 or 1493; prints the substitution table, markdown)

The input is the record's train_gpt.py of openai/parameter-golf at 4908dc46f, as committed (the
``exec(lzma.decompress(base64.b85decode(...)))`` wrapper, decoded here: raw LZMA2, ``format=FORMAT_RAW``) or
already decoded:
  #1394 records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2/train_gpt.py
  #1493 records/track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT/train_gpt.py
Only device and precision plumbing changes; every substitution is exact text with its expected count, and the
decoded input and the output are checked by sha256, so a different script is refused rather than patched
differently. (From the project's shared recipe: the decoding and the sha256 checks are the only additions.)
"""
import base64
import hashlib
import lzma
import re
import sys
src_path, out_path, pr = sys.argv[1], sys.argv[2], sys.argv[3]
s = open(src_path, encoding='utf-8').read()
if s.startswith('import lzma as L,base64 as B'):
    blob = re.search(r'b85decode\("(.*?)"\)', s, re.S).group(1)
    s = lzma.decompress(base64.b85decode(blob), format=lzma.FORMAT_RAW, filters=[{'id': lzma.FILTER_LZMA2}]).decode('utf-8')
IN_SHA256 = {'1394': '43b86b36c04e27c5b5d3dd133d0861eda6bfb10f4ddb610101ff798191afe5f5', '1493': '958bd4e44b6545b426418a92407498b0997ea25a1e1e6af7dfaf6f3ebcbc98aa'}
OUT_SHA256 = {'1394': 'a62c1c77fce7dd16dbd6c9246b42e62f0e3472ad04b5f66916405170f8803bd6', '1493': 'ded7cb36a3beb9ed7dd3c3342fe4fd74f48cf26c6e5b7bd90942b03b8448501b'}
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == IN_SHA256[pr], f'not the decoded train_gpt.py of record #{pr} at 4908dc46f'
SDPA = ("def flash_attn_3_func(q,k,v,causal=False):return F.scaled_dot_product_attention("
        "q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),is_causal=causal,enable_gqa=True).transpose(1,2)")
SUBS = [
 ("FlashAttention-3 import -> SDPA on (B,H,T,D)-transposed tensors, is_causal, enable_gqa; output transposed back to FA3's (B,T,H,D)",
  "from flash_attn_interface import flash_attn_func as flash_attn_3_func", SDPA, 1),
 ("@torch.compile decorator on zeropower_via_newtonschulz5 -> removed (identity)", "@torch.compile\n", "", 1),
 ("torch.compile(base_model,...) -> base_model", "torch.compile(base_model,dynamic=False,fullgraph=True)", "base_model", 1),
 ("torch.compile(base_model.forward_logits,...) -> base_model.forward_logits", "torch.compile(base_model.forward_logits,dynamic=False,fullgraph=True)", "base_model.forward_logits", None),
 ("torch.compile(eval_model,...) -> eval_model", "torch.compile(eval_model,dynamic=False,fullgraph=True)", "eval_model", 1),
 ("torch.cuda.synchronize() -> no-op expression `None`", "torch.cuda.synchronize()", "None", 5),
 ("torch.cuda.empty_cache() -> no-op expression `None`", "torch.cuda.empty_cache()", "None", None),
 ("torch.cuda.max_memory_allocated() -> 0", "torch.cuda.max_memory_allocated()", "0", 1),
 ("torch.cuda.max_memory_reserved() -> 0", "torch.cuda.max_memory_reserved()", "0", 1),
 ("CUDA-required check removed", "\tif not torch.cuda.is_available():raise RuntimeError('CUDA is required')\n", "", 1),
 ("main(): device cuda:local_rank + set_device -> cpu", "device=torch.device('cuda',local_rank);torch.cuda.set_device(device)", "device=torch.device('cpu')", 1),
 ("process group nccl -> gloo (no device_id)", "dist.init_process_group(backend='nccl',device_id=device)", "dist.init_process_group(backend='gloo')", 1),
 ("serialize(): Hessian-collection device cuda -> cpu", "device=torch.device('cuda',h.local_rank)", "device=torch.device('cpu')", 1),
 ("DDP without device_ids", "DDP(compiled_model,device_ids=[h.local_rank],broadcast_buffers=False)", "DDP(compiled_model,broadcast_buffers=False)", 1),
 ("bf16 autocast (enabled=True) -> cpu autocast enabled=False", "torch.autocast(device_type='cuda',dtype=torch.bfloat16,enabled=True)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", 2),
 ("bf16 autocast (default enabled) -> cpu autocast enabled=False", "torch.autocast(device_type='cuda',dtype=torch.bfloat16)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", None),
 ("model .bfloat16() casts (train model and deserialized eval model) -> kept fp32", "GPT(h).to(device).bfloat16()", "GPT(h).to(device)", 2),
 ("nvidia-smi subprocess -> fixed string", "subprocess.run(['nvidia-smi'],stdout=subprocess.PIPE,stderr=subprocess.PIPE,text=True,check=False).stdout", "'nvidia-smi: not run (CPU reference run)'", 1),
]
if pr == '1493':
    SUBS += [
     ("Python 3.12-only f-string (same quotes nested) rewritten for 3.11: \", \".join -> ', '.join (identical output)",
      "log(f\"  {cat}: {\", \".join(sorted(categories[cat]))}\")", "log(f\"  {cat}: {', '.join(sorted(categories[cat]))}\")", 1),
     ("Python 3.12-only f-string rewritten for 3.11: glob(\"fineweb_train_*.bin\") -> glob('fineweb_train_*.bin') (identical output)",
      "glob(\"fineweb_train_*.bin\")))}\")", "glob('fineweb_train_*.bin')))}\")", 1),
    ]
rows = []
for why, old, new, n in SUBS:
    c = s.count(old)
    assert (c >= 0 if n is None else c == n), (why, c, n)
    if c == 0: continue
    s = s.replace(old, new)
    rows.append((why, old, new, c))
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == OUT_SHA256[pr], 'output differs from the one the references were made with'
open(out_path, 'w', encoding='utf-8').write(s)
compile(s, out_path, 'exec')
for kw in ('flash_attn_interface', 'torch.compile', "'cuda'", 'nccl', 'device_ids', '.to(device).bfloat16()', 'nvidia-smi\'],', 'torch.cuda.synchronize', 'torch.cuda.empty_cache', 'max_memory'):
    assert kw not in s, kw
def md(x): return '`' + x.replace('\n', '\\n').replace('`', "'") + '`' if x else '(removed)'
print('| # | what | original text | replacement | count |')
print('|---|---|---|---|---|')
for i, (why, old, new, c) in enumerate(rows, 1):
    print(f"| {i} | {why} | {md(old)} | {md(new)} | {c} |")

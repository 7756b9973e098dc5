"""Make a CPU copy of PR #1392's train_gpt.py by exact text substitution (how pr1392.json's 8-process case was made).

Usage: make_cpu_pr1392.py PR1392_TRAIN_GPT.py OUT.py   (prints the substitution table, in markdown)

The input is records/track_10min_16mb/2026-04-05_SP4096_DepthRecur_ParallelResid_Brotli/train_gpt.py at
refs/pull/1392/head of openai/parameter-golf (commit 46b43b328ea6):
  git -C parameter-golf fetch origin pull/1392/head:pr1392
  git -C parameter-golf show pr1392:records/track_10min_16mb/2026-04-05_SP4096_DepthRecur_ParallelResid_Brotli/train_gpt.py > pr1392.py
Only device and precision plumbing changes; every substitution is exact text with its expected count, and the
input and output are checked by sha256 so a different script is refused rather than patched differently.
"""
import hashlib
import sys
src_path, out_path = sys.argv[1], sys.argv[2]
s = open(src_path, encoding='utf-8').read()
IN_SHA256 = '9d3463a36d19d4303a7adb7a172b8d4f707bb422c7eaadced1489c8bf98f1ec6'
OUT_SHA256 = '4c4448f87601fb58b90221352f851c68ba3e3ba9ed87a2e9f3dcf8912c9aef13'
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == IN_SHA256, 'not the script of refs/pull/1392/head (46b43b328ea6)'
SDPA = ("try:\n\tdef flash_attn_3_func(q,k,v,causal=False):return F.scaled_dot_product_attention("
        "q.transpose(1,2),k.transpose(1,2),v.transpose(1,2),is_causal=causal,enable_gqa=True).transpose(1,2)\n\tHAS_FA3=_B")
SUBS = [
 ("FlashAttention-3 import -> SDPA on (B,H,T,D)-transposed tensors, is_causal, enable_gqa; output transposed back to FA3's (B,T,H,D); HAS_FA3 stays True",
  "try:from flash_attn_interface import flash_attn_func as flash_attn_3_func;HAS_FA3=_B", SDPA, 1),
 ("torch.compile(model,...) -> model (the training model)", "torch.compile(B,dynamic=_C,fullgraph=_B)", "B", 1),
 ("torch.compile(model,...) -> model (the deserialized model of the final evaluation)", "torch.compile(H,dynamic=_C,fullgraph=_B)", "H", 1),
 ("torch.compile(forward_logits) -> forward_logits (evaluation helpers)", "torch.compile(M.forward_logits,dynamic=_C,fullgraph=_B)", "M.forward_logits", 1),
 ("torch.compile(forward_logits) -> forward_logits (evaluation helpers)", "torch.compile(B.forward_logits,dynamic=_C,fullgraph=_B)", "B.forward_logits", 1),
 ("torch.cuda.synchronize() -> no-op expression `None`", "torch.cuda.synchronize()", "None", 13),
 ("torch.cuda.empty_cache() -> no-op expression `None`", "torch.cuda.empty_cache()", "None", 2),
 ("torch.cuda.max_memory_allocated() -> 0", "torch.cuda.max_memory_allocated()", "0", 1),
 ("torch.cuda.max_memory_reserved() -> 0", "torch.cuda.max_memory_reserved()", "0", 1),
 ("CUDA-required check removed", "\tif not torch.cuda.is_available():raise RuntimeError('CUDA is required')\n", "", 1),
 ("main(): device cuda:local_rank + set_device -> cpu", "E=torch.device(_I,BR);torch.cuda.set_device(E)", "E=torch.device('cpu')", 1),
 ("process group nccl -> gloo (no device_id)", "dist.init_process_group(backend='nccl',device_id=E)", "dist.init_process_group(backend='gloo')", 1),
 ("bf16 autocast (enabled=True) -> cpu autocast enabled=False", "torch.autocast(device_type=_I,dtype=torch.bfloat16,enabled=_B)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", 3),
 ("bf16 autocast (default enabled) -> cpu autocast enabled=False", "torch.autocast(device_type=_I,dtype=torch.bfloat16)", "torch.autocast(device_type='cpu',dtype=torch.bfloat16,enabled=False)", 7),
 ("model .bfloat16() casts (train model, Hessian model, deserialized eval model) -> kept fp32", "trigram=A.trigram_enabled).to(E).bfloat16()", "trigram=A.trigram_enabled).to(E)", 3),
 ("nvidia-smi subprocess -> fixed string", "subprocess.run(['nvidia-smi'],stdout=subprocess.PIPE,stderr=subprocess.PIPE,text=_B,check=_C).stdout", "'nvidia-smi: not run (CPU reference run)'", 1),
]
rows = []
for why, old, new, n in SUBS:
    c = s.count(old)
    assert c == n, (why, c, n)
    s = s.replace(old, new)
    rows.append((why, old, new, c))
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == OUT_SHA256
open(out_path, 'w', encoding='utf-8').write(s)
compile(s, out_path, 'exec')
for kw in ('flash_attn_interface', 'torch.compile(', 'device_type=_I', 'nccl', '.to(E).bfloat16()', "nvidia-smi'],", 'torch.cuda.synchronize', 'torch.cuda.empty_cache', 'max_memory', 'torch.cuda.set_device'):
    assert kw not in s, kw
def md(x): return '`' + x.replace('\n', '\\n').replace('\t', '\\t').replace('`', "'") + '`' if x else '(removed)'
print('| # | what | original text | replacement | count |')
print('|---|---|---|---|---|')
for i, (why, old, new, c) in enumerate(rows, 1):
    print(f"| {i} | {why} | {md(old)} | {md(new)} | {c} |")

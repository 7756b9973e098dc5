"""Make a CPU copy of the #1218 record's train_gpt.py by exact text substitution (how pr1218.json was made).

Usage: make_cpu_pr1218.py PR1218_TRAIN_GPT.py OUT.py   (prints the substitution table, in markdown)

The input is records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085/train_gpt.py of openai/parameter-golf
at HEAD 4908dc46f (plain source, no lzma/b85 wrapper):
  git -C parameter-golf show HEAD:records/track_10min_16mb/2026-04-01_Vocab4096_MLPMult4_WD085/train_gpt.py > pr1218.py
Only device and precision plumbing changes; every substitution is exact text with its expected count, and the
input and output are checked by sha256 so a different script is refused rather than patched differently.

How the runs were made (from a scratch directory, so that the script's own paths resolve):
  mkdir -p data/datasets data/tokenizers
  ln -s <repo>/tests/data/fixture_sp4096 data/datasets/fineweb10B_sp4096
  ln -s <repo>/pgolf_core/sample/fineweb_4096_bpe.model data/tokenizers/fineweb_4096_bpe.model
  env <the case's env upper-cased> ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 python OUT.py             # 1 process
  env ... torchrun --standalone --nproc_per_node=2 OUT.py                                                 # 2 processes
DATA_DIR is left at the script's default './data/': the coprime-stride loader seeds its RNG from the shard paths
as the script sees them ('data/datasets/fineweb10B_sp4096/fineweb_train_00000N.bin'), exactly as in the record's
own runs; pgolf's `coprime_stride` loader hashes the same names (its `seed_dir`).
"""
import hashlib
import sys
src_path, out_path = sys.argv[1], sys.argv[2]
s = open(src_path, encoding='utf-8').read()
IN_SHA256 = 'f10534f2ab37ff4274f0ebcc2c49c5140e54250c5aa809afe4ad71975897651f'
OUT_SHA256 = '2d78fbf39f6aef88bf470212a7918d2c5c3fe6c3f5c5637da9bb854fbdd3b76f'
assert hashlib.sha256(s.encode('utf-8')).hexdigest() == IN_SHA256, 'not the #1218 record script of openai/parameter-golf HEAD 4908dc46f'
SDPA = ("def flash_attn_3_func(q, k, v, causal=False):\n"
        "    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True).transpose(1, 2)")
SUBS = [
 ("FlashAttention-3 import -> SDPA on (B,H,T,D)-transposed tensors, is_causal, enable_gqa; output transposed back to FA3's (B,T,H,D)",
  "from flash_attn_interface import flash_attn_func as flash_attn_3_func", SDPA, 1),
 ("@torch.compile on Newton-Schulz -> removed (eager)", "@torch.compile\ndef zeropower_via_newtonschulz5", "def zeropower_via_newtonschulz5", 1),
 ("torch.compile(base_model) -> base_model (training model)", "compiled_model = torch.compile(base_model, dynamic=False, fullgraph=True)", "compiled_model = base_model", 1),
 ("torch.compile(eval_model) -> eval_model (final evaluation)", "compiled_model = torch.compile(eval_model, dynamic=False, fullgraph=True)", "compiled_model = eval_model", 1),
 ("torch.compile(forward_logits) -> forward_logits (sliding window)", "logits_fn = torch.compile(base_model.forward_logits, dynamic=False, fullgraph=True)", "logits_fn = base_model.forward_logits", 1),
 ("torch.cuda.synchronize() -> no-op expression `None`", "torch.cuda.synchronize()", "None", 5),
 ("torch.cuda.max_memory_allocated() -> 0", "torch.cuda.max_memory_allocated()", "0", 1),
 ("torch.cuda.max_memory_reserved() -> 0", "torch.cuda.max_memory_reserved()", "0", 1),
 ("CUDA-required check removed", "    if not torch.cuda.is_available():\n        raise RuntimeError(\"CUDA is required\")\n", "", 1),
 ("main(): device cuda:local_rank + set_device -> cpu", "    device = torch.device(\"cuda\", local_rank)\n    torch.cuda.set_device(device)\n", "    device = torch.device(\"cpu\")\n", 1),
 ("process group nccl -> gloo (no device_id)", "dist.init_process_group(backend=\"nccl\", device_id=device)", "dist.init_process_group(backend=\"gloo\")", 1),
 ("DDP without device_ids", "DDP(compiled_model, device_ids=[h.local_rank], broadcast_buffers=False)", "DDP(compiled_model, broadcast_buffers=False)", 1),
 ("GPTQ calibration loader and Hessians on cuda:local_rank -> cpu", "torch.device(\"cuda\", h.local_rank)", "torch.device(\"cpu\")", 2),
 ("bf16 autocast (enabled=True) -> cpu autocast enabled=False", "torch.autocast(device_type=\"cuda\", dtype=torch.bfloat16, enabled=True)", "torch.autocast(device_type=\"cpu\", dtype=torch.bfloat16, enabled=False)", 2),
 ("bf16 autocast (default enabled) -> cpu autocast enabled=False", "torch.autocast(device_type=\"cuda\", dtype=torch.bfloat16)", "torch.autocast(device_type=\"cpu\", dtype=torch.bfloat16, enabled=False)", 1),
 ("model .bfloat16() casts (train model, deserialized eval model) -> kept fp32", "GPT(h).to(device).bfloat16()", "GPT(h).to(device)", 2),
 ("nvidia-smi subprocess -> fixed string", "subprocess.run([\"nvidia-smi\"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False).stdout", "'nvidia-smi: not run (CPU reference run)'", 1),
]
rows = []
for why, old, new, n in SUBS:
    c = s.count(old)
    assert c == n, (why, c, n)
    s = s.replace(old, new)
    rows.append((why, old, new, c))
out_sha = hashlib.sha256(s.encode('utf-8')).hexdigest()
assert out_sha == OUT_SHA256, out_sha
open(out_path, 'w', encoding='utf-8').write(s)
compile(s, out_path, 'exec')
for kw in ('flash_attn_interface', 'torch.compile', 'device_type="cuda"', 'nccl', 'GPT(h).to(device).bfloat16()', '"nvidia-smi"', 'torch.cuda.synchronize', 'max_memory', 'torch.cuda.set_device', 'device_ids'):
    assert kw not in s, kw
def md(x): return '`' + x.replace('\n', '\\n').replace('\t', '\\t').replace('`', "'") + '`' if x else '(removed)'
print('| # | what | original text | replacement | count |')
print('|---|---|---|---|---|')
for i, (why, old, new, c) in enumerate(rows, 1):
    print(f"| {i} | {why} | {md(old)} | {md(new)} | {c} |")

"""``pgolf data download``: fetch the published FineWeb shards and tokenizer from the Hugging Face Hub and say
how to point a stack at them; ``data`` is a command group so other data commands can join it."""

from __future__ import annotations

import argparse
import os
import sys


def cmd_data_download(args: argparse.Namespace) -> int:
    from ..download import HubSource, download

    source = HubSource(args.repo_id, args.remote_root, args.revision, args.endpoint, args.cache_dir)
    result = download(args.variant, args.train_shards, args.dir, source, log=lambda line: print(line, file=sys.stderr))
    n = len(result.fetched) + len(result.kept)
    print(f"data ready: {n} files ({len(result.fetched)} downloaded, {len(result.kept)} already present and verified)")
    tokenizer = f', data.tokenizer = "{result.tokenizer_path}"' if result.tokenizer_path else ""
    print(f'use it in a stack: data.path = "{result.dataset_dir}"{tokenizer}')
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", help="challenge data: download shards and tokenizers")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dl = data_sub.add_parser(
        "download", parents=[common],
        help="fetch the published FineWeb shards and tokenizer from the Hugging Face Hub (network; ~16 GB by default)",
        description="Downloads the challenge's FineWeb shards and tokenizer from the Hugging Face Hub: this needs the network, "
        "and the default of 80 training shards (8B tokens, ~200 MB each) is about 16 GB on disk; --train-shards 1 "
        "fetches ~0.2 GB. Offline, any stack runs at toy size on the built-in samples instead: pgolf run STACK --toy.",
    )
    dl.add_argument("--variant", default="sp1024", help="sp1024, sp4096, sp8192 (sp<VOCAB_SIZE>) or byte260 (default sp1024); sp8192 comes from kevclark/parameter-golf, as the SP8192 records name it")
    dl.add_argument("--train-shards", type=int, default=80, help="training shards, a prefix of the export (default 80 = 8B tokens, ~16 GB; each shard ~200 MB)")
    dl.add_argument("--dir", default="data", help="destination; files land in DIR/datasets/ and DIR/tokenizers/ (default ./data)")
    dl.add_argument("--endpoint", help="Hub base URL (default: $HF_ENDPOINT or https://huggingface.co)")
    dl.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"), help="dataset repo (default: the variant's: kevclark/parameter-golf for sp8192, else willdepueoai/parameter-golf)")
    dl.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets"), help="export root inside the repo")
    dl.add_argument("--revision", help="branch, tag or commit of the dataset repo (default: main)")
    dl.add_argument("--cache-dir", help="Hugging Face cache directory (default: the Hub's own)")
    dl.set_defaults(func=cmd_data_download)

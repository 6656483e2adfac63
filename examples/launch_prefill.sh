#!/usr/bin/env bash
# A prefill instance: computes prompts' KV and pushes it, layer by layer, into decode instances.
#   MODEL=Qwen/Qwen2.5-7B-Instruct CUDA_VISIBLE_DEVICES=0 examples/launch_prefill.sh
# Settings: see examples/_instance.sh.
KV_ROLE=kv_producer
PORT=${PORT:-8100}
# shellcheck source=examples/_instance.sh
source "$(dirname "$0")/_instance.sh"
